"""Command-line flags and the typed settings built from them once (docs/METHOD.md, section 0).

Flags: names and defaults are the original's; ``--accelerator``, ``--devices``, ``--strategy``,
``--backbone_weights``, ``--random_init``, ``--embedding_root_path``,
``--max_train_images``, ``--variant``, ``--mask_workers``, ``--debug`` and ``--verbose`` are ours.
Every check that needs only the flags is made here, before anything is read or written.

Settings: :func:`settings_from_flags` turns the parsed flags of ``train_coreset_distribution.py``
into one frozen :class:`Settings` (groups: data, features, coreset, neighbourhood, MLP training,
scoring, runtime, output, stages, console, seed); :func:`export_settings_from_flags` and
:func:`predict_settings_from_flags` do the same for ``export_model.py`` and ``predict.py``.
Everything past the CLI scripts takes these objects, never the parsed flags. Facts decided at
run time (DDP, the digests of the backbone weights and the training images) are set with
``dataclasses.replace``. :meth:`Settings.flags` is the flat ``{flag name: value}`` view that
the artefacts' settings records and the test run's ``settings.json`` hold.

Importing this module does not import torch (the compute modules are imported where a
parser or setting needs them), so that ``predict.py --runtime onnxruntime`` runs without it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pni.cli import ArgumentParser, Devices, parse_devices
from pni.errors import PNIError
from pni.io import is_single_name
from pni.maps import MAP_NAMES

if TYPE_CHECKING:
    from pni.features import PatchFeatureExtractor
    from pni.scoring import ScoringConfig

DATASET_CATEGORIES = ("MVTec", "BTAD", "VisA")
NB_MASK_ALIASES = {"official": "original", "paper": "paper"}  # the old --nb_mask values
LAYERS = ("layer1", "layer2", "layer3", "layer4")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
STRATEGIES = ("auto", "ddp", "ddp_find_unused_parameters_true")
PROB_GAMMA_RANGE = (1e-6, 1e6)  # beyond it the float32 maps overflow or lose their range
RUNTIMES = ("torch", "onnxruntime")  # predict.py --runtime (pni.predict.load_model's runtime)
# --precision (pni.precision; here without torch, for the manifest's check and predict.py)
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed")
DEFAULT_PRECISION = "32-true"


def _checked(name: str, convert: Callable[[str], Any], ok: Callable[[Any], bool], rule: str) -> Callable[[str], Any]:
    """An argparse ``type``: ``convert`` the text, refuse it unless ``ok`` ("must be <rule>")."""

    def parse(text: str) -> Any:
        value = convert(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    parse.__name__ = name  # argparse names it in "invalid <name> value" errors
    return parse


_positive_int = _checked("_positive_int", int, lambda v: v > 0, "a positive integer")
_at_least_two = _checked("_at_least_two", int, lambda v: v >= 2, "an integer >= 2")
_non_negative_int = _checked("_non_negative_int", int, lambda v: v >= 0, ">= 0")
_positive_float = _checked("_positive_float", float, lambda v: 0 < v < math.inf, "> 0 and finite")
_non_negative_float = _checked("_non_negative_float", float, lambda v: 0 <= v < math.inf, ">= 0 and finite")
_prob_gamma = _checked(
    "_prob_gamma",
    float,
    lambda v: PROB_GAMMA_RANGE[0] <= v <= PROB_GAMMA_RANGE[1],
    f"in [{PROB_GAMMA_RANGE[0]:g}, {PROB_GAMMA_RANGE[1]:g}]",
)
_single_name = _checked("_single_name", str, is_single_name, "a single folder name (not a path)")
_fraction = _checked("_fraction", float, lambda v: 0 < v <= 1, "in (0, 1]")
_odd_positive = _checked("_odd_positive", int, lambda v: v > 0 and v % 2 == 1, "a positive odd integer")


def build_parser() -> argparse.ArgumentParser:
    from pni.features import BACKBONES
    from pni.scoring import VARIANTS

    p = ArgumentParser(
        description="PNI: build coresets, learn the neighbourhood and position priors for one "
        "category, then score its test set (anomaly maps + AUROC).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("stages (a stage whose flag is absent loads its saved artefacts)")
    g.add_argument("--train_coreset", action="store_true", help="build the embedding and distribution coresets")
    g.add_argument("--train_nb_dist", action="store_true", help="train the neighbourhood MLP")
    g.add_argument("--train_coor_dist", action="store_true", help="count the position priors")

    g = p.add_argument_group("data")
    g.add_argument("--dataset_path", default="../dataset/MVTecAD", help="dataset root folder")
    g.add_argument("--dataset_category", default="MVTec", choices=DATASET_CATEGORIES, help="dataset layout")
    g.add_argument(
        "--category", type=_single_name, default="bottle", help="product category (sub-folder of --dataset_path)"
    )
    g.add_argument("--resize", type=_positive_int, default=512, help="shorter image side after resizing")
    g.add_argument("--imagesize", type=_positive_int, default=480, help="centre-crop size")
    g.add_argument("--num_workers", type=_non_negative_int, default=0, help="data loader worker processes")
    g.add_argument(
        "--max_train_images",
        type=_positive_int,
        default=None,
        help="use only the first N training images (quick experiments)",
    )

    g = p.add_argument_group("output")
    g.add_argument("--project_root_path", default="./result", help="where test results and score_result.csv go")
    g.add_argument(
        "--embedding_root_path",
        default=".",
        help="folder holding embeddings_layer2+layer3/ (BTAD_embedding/, VisA_embedding/)",
    )
    g.add_argument("--seed", type=int, default=22, help="random seed")

    g = p.add_argument_group("features")
    g.add_argument("--backbone", "-b", default="WR101", choices=list(BACKBONES), help="ImageNet backbone")
    g.add_argument(
        "--backbone_weights",
        default=None,
        metavar="PATH",
        help="torchvision state dict of the backbone (default: the torch hub cache)",
    )
    g.add_argument(
        "--random_init", action="store_true", help="randomly initialised backbone (tests and offline demos only)"
    )
    g.add_argument(
        "--layer_index",
        nargs="+",
        default=["layer2", "layer3"],
        choices=LAYERS,
        help="backbone layers whose features are used",
    )
    g.add_argument("--pretrain_embed_dimension", type=_positive_int, default=1024, help="per-layer pooled size")
    g.add_argument("--target_embed_dimension", type=_positive_int, default=1024, help="final feature size E")
    g.add_argument("--patchsize", type=_odd_positive, default=5, help="local aggregation window (odd)")

    g = p.add_argument_group("coreset")
    g.add_argument(
        "--subsampling_percentage",
        "-p",
        type=_fraction,
        default=0.01,
        help="embedding coreset size as a fraction of all training patches",
    )
    g.add_argument("--dist_coreset_size", type=_positive_int, default=2048, help="distribution coreset size")
    g.add_argument("--anomaly_nn", type=_positive_int, default=3, help="neighbours for the PatchCore score")

    g = p.add_argument_group("neighbourhood and position priors")
    g.add_argument("--dist_padding", type=_positive_int, default=4, help="half-width dp of the neighbourhood window")
    g.add_argument(
        "--num_layers", type=_at_least_two, default=10, help="linear layers of the neighbourhood MLP (at least 2)"
    )
    g.add_argument("--num_epochs", type=_positive_int, default=15, help="MLP training epochs")
    g.add_argument("--learning_rate", type=_positive_float, default=1e-3, help="Adam learning rate")
    g.add_argument("--step_size", type=_positive_int, default=5, help="StepLR period (epochs), gamma 0.1")
    g.add_argument("--dist_batchsize", type=_positive_int, default=2048, help="MLP batch size")

    g = p.add_argument_group("scoring")
    g.add_argument("--softmax_temperature_alpha", type=_positive_float, default=2.0, help="softmax temperature")
    g.add_argument("--prob_gamma", type=_prob_gamma, default=0.99, help="g in prob = g*exp(-g*d)")
    g.add_argument(
        "--softmax_nb_gamma",
        type=_non_negative_float,
        default=0.5,
        help="neighbourhood threshold: softmax > gamma / coreset size",
    )
    g.add_argument(
        "--softmax_coor_gamma",
        type=_non_negative_float,
        default=0.5,
        help="position threshold: prior > gamma / coreset size",
    )
    g.add_argument(
        "--blursigma",
        type=_non_negative_float,
        default=8.0,
        help="Gaussian blur of the maps (pixels, at most --imagesize)",
    )
    g.add_argument(
        "--variant",
        default=None,
        choices=VARIANTS,
        help="'original' (default) reproduces the published code, its quirks included (rank/id mix-up "
        "of the neighbourhood mask, lost parallel mask writes, the centre feature in the MLP window); "
        "'paper' is the method as the paper describes it",
    )
    g.add_argument(
        "--mask_workers",
        type=_positive_int,
        default=8,
        help="worker count of the original's parallel mask loops whose lost writes --variant original "
        "reproduces (8 as published; 1 = the serial semantics)",
    )
    g.add_argument(
        "--nb_mask",
        default=None,
        choices=tuple(NB_MASK_ALIASES),
        help="old name: official = --variant original, paper = --variant paper",
    )

    g = p.add_argument_group("devices")
    g.add_argument("--accelerator", default="auto", choices=ACCELERATORS, help="Lightning accelerator")
    g.add_argument(
        "--devices",
        default="auto",
        help="Lightning devices: auto (one device), N, or a list; N > 1 runs the MLP training and "
        "the test scoring on N processes (DDP)",
    )
    g.add_argument("--strategy", default="auto", choices=STRATEGIES, help="Lightning strategy")
    g.add_argument(
        "--precision",
        default=DEFAULT_PRECISION,
        choices=PRECISIONS,
        help="precision of the backbone and the neighbourhood MLP in every stage (features, MLP training, "
        "test, calibration); distances, masks and maps stay float32. 32-true reproduces the published "
        "code; bf16-mixed is the fast path on CPUs with bf16 matrix units (Intel AMX: about 2.5x faster "
        "test stage, 3x faster MLP training) and on GPUs; 16-mixed is for GPUs only",
    )
    g.add_argument(
        "--feature_bank_dtype",
        default="float32",
        choices=("float32", "float16"),
        help="storage of the training feature bank (float16 halves its memory; coresets are "
        "then rounded to float16 precision)",
    )
    g.add_argument("--debug", action="store_true", help="show tracebacks")
    g.add_argument(
        "--verbose",
        action="store_true",
        help="show everything: third-party warnings and Lightning's own output and progress bars",
    )
    return p


def parse_args(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parse and check the flags (``parser``: :func:`build_parser`'s, possibly extended)."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    if args.imagesize > args.resize:
        parser.error(f"--imagesize ({args.imagesize}) must not exceed --resize ({args.resize})")
    if args.random_init and args.backbone_weights:
        parser.error("--random_init and --backbone_weights exclude each other")
    if args.blursigma > args.imagesize:
        parser.error(
            f"--blursigma ({args.blursigma:g}) must not exceed --imagesize ({args.imagesize}): a wider blur "
            "only flattens the maps, and its padding grows with it"
        )
    try:
        parse_devices(args.devices)
    except PNIError as exc:
        parser.error(str(exc))
    if args.nb_mask is not None:
        variant = NB_MASK_ALIASES[args.nb_mask]
        if args.variant not in (None, variant):
            parser.error(f"--nb_mask {args.nb_mask} means --variant {variant}, but --variant {args.variant} is given")
        print(f"note: --nb_mask {args.nb_mask} is the old name of --variant {variant}", file=sys.stderr)
        args.variant = variant
    args.variant = args.variant or "original"
    del args.nb_mask
    return args


_open_fraction = _checked("_open_fraction", float, lambda v: 0 < v < 1, "in (0, 1)")


def build_export_parser() -> argparse.ArgumentParser:
    """``export_model.py``: the flags of ``train_coreset_distribution.py`` (to find the
    artefacts) plus where the bundle goes and how its thresholds are calibrated."""
    p = build_parser()
    p.description = (
        "Export a trained PNI model (its artefacts, found with the same flags as "
        "train_coreset_distribution.py) as a self-contained bundle folder with calibrated thresholds."
    )
    g = p.add_argument_group("export")
    g.add_argument("--output", required=True, metavar="DIR", help="bundle folder to write (replaced if it is one)")
    g.add_argument(
        "--include_backbone",
        action="store_true",
        help="copy the backbone weights into the bundle (else it names the file and its sha256)",
    )
    g.add_argument(
        "--target_fpr",
        type=_open_fraction,
        default=0.01,
        help="false-positive rate of the image threshold on the good calibration images",
    )
    g.add_argument(
        "--calibration_dir",
        nargs="+",
        default=None,
        metavar="DIR",
        help="folder(s) of good images not used in training to calibrate on (default: the category's good test images)",
    )
    g.add_argument(
        "--onnx",
        action="store_true",
        help="also write model.onnx, the whole model as one ONNX graph (backbone weights included), "
        "for predict.py --runtime onnxruntime without PyTorch",
    )
    return p


def build_predict_parser() -> argparse.ArgumentParser:
    """``predict.py``: a bundle, input images, an output folder."""
    p = ArgumentParser(
        description="Predict new images with a PNI model bundle (made by export_model.py): "
        "verdicts, scores, heat maps, defect masks and regions.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, metavar="BUNDLE", help="model bundle folder")
    p.add_argument(
        "--input",
        required=True,
        nargs="+",
        metavar="PATH",
        help="image files, folders (every image below) or glob patterns",
    )
    p.add_argument("--output", required=True, metavar="DIR", help="folder for predictions.csv and the pictures")
    p.add_argument("--map", default="nb_coor", choices=MAP_NAMES, help="the map whose score decides")
    p.add_argument(
        "--image_threshold",
        default="fpr",
        metavar="fpr|best_f1|SCORE",
        help="image threshold: calibrated on good images at the export's target false-positive rate, "
        "the best-F1 one, or a raw score",
    )
    p.add_argument(
        "--pixel_threshold",
        default="fpr",
        metavar="fpr|best_f1|SCORE",
        help="pixel threshold of the defect mask: from good images (at most the target rate of good "
        "images get a flagged pixel), the best-F1 one, or a raw score",
    )
    p.add_argument("--save_maps", action="store_true", help="also write the four maps as .npy (input pixels)")
    p.add_argument("--batch_size", type=_positive_int, default=None, help="images per batch (default: from memory)")
    p.add_argument("--num_workers", type=_non_negative_int, default=0, help="image decoding worker processes")
    p.add_argument("--accelerator", default="auto", choices=ACCELERATORS, help="Lightning accelerator")
    p.add_argument(
        "--backbone_weights",
        default=None,
        metavar="PATH",
        help="backbone weights file, when the bundle does not include them",
    )
    p.add_argument(
        "--runtime",
        default="torch",
        choices=RUNTIMES,
        help="torch (PNIModel on the Lightning device) or onnxruntime (the bundle's model.onnx of "
        "export_model.py --onnx, on the CPU, without PyTorch)",
    )
    p.add_argument(
        "--precision",
        default=None,
        choices=PRECISIONS,
        help="precision of the backbone and MLP with --runtime torch (default: the one the bundle was "
        "calibrated under, in its manifest; bf16-mixed is the fast path on CPUs with bf16 matrix units); "
        "--runtime onnxruntime runs model.onnx in float32",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show everything: third-party warnings and Lightning's own output and progress bars",
    )
    return p


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class DataSettings:
    """The category to train and test on, and how its images are loaded."""

    dataset_path: str
    dataset_category: str
    category: str
    num_workers: int = 0
    max_train_images: int | None = None


@dataclass(frozen=True)
class FeatureSettings:
    """What the patch features are: the backbone, its layers, the pooled sizes, the aggregation
    window, and the image geometry they are taken at (resize, then centre crop to
    ``imagesize``). ``backbone_weights`` / ``random_init``: where the weights come from."""

    backbone: str
    layers: tuple[str, ...]
    pretrain_embed_dimension: int
    target_embed_dimension: int
    patchsize: int
    resize: int
    imagesize: int
    backbone_weights: str | None = None
    random_init: bool = False

    @property
    def pad(self) -> int:
        """Grid border without a full aggregation window (``(patchsize - 1) // 2``)."""
        from pni.features import patch_padding

        return patch_padding(self.patchsize)

    def build_extractor(self) -> PatchFeatureExtractor:
        """The feature extractor these settings describe (see :func:`pni.features.build_feature_extractor`)."""
        from pni.features import build_feature_extractor

        return build_feature_extractor(
            self.backbone,
            self.layers,
            self.pretrain_embed_dimension,
            self.target_embed_dimension,
            self.patchsize,
            self.backbone_weights,
            self.random_init,
        )


@dataclass(frozen=True)
class CoresetSettings:
    """Sizes of the embedding and distribution coresets, and how the training bank is stored."""

    subsampling_percentage: float
    dist_coreset_size: int
    feature_bank_dtype: str = "float32"

    @property
    def file_names(self) -> dict[str, str]:
        """The original's file names of the three coreset indexes."""
        sp = int(self.subsampling_percentage * 100)
        return {
            "without_edge": f"embedding_coreset_index_{sp}.faiss",
            "with_edge": f"embedding_coreset_index_{sp}_with_edge.faiss",
            "distribution": f"dist_coreset_index_{self.dist_coreset_size}.faiss",
        }


@dataclass(frozen=True)
class NeighbourhoodSettings:
    """The neighbourhood MLP: window half-width ``dist_padding`` (dp), depth, and the window
    layout of ``variant`` (which slot of the ``(2dp+1)^2`` window its input leaves out)."""

    dist_padding: int
    num_layers: int
    variant: str = "original"

    @property
    def window_count(self) -> int:
        """Features in one input window: ``(2dp+1)^2 - 1``."""
        from pni.distributions import window_count

        return window_count(self.dist_padding)

    @property
    def dropped_slot(self) -> int:
        from pni.distributions import dropped_slot

        return dropped_slot(self.dist_padding, self.variant)

    def input_size(self, feature_dim: int) -> int:
        """The MLP's input width for ``feature_dim``-dim features."""
        return self.window_count * feature_dim


@dataclass(frozen=True)
class MlpTrainingSettings:
    """How the neighbourhood MLP is trained (Adam, StepLR with gamma 0.1)."""

    num_epochs: int
    learning_rate: float
    step_size: int
    dist_batchsize: int


@dataclass(frozen=True)
class RuntimeSettings:
    """Lightning's accelerator, devices (the flag's text), strategy and precision; ``ddp``:
    whether this run uses several processes (decided by :func:`pni.distributed.configure`)."""

    accelerator: str = "auto"
    devices: Devices = "auto"
    strategy: str = "auto"
    precision: str = DEFAULT_PRECISION
    ddp: bool = False


@dataclass(frozen=True)
class OutputSettings:
    """Where the test results (``project_root_path``) and the trained artefacts go."""

    project_root_path: str
    embedding_root_path: str


@dataclass(frozen=True)
class StageSettings:
    """Which stages train (the others load their saved artefacts)."""

    train_coreset: bool = False
    train_nb_dist: bool = False
    train_coor_dist: bool = False

    @property
    def training(self) -> bool:
        return self.train_coreset or self.train_nb_dist or self.train_coor_dist


@dataclass(frozen=True)
class ConsoleSettings:
    """What is shown: tracebacks (``debug``), third-party output (``verbose``)."""

    debug: bool = False
    verbose: bool = False


@dataclass(frozen=True)
class InputDigests:
    """What decides the features besides the flags, recorded with every stage's settings
    (set by the pipeline once the inputs are found)."""

    backbone_weights_digest: str
    training_set_digest: str


# Settings fields whose flag has another name (Settings.flags).
FLAG_NAMES = {"layers": "layer_index"}


@dataclass(frozen=True)
class Settings:
    """Everything one ``train_coreset_distribution.py`` run is told (see :func:`settings_from_flags`)."""

    data: DataSettings
    features: FeatureSettings
    coreset: CoresetSettings
    neighbourhood: NeighbourhoodSettings
    mlp_training: MlpTrainingSettings
    scoring: ScoringConfig
    runtime: RuntimeSettings
    output: OutputSettings
    stages: StageSettings
    console: ConsoleSettings
    seed: int
    digests: InputDigests | None = None

    def __post_init__(self) -> None:
        shared = (
            ("patchsize", self.features.patchsize, self.scoring.patchsize),
            ("imagesize", self.features.imagesize, self.scoring.imagesize),
            ("variant", self.neighbourhood.variant, self.scoring.variant),
        )
        for name, one, other in shared:
            if one != other:
                raise ValueError(f"settings disagree on {name}: {one!r} and {other!r} (scoring)")

    def flags(self) -> dict[str, Any]:
        """The flat ``{flag name: value}`` view (sequences as lists), with ``ddp`` and, once
        set, the input digests: what the artefacts' settings records and ``settings.json`` hold."""
        groups = (
            self.data,
            self.features,
            self.coreset,
            self.neighbourhood,
            self.mlp_training,
            self.runtime,
            self.output,
            self.stages,
            self.console,
        )
        out: dict[str, Any] = {}
        for group in groups:
            for f in dataclasses.fields(group):
                out[FLAG_NAMES.get(f.name, f.name)] = getattr(group, f.name)
        out.update((k, v) for k, v in dataclasses.asdict(self.scoring).items() if k != "chunk_size")
        out["seed"] = self.seed
        if self.digests is not None:
            out.update(dataclasses.asdict(self.digests))
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @property
    def embedding_dir(self) -> Path:
        """Artefact folder of the original: ``[BTAD_|VisA_]embedding/embeddings_<layers>/<category>/<backbone>``."""
        root = Path(self.output.embedding_root_path)
        if self.data.dataset_category == "BTAD":
            root = root / "BTAD_embedding"
        elif self.data.dataset_category == "VisA":
            root = root / "VisA_embedding"
        return root / f"embeddings_{'+'.join(self.features.layers)}" / self.data.category / self.features.backbone


def scoring_config(args: argparse.Namespace) -> ScoringConfig:
    """The :class:`ScoringConfig` of parsed ``train_coreset_distribution.py`` flags
    (``chunk_size`` is chosen per device by :class:`pni.model.PNIModel`)."""
    from pni.scoring import ScoringConfig

    return ScoringConfig(
        anomaly_nn=args.anomaly_nn,
        patchsize=args.patchsize,
        prob_gamma=args.prob_gamma,
        softmax_temperature_alpha=args.softmax_temperature_alpha,
        softmax_nb_gamma=args.softmax_nb_gamma,
        softmax_coor_gamma=args.softmax_coor_gamma,
        variant=args.variant,
        mask_workers=args.mask_workers,
        imagesize=args.imagesize,
        blursigma=args.blursigma,
        chunk_size=None,
    )


def settings_from_flags(args: argparse.Namespace) -> Settings:
    """The :class:`Settings` of flags parsed by :func:`parse_args` (extra flags, such as
    ``export_model.py``'s, are ignored)."""
    return Settings(
        data=DataSettings(
            args.dataset_path, args.dataset_category, args.category, args.num_workers, args.max_train_images
        ),
        features=FeatureSettings(
            backbone=args.backbone,
            layers=tuple(args.layer_index),
            pretrain_embed_dimension=args.pretrain_embed_dimension,
            target_embed_dimension=args.target_embed_dimension,
            patchsize=args.patchsize,
            resize=args.resize,
            imagesize=args.imagesize,
            backbone_weights=args.backbone_weights,
            random_init=args.random_init,
        ),
        coreset=CoresetSettings(args.subsampling_percentage, args.dist_coreset_size, args.feature_bank_dtype),
        neighbourhood=NeighbourhoodSettings(args.dist_padding, args.num_layers, args.variant),
        mlp_training=MlpTrainingSettings(args.num_epochs, args.learning_rate, args.step_size, args.dist_batchsize),
        scoring=scoring_config(args),
        runtime=RuntimeSettings(args.accelerator, args.devices, args.strategy, args.precision),
        output=OutputSettings(args.project_root_path, args.embedding_root_path),
        stages=StageSettings(args.train_coreset, args.train_nb_dist, args.train_coor_dist),
        console=ConsoleSettings(args.debug, args.verbose),
        seed=args.seed,
    )


@dataclass(frozen=True)
class ExportSettings:
    """``export_model.py``'s own flags: the bundle folder, whether it holds the backbone, the
    calibration's target false-positive rate and good images, whether it holds ``model.onnx``."""

    output: str
    include_backbone: bool = False
    target_fpr: float = 0.01
    calibration_dir: tuple[str, ...] | None = None
    onnx: bool = False


def export_settings_from_flags(args: argparse.Namespace) -> ExportSettings:
    """The :class:`ExportSettings` of flags parsed with :func:`build_export_parser`."""
    calibration = tuple(args.calibration_dir) if args.calibration_dir else None
    return ExportSettings(args.output, args.include_backbone, args.target_fpr, calibration, args.onnx)


@dataclass(frozen=True)
class PredictSettings:
    """``predict.py``: the bundle, the inputs and output folder, the deciding map and
    thresholds, what is written, and how images are decoded and scored (``runtime``: one of
    :data:`RUNTIMES`)."""

    model: str
    inputs: tuple[str, ...]
    output: str
    map_name: str = "nb_coor"
    image_threshold: str = "fpr"
    pixel_threshold: str = "fpr"
    save_maps: bool = False
    batch_size: int | None = None
    num_workers: int = 0
    accelerator: str = "auto"
    backbone_weights: str | None = None
    runtime: str = "torch"
    precision: str | None = None  # None: the bundle's (pni.manifest.bundle_precision)


def predict_settings_from_flags(args: argparse.Namespace) -> PredictSettings:
    """The :class:`PredictSettings` of flags parsed with :func:`build_predict_parser`."""
    return PredictSettings(
        model=args.model,
        inputs=tuple(args.input),
        output=args.output,
        map_name=args.map,
        image_threshold=args.image_threshold,
        pixel_threshold=args.pixel_threshold,
        save_maps=args.save_maps,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        accelerator=args.accelerator,
        backbone_weights=args.backbone_weights,
        runtime=args.runtime,
        precision=args.precision,
    )
