"""One category, top to bottom: data -> features -> coresets -> priors -> scoring -> results.

``run(settings)`` is what ``train_coreset_distribution.py`` calls with the settings of its
flags (:class:`pni.config.Settings`). Stages whose ``--train_*`` flag is absent load their
saved artefacts instead; each stage records its settings in a JSON file beside its
artefacts, and later runs refuse artefacts made with incompatible settings.

The training feature bank: :mod:`pni.bank`; Trainers, batch sizes and grid checks:
:mod:`pni.runtime`; the test images' sink: :mod:`pni.collector`; settings records, loading
saved artefacts, interruptions and the test hook: :mod:`pni.artefacts`; several processes:
:mod:`pni.distributed`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from pni import coreset as cs
from pni import distributed
from pni.artefacts import (
    COOR_KEYS,
    CORESET_KEYS,
    DIGEST_KEY,
    FEATURE_KEYS,
    NB_KEYS,
    begin_stage,
    check_saved_stages,
    coreset_digest,
    input_digests,
    load_coresets,
    load_neighbourhood_model,
    load_position_priors,
    mlp_file,
    new_version_dir,
    owner_tag,
    publish_version_dir,
    remove_stale,
    settings_of,
    test_hook,
)
from pni.bank import bank_on_disk, extract_bank
from pni.collector import ResultCollector, scores_from_samples
from pni.config import Settings
from pni.console import Progress, print_table
from pni.data.datasets import build_datasets
from pni.distributions import (
    NeighbourhoodMLP,
    normalise_rows,
    position_prior_counts,
    position_prior_file_name,
    save_mlp_checkpoint,
)
from pni.errors import PNIError
from pni.io import check_output_dir, make_dir, save_json, save_npy
from pni.lightning import (
    CoresetModule,
    IndexedDataset,
    NeighbourhoodModule,
    ScoringModule,
    WindowCollate,
    interruptible,
    split_train_val,
    window_loader,
)
from pni.model import PNIModel
from pni.precision import check_and_note, compute_dtype
from pni.results import append_score_result, check_score_result, format_score_table, write_image_scores
from pni.runtime import (
    build_trainer,
    check_grid_size,
    check_test_grid,
    check_trainer_flags,
    images_per_batch,
    probe_extractor,
)
from pni.scoring import interior_indices

log = logging.getLogger("pni")


def build_coresets(
    settings: Settings,
    extractor: Any,
    train_ds: Dataset,
    out_dir: Path,
    scratch: Path | None,
    progress: Progress | None = None,
) -> np.ndarray:
    """Stage 1: feature bank (memory-mapped in folder ``scratch`` when large, see
    :func:`pni.bank.extract_bank`), greedy selections, the three faiss files. Returns the
    bank. ``progress`` counts extraction batches and greedy steps."""
    sp, dcs = settings.coreset.subsampling_percentage, settings.coreset.dist_coreset_size
    pad = settings.features.pad
    probed = probe_extractor(extractor, train_ds[0]["image"])
    _, n_rows, n_cols, _ = probed[0].shape
    n_img = len(train_ds)  # type: ignore[arg-type]  # (torch's Dataset declares no __len__)
    n_with = n_img * n_rows * n_cols
    check_grid_size(settings.features, n_rows, n_cols)
    n_without = n_img * (n_rows - 2 * pad) * (n_cols - 2 * pad)
    k_emb = int(sp * n_without)
    k_emb_edge = int(sp * n_with)
    if min(k_emb, k_emb_edge) < 1:
        raise PNIError(f"--subsampling_percentage {sp} selects no patch of {n_without}")
    if dcs >= n_without:
        raise PNIError(
            f"--dist_coreset_size {dcs} must be below the {n_without} interior "
            "training patches (the greedy start point is not selected); lower it or add training images"
        )
    if k_emb >= n_without or k_emb_edge >= n_with:
        raise PNIError(
            f"--subsampling_percentage {sp} selects every training patch, "
            "but the greedy start point is not selected; use a smaller fraction"
        )
    check_anomaly_nn(settings, k_emb_edge)
    n_select = {"without_edge": max(k_emb, dcs), "with_edge": k_emb_edge}
    if progress is not None:
        progress.add_total(sum(n_select.values()))
    bank, module = extract_bank(
        settings,
        extractor,
        train_ds,
        scratch,
        CoresetModule,
        on_disk=bank_on_disk(settings),
        probed=probed,
        progress=progress,
        pad=pad,
        n_select=n_select,
        seed=settings.seed,
        track=progress.track if progress is not None else None,
    )
    assert isinstance(module, CoresetModule)
    sel_without = module.selections["without_edge"].numpy()
    sel_with = module.selections["with_edge"].numpy()
    flat = bank.reshape(-1, bank.shape[-1])  # a view (no copy of the bank)

    def interior(ids: np.ndarray) -> np.ndarray:  # rows of the interior positions, flat order
        img, rest = np.divmod(ids, (n_rows - 2 * pad) * (n_cols - 2 * pad))
        row, col = np.divmod(rest, n_cols - 2 * pad)
        return np.ascontiguousarray(bank[img, row + pad, col + pad], dtype=np.float32)

    names = settings.coreset.file_names
    vectors = {
        "without_edge": interior(sel_without[:k_emb]),
        "distribution": interior(sel_without[:dcs]),
        "with_edge": np.ascontiguousarray(flat[sel_with], dtype=np.float32),
    }
    begin_stage(out_dir / "coreset_settings.json")
    for key in ("without_edge", "distribution", "with_edge"):
        cs.save_index(cs.build_index(vectors[key]), out_dir / names[key])
        test_hook("coreset_index")
    record = {**settings_of(settings, CORESET_KEYS), **_informational(settings), DIGEST_KEY: coreset_digest(vectors)}
    save_json(out_dir / "coreset_settings.json", record)
    sizes = (k_emb, k_emb_edge, dcs, n_without, n_with)
    log.info("coresets: %d (interior), %d (with edge), %d (distribution) of %d / %d patches", *sizes)
    return bank


def _informational(settings: Settings) -> dict[str, Any]:
    """What a stage's settings record shows without checking it against later runs: the
    precision the stage ran its backbone and MLP in (artefacts of either precision load under
    any --precision)."""
    return {"precision": settings.runtime.precision}


def check_anomaly_nn(settings: Settings, with_edge_size: int) -> None:
    """``--anomaly_nn`` neighbours must exist in the with-edge coreset (checked before training)."""
    if settings.scoring.anomaly_nn > with_edge_size:
        raise PNIError(
            f"--anomaly_nn {settings.scoring.anomaly_nn} exceeds the {with_edge_size} entries of the with-edge "
            "coreset; lower it (or raise --subsampling_percentage)"
        )


def train_neighbourhood(
    settings: Settings,
    bank: np.ndarray,
    coresets: dict[str, np.ndarray],
    out_dir: Path,
    progress: Progress | None = None,
) -> None:
    """Stage 2: label interior training positions by their nearest distribution entry and
    train the neighbourhood MLP; keeps the best-validation weights. ``progress`` counts
    training batches."""
    pad, nb, train = settings.features.pad, settings.neighbourhood, settings.mlp_training
    n_img, n_rows, n_cols, dim = bank.shape
    index = cs.use_gpu_index(cs.build_index(coresets["distribution"]))
    interior = bank[:, pad : n_rows - pad, pad : n_cols - pad]
    labels = np.stack([cs.nearest_ids(index, np.asarray(interior[i]).reshape(-1, dim)) for i in range(n_img)])
    ckpt = out_dir / mlp_file(settings)
    record = {**settings_of(settings, NB_KEYS), **_informational(settings), DIGEST_KEY: coreset_digest(coresets)}
    child = distributed.is_child()  # DDP ranks > 0 train but write nothing
    # built first: a flag Lightning refuses must not cost the saved model
    trainer = build_trainer(
        settings.runtime,
        progress,
        max_epochs=train.num_epochs,
        num_sanity_val_steps=0,
        precision=settings.runtime.precision,
        **distributed.devices_and_strategy(settings.runtime),
    )
    if not child:
        begin_stage(out_dir / "nb_settings.json")
    # The same seed gives the same model whichever other stages ran before in this process.
    pl.seed_everything(settings.seed, workers=True, verbose=False)
    saved = []

    def on_best(model: torch.nn.Module, train_loss: float, val_loss: float) -> None:
        save_mlp_checkpoint(ckpt, model, record, train_loss, val_loss)  # replaces the old model atomically
        saved.append(val_loss)
        test_hook("nb_checkpoint")

    dcs = settings.coreset.dist_coreset_size
    module = NeighbourhoodModule(nb.input_size(dim), dcs, nb.num_layers, train.learning_rate, train.step_size, on_best)
    train_ids, val_ids = split_train_val(labels.size, settings.seed)
    collate = WindowCollate(bank, labels, pad, nb.dist_padding, nb.variant, compute_dtype(settings.runtime.precision))
    workers = settings.data.num_workers
    train_loader = window_loader(train_ids, collate, train.dist_batchsize, True, settings.seed, workers)
    val_loader = window_loader(val_ids, collate, train.dist_batchsize, False, settings.seed, workers)
    interruptible(trainer.fit, module, train_loader, val_loader)
    if child:
        return
    if not saved:
        ckpt.unlink(missing_ok=True)
        raise PNIError(f"the neighbourhood MLP never reached a finite validation loss; no {ckpt} written")
    save_json(out_dir / "nb_settings.json", record)


def train_position(
    settings: Settings,
    bank: np.ndarray,
    coresets: dict[str, np.ndarray],
    out_dir: Path,
    progress: Progress | None = None,
) -> None:
    """Stage 3: the two position priors (interior / without-edge coreset and all positions /
    with-edge coreset), normalised per position, as ``.npy``. ``progress`` counts images
    (twice: once per prior)."""
    pad, dp = settings.features.pad, settings.neighbourhood.dist_padding
    n_img, n_rows, n_cols, dim = bank.shape
    if progress is not None:
        progress.add_total(2 * n_img)
    begin_stage(out_dir / "coor_settings.json")
    for with_edge in (False, True):
        entries = coresets["with_edge" if with_edge else "without_edge"]
        index = cs.use_gpu_index(cs.build_index(entries))
        counts = torch.zeros(n_rows * n_cols, len(entries), dtype=torch.float32)
        # all positions, or the interior ones (whose rows of counts their ids go to)
        positions = None if with_edge else interior_indices(n_rows, n_cols, pad)
        for i in range(n_img):
            grid = np.asarray(bank[i]) if with_edge else np.asarray(bank[i, pad : n_rows - pad, pad : n_cols - pad])
            ids = torch.as_tensor(cs.nearest_ids(index, grid.reshape(-1, dim)))[None]
            position_prior_counts(ids, (n_rows, n_cols), len(entries), dp, positions=positions, counts=counts)
            if progress is not None:
                progress.update()
        prior = normalise_rows(counts).numpy()
        save_npy(out_dir / position_prior_file_name(settings.coreset.subsampling_percentage, with_edge), prior)
        test_hook("coor_prior")
    record = {**settings_of(settings, COOR_KEYS), **_informational(settings), DIGEST_KEY: coreset_digest(coresets)}
    save_json(out_dir / "coor_settings.json", record)


# ---------------------------------------------------------------- test stage


def run_test(
    settings: Settings,
    extractor: Any,
    test_ds: Dataset,
    coresets: dict[str, np.ndarray],
    priors: dict[str, np.ndarray],
    mlp: NeighbourhoodMLP,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Stage 4: score every test image, write results and the score table row; ``progress``
    counts test batches.

    Under DDP every rank scores its share of the test set and writes those images' files;
    rank 0 gathers the rows, reads the maps back for the AUROCs and writes the tables (the
    other ranks return ``{}``)."""
    ddp, child = settings.runtime.ddp, distributed.is_child()
    data, features, nb = settings.data, settings.features, settings.neighbourhood
    per_image = check_test_grid(features, extractor, priors, settings.embedding_dir)
    model = PNIModel.from_arrays(extractor, mlp, coresets, priors, settings.scoring, nb.dist_padding, features.resize)

    score_csv = Path(settings.output.project_root_path) / "score_result.csv"
    check_score_result(score_csv)  # fail now, not after scoring every image

    def new_partial() -> Path:
        return new_version_dir(settings.output.project_root_path, data.category, features.backbone)

    # under DDP rank 0 names the folder and the other ranks take it (pni.distributed.shared)
    partial = Path(distributed.shared("version_dir", lambda: str(new_partial()))) if ddp else new_partial()
    try:
        sample_dir = make_dir(partial / "sample")
        collector = ResultCollector(sample_dir)
        module = ScoringModule(model, collector)
        loader = DataLoader(
            IndexedDataset(test_ds),
            batch_size=images_per_batch(features.imagesize, settings.runtime.accelerator, per_image),
            shuffle=False,
            num_workers=data.num_workers,
        )
        trainer = build_trainer(
            settings.runtime,
            progress,
            logger=False,
            precision=settings.runtime.precision,
            **distributed.devices_and_strategy(settings.runtime),
        )
        interruptible(trainer.test, module, loader, verbose=False)
        rows: list[list[Any]] = collector.rows
        if ddp:  # every rank's rows, once each
            merged = distributed.gather_by_index(collector.indices, list(zip(collector.rows, collector.score_tuples())))
            if child:
                return {}
            rows = [row for row, _ in merged]
        n_test = len(test_ds)  # type: ignore[arg-type]
        if len(rows) != n_test:
            raise PNIError(f"scored {len(rows)} of {n_test} test images")
        write_image_scores(partial / "image_scores.csv", rows)
        with_masks = getattr(test_ds, "has_masks", True)
        if not with_masks:
            print(
                f"note: the test images of {data.category} have no ground_truth/ masks: image-level results "
                "only (P-AUROC columns left empty)",
                flush=True,
            )
        if ddp:
            scores = scores_from_samples(sample_dir, rows, [image_scores for _, image_scores in merged], with_masks)
        else:
            scores = collector.scores(with_masks)
        save_json(partial / "settings.json", settings.flags())
        version_dir = publish_version_dir(partial)
    except BaseException:
        if not child:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    append_score_result(score_csv, {**settings.flags(), "version": version_dir.name}, scores)
    return {**_run_summary(settings), "version_dir": str(version_dir), **scores}


def _run_summary(settings: Settings) -> dict[str, Any]:
    """What :func:`run` returns besides the scores and the result folder."""
    return {
        "category": settings.data.category,
        "variant": settings.scoring.variant,
        "mask_workers": settings.scoring.mask_workers,
    }


# ---------------------------------------------------------------- all stages


def run(settings: Settings) -> dict[str, Any]:
    """Run every stage for one category; returns the test scores.

    With ``--devices N --strategy ddp`` the MLP training and the test scoring run on N
    processes and everything else on rank 0 (see :mod:`pni.distributed`); the other ranks
    re-run this function, skip rank 0's stages and writes, and return ``{}``.
    """
    settings = dataclasses.replace(settings, runtime=distributed.configure(settings.runtime))
    child = distributed.is_child()
    # before any work: 16-mixed on a CPU refused; the note that bf16-mixed is available, rank 0 only
    check_and_note(settings.runtime.precision, settings.runtime.accelerator, note=not child)
    if child:  # one copy of the progress lines and tables, from rank 0
        sys.stdout = open(os.devnull, "w")
    else:
        check_trainer_flags(settings.runtime)
    pl.seed_everything(settings.seed, workers=True, verbose=False)
    data, stages, category = settings.data, settings.stages, settings.data.category
    out_dir = settings.embedding_dir
    train_ds, test_ds = build_datasets(
        data.dataset_category,
        data.dataset_path,
        category,
        resize=settings.features.resize,
        imagesize=settings.features.imagesize,
    )
    train_set: Dataset = train_ds
    if data.max_train_images:
        train_set = torch.utils.data.Subset(train_ds, range(min(data.max_train_images, len(train_ds))))
    # What decides the features besides the flags, recorded with every stage's settings.
    settings = dataclasses.replace(settings, digests=input_digests(settings, train_set))
    check_saved_stages(settings, out_dir)
    if not child:  # the test stage's outputs, checked before hours of training
        check_output_dir(settings.output.project_root_path, "--project_root_path")
        check_score_result(Path(settings.output.project_root_path) / "score_result.csv")
    extractor = settings.features.build_extractor()
    if stages.training and not child:
        make_dir(out_dir, "--embedding_root_path")
        save_json(out_dir / "feature_settings.json", settings_of(settings, FEATURE_KEYS))
        remove_stale(out_dir, ".scratch-*")
    scratch_dir = (
        nullcontext(None)
        if child
        else tempfile.TemporaryDirectory(prefix=f".scratch-{owner_tag()}-", dir=out_dir if stages.training else None)
    )
    with scratch_dir as scratch_name:
        scratch = Path(scratch_name) if scratch_name is not None else None  # DDP ranks > 0 extract nothing
        bank = None
        if stages.train_coreset and not child:  # DDP: rank 0 alone, before the other ranks start
            with Progress(f"[{category}] stage 1/4: coresets") as bar:
                bank = build_coresets(settings, extractor, train_set, out_dir, scratch, bar)
        coresets = load_coresets(settings, out_dir)
        check_anomaly_nn(settings, len(coresets["with_edge"]))
        if (stages.train_nb_dist or stages.train_coor_dist) and bank is None and not child:
            with Progress(f"[{category}] extracting training features") as bar:
                bank, _ = extract_bank(
                    settings, extractor, train_set, scratch, on_disk=bank_on_disk(settings), progress=bar
                )
        if stages.train_nb_dist:
            if settings.runtime.ddp:
                bank = distributed.share_bank(bank)
            assert bank is not None
            with Progress(f"[{category}] stage 2/4: neighbourhood MLP") as bar:
                train_neighbourhood(settings, bank, coresets, out_dir, bar)
        if stages.train_coor_dist and not child:
            assert bank is not None
            with Progress(f"[{category}] stage 3/4: position priors") as bar:
                train_position(settings, bank, coresets, out_dir, bar)
        del bank
    distributed.barrier()  # DDP ranks > 0 wait here for rank 0's position priors
    priors = load_position_priors(settings, out_dir, coresets)
    mlp = load_neighbourhood_model(settings, out_dir, coresets)
    if len(test_ds) == 0:
        print(
            f"[{category}] stage 4/4: no test images in {Path(data.dataset_path) / category}: "
            "nothing to score, test stage skipped",
            flush=True,
        )
        return {**_run_summary(settings), "version_dir": None}
    with Progress(f"[{category}] stage 4/4: scoring {len(test_ds)} test images") as bar:
        result = run_test(settings, extractor, test_ds, coresets, priors, mlp, bar)
    if child:
        return result
    print_table(
        f"[{category}] AUROC (%) of the four maps ({settings.features.backbone}, seed {settings.seed})",
        format_score_table([result]),
    )
    print(f"results: {result['version_dir']}", flush=True)
    return result
