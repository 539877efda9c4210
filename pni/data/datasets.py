"""MVTec AD, BTAD and VisA: file listing (``Sample`` records) and torch datasets.

Listing never decodes images, so callers can inspect the samples cheaply; decoding and
the transforms happen in :class:`AnomalyDataset`. Masks are paired with images by file
stem, never by sort order.
"""

from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from pni.data.images import IMAGE_EXTENSIONS, first_line, load_image
from pni.data.transforms import image_transform, load_mask, mask_transform
from pni.errors import PNIError
from pni.io import check_name

DATASET_CATEGORIES: tuple[str, ...] = ("MVTec", "BTAD", "VisA")
NORMAL = "good"
VISA_SPLIT_FILE = Path("split_csv") / "1cls.csv"


@dataclass(frozen=True)
class Sample:
    """One image of a split: where it is, its mask (None for normal images) and labels."""

    image_path: str
    mask_path: str | None
    label: int
    defect_type: str
    stem: str


class AnomalyDataset(Dataset):
    """Decodes and transforms a list of samples.

    Items are dicts: ``image`` float32 3xHxW (ImageNet-normalised), ``mask`` float32
    1xHxW in {0, 1}, ``label`` int, ``defect_type`` str, ``stem`` str, ``path`` str,
    with H = W = ``imagesize``.
    """

    def __init__(
        self,
        samples: list[Sample],
        resize: int = 512,
        imagesize: int = 480,
        binarize_masks: bool = True,
    ) -> None:
        self.samples = list(samples)
        self.resize = resize
        self.imagesize = imagesize
        self.binarize_masks = binarize_masks
        self._image_tf = image_transform(resize, imagesize)
        self._mask_tf = mask_transform(resize, imagesize)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def has_masks(self) -> bool:
        """Whether every defective sample has a mask (pixel-level ground truth)."""
        return all(s.mask_path is not None for s in self.samples if s.label)

    def __getitem__(self, index: int) -> dict:
        s = self.samples[index]
        pil = load_image(s.image_path)
        image = self._image_tf(pil)
        if s.mask_path is None:
            mask = torch.zeros((1, *image.shape[1:]), dtype=torch.float32)
        else:
            pil_mask = load_mask(s.mask_path, binarize=self.binarize_masks)
            if pil_mask.size != pil.size:
                raise PNIError(_size_mismatch(s, pil_mask.size, pil.size))
            mask = self._mask_tf(pil_mask)
        return {
            "image": image,
            "mask": mask,
            "label": int(s.label),
            "defect_type": s.defect_type,
            "stem": s.stem,
            "path": s.image_path,
        }


# ----------------------------------------------------------------------------- helpers


def _size_mismatch(s: Sample, mask_size: tuple[int, int], image_size: tuple[int, int]) -> str:
    return (
        f"mask {s.mask_path} is {mask_size[0]}x{mask_size[1]} but image {s.image_path} is "
        f"{image_size[0]}x{image_size[1]}"
    )


def _header_size(path: str) -> tuple[int, int]:
    """Width and height from an image file's header (nothing decoded)."""
    try:
        with Image.open(path) as img:
            return img.size
    except FileNotFoundError as exc:
        raise PNIError(f"image file not found: {path}") from exc
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise PNIError(f"cannot read image {path}: {first_line(exc)}") from exc


def check_mask_sizes(samples: list[Sample]) -> None:
    """Every mask has its image's size, read from the file headers (cheap: nothing is
    decoded), so that a wrong mask stops a run before training rather than at scoring."""
    for s in samples:
        if s.mask_path is not None:
            mask_size, image_size = _header_size(s.mask_path), _header_size(s.image_path)
            if mask_size != image_size:
                raise PNIError(_size_mismatch(s, mask_size, image_size))


def training_set_digest(samples: list[Sample], root: str | os.PathLike) -> str:
    """A digest of the training images for the settings records: their paths relative to the
    dataset root and their sizes in bytes (stat only; an image edited in place to the very
    same size goes unnoticed)."""
    h = hashlib.sha256()
    for s in samples:
        try:
            size = os.stat(s.image_path).st_size
        except OSError as exc:
            raise PNIError(f"cannot read training image {s.image_path}: {exc.strerror or exc}") from None
        h.update(f"{os.path.relpath(s.image_path, root)}\t{size}\n".encode())
    return h.hexdigest()[:16]


def canonical_dataset_category(name: str) -> str:
    """'mvtec' -> 'MVTec' etc.; unknown names are a PNIError listing the choices."""
    for c in DATASET_CATEGORIES:
        if name.lower() == c.lower():
            return c
    raise PNIError(f"unknown --dataset_category '{name}'; choose one of {', '.join(DATASET_CATEGORIES)}")


def _is_image(entry: os.DirEntry) -> bool:
    return (
        not entry.name.startswith(".")
        and entry.is_file()
        and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS
    )


def _image_files(folder: Path) -> dict[str, Path]:
    """stem -> path for the image files directly in ``folder`` (hidden files skipped)."""
    found: dict[str, Path] = {}
    with os.scandir(folder) as it:
        for e in it:
            if not _is_image(e):
                continue
            stem = os.path.splitext(e.name)[0]
            if stem in found:
                raise PNIError(f"two images with the same stem '{stem}': {found[stem]} and {folder / e.name}")
            found[stem] = folder / e.name
    return found


def _subdirs(folder: Path) -> list[str]:
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise PNIError(f"{what} not found: {path}")


def _mask_files(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """image stem -> mask path for the masks in ``folder``.

    A mask ``<stem><suffix>.<ext>`` belongs to image ``<stem>``; suffixes are tried in
    order (non-empty ones should come first). Files matching no suffix are an error.
    """
    masks: dict[str, Path] = {}
    if not folder.is_dir():
        return masks
    with os.scandir(folder) as it:
        for e in it:
            if not _is_image(e):
                continue
            name = os.path.splitext(e.name)[0]
            key = None
            for suf in suffixes:
                if suf == "":
                    key = name
                    break
                if name.endswith(suf) and len(name) > len(suf):
                    key = name[: -len(suf)]
                    break
            if key is None:
                raise PNIError(f"mask {folder / e.name} is not named <image stem>{suffixes[0]}.<ext>")
            if key in masks:
                raise PNIError(f"two masks for image stem '{key}': {masks[key]} and {folder / e.name}")
            masks[key] = folder / e.name
    return masks


def _check_category(dataset_category: str, root: Path, category: str) -> Path:
    check_name(category, "--category")
    if not root.is_dir():
        raise PNIError(f"dataset folder not found: {root} (set --dataset_path)")
    cat_root = root / category
    if not category or not cat_root.is_dir():
        available = list_categories(dataset_category, root)
        listed = ", ".join(available) if available else "none found"
        raise PNIError(f"unknown {dataset_category} category '{category}' in {root}; available: {listed}")
    return cat_root


def _sorted_samples(samples: list[Sample]) -> list[Sample]:
    return sorted(samples, key=lambda s: (s.defect_type, s.stem))


def _list_mvtec_style(
    cat_root: Path,
    normal_folder: str,
    mask_suffixes: tuple[str, ...],
    train_fraction_half: bool = False,
) -> tuple[list[Sample], list[Sample]]:
    """List ``train/<normal_folder>``, ``test/<type>`` and ``ground_truth/<type>``. Without
    ``test/`` the test list is empty; without ``ground_truth/`` defective images have no mask."""
    train_dir = cat_root / "train" / normal_folder
    _require_dir(train_dir, "training folder")
    train_files = sorted(_image_files(train_dir).items(), key=lambda kv: kv[1].name)
    if train_fraction_half:
        train_files = train_files[: max(1, len(train_files) // 2)]
    if not train_files:
        raise PNIError(f"no training images in {train_dir}")
    train = [Sample(str(p), None, 0, NORMAL, stem) for stem, p in train_files]

    test_dir = cat_root / "test"
    if not test_dir.is_dir():  # own data: good training images only, nothing to score
        return train, []
    types = _subdirs(test_dir)
    if not types:
        raise PNIError(f"no defect-type folders in {test_dir}")
    gt_root = cat_root / "ground_truth"
    test: list[Sample] = []
    for folder in types:
        images = _image_files(test_dir / folder)
        if folder in (normal_folder, NORMAL):
            test += [Sample(str(p), None, 0, NORMAL, stem) for stem, p in images.items()]
            continue
        if not gt_root.is_dir():  # no ground_truth/ at all: image-level labels only
            test += [Sample(str(p), None, 1, folder, stem) for stem, p in images.items()]
            continue
        masks = _mask_files(gt_root / folder, mask_suffixes)
        for stem, path in images.items():
            if stem not in masks:
                expected = gt_root / folder / f"{stem}{mask_suffixes[0]}.png"
                raise PNIError(f"defective test image {path} has no mask (expected {expected})")
            test.append(Sample(str(path), str(masks[stem]), 1, folder, stem))
        orphans = sorted(set(masks) - set(images))
        if orphans:
            raise PNIError(f"mask {masks[orphans[0]]} has no test image in {test_dir / folder}")
    if not test:
        raise PNIError(f"no test images in the folders of {test_dir}")
    if gt_root.is_dir():
        for folder in _subdirs(gt_root):
            if folder in types or folder in (normal_folder, NORMAL):
                continue
            masks = _mask_files(gt_root / folder, mask_suffixes)
            if masks:
                first = masks[sorted(masks)[0]]
                raise PNIError(f"mask {first} has no test image (no folder {test_dir / folder})")
    return train, _sorted_samples(test)


def _list_visa_released(root: Path, category: str) -> tuple[list[Sample], list[Sample]]:
    """The released VisA layout, split by ``split_csv/1cls.csv``."""
    split_file = root / VISA_SPLIT_FILE
    if not split_file.is_file():
        raise PNIError(f"VisA split file not found: {split_file}")
    try:
        with open(split_file, newline="") as fh:
            reader = csv.DictReader(fh)
            fields = [f.strip() for f in (reader.fieldnames or [])]
            rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise PNIError(f"cannot read VisA split file {split_file}: {exc}") from exc
    missing = {"object", "split", "label", "image", "mask"} - set(fields)
    if missing:
        raise PNIError(f"VisA split file {split_file} lacks columns: {', '.join(sorted(missing))}")
    rows = [r for r in rows if r["object"] == category]
    if not rows:
        raise PNIError(f"VisA split file {split_file} has no rows for object '{category}'")

    default_mask_dir = root / category / "Data" / "Masks" / "Anomaly"
    train: list[Sample] = []
    test: list[Sample] = []
    for r in rows:
        image = root / r["image"]
        stem = image.stem
        if not image.is_file():
            raise PNIError(f"image listed in {split_file} not found: {image}")
        split, label = r["split"].lower(), r["label"].lower()
        if split not in ("train", "test") or label not in ("normal", "anomaly"):
            raise PNIError(f"{split_file}: bad split/label '{r['split']}'/'{r['label']}' for {r['image']}")
        if label == "normal":
            sample = Sample(str(image), None, 0, NORMAL, stem)
        else:
            if split == "train":
                raise PNIError(f"{split_file}: anomalous image {image} is in the training split")
            mask = root / r["mask"] if r["mask"] else default_mask_dir / f"{stem}.png"
            if not mask.is_file():
                raise PNIError(f"defective test image {image} has no mask (expected {mask})")
            if mask.stem != stem:
                raise PNIError(f"mask {mask} does not match image {image} (different file stems)")
            sample = Sample(str(image), str(mask), 1, "bad", stem)
        (train if split == "train" else test).append(sample)

    anomaly_dir = root / category / "Data" / "Images" / "Anomaly"
    if default_mask_dir.is_dir():
        images = _image_files(anomaly_dir) if anomaly_dir.is_dir() else {}
        for stem, mask in sorted(_mask_files(default_mask_dir, ("",)).items()):
            if stem not in images:
                raise PNIError(f"mask {mask} has no image in {anomaly_dir}")
    if not train:
        raise PNIError(f"no training images for '{category}' in {split_file}")
    if not test:
        raise PNIError(f"no test images for '{category}' in {split_file}")
    return sorted(train, key=lambda s: s.stem), _sorted_samples(test)


# ----------------------------------------------------------------------------- public API


def list_categories(dataset_category: str, dataset_path: str | os.PathLike) -> list[str]:
    """Sorted names of the category folders under ``dataset_path``.

    A category is a sub-folder with ``train/`` (all datasets) or ``Data/Images/`` (VisA).
    """
    kind = canonical_dataset_category(dataset_category)
    root = Path(dataset_path)
    if not root.is_dir():
        raise PNIError(f"dataset folder not found: {root} (set --dataset_path)")
    out = []
    for name in _subdirs(root):
        if (root / name / "train").is_dir() or (kind == "VisA" and (root / name / "Data" / "Images").is_dir()):
            out.append(name)
    return out


def list_samples(
    dataset_category: str, dataset_path: str | os.PathLike, category: str
) -> tuple[list[Sample], list[Sample]]:
    """(train samples, test samples) of one category, without decoding any image.

    Train samples are sorted by file name; test samples by (defect_type, stem).
    """
    kind = canonical_dataset_category(dataset_category)
    root = Path(dataset_path)
    cat_root = _check_category(kind, root, category)
    if kind == "MVTec":
        return _list_mvtec_style(cat_root, NORMAL, ("_mask",))
    if kind == "BTAD":
        # The original trains category 03 on the first half of its sorted training images.
        return _list_mvtec_style(cat_root, "ok", ("",), train_fraction_half=(category == "03"))
    if (cat_root / "train").is_dir():
        return _list_mvtec_style(cat_root, NORMAL, ("_mask", ""))
    return _list_visa_released(root, category)


def build_datasets(
    dataset_category: str,
    dataset_path: str | os.PathLike,
    category: str,
    resize: int = 512,
    imagesize: int = 480,
) -> tuple[AnomalyDataset, AnomalyDataset]:
    """(train_dataset, test_dataset) for one category of MVTec, BTAD or VisA.

    See :class:`AnomalyDataset` for the items; a mask pixel > 0 is a defect. Mask sizes are
    checked against their images here (file headers only).
    """
    kind = canonical_dataset_category(dataset_category)
    train, test = list_samples(kind, dataset_path, category)
    check_mask_sizes(test)
    return AnomalyDataset(train, resize, imagesize), AnomalyDataset(test, resize, imagesize)
