"""Make docs/images/demo_example.jpg from a finished `make demo`:

    python docs/images/make_demo_example.py demo_output/result/ensemble_ravel docs/images/demo_example.jpg

One row per defect type (its first test image): the image, the ground truth, the nb_coor heat
map and the heat map with the predicted region, as analysis_amap.py --visualize drew them.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ROWS = (
    ("texture", "scratch"),
    ("layered", "misplaced"),
    ("layered", "shifted"),
    ("stripes", "inconsistent"),
    ("board", "moved"),
)
COLUMNS = ("", "_img_with_gt", "_amap", "_heatmap_on_img_with_mask")  # suffixes in viz/<category>/
SIDE, GAP, LABEL_WIDTH = 128, 4, 100


def main(ravel: Path, out: Path) -> None:
    with open(ravel / "index.csv", newline="") as fh:
        index = list(csv.DictReader(fh))
    width = LABEL_WIDTH + len(COLUMNS) * SIDE + (len(COLUMNS) - 1) * GAP
    canvas = Image.new("RGB", (width, len(ROWS) * SIDE + (len(ROWS) - 1) * GAP), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (category, defect) in enumerate(ROWS):
        i = int(next(e["index"] for e in index if e["category"] == category and e["defect_type"] == defect))
        y = r * (SIDE + GAP)
        draw.text((4, y + SIDE // 2 - 12), f"{category}/\n{defect}", fill="black", font=ImageFont.load_default())
        for c, suffix in enumerate(COLUMNS):
            tile = Image.open(ravel / "viz" / category / f"{i:05d}{suffix}.png").convert("RGB")
            canvas.paste(tile.resize((SIDE, SIDE)), (LABEL_WIDTH + c * (SIDE + GAP), y))
    canvas.save(out, quality=90)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
