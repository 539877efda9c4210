"""A small built-in anomaly dataset in the MVTec AD layout, made offline.

Everything is derived from scikit-image's bundled sample images (``skimage.data``:
brick, grass, gravel), so nothing is downloaded. {count_word} categories, each probing one
part of PNI (this list and the dataset's ``README.txt`` are generated from
:data:`CATEGORY_TABLE`):

{category_list}

Usage: ``python -m pni.data.synthetic --output_path DIR`` or :func:`make_dataset`.
The same settings and seed give byte-identical files.
"""

from __future__ import annotations

import os
import shutil
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from pni.cli import ArgumentParser, exit_with, run_cli
from pni.errors import PNIError
from pni.io import atomic_path, load_json, save_json

FORMAT_VERSION = 1
SETTINGS_FILE = "synthetic.json"


@dataclass(frozen=True)
class CategorySpec:
    """One category of the dataset, as users read about it.

    ``normal``: what the normal images look like. ``defects``: each defect type (its
    ``test/<type>`` folder) -> what it is, a phrase without the final full stop; their order is
    the generation order (it seeds the random streams: do not reorder). ``found_by``: which
    part of PNI can flag the defects, and why.
    """

    name: str
    normal: str
    defects: dict[str, str]
    found_by: str


# The one description of the categories: the module docstring, README.txt and CATEGORIES
# are made from it.
CATEGORY_TABLE: tuple[CategorySpec, ...] = (
    CategorySpec(
        name="texture",
        normal="Random crops of the gravel texture (random flips, 90-degree rotations, +-8% brightness), "
        "tinted sand colour.",
        defects={
            "hole": "a dark elliptical blob",
            "scratch": "a thin (about 3 px at 128) straight line, bright or dark",
            "stain": "an irregular blue, green or purple blob",
        },
        found_by="Local defects: any patch-level model should find them.",
    ),
    CategorySpec(
        name="layered",
        normal="Brick texture (red) in the top half, grass (green) in the bottom half; the boundary moves by "
        "a few pixels between images.",
        defects={
            "misplaced": "a square patch of brick pasted inside the grass half, or of grass inside the brick half",
            "shifted": "the brick/grass boundary sits a quarter of the image higher or lower than usual",
        },
        found_by="Every local view is normal, the boundary included: only the position (a position prior) "
        "tells. The borders of a misplaced patch are seams never seen in training, so patch-level models "
        "find those.",
    ),
    CategorySpec(
        name="stripes",
        normal="Sinusoidal stripes (period about a tenth of the image, random phase, gravel-modulated, "
        "blue-grey). Each image is all horizontal or all vertical; training images alternate between the two.",
        defects={"inconsistent": "a square region with the other orientation"},
        found_by="Locally normal and anywhere in the image: only the neighbourhood tells.",
    ),
    CategorySpec(
        name="board",
        normal="A gravel plate (grey) with one dark, grainy round component (diameter about 16% of the image) "
        "top-left or bottom-right of the centre: two product variants, each about half of the images.",
        defects={"moved": "the component top-right or bottom-left of the centre, where it never is"},
        found_by="Every local view of the image occurs in training, only at other positions, and the component "
        "stays about 30% of the image away from the border (where zero padding makes features "
        "position-aware): only the position tells.",
    ),
)
# Category -> defect types (normal test images go to test/good).
CATEGORIES: dict[str, tuple[str, ...]] = {spec.name: tuple(spec.defects) for spec in CATEGORY_TABLE}

_NUMBER_WORDS = ("No", "One", "Two", "Three", "Four", "Five", "Six", "Seven", "Eight", "Nine", "Ten")


def _count_word(n: int) -> str:
    """``4`` -> ``"Four"``, to start a sentence (digits beyond ten)."""
    return _NUMBER_WORDS[n] if 0 <= n < len(_NUMBER_WORDS) else str(n)


def _docstring_categories(table: tuple[CategorySpec, ...]) -> str:
    """The category list of the module docstring: one reST bullet per category."""
    items = []
    for spec in table:
        defects = "; ".join(f"``{name}``, {what}" for name, what in spec.defects.items())
        text = f"``{spec.name}``: {spec.normal} Defects: {defects}. {spec.found_by}"
        items.append(textwrap.fill(text, width=88, initial_indent="- ", subsequent_indent="  ", break_on_hyphens=False))
    return "\n".join(items)


def _readme_categories(table: tuple[CategorySpec, ...] = CATEGORY_TABLE) -> str:
    """The "Categories" section of the dataset's README.txt: name column, then the normal
    images, each defect type and what finds the defects, wrapped at 80 columns."""
    column = max(len(spec.name) for spec in table) + 2
    indent = " " * column

    def fill(text: str, first: str, rest: str) -> str:
        return textwrap.fill(
            text, width=80, initial_indent=first, subsequent_indent=rest, break_on_hyphens=False, break_long_words=False
        )

    blocks = []
    for spec in table:
        lines = [fill(spec.normal, spec.name.ljust(column), indent)]
        width = max(len(name) for name in spec.defects) + 2
        for name, what in spec.defects.items():
            lines.append(fill(f"{what}.", indent + f"{name}:".ljust(width), indent + " " * width))
        lines.append(fill(spec.found_by, indent, indent))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


if __doc__:  # None under python -OO
    __doc__ = __doc__.format(
        count_word=_count_word(len(CATEGORY_TABLE)), category_list=_docstring_categories(CATEGORY_TABLE)
    )

_SOURCE_CROP = 256  # source pixels per crop side: the texture scale is the same at any image size

_TEXTURE_TINT = np.array([0.86, 0.76, 0.60])
_BRICK_TINT = np.array([0.80, 0.42, 0.30])
_GRASS_TINT = np.array([0.42, 0.68, 0.30])
_STRIPE_TINT = np.array([0.62, 0.68, 0.86])
_BOARD_TINT = np.array([0.70, 0.72, 0.66])
# board: component centres as fractions of the image side (row, col); diameter likewise
_BOARD_NORMAL = ((0.375, 0.375), (0.625, 0.625))
_BOARD_MOVED = ((0.375, 0.625), (0.625, 0.375))
_BOARD_COMPONENT = 20 / 128
_STAIN_COLOURS = np.array([[0.15, 0.30, 0.85], [0.20, 0.70, 0.25], [0.60, 0.15, 0.65]])

Array = np.ndarray


# ----------------------------------------------------------------------------- sources


def _load_sources() -> dict[str, Array]:
    """Bundled grayscale textures, each 512x512 float32 stretched to [0, 1]."""
    try:
        import skimage.data as skdata

        raw = {"brick": skdata.brick(), "grass": skdata.grass(), "gravel": skdata.gravel()}
    except Exception as exc:  # missing package or data file: say so in one line
        raise PNIError(f"cannot load scikit-image sample textures (brick, grass, gravel): {exc}") from exc
    out = {}
    for name, img in raw.items():
        a = np.asarray(img, dtype=np.float64)
        lo, hi = np.percentile(a, [1.0, 99.0])
        out[name] = np.clip((a - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)
    return out


def _resize(arr: Array, h: int, w: int) -> Array:
    """Bilinear resize of a float HxW array (PIL, deterministic)."""
    img = Image.fromarray(np.ascontiguousarray(arr, dtype=np.float32))
    return np.asarray(img.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)


def _texture_crop(rng: np.random.Generator, src: Array, size: int, flips: bool = True) -> Array:
    """Random ``_SOURCE_CROP`` crop of ``src`` resized to size x size, mildly augmented."""
    c = min(_SOURCE_CROP, src.shape[0], src.shape[1])
    y = int(rng.integers(0, src.shape[0] - c + 1))
    x = int(rng.integers(0, src.shape[1] - c + 1))
    crop = src[y : y + c, x : x + c]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if flips:
        if rng.random() < 0.5:
            crop = crop[::-1, :]
        crop = np.rot90(crop, int(rng.integers(0, 4)))
    gain = rng.uniform(0.92, 1.08)
    return np.clip(_resize(crop, size, size) * gain, 0.0, 1.0)


def _colourise(gray: Array, tint: Array) -> Array:
    """HxW in [0,1] -> HxWx3: tinted, with a floor so dark areas keep some colour."""
    return (0.08 + 0.92 * gray[..., None]) * tint[None, None, :]


def _to_uint8(img: Array) -> Array:
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- shapes


def _grid(size: int) -> tuple[Array, Array]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    return yy, xx


def _margin(size: int) -> int:
    # Keep defects well inside the image so that centre crops (e.g. 112 of 128) keep them.
    return int(np.ceil(0.12 * size))


def _segment_mask(size: int, p0: Array, p1: Array, half_width: float) -> Array:
    """Pixels within ``half_width`` of the segment p0-p1 (points as (y, x))."""
    yy, xx = _grid(size)
    d = p1 - p0
    t = ((yy - p0[0]) * d[0] + (xx - p0[1]) * d[1]) / max(float(d @ d), 1e-9)
    t = np.clip(t, 0.0, 1.0)
    dist2 = (yy - p0[0] - t * d[0]) ** 2 + (xx - p0[1] - t * d[1]) ** 2
    return dist2 <= half_width**2


def _ellipse_mask(size: int, centre: Array, radii: Array, angle: float) -> Array:
    yy, xx = _grid(size)
    dy, dx = yy - centre[0], xx - centre[1]
    ca, sa = np.cos(angle), np.sin(angle)
    u = (ca * dx + sa * dy) / radii[1]
    v = (-sa * dx + ca * dy) / radii[0]
    return u * u + v * v <= 1.0


def _centre(rng: np.random.Generator, size: int, extent: float) -> Array:
    lo = _margin(size) + extent
    hi = size - 1 - _margin(size) - extent
    return rng.uniform(lo, max(lo, hi), size=2)


# ----------------------------------------------------------------------------- categories


def _texture_image(rng: np.random.Generator, src: dict[str, Array], size: int, defect: str) -> tuple[Array, Array]:
    """Gravel texture; defects scratch (thin line), hole (dark blob), stain (colour blob)."""
    img = _colourise(_texture_crop(rng, src["gravel"], size), _TEXTURE_TINT)
    img = np.clip(img + rng.normal(0.0, 0.01, img.shape), 0.0, 1.0)
    mask = np.zeros((size, size), dtype=bool)
    if defect == "scratch":
        length = rng.uniform(0.3, 0.55) * size
        c = _centre(rng, size, length / 2)
        angle = rng.uniform(0.0, np.pi)
        half = 0.5 * length * np.array([np.sin(angle), np.cos(angle)])
        mask = _segment_mask(size, c - half, c + half, max(1.0, 1.5 * size / 128))
        value = 0.97 if rng.random() < 0.5 else 0.05
        img[mask] = value
    elif defect == "hole":
        radii = rng.uniform(0.05, 0.09, size=2) * size
        mask = _ellipse_mask(size, _centre(rng, size, radii.max()), radii, rng.uniform(0, np.pi))
        img[mask] *= 0.15
    elif defect == "stain":
        r = rng.uniform(0.06, 0.09) * size
        c = _centre(rng, size, 2 * r)
        for _ in range(3):  # a few overlapping ellipses: an irregular blob
            offset = rng.uniform(-0.7, 0.7, size=2) * r
            radii = rng.uniform(0.6, 1.0, size=2) * r
            mask |= _ellipse_mask(size, c + offset, radii, rng.uniform(0, np.pi))
        colour = _STAIN_COLOURS[int(rng.integers(0, len(_STAIN_COLOURS)))]
        img[mask] = 0.35 * img[mask] + 0.65 * colour
    return img, mask


def _layered_image(rng: np.random.Generator, src: dict[str, Array], size: int, defect: str) -> tuple[Array, Array]:
    """Brick above grass (boundary jittered a little); ``misplaced`` pastes one in the other,
    ``shifted`` moves the whole boundary up or down (the band between the normal and the
    shifted boundary is the defect: every local view of it is a normal one)."""
    brick = _colourise(_texture_crop(rng, src["brick"], size, flips=False), _BRICK_TINT)
    grass = _colourise(_texture_crop(rng, src["grass"], size, flips=False), _GRASS_TINT)
    jitter = max(1, size // 32)
    boundary = size // 2 + int(rng.integers(-jitter, jitter + 1))
    mask = np.zeros((size, size), dtype=bool)
    if defect == "shifted":
        shift = int(rng.integers(size // 5, size // 4 + 1)) * (1 if rng.random() < 0.5 else -1)
        mask[min(boundary, boundary + shift) : max(boundary, boundary + shift)] = True
        boundary += shift
    top = np.arange(size)[:, None] < boundary
    img = np.where(top[..., None], brick, grass)
    if defect == "misplaced":
        p = int(rng.integers(size // 5, size // 4 + 1))
        m, gap = _margin(size), max(2, size // 64)
        x = int(rng.integers(m, size - m - p + 1))
        if rng.random() < 0.5:  # brick in the grass half
            y = int(rng.integers(boundary + gap, max(boundary + gap, size - m - p) + 1))
            donor = _colourise(_texture_crop(rng, src["brick"], size, flips=False), _BRICK_TINT)
        else:  # grass in the brick half
            y = int(rng.integers(min(m, boundary - gap - p), boundary - gap - p + 1))
            donor = _colourise(_texture_crop(rng, src["grass"], size, flips=False), _GRASS_TINT)
        mask[y : y + p, x : x + p] = True
        img[mask] = donor[mask]
    img = np.clip(img + rng.normal(0.0, 0.01, img.shape), 0.0, 1.0)
    return img, mask


def _stripes(size: int, period: float, phase: float, vertical: bool, modulation: Array) -> Array:
    coord = np.arange(size, dtype=np.float64)
    wave = 0.5 + 0.4 * np.sin(2 * np.pi * coord / period + phase)
    field = np.broadcast_to(wave[None, :] if vertical else wave[:, None], (size, size))
    return field * (0.8 + 0.4 * (modulation - 0.5))


def _stripes_image(
    rng: np.random.Generator, src: dict[str, Array], size: int, defect: str, vertical: bool
) -> tuple[Array, Array]:
    """Stripes of one orientation; ``inconsistent`` holds a square of the other one."""
    period = size / 10.0 * rng.uniform(0.95, 1.05)
    modulation = _texture_crop(rng, src["gravel"], size)
    gray = _stripes(size, period, rng.uniform(0, 2 * np.pi), vertical, modulation)
    mask = np.zeros((size, size), dtype=bool)
    if defect == "inconsistent":
        p = int(rng.integers(size // 4, size // 3 + 1))
        m = _margin(size)
        y, x = (int(v) for v in rng.integers(m, size - m - p + 1, size=2))
        mask[y : y + p, x : x + p] = True
        other = _stripes(size, period, rng.uniform(0, 2 * np.pi), not vertical, modulation)
        gray = np.where(mask, other, gray)
    img = _colourise(np.clip(gray, 0.0, 1.0), _STRIPE_TINT)
    img = np.clip(img + rng.normal(0.0, 0.01, img.shape), 0.0, 1.0)
    return img, mask


def _board_image(rng: np.random.Generator, src: dict[str, Array], size: int, defect: str) -> tuple[Array, Array]:
    """Gravel plate with one dark, textured round component at a normal place (randomly one of
    ``_BOARD_NORMAL``, jittered by 2/128 of the side); ``moved`` puts it at one of
    ``_BOARD_MOVED`` instead. The places are 32/128 apart (4 feature cells of layer2 at stride
    8) and the component is at least 38/128 from every border."""
    img = _colourise(_texture_crop(rng, src["gravel"], size), _BOARD_TINT)
    places = _BOARD_MOVED if defect == "moved" else _BOARD_NORMAL
    centre = np.array(places[int(rng.integers(0, len(places)))]) * size + rng.uniform(-1, 1, size=2) * size / 64
    radius = 0.5 * _BOARD_COMPONENT * size
    yy, xx = _grid(size)
    disc = (yy + 0.5 - centre[0]) ** 2 + (xx + 0.5 - centre[1]) ** 2 < radius**2
    surface = _texture_crop(rng, src["gravel"], size)  # the component's own grain
    darkness = rng.uniform(0.03, 0.15)
    img[disc] = ((0.5 + 0.5 * surface[..., None]) * darkness * np.ones(3))[disc]
    img = np.clip(img + rng.normal(0.0, 0.01, img.shape), 0.0, 1.0)
    return img, disc if defect == "moved" else np.zeros((size, size), dtype=bool)


# Category -> image generator ``(rng, sources, size, defect) -> (HxWx3 image, HxW mask)``;
# stripes also takes ``vertical``.
_GENERATORS: dict[str, Callable[..., tuple[Array, Array]]] = {
    "texture": _texture_image,
    "layered": _layered_image,
    "stripes": _stripes_image,
    "board": _board_image,
}


# ----------------------------------------------------------------------------- writing


def _save_png(path: Path, array: Array) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def _write_split(
    cat_root: Path,
    category: str,
    split: str,
    defect: str,
    count: int,
    rng: np.random.Generator,
    src: dict[str, Array],
    size: int,
) -> None:
    folder = cat_root / split / defect
    gen = _GENERATORS[category]
    flip_start = int(rng.integers(0, 2))
    for i in range(count):
        if category == "stripes":  # alternate orientations so both are always seen
            img, mask = gen(rng, src, size, defect, vertical=bool((i + flip_start) % 2))
        else:
            img, mask = gen(rng, src, size, defect)
        _save_png(folder / f"{i:03d}.png", _to_uint8(img))
        if defect != "good":
            if not mask.any():
                raise AssertionError(f"empty defect mask for {category}/{defect}/{i:03d}")
            _save_png(cat_root / "ground_truth" / defect / f"{i:03d}_mask.png", mask.astype(np.uint8) * 255)


_README = """PNI built-in synthetic dataset (MVTec AD layout)
=================================================

Made by `python -m pni.data.synthetic` from scikit-image's bundled sample images
(skimage.data brick, grass, gravel); nothing was downloaded.
Settings: image_size={image_size}, num_train={num_train}, num_test_per_type={num_test_per_type},
seed={seed}. The same settings give byte-identical files.

Layout: <category>/train/good/NNN.png, <category>/test/<type>/NNN.png,
<category>/ground_truth/<type>/NNN_mask.png (0 / 255, exact defect pixels).
Normal test images are in test/good. Defects stay at least 12% of the image
size away from the border, so centre crops (e.g. 112 of 128) keep them.

Categories
----------
{categories}"""


def make_dataset(
    output_path: str | os.PathLike,
    num_train: int = 16,
    num_test_per_type: int = 4,
    image_size: int = 128,
    seed: int = 0,
    categories: list[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the synthetic dataset under ``output_path`` and return that path.

    ``num_test_per_type`` images are made for each defect type and for ``test/good``.
    Category folders left by other settings are an error unless ``overwrite`` (which
    deletes those folders first). Also writes ``README.txt`` and ``synthetic.json``.
    """
    if num_train < 1 or num_test_per_type < 1:
        raise PNIError("--num_train and --num_test_per_type must be at least 1")
    if image_size < 32:
        raise PNIError(f"--image_size must be at least 32, got {image_size}")
    cats = list(CATEGORIES) if categories is None else list(categories)
    unknown = [c for c in cats if c not in CATEGORIES]
    if unknown:
        raise PNIError(f"unknown synthetic category '{unknown[0]}'; choose from {', '.join(CATEGORIES)}")
    root = Path(output_path)
    settings = {
        "format_version": FORMAT_VERSION,
        "image_size": int(image_size),
        "num_train": int(num_train),
        "num_test_per_type": int(num_test_per_type),
        "seed": int(seed),
    }
    previous = None
    if (root / SETTINGS_FILE).is_file():
        try:
            previous = load_json(root / SETTINGS_FILE)
        except (OSError, ValueError):
            previous = None
    if previous != settings:
        # Category folders from other settings (or of unknown origin) would mix with ours.
        stale = [c for c in CATEGORIES if (root / c).is_dir() and any((root / c).iterdir())]
        if stale and not overwrite:
            raise PNIError(
                f"{root / stale[0]} already exists with other settings; use another --output_path or --overwrite"
            )
        for c in stale:
            shutil.rmtree(root / c)

    src = _load_sources()
    # Settings first: an interrupted run can be completed by running again unchanged.
    save_json(root / SETTINGS_FILE, settings)
    for ci, cat in enumerate(CATEGORIES):
        if cat not in cats:
            continue
        cat_root = root / cat
        # One stream per (category, split, type): changing one count leaves the others alone.
        _write_split(
            cat_root, cat, "train", "good", num_train, np.random.default_rng([seed, ci, 0, 0]), src, image_size
        )
        for ti, defect in enumerate(("good",) + CATEGORIES[cat]):
            rng = np.random.default_rng([seed, ci, 1, ti])
            _write_split(cat_root, cat, "test", defect, num_test_per_type, rng, src, image_size)
    with atomic_path(root / "README.txt") as tmp:
        tmp.write_text(_README.format(categories=_readme_categories(), **settings))
    return root


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: ``python -m pni.data.synthetic --output_path DIR``; returns the exit code
    (2 with one ``error: ...`` line on bad flags or settings)."""
    parser = ArgumentParser(description="Write PNI's built-in synthetic dataset (MVTec layout).")
    parser.add_argument("--output_path", required=True, help="dataset root to write")
    parser.add_argument("--num_train", type=int, default=16, help="training images per category")
    parser.add_argument("--num_test_per_type", type=int, default=4, help="test images per type (and good)")
    parser.add_argument("--image_size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--categories", nargs="+", choices=list(CATEGORIES), default=None)
    parser.add_argument("--overwrite", action="store_true", help="replace categories made with other settings")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)

    def work() -> None:
        root = make_dataset(
            args.output_path,
            num_train=args.num_train,
            num_test_per_type=args.num_test_per_type,
            image_size=args.image_size,
            seed=args.seed,
            categories=args.categories,
            overwrite=args.overwrite,
        )
        print(f"wrote synthetic dataset to {root}")

    return run_cli(work, debug=args.debug)


if __name__ == "__main__":
    exit_with(main)
