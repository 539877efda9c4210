"""One category, top to bottom: data -> features -> coresets -> priors -> scoring -> results.

``run(args)`` is what ``train_coreset_distribution.py`` calls with its parsed flags.
Stages whose ``--train_*`` flag is absent load their saved artefacts instead; each stage
records its settings in a JSON file beside its artefacts, and later runs refuse artefacts
made with incompatible settings.

Interruptions, settings records and the test hook: see :mod:`pni.artefacts`.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from pni import coreset as cs
from pni import distributed
from pni.artefacts import (
    COOR_KEYS,
    CORESET_KEYS,
    DIGEST_KEY,
    FEATURE_KEYS,
    NB_KEYS,
    ORIGINAL_NB_KEYS,
    begin_stage,
    check_saved_stages,
    check_settings,
    compare_settings,
    coreset_digest,
    coreset_file_names,
    new_version_dir,
    owner_tag,
    publish_version_dir,
    remove_stale,
    settings_of,
    test_hook,
)
from pni.cli import parse_devices
from pni.config import embedding_dir
from pni.console import Progress, print_table, trainer_progress
from pni.data.datasets import build_datasets, training_set_digest
from pni.data.transforms import denormalize
from pni.distributions import (
    checkpoint_layout,
    load_mlp_checkpoint,
    mlp_file_name,
    mlp_from_state_dict,
    normalise_rows,
    position_prior_counts,
    position_prior_file_name,
    save_mlp_checkpoint,
)
from pni.errors import PNIError
from pni.features import build_feature_extractor, weights_digest
from pni.io import check_output_dir, load_json, load_npy, make_dir, save_json, save_npy
from pni.lightning import (
    CoresetModule,
    FeatureBankModule,
    IndexedDataset,
    NeighbourhoodModule,
    ScoringModule,
    WindowCollate,
    interruptible,
    split_train_val,
    window_loader,
)
from pni.memory import available_bytes
from pni.model import PNIModel, scoring_config
from pni.results import (
    MAP_NAMES,
    append_score_result,
    auroc_scores,
    check_score_result,
    format_score_table,
    read_sample,
    write_image_scores,
    write_sample,
)
from pni.scoring import interior_indices

log = logging.getLogger("pni")


IN_MEMORY_BANK_BYTES = int(os.environ.get("PNI_IN_MEMORY_BANK_BYTES", 4 * 2**30))


def _trainer(
    args: argparse.Namespace, progress: Progress | None = None, callbacks: Sequence[pl.Callback] = (), **kwargs: Any
) -> pl.Trainer:
    """A Trainer for one stage, shown as ``progress`` (see :func:`pni.console.trainer_progress`),
    with ``callbacks`` besides the progress bar's."""
    shown = trainer_progress(progress)
    defaults = dict(
        accelerator=args.accelerator,
        devices=parse_devices(args.devices),
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        deterministic=False,
        enable_progress_bar=shown["enable_progress_bar"],
        callbacks=list(shown.get("callbacks", [])) + list(callbacks),
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def check_trainer_flags(args: argparse.Namespace) -> None:
    """Before any work: ``--accelerator``, ``--devices`` and ``--strategy`` name something this
    machine has, and Lightning accepts the trainers the stages will build from them."""
    distributed.check_devices(args.accelerator, args.devices)
    try:
        _trainer(args, devices=1, strategy="auto")
        _trainer(
            args, precision=_precision(args), **distributed.devices_and_strategy(args, getattr(args, "ddp", False))
        )
    except Exception as exc:  # noqa: BLE001 - Lightning's configuration errors
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise PNIError(
            f"--accelerator {args.accelerator} --devices {args.devices} --strategy {args.strategy}: {text}"
        ) from None


class _TestHookCallback(pl.Callback):
    """Calls :func:`test_hook` ``feature_batch`` after each batch of training features (the
    tests' interruption point inside Lightning's predict loop)."""

    def on_predict_batch_end(self, *args: Any, **kwargs: Any) -> None:
        test_hook("feature_batch")


# ---------------------------------------------------------------- stage helpers


def extract_bank(
    args,
    extractor,
    train_ds,
    scratch: Path,
    module_cls=FeatureBankModule,
    on_disk: bool = False,
    probed: tuple[torch.Tensor, int | None] | None = None,
    progress: Progress | None = None,
    **module_kwargs,
):
    """Run the extractor over the training set into a preallocated bank ``(N, R, C, E)``
    (``--feature_bank_dtype``): an array, or a memory map in ``scratch`` when it is larger
    than ``IN_MEMORY_BANK_BYTES`` or ``on_disk`` (other processes open it). ``probed``: the
    result of :func:`_probe` on the first training image, if the caller already has it.
    ``progress`` gains one unit per extraction batch."""
    probe, per_image = probed if probed is not None else _probe(extractor, train_ds[0]["image"])
    dtype = np.dtype(getattr(args, "feature_bank_dtype", "float32"))
    shape = (len(train_ds),) + tuple(probe.shape[1:])
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if nbytes > IN_MEMORY_BANK_BYTES or on_disk:
        bank = np.lib.format.open_memmap(scratch / "train_features.npy", mode="w+", dtype=dtype, shape=shape)
    else:
        bank = np.empty(shape, dtype=dtype)
    module = module_cls(extractor, bank, **module_kwargs)
    # Extraction temporaries of a batch: at most a quarter of the bank (at least 256 MiB) on
    # the host, so the stage's peak stays near the bank's own size; half the free GPU memory.
    budget = None if _on_gpu(args) else min(available_bytes() // 4, max(256 * 2**20, nbytes // 4))
    loader = DataLoader(
        IndexedDataset(train_ds),
        batch_size=_batch_size(args, per_image, budget),
        shuffle=False,
        num_workers=args.num_workers,
    )
    if progress is not None:
        progress.add_total(len(loader))
    trainer = _trainer(args, progress, devices=1, strategy="auto", callbacks=[_TestHookCallback()])
    interruptible(trainer.predict, module, loader, return_predictions=False)
    return bank, module


def _ddp_bank(bank: np.ndarray | None) -> np.ndarray:
    """Rank 0's memory-mapped bank, opened read-only by the other DDP ranks (its path is
    handed over in the environment before they start)."""
    if distributed.is_child():
        return load_npy(distributed.shared("bank", lambda: ""), mmap_mode="r")
    path = getattr(bank, "filename", None)
    if path is None:
        raise RuntimeError("the feature bank must be a memory map under DDP")
    bank.flush()
    distributed.shared("bank", lambda: str(path))
    return bank


def _share_bank(args: argparse.Namespace) -> bool:
    """The bank goes to a file when DDP ranks train the MLP on it (they open it read-only)."""
    return bool(getattr(args, "ddp", False)) and bool(args.train_nb_dist)


def _on_gpu(args: argparse.Namespace) -> bool:
    return args.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def _probe(extractor, image: torch.Tensor) -> tuple[torch.Tensor, int | None]:
    """Features of one image and an estimate of the extraction temporaries per image (bytes):
    the patch neighbourhoods of every layer on its own grid (they are pooled before layer
    grids are aligned), about twice over."""
    shapes: dict[str, tuple[int, ...]] = {}
    body = getattr(extractor, "body", None)
    hook = None
    if isinstance(body, torch.nn.Module):
        hook = body.register_forward_hook(
            lambda _m, _i, out: (
                shapes.update({k: tuple(v.shape) for k, v in out.items()}) if isinstance(out, dict) else None
            )
        )
    try:
        probe = extractor(image[None])
    finally:
        if hook is not None:
            hook.remove()
    if not shapes:
        return probe, None
    ps2 = getattr(extractor, "patchsize", 1) ** 2
    return probe, 2 * 4 * ps2 * sum(s[1] * s[2] * s[3] for s in shapes.values())


def _batch_size(args: argparse.Namespace, per_image_bytes: int | None = None, budget: int | None = None) -> int:
    """Images per extraction batch: ~8 of 480 px (more for small images), fewer when their
    temporaries (``per_image_bytes`` each) would not fit ``budget`` (default: a quarter of
    the host's available memory, half the GPU's free memory)."""
    default = max(1, min(32, int(8 * (480 / args.imagesize) ** 2)))
    if not per_image_bytes:
        return default
    if budget is None:
        budget = available_bytes("cuda") // 2 if _on_gpu(args) else available_bytes() // 4
    return max(1, min(default, int(budget // per_image_bytes)))


def build_coresets(
    args, extractor, train_ds, out_dir: Path, scratch: Path, progress: Progress | None = None
) -> np.ndarray:
    """Stage 1: feature bank, greedy selections, the three faiss files. Returns the bank.
    ``progress`` counts extraction batches and greedy steps."""
    pad = (args.patchsize - 1) // 2
    probed = _probe(extractor, train_ds[0]["image"])
    _, n_rows, n_cols, _ = probed[0].shape
    n_img = len(train_ds)
    n_with = n_img * n_rows * n_cols
    check_grid_size(args, n_rows, n_cols)
    n_without = n_img * (n_rows - 2 * pad) * (n_cols - 2 * pad)
    k_emb = int(args.subsampling_percentage * n_without)
    k_emb_edge = int(args.subsampling_percentage * n_with)
    if min(k_emb, k_emb_edge) < 1:
        raise PNIError(f"--subsampling_percentage {args.subsampling_percentage} selects no patch of {n_without}")
    if args.dist_coreset_size >= n_without:
        raise PNIError(
            f"--dist_coreset_size {args.dist_coreset_size} must be below the {n_without} interior "
            "training patches (the greedy start point is not selected); lower it or add training images"
        )
    if k_emb >= n_without or k_emb_edge >= n_with:
        raise PNIError(
            f"--subsampling_percentage {args.subsampling_percentage} selects every training patch, "
            "but the greedy start point is not selected; use a smaller fraction"
        )
    check_anomaly_nn(args, k_emb_edge)
    n_select = {"without_edge": max(k_emb, args.dist_coreset_size), "with_edge": k_emb_edge}
    if progress is not None:
        progress.add_total(sum(n_select.values()))
    bank, module = extract_bank(
        args,
        extractor,
        train_ds,
        scratch,
        CoresetModule,
        on_disk=_share_bank(args),
        probed=probed,
        progress=progress,
        pad=pad,
        n_select=n_select,
        seed=args.seed,
        track=progress.track if progress is not None else None,
    )
    sel_without = module.selections["without_edge"].numpy()
    sel_with = module.selections["with_edge"].numpy()
    flat = bank.reshape(-1, bank.shape[-1])  # a view (no copy of the bank)

    def interior(ids: np.ndarray) -> np.ndarray:  # rows of the interior positions, flat order
        img, rest = np.divmod(ids, (n_rows - 2 * pad) * (n_cols - 2 * pad))
        row, col = np.divmod(rest, n_cols - 2 * pad)
        return np.ascontiguousarray(bank[img, row + pad, col + pad], dtype=np.float32)

    names = coreset_file_names(args)
    vectors = {
        "without_edge": interior(sel_without[:k_emb]),
        "distribution": interior(sel_without[: args.dist_coreset_size]),
        "with_edge": np.ascontiguousarray(flat[sel_with], dtype=np.float32),
    }
    begin_stage(out_dir / "coreset_settings.json")
    for key in ("without_edge", "distribution", "with_edge"):
        cs.save_index(cs.build_index(vectors[key]), out_dir / names[key])
        test_hook("coreset_index")
    save_json(
        out_dir / "coreset_settings.json", {**settings_of(args, CORESET_KEYS), DIGEST_KEY: coreset_digest(vectors)}
    )
    log.info(
        "coresets: %d (interior), %d (with edge), %d (distribution) of %d / %d patches",
        k_emb,
        k_emb_edge,
        args.dist_coreset_size,
        n_without,
        n_with,
    )
    return bank


def check_anomaly_nn(args, with_edge_size: int) -> None:
    """``--anomaly_nn`` neighbours must exist in the with-edge coreset (checked before training)."""
    if args.anomaly_nn > with_edge_size:
        raise PNIError(
            f"--anomaly_nn {args.anomaly_nn} exceeds the {with_edge_size} entries of the with-edge "
            "coreset; lower it (or raise --subsampling_percentage)"
        )


def load_coresets(args, out_dir: Path) -> dict[str, np.ndarray]:
    """The three coresets as arrays ``(K, E)``."""
    settings_path = out_dir / "coreset_settings.json"
    check_settings(settings_path, args, CORESET_KEYS, "coresets")
    out = {}
    for key, name in coreset_file_names(args).items():
        path = out_dir / name
        if not path.is_file():
            raise PNIError(f"missing coreset {path} (run with --train_coreset to make it)")
        try:
            out[key] = cs.index_vectors(cs.load_index(path))
        except Exception as exc:
            raise PNIError(f"cannot read coreset {path}: {str(exc).splitlines()[0]}") from None
        if out[key].ndim != 2 or out[key].shape[1] != args.target_embed_dimension:
            raise PNIError(
                f"{path} holds {out[key].shape[-1]}-dim features, but --target_embed_dimension is "
                f"{args.target_embed_dimension}"
            )
    if len(out["distribution"]) != args.dist_coreset_size:
        raise PNIError(
            f"{out_dir / coreset_file_names(args)['distribution']} holds {len(out['distribution'])} "
            f"entries, but --dist_coreset_size is {args.dist_coreset_size}"
        )
    if settings_path.is_file():
        recorded = load_json(settings_path).get(DIGEST_KEY)
        if recorded is not None and recorded != coreset_digest(out):
            raise PNIError(
                f"the coreset files in {out_dir} are not the ones {settings_path.name} was written for "
                "(replaced or copied from another run?); re-run with --train_coreset"
            )
    return out


def train_neighbourhood(
    args, bank: np.ndarray, coresets: dict[str, np.ndarray], out_dir: Path, progress: Progress | None = None
) -> None:
    """Stage 2: label interior training positions by their nearest distribution entry and
    train the neighbourhood MLP; keeps the best-validation weights. ``progress`` counts
    training batches."""
    pad = (args.patchsize - 1) // 2
    n_img, n_rows, n_cols, dim = bank.shape
    index = cs.use_gpu_index(cs.build_index(coresets["distribution"]))
    interior = bank[:, pad : n_rows - pad, pad : n_cols - pad]
    labels = np.stack([cs.nearest_ids(index, np.asarray(interior[i]).reshape(-1, dim)) for i in range(n_img)])
    n_windows = (2 * args.dist_padding + 1) ** 2 - 1
    ckpt = out_dir / mlp_file_name(args.dist_padding, args.dist_coreset_size, args.num_layers)
    settings = {**settings_of(args, NB_KEYS), DIGEST_KEY: coreset_digest(coresets)}
    child = distributed.is_child()  # DDP ranks > 0 train but write nothing
    # built first: a flag Lightning refuses must not cost the saved model
    trainer = _trainer(
        args,
        progress,
        max_epochs=args.num_epochs,
        num_sanity_val_steps=0,
        precision=_precision(args),
        **distributed.devices_and_strategy(args, getattr(args, "ddp", False)),
    )
    if not child:
        begin_stage(out_dir / "nb_settings.json")
    # The same seed gives the same model whichever other stages ran before in this process.
    pl.seed_everything(args.seed, workers=True, verbose=False)
    saved = []

    def on_best(model, train_loss, val_loss):
        save_mlp_checkpoint(ckpt, model, settings, train_loss, val_loss)  # replaces the old model atomically
        saved.append(val_loss)
        test_hook("nb_checkpoint")

    module = NeighbourhoodModule(
        n_windows * dim, args.dist_coreset_size, args.num_layers, args.learning_rate, args.step_size, on_best
    )
    train_ids, val_ids = split_train_val(labels.size, args.seed)
    collate = WindowCollate(bank, labels, pad, args.dist_padding, args.variant)
    train_loader = window_loader(train_ids, collate, args.dist_batchsize, True, args.seed, args.num_workers)
    val_loader = window_loader(val_ids, collate, args.dist_batchsize, False, args.seed, args.num_workers)
    interruptible(trainer.fit, module, train_loader, val_loader)
    if child:
        return
    if not saved:
        ckpt.unlink(missing_ok=True)
        raise PNIError(f"the neighbourhood MLP never reached a finite validation loss; no {ckpt} written")
    save_json(out_dir / "nb_settings.json", settings)


def train_position(
    args, bank: np.ndarray, coresets: dict[str, np.ndarray], out_dir: Path, progress: Progress | None = None
) -> None:
    """Stage 3: the two position priors (interior / without-edge coreset and all positions /
    with-edge coreset), normalised per position, as ``.npy``. ``progress`` counts images
    (twice: once per prior)."""
    pad = (args.patchsize - 1) // 2
    n_img, n_rows, n_cols, dim = bank.shape
    if progress is not None:
        progress.add_total(2 * n_img)
    begin_stage(out_dir / "coor_settings.json")
    interior_pos = interior_indices(n_rows, n_cols, pad)
    for with_edge in (False, True):
        entries = coresets["with_edge" if with_edge else "without_edge"]
        index = cs.use_gpu_index(cs.build_index(entries))
        counts = torch.zeros(n_rows * n_cols, len(entries), dtype=torch.float32)
        for i in range(n_img):
            grid = np.asarray(bank[i])
            if with_edge:
                ids = cs.nearest_ids(index, grid.reshape(-1, dim))
                position_prior_counts(
                    torch.as_tensor(ids)[None], (n_rows, n_cols), len(entries), args.dist_padding, counts=counts
                )
            else:
                ids = cs.nearest_ids(index, grid[pad : n_rows - pad, pad : n_cols - pad].reshape(-1, dim))
                position_prior_counts(
                    torch.as_tensor(ids)[None],
                    (n_rows, n_cols),
                    len(entries),
                    args.dist_padding,
                    positions=interior_pos,
                    counts=counts,
                )
            if progress is not None:
                progress.update()
        prior = normalise_rows(counts).numpy()
        save_npy(out_dir / position_prior_file_name(args.subsampling_percentage, with_edge), prior)
        test_hook("coor_prior")
    save_json(out_dir / "coor_settings.json", {**settings_of(args, COOR_KEYS), DIGEST_KEY: coreset_digest(coresets)})


def load_position_priors(args, out_dir: Path, coresets: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    check_settings(out_dir / "coor_settings.json", args, COOR_KEYS, "position priors", coreset_digest(coresets))
    out = {}
    for with_edge, key in ((False, "without_edge"), (True, "with_edge")):
        path = out_dir / position_prior_file_name(args.subsampling_percentage, with_edge)
        if not path.is_file():
            raise PNIError(f"missing position prior {path} (run with --train_coor_dist to make it)")
        try:
            prior = load_npy(path)
        except (OSError, ValueError) as exc:
            raise PNIError(f"cannot read position prior {path}: {exc}; re-run with --train_coor_dist") from None
        if prior.ndim != 2 or prior.shape[1] != len(coresets[key]):
            raise PNIError(
                f"{path} has shape {prior.shape}, but the coreset has {len(coresets[key])} entries; "
                "re-run with --train_coor_dist"
            )
        out[key] = prior
    return out


def load_neighbourhood_model(args, out_dir: Path, coresets: dict[str, np.ndarray]):
    """The neighbourhood MLP, refused if its settings (``nb_settings.json`` and those stored in
    the checkpoint itself), its coresets or its layer sizes do not fit the flags."""
    digest = coreset_digest(coresets)
    check_settings(out_dir / "nb_settings.json", args, NB_KEYS, "neighbourhood model", digest)
    path = out_dir / mlp_file_name(args.dist_padding, args.dist_coreset_size, args.num_layers)
    ckpt = load_mlp_checkpoint(path)
    saved = ckpt.get("settings") or {}
    original = "args" in ckpt and "model" in ckpt and DIGEST_KEY not in saved
    layout = checkpoint_layout(saved, original)
    if layout != args.variant:
        raise PNIError(
            f"neighbourhood model {path} was trained with the {layout} window layout, but --variant is "
            f"{args.variant}; use --variant {layout} or re-run with --train_nb_dist"
        )
    detail = compare_settings(saved, args, ORIGINAL_NB_KEYS if original else NB_KEYS)
    if detail:
        raise PNIError(
            f"neighbourhood model {path} was made with other settings: {detail}; "
            "re-run with --train_nb_dist or change the flags back"
        )
    if saved.get(DIGEST_KEY) not in (None, digest):
        raise PNIError(
            f"neighbourhood model {path} was made from other coresets than the ones in {out_dir}; "
            "re-run with --train_nb_dist"
        )
    try:
        mlp = mlp_from_state_dict(ckpt["model"])
    except (RuntimeError, ValueError, AttributeError, IndexError) as exc:
        raise PNIError(f"{path} is not a valid neighbourhood model: {str(exc).splitlines()[0]}") from None
    expected_in = ((2 * args.dist_padding + 1) ** 2 - 1) * args.target_embed_dimension
    if mlp.first_layer[0].in_features != expected_in or mlp.last_layer[0].out_features != len(coresets["distribution"]):
        raise PNIError(
            f"neighbourhood model {path} (input {mlp.first_layer[0].in_features}, "
            f"{mlp.last_layer[0].out_features} classes) does not fit --dist_padding {args.dist_padding}, "
            f"--target_embed_dimension {args.target_embed_dimension}, --dist_coreset_size "
            f"{args.dist_coreset_size}; re-run with --train_nb_dist"
        )
    return mlp


# ---------------------------------------------------------------- test stage


class ResultCollector:
    """Receives each scored test image: writes its files and keeps what the AUROCs need."""

    def __init__(self, sample_dir: Path) -> None:
        self.sample_dir = sample_dir
        self.rows: list[list] = []
        self.indices: list[int] = []  # position of each row's image in the test set
        self.labels: list[int] = []
        self.image_scores: dict[str, list[float]] = {m: [] for m in MAP_NAMES}
        self.masks: list[np.ndarray] = []
        self.maps: dict[str, list[np.ndarray]] = {m: [] for m in MAP_NAMES}

    def __call__(self, meta: dict, result) -> None:
        maps = {m: result.maps[m].detach().float().cpu().numpy() for m in MAP_NAMES}
        broken = [m for m in MAP_NAMES if not np.isfinite(maps[m]).all()]
        if broken:
            raise PNIError(
                f"the {broken[0]} map of {meta.get('path', meta['stem'])} has NaN or infinite values; "
                "check --prob_gamma, --softmax_temperature_alpha and the backbone weights"
            )
        image = denormalize(meta["image"].cpu())
        gt = (meta["mask"].cpu().numpy()[0] > 0.5).astype(np.uint8)
        defect_type, stem, label = str(meta["defect_type"]), str(meta["stem"]), int(meta["label"])
        write_sample(self.sample_dir, defect_type, stem, image, gt, maps)
        test_hook("test_sample")
        self.rows.append([defect_type, stem, label] + [f"{result.image[m]:.6f}" for m in MAP_NAMES])
        self.indices.append(int(meta["index"]) if "index" in meta else len(self.indices))
        self.labels.append(label)
        self.masks.append(gt)
        for m in MAP_NAMES:
            self.image_scores[m].append(float(result.image[m]))
            self.maps[m].append(maps[m])

    def scores(self, with_masks: bool = True) -> dict[str, float | None]:
        return auroc_scores(self.labels, self.image_scores, self.masks if with_masks else None, self.maps)


def scores_from_samples(
    sample_dir: Path, rows: list[list], image_scores: list, with_masks: bool = True
) -> dict[str, float | None]:
    """P- and I-AUROC of each map family from the written sample files, the image rows
    (``[defect_type, stem, label, ...]``) and each image's scores in ``MAP_NAMES`` order;
    what rank 0 computes under DDP."""
    samples = [read_sample(sample_dir, str(r[0]), str(r[1])) for r in rows]
    return auroc_scores(
        [int(r[2]) for r in rows],
        {m: [float(v[j]) for v in image_scores] for j, m in enumerate(MAP_NAMES)},
        [smp["gt"] for smp in samples] if with_masks else None,
        {m: [smp[m] for smp in samples] for m in MAP_NAMES},
    )


def _precision(args: argparse.Namespace) -> str:
    return getattr(args, "precision", "32-true")


def run_test(args, extractor, test_ds, coresets, priors, mlp, progress: Progress | None = None) -> dict[str, Any]:
    """Stage 4: score every test image, write results and the score table row; ``progress``
    counts test batches.

    Under DDP every rank scores its share of the test set and writes those images' files;
    rank 0 gathers the rows, reads the maps back for the AUROCs and writes the tables (the
    other ranks return ``{}``)."""
    ddp = bool(getattr(args, "ddp", False))
    child = distributed.is_child()
    per_image = _check_grid(args, extractor, priors)
    model = PNIModel.from_arrays(extractor, mlp, coresets, priors, scoring_config(args), args.dist_padding, args.resize)

    score_csv = Path(args.project_root_path) / "score_result.csv"
    check_score_result(score_csv)  # fail now, not after scoring every image
    # under DDP rank 0 names the folder and the other ranks take it (pni.distributed.shared)
    partial = (
        Path(distributed.shared("version_dir", lambda: str(new_version_dir(args)))) if ddp else new_version_dir(args)
    )
    try:
        sample_dir = make_dir(partial / "sample")
        collector = ResultCollector(sample_dir)
        module = ScoringModule(model, collector)
        loader = DataLoader(
            IndexedDataset(test_ds),
            batch_size=_batch_size(args, per_image),
            shuffle=False,
            num_workers=args.num_workers,
        )
        trainer = _trainer(
            args, progress, logger=False, precision=_precision(args), **distributed.devices_and_strategy(args, ddp)
        )
        interruptible(trainer.test, module, loader, verbose=False)
        rows = collector.rows
        if ddp:  # every rank's rows, once each (the distributed sampler repeats a few images)
            merged: dict[int, tuple] = {}
            floats = list(zip(*[collector.image_scores[m] for m in MAP_NAMES]))
            for part in distributed.gather(list(zip(collector.indices, collector.rows, floats))):
                for index, row, image_scores in part:
                    merged.setdefault(int(index), (row, image_scores))
            if child:
                return {}
            rows = [merged[i][0] for i in sorted(merged)]
            image_scores = [merged[i][1] for i in sorted(merged)]
        if len(rows) != len(test_ds):
            raise PNIError(f"scored {len(rows)} of {len(test_ds)} test images")
        write_image_scores(partial / "image_scores.csv", rows)
        with_masks = getattr(test_ds, "has_masks", True)
        if not with_masks:
            print(
                f"note: the test images of {args.category} have no ground_truth/ masks: image-level results "
                "only (P-AUROC columns left empty)",
                flush=True,
            )
        scores = (
            scores_from_samples(sample_dir, rows, image_scores, with_masks) if ddp else collector.scores(with_masks)
        )
        save_json(partial / "settings.json", vars(args))
        version_dir = publish_version_dir(partial)
    except BaseException:
        if not child:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    settings = {
        "category": args.category,
        "backbone": args.backbone,
        "version": version_dir.name,
        "seed": args.seed,
        "imagesize": args.imagesize,
        "subsampling_percentage": args.subsampling_percentage,
        "anomaly_nn": args.anomaly_nn,
        "dist_coreset_size": args.dist_coreset_size,
        "dist_padding": args.dist_padding,
        "num_layers": args.num_layers,
        "variant": args.variant,
        "mask_workers": args.mask_workers,
    }
    append_score_result(score_csv, settings, scores)
    return {
        "category": args.category,
        "variant": args.variant,
        "mask_workers": args.mask_workers,
        "version_dir": str(version_dir),
        **scores,
    }


def check_grid_size(args, n_rows: int, n_cols: int) -> None:
    """The ``n_rows x n_cols`` feature grid must have interior positions for ``--patchsize``."""
    pad = (args.patchsize - 1) // 2
    if n_rows <= 2 * pad or n_cols <= 2 * pad:
        raise PNIError(
            f"--imagesize {args.imagesize} gives a {n_rows}x{n_cols} grid, too small for --patchsize {args.patchsize}"
        )


def _check_grid(args, extractor, priors: dict[str, np.ndarray]) -> int | None:
    """The feature grid of ``--imagesize`` must have interior positions and match the rows of
    the position priors (which carry no image size of their own). Returns the estimated
    extraction temporaries per image (see :func:`_probe`)."""
    device = next(extractor.parameters(), torch.empty(0)).device
    with torch.no_grad():
        probe, per_image = _probe(extractor, torch.zeros(3, args.imagesize, args.imagesize, device=device))
        n_rows, n_cols = probe.shape[1:3]
    check_grid_size(args, n_rows, n_cols)
    n_positions = len(priors["with_edge"])
    if n_rows * n_cols != n_positions or len(priors["without_edge"]) != n_positions:
        raise PNIError(
            f"the position priors in {embedding_dir(args)} cover {n_positions} grid positions, but "
            f"--imagesize {args.imagesize} gives a {n_rows}x{n_cols} grid; re-run with --train_coor_dist "
            "or change the flags back"
        )
    return per_image


# ---------------------------------------------------------------- all stages


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every stage for one category; returns the test scores.

    With ``--devices N --strategy ddp`` the MLP training and the test scoring run on N
    processes and everything else on rank 0 (see :mod:`pni.distributed`); the other ranks
    re-run this function, skip rank 0's stages and writes, and return ``{}``.
    """
    args.ddp = distributed.configure(args)
    child = distributed.is_child()
    if child:  # one copy of the progress lines and tables, from rank 0
        sys.stdout = open(os.devnull, "w")
    else:
        check_trainer_flags(args)
    pl.seed_everything(args.seed, workers=True, verbose=False)
    out_dir = embedding_dir(args)
    train_ds, test_ds = build_datasets(
        args.dataset_category, args.dataset_path, args.category, resize=args.resize, imagesize=args.imagesize
    )
    training = args.train_coreset or args.train_nb_dist or args.train_coor_dist
    if args.max_train_images:
        train_ds = torch.utils.data.Subset(train_ds, range(min(args.max_train_images, len(train_ds))))
    # What decides the features besides the flags, recorded with every stage's settings.
    args.backbone_weights_digest = weights_digest(args.backbone, args.backbone_weights, args.random_init)
    args.training_set_digest = training_set_digest(
        [train_ds.dataset.samples[i] for i in train_ds.indices]
        if isinstance(train_ds, torch.utils.data.Subset)
        else train_ds.samples,
        args.dataset_path,
    )
    check_saved_stages(args, out_dir)
    if not child:  # the test stage's outputs, checked before hours of training
        check_output_dir(args.project_root_path, "--project_root_path")
        check_score_result(Path(args.project_root_path) / "score_result.csv")
    extractor = build_feature_extractor(
        args.backbone,
        args.layer_index,
        args.pretrain_embed_dimension,
        args.target_embed_dimension,
        args.patchsize,
        args.backbone_weights,
        args.random_init,
    )
    if training and not child:
        make_dir(out_dir, "--embedding_root_path")
        save_json(out_dir / "feature_settings.json", settings_of(args, FEATURE_KEYS))
    if training and not child:
        remove_stale(out_dir, ".scratch-*")
    scratch_dir = (
        nullcontext(None)
        if child
        else tempfile.TemporaryDirectory(prefix=f".scratch-{owner_tag()}-", dir=out_dir if training else None)
    )
    with scratch_dir as scratch:
        scratch = Path(scratch) if scratch is not None else None
        bank = None
        if args.train_coreset and not child:  # DDP: rank 0 alone, before the other ranks start
            with Progress(f"[{args.category}] stage 1/4: coresets") as bar:
                bank = build_coresets(args, extractor, train_ds, out_dir, scratch, bar)
        coresets = load_coresets(args, out_dir)
        check_anomaly_nn(args, len(coresets["with_edge"]))
        if (args.train_nb_dist or args.train_coor_dist) and bank is None and not child:
            with Progress(f"[{args.category}] extracting training features") as bar:
                bank, _ = extract_bank(args, extractor, train_ds, scratch, on_disk=_share_bank(args), progress=bar)
        if args.train_nb_dist:
            if args.ddp:
                bank = _ddp_bank(bank)
            with Progress(f"[{args.category}] stage 2/4: neighbourhood MLP") as bar:
                train_neighbourhood(args, bank, coresets, out_dir, bar)
        if args.train_coor_dist and not child:
            with Progress(f"[{args.category}] stage 3/4: position priors") as bar:
                train_position(args, bank, coresets, out_dir, bar)
        del bank
    distributed.barrier()  # DDP ranks > 0 wait here for rank 0's position priors
    priors = load_position_priors(args, out_dir, coresets)
    mlp = load_neighbourhood_model(args, out_dir, coresets)
    if len(test_ds) == 0:
        print(
            f"[{args.category}] stage 4/4: no test images in {Path(args.dataset_path) / args.category}: "
            "nothing to score, test stage skipped",
            flush=True,
        )
        return {
            "category": args.category,
            "variant": args.variant,
            "mask_workers": args.mask_workers,
            "version_dir": None,
        }
    with Progress(f"[{args.category}] stage 4/4: scoring {len(test_ds)} test images") as bar:
        result = run_test(args, extractor, test_ds, coresets, priors, mlp, bar)
    if child:
        return result
    print_table(
        f"[{args.category}] AUROC (%) of the four maps ({args.backbone}, seed {args.seed})",
        format_score_table([result]),
    )
    print(f"results: {result['version_dir']}", flush=True)
    return result
