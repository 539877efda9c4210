"""One category, top to bottom: data -> features -> coresets -> priors -> scoring -> results.

``run(args)`` is what ``train_coreset_distribution.py`` calls with its parsed flags.
Stages whose ``--train_*`` flag is absent load their saved artefacts instead; each stage
records its settings in a JSON file beside its artefacts, and later runs refuse artefacts
made with incompatible settings.
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader

from pni import coreset as cs
from pni.config import embedding_dir
from pni.data.datasets import build_datasets
from pni.data.transforms import denormalize
from pni.distributions import (
    load_mlp_checkpoint,
    mlp_file_name,
    mlp_from_state_dict,
    normalise_rows,
    position_prior_counts,
    position_prior_file_name,
    save_mlp_checkpoint,
)
from pni.errors import PNIError
from pni.features import build_feature_extractor
from pni.io import load_json, load_npy, save_json, save_npy
from pni.lightning import (
    AnomalyTestModule,
    CoresetModule,
    FeatureBankModule,
    IndexedDataset,
    NeighbourhoodModule,
    WindowCollate,
    split_train_val,
    window_loader,
)
from pni.metrics import image_auroc, pixel_auroc
from pni.results import (
    MAP_NAMES,
    append_score_result,
    format_score_table,
    write_image_scores,
    write_sample,
)
from pni.scoring import ScoringArtefacts, ScoringConfig, nearest_ids, score_image

log = logging.getLogger("pni")

# Settings that make artefacts of one stage incompatible with another run's flags.
FEATURE_KEYS = ("dataset_category", "category", "backbone", "layer_index", "pretrain_embed_dimension",
                "target_embed_dimension", "patchsize", "resize", "imagesize", "random_init", "max_train_images")
CORESET_KEYS = FEATURE_KEYS + ("subsampling_percentage", "dist_coreset_size", "seed")
NB_KEYS = CORESET_KEYS + ("dist_padding", "num_layers")
COOR_KEYS = CORESET_KEYS + ("dist_padding",)

# Above this size the training feature bank lives in a memory-mapped file, not in RAM.
IN_MEMORY_BANK_BYTES = int(os.environ.get("PNI_IN_MEMORY_BANK_BYTES", 4 * 2**30))


def coreset_file_names(args: argparse.Namespace) -> dict[str, str]:
    sp = int(args.subsampling_percentage * 100)
    return {
        "without_edge": f"embedding_coreset_index_{sp}.faiss",
        "with_edge": f"embedding_coreset_index_{sp}_with_edge.faiss",
        "distribution": f"dist_coreset_index_{args.dist_coreset_size}.faiss",
    }


def _settings(args: argparse.Namespace, keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: getattr(args, k) for k in keys}


def _check_settings(path: Path, args: argparse.Namespace, keys: tuple[str, ...], what: str) -> None:
    if not path.is_file():
        return  # artefacts from the original code carry no settings record
    saved = load_json(path)
    wanted = _settings(args, keys)
    wanted = {k: (list(v) if isinstance(v, tuple) else v) for k, v in wanted.items()}
    diff = {k: (saved[k], wanted[k]) for k in keys if k in saved and saved[k] != wanted[k]}
    if diff:
        detail = ", ".join(f"--{k} {new} (saved: {old})" for k, (old, new) in diff.items())
        raise PNIError(f"{what} in {path.parent} were made with other settings: {detail}; "
                       f"re-run with its --train_* flag or change the flags back")


def _trainer(args: argparse.Namespace, **kwargs: Any) -> pl.Trainer:
    defaults = dict(accelerator=args.accelerator, devices=_devices(args.devices), logger=False,
                    enable_checkpointing=False, enable_model_summary=False, deterministic=False)
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def _devices(text: str) -> Any:
    if text == "auto":
        return "auto"
    if "," in text:
        return [int(t) for t in text.split(",") if t]
    return int(text)


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*GPU available but not used.*")
        warnings.filterwarnings("ignore", ".*_pytree.*")
        warnings.filterwarnings("ignore", ".*LeafSpec.*")
        warnings.filterwarnings("ignore", ".*predict returned None.*")
        for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)
        yield


# ---------------------------------------------------------------- stage helpers


def extract_bank(args, extractor, train_ds, scratch: Path, module_cls=FeatureBankModule, **module_kwargs):
    """Run the extractor over the training set into a preallocated bank ``(N, R, C, E)``."""
    probe = extractor(train_ds[0]["image"][None])
    shape = (len(train_ds),) + tuple(probe.shape[1:])
    nbytes = int(np.prod(shape)) * 4
    if nbytes > IN_MEMORY_BANK_BYTES:
        bank = np.lib.format.open_memmap(scratch / "train_features.npy", mode="w+", dtype=np.float32, shape=shape)
    else:
        bank = np.empty(shape, dtype=np.float32)
    module = module_cls(extractor, bank, **module_kwargs)
    loader = DataLoader(IndexedDataset(train_ds), batch_size=_batch_size(args), shuffle=False,
                        num_workers=args.num_workers)
    with _quiet_lightning():
        _trainer(args, devices=1, strategy="auto").predict(module, loader, return_predictions=False)
    return bank, module


def _batch_size(args: argparse.Namespace) -> int:
    # ~8 images of 480 px per batch; more for small images.
    return max(1, min(32, int(8 * (480 / args.imagesize) ** 2)))


def build_coresets(args, extractor, train_ds, out_dir: Path, scratch: Path) -> np.ndarray:
    """Stage 1: feature bank, greedy selections, the three faiss files. Returns the bank."""
    pad = (args.patchsize - 1) // 2
    probe = extractor(train_ds[0]["image"][None])
    _, n_rows, n_cols, _ = probe.shape
    n_img = len(train_ds)
    n_with = n_img * n_rows * n_cols
    n_without = n_img * (n_rows - 2 * pad) * (n_cols - 2 * pad)
    if n_rows <= 2 * pad or n_cols <= 2 * pad:
        raise PNIError(f"--imagesize {args.imagesize} gives a {n_rows}x{n_cols} grid, too small for --patchsize "
                       f"{args.patchsize}")
    k_emb = int(args.subsampling_percentage * n_without)
    k_emb_edge = int(args.subsampling_percentage * n_with)
    if min(k_emb, k_emb_edge) < 1:
        raise PNIError(f"--subsampling_percentage {args.subsampling_percentage} selects no patch of {n_without}")
    if args.dist_coreset_size > n_without:
        raise PNIError(f"--dist_coreset_size {args.dist_coreset_size} exceeds the {n_without} interior training "
                       "patches; lower it or add training images")
    n_select = {"without_edge": max(k_emb, args.dist_coreset_size), "with_edge": k_emb_edge}
    bank, module = extract_bank(args, extractor, train_ds, scratch, CoresetModule, pad=pad,
                                n_select=n_select, seed=args.seed)
    sel_without = module.selections["without_edge"].numpy()
    sel_with = module.selections["with_edge"].numpy()
    flat = bank.reshape(-1, bank.shape[-1])
    interior = bank[:, pad:n_rows - pad, pad:n_cols - pad].reshape(-1, bank.shape[-1])
    names = coreset_file_names(args)
    cs.save_index(cs.build_index(interior[sel_without[:k_emb]]), out_dir / names["without_edge"])
    cs.save_index(cs.build_index(interior[sel_without[: args.dist_coreset_size]]), out_dir / names["distribution"])
    cs.save_index(cs.build_index(flat[sel_with]), out_dir / names["with_edge"])
    save_json(out_dir / "coreset_settings.json", _settings(args, CORESET_KEYS))
    log.info("coresets: %d (interior), %d (with edge), %d (distribution) of %d / %d patches",
             k_emb, k_emb_edge, args.dist_coreset_size, n_without, n_with)
    return bank


def load_coresets(args, out_dir: Path) -> dict[str, np.ndarray]:
    """The three coresets as arrays ``(K, E)``."""
    _check_settings(out_dir / "coreset_settings.json", args, CORESET_KEYS, "coresets")
    out = {}
    for key, name in coreset_file_names(args).items():
        path = out_dir / name
        if not path.is_file():
            raise PNIError(f"missing coreset {path} (run with --train_coreset to make it)")
        try:
            out[key] = cs.index_vectors(cs.load_index(path))
        except Exception as exc:
            raise PNIError(f"cannot read coreset {path}: {str(exc).splitlines()[0]}") from None
        if out[key].shape[1] != args.target_embed_dimension:
            raise PNIError(f"{path} holds {out[key].shape[1]}-dim features, but --target_embed_dimension is "
                           f"{args.target_embed_dimension}")
    return out


def train_neighbourhood(args, bank: np.ndarray, coresets: dict[str, np.ndarray], out_dir: Path) -> None:
    """Stage 2: label interior training positions by their nearest distribution entry and
    train the neighbourhood MLP; keeps the best-validation weights."""
    pad = (args.patchsize - 1) // 2
    n_img, n_rows, n_cols, dim = bank.shape
    index = cs.use_gpu_index(cs.build_index(coresets["distribution"]))
    interior = bank[:, pad:n_rows - pad, pad:n_cols - pad]
    labels = np.stack([cs.nearest_ids(index, np.asarray(interior[i]).reshape(-1, dim)) for i in range(n_img)])
    n_windows = (2 * args.dist_padding + 1) ** 2 - 1
    ckpt = out_dir / mlp_file_name(args.dist_padding, args.dist_coreset_size, args.num_layers)
    settings = _settings(args, NB_KEYS)

    def on_best(model, train_loss, val_loss):
        save_mlp_checkpoint(ckpt, model, settings, train_loss, val_loss)

    module = NeighbourhoodModule(n_windows * dim, args.dist_coreset_size, args.num_layers, args.learning_rate,
                                 args.step_size, on_best)
    train_ids, val_ids = split_train_val(labels.size, args.seed)
    collate = WindowCollate(bank, labels, pad, args.dist_padding)
    train_loader = window_loader(train_ids, collate, args.dist_batchsize, True, args.seed, args.num_workers)
    val_loader = window_loader(val_ids, collate, args.dist_batchsize, False, args.seed, args.num_workers)
    with _quiet_lightning():
        trainer = _trainer(args, max_epochs=args.num_epochs, num_sanity_val_steps=0, strategy=args.strategy)
        trainer.fit(module, train_loader, val_loader)
    save_json(out_dir / "nb_settings.json", settings)


def train_position(args, bank: np.ndarray, coresets: dict[str, np.ndarray], out_dir: Path) -> None:
    """Stage 3: the two position priors (interior / without-edge coreset and all positions /
    with-edge coreset), normalised per position, as ``.npy``."""
    pad = (args.patchsize - 1) // 2
    n_img, n_rows, n_cols, dim = bank.shape
    rr, cc = np.meshgrid(np.arange(pad, n_rows - pad), np.arange(pad, n_cols - pad), indexing="ij")
    interior_pos = torch.as_tensor((rr * n_cols + cc).reshape(-1))
    for with_edge in (False, True):
        entries = coresets["with_edge" if with_edge else "without_edge"]
        index = cs.use_gpu_index(cs.build_index(entries))
        counts = torch.zeros(n_rows * n_cols, len(entries), dtype=torch.float32)
        for i in range(n_img):
            grid = np.asarray(bank[i])
            if with_edge:
                ids = cs.nearest_ids(index, grid.reshape(-1, dim))
                position_prior_counts(torch.as_tensor(ids)[None], (n_rows, n_cols), len(entries),
                                      args.dist_padding, counts=counts)
            else:
                ids = cs.nearest_ids(index, grid[pad:n_rows - pad, pad:n_cols - pad].reshape(-1, dim))
                position_prior_counts(torch.as_tensor(ids)[None], (n_rows, n_cols), len(entries),
                                      args.dist_padding, positions=interior_pos, counts=counts)
        prior = normalise_rows(counts).numpy()
        save_npy(out_dir / position_prior_file_name(args.subsampling_percentage, with_edge), prior)
    save_json(out_dir / "coor_settings.json", _settings(args, COOR_KEYS))


def load_position_priors(args, out_dir: Path, coresets: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    _check_settings(out_dir / "coor_settings.json", args, COOR_KEYS, "position priors")
    out = {}
    for with_edge, key in ((False, "without_edge"), (True, "with_edge")):
        path = out_dir / position_prior_file_name(args.subsampling_percentage, with_edge)
        if not path.is_file():
            raise PNIError(f"missing position prior {path} (run with --train_coor_dist to make it)")
        prior = load_npy(path)
        if prior.ndim != 2 or prior.shape[1] != len(coresets[key]):
            raise PNIError(f"{path} has shape {prior.shape}, but the coreset has {len(coresets[key])} entries; "
                           "re-run with --train_coor_dist")
        out[key] = prior
    return out


# ---------------------------------------------------------------- test stage


class ResultCollector:
    """Receives each scored test image: writes its files and keeps what the AUROCs need."""

    def __init__(self, sample_dir: Path) -> None:
        self.sample_dir = sample_dir
        self.rows: list[list] = []
        self.labels: list[int] = []
        self.image_scores: dict[str, list[float]] = {m: [] for m in MAP_NAMES}
        self.masks: list[np.ndarray] = []
        self.maps: dict[str, list[np.ndarray]] = {m: [] for m in MAP_NAMES}

    def __call__(self, meta: dict, result) -> None:
        maps = {m: result.maps[m].detach().float().cpu().numpy() for m in MAP_NAMES}
        image = denormalize(meta["image"].cpu())
        gt = (meta["mask"].cpu().numpy()[0] > 0.5).astype(np.uint8)
        defect_type, stem, label = str(meta["defect_type"]), str(meta["stem"]), int(meta["label"])
        write_sample(self.sample_dir, defect_type, stem, image, gt, maps)
        self.rows.append([defect_type, stem, label] + [f"{result.image[m]:.6f}" for m in MAP_NAMES])
        self.labels.append(label)
        self.masks.append(gt)
        for m in MAP_NAMES:
            self.image_scores[m].append(float(result.image[m]))
            self.maps[m].append(maps[m])

    def scores(self) -> dict[str, float]:
        masks = np.stack(self.masks)
        out = {}
        for m in MAP_NAMES:
            out[f"{m}_P-AUROC"] = pixel_auroc(masks, np.stack(self.maps[m]))
            out[f"{m}_I-AUROC"] = image_auroc(np.asarray(self.labels), np.asarray(self.image_scores[m]))
        return out


def run_test(args, extractor, test_ds, coresets, priors, mlp) -> dict[str, Any]:
    """Stage 4: score every test image, write results and the score table row."""
    device = torch.device("cuda" if args.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
                          else "cpu")
    emb = torch.as_tensor(coresets["without_edge"])
    dist = torch.as_tensor(coresets["distribution"])
    art = ScoringArtefacts(
        embedding_without_edge=emb.to(device),
        embedding_with_edge=torch.as_tensor(coresets["with_edge"]).to(device),
        distribution_coreset=dist.to(device),
        embedding_to_distribution=nearest_ids(emb, dist).to(device),
        position_prior=torch.as_tensor(priors["without_edge"]).to(device),
        position_prior_with_edge=torch.as_tensor(priors["with_edge"]).to(device),
    )
    cfg = ScoringConfig(anomaly_nn=args.anomaly_nn, patchsize=args.patchsize, prob_gamma=args.prob_gamma,
                        softmax_temperature_alpha=args.softmax_temperature_alpha,
                        softmax_nb_gamma=args.softmax_nb_gamma, softmax_coor_gamma=args.softmax_coor_gamma,
                        nb_mask=args.nb_mask, imagesize=args.imagesize, blursigma=args.blursigma)

    def scorer(features, logits):
        return score_image(features, logits, art, cfg)

    logger = CSVLogger(str(Path(args.project_root_path) / args.category / args.backbone / "anomaly"),
                       name="lightning_logs")
    version_dir = Path(logger.log_dir)
    sample_dir = version_dir / "sample"
    sample_dir.mkdir(parents=True, exist_ok=True)
    collector = ResultCollector(sample_dir)
    pad = (args.patchsize - 1) // 2
    module = AnomalyTestModule(extractor, mlp, pad, args.dist_padding, scorer, collector)
    loader = DataLoader(test_ds, batch_size=_batch_size(args), shuffle=False, num_workers=args.num_workers)
    with _quiet_lightning():
        _trainer(args, devices=1, strategy="auto", logger=False).test(module, loader, verbose=False)
    write_image_scores(version_dir / "image_scores.csv", collector.rows)
    scores = collector.scores()
    settings = {"category": args.category, "backbone": args.backbone, "version": version_dir.name,
                "seed": args.seed, "imagesize": args.imagesize, "subsampling_percentage": args.subsampling_percentage,
                "anomaly_nn": args.anomaly_nn, "dist_coreset_size": args.dist_coreset_size,
                "dist_padding": args.dist_padding, "num_layers": args.num_layers, "nb_mask": args.nb_mask}
    save_json(version_dir / "settings.json", vars(args))
    append_score_result(Path(args.project_root_path) / "score_result.csv", settings, scores)
    return {"category": args.category, "version_dir": str(version_dir), **scores}


# ---------------------------------------------------------------- all stages


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every stage for one category; returns the test scores."""
    pl.seed_everything(args.seed, workers=True, verbose=False)
    out_dir = embedding_dir(args)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_ds, test_ds = build_datasets(args.dataset_category, args.dataset_path, args.category,
                                       resize=args.resize, imagesize=args.imagesize)
    if args.max_train_images:
        train_ds = torch.utils.data.Subset(train_ds, range(min(args.max_train_images, len(train_ds))))
    extractor = build_feature_extractor(args.backbone, args.layer_index, args.pretrain_embed_dimension,
                                        args.target_embed_dimension, args.patchsize, args.backbone_weights,
                                        args.random_init)
    training = args.train_coreset or args.train_nb_dist or args.train_coor_dist
    if training:
        save_json(out_dir / "feature_settings.json", _settings(args, FEATURE_KEYS))
    with tempfile.TemporaryDirectory(prefix=".scratch-", dir=out_dir) as scratch:
        scratch = Path(scratch)
        bank = None
        if args.train_coreset:
            print(f"[{args.category}] stage 1/4: coresets", flush=True)
            bank = build_coresets(args, extractor, train_ds, out_dir, scratch)
        coresets = load_coresets(args, out_dir)
        if (args.train_nb_dist or args.train_coor_dist) and bank is None:
            print(f"[{args.category}] extracting training features", flush=True)
            bank, _ = extract_bank(args, extractor, train_ds, scratch)
        if args.train_nb_dist:
            print(f"[{args.category}] stage 2/4: neighbourhood MLP", flush=True)
            train_neighbourhood(args, bank, coresets, out_dir)
        if args.train_coor_dist:
            print(f"[{args.category}] stage 3/4: position priors", flush=True)
            train_position(args, bank, coresets, out_dir)
        del bank
    priors = load_position_priors(args, out_dir, coresets)
    _check_settings(out_dir / "nb_settings.json", args, NB_KEYS, "neighbourhood model")
    ckpt = load_mlp_checkpoint(out_dir / mlp_file_name(args.dist_padding, args.dist_coreset_size, args.num_layers))
    mlp = mlp_from_state_dict(ckpt["model"])
    expected_in = ((2 * args.dist_padding + 1) ** 2 - 1) * args.target_embed_dimension
    if mlp.first_layer[0].in_features != expected_in or mlp.last_layer[0].out_features != len(coresets["distribution"]):
        raise PNIError(f"neighbourhood model in {out_dir} does not fit --dist_padding {args.dist_padding}, "
                       f"--target_embed_dimension {args.target_embed_dimension}, --dist_coreset_size "
                       f"{args.dist_coreset_size}; re-run with --train_nb_dist")
    print(f"[{args.category}] stage 4/4: scoring {len(test_ds)} test images", flush=True)
    result = run_test(args, extractor, test_ds, coresets, priors, mlp)
    print(format_score_table([result]), flush=True)
    print(f"results: {result['version_dir']}", flush=True)
    return result
