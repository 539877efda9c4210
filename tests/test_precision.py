"""--precision: the CPU capability check and its note, the refusal of 16-mixed on a CPU, and
the compute side of bf16-mixed (windows, MLP training and inference, features, scoring, a
tiny run end to end) against float32 with stated tolerances."""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import reference
import torch
import torch.nn.functional as F
from helpers import MAPS, TINY, TRAIN, aurocs_from_saved, expect_one_error, path_flags

import export_model
import predict as predict_cli
import train_coreset_distribution as tcd
from pni import load_model, precision
from pni.data.synthetic import make_dataset
from pni.distributions import NeighbourhoodMLP, bf16_linear, bit_dropout, gather_windows, grid_windows
from pni.errors import PNIError
from pni.features import build_feature_extractor, local_patches, pooled_patches
from pni.lightning import NeighbourhoodModule, WindowCollate, window_loader
from pni.model import PNIModel
from pni.scoring import MAP_NAMES, ScoringArtefacts, ScoringConfig

BF16 = torch.bfloat16


@pytest.fixture
def capabilities(monkeypatch):
    """Set what ``torch.cpu.get_capabilities`` reports (the capability check is cached)."""

    def set_caps(caps):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
        precision.cpu_bf16_units.cache_clear()

    yield set_caps
    precision.cpu_bf16_units.cache_clear()


# ---------------------------------------------------------------- capability, note, refusal


def test_bf16_units_from_torch_capabilities(capabilities, monkeypatch):
    capabilities({"amx_bf16": True, "amx_tile": True, "avx512_bf16": True})
    assert precision.cpu_bf16_units() == "Intel AMX"
    capabilities({"amx_bf16": False, "avx512_bf16": True})
    assert precision.cpu_bf16_units() == "AVX512-BF16"
    capabilities({"avx512_f": True, "avx2": True})
    assert precision.cpu_bf16_units() is None
    capabilities({})
    assert precision.cpu_bf16_units() is None
    # read once per process: a changed answer is not seen until the cache is cleared
    capabilities({"amx_bf16": True})
    assert precision.cpu_bf16_units() == "Intel AMX"
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {})
    assert precision.cpu_bf16_units() == "Intel AMX"
    # no oneDNN, no bf16 path
    capabilities({"amx_bf16": True})
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert precision.cpu_bf16_units() is None


def test_note_only_for_32_true_on_a_cpu_with_units(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: "Intel AMX")
    note = precision.precision_note("32-true", "cpu")
    assert note is not None and note.startswith("note: ") and "\n" not in note
    assert "--precision bf16-mixed" in note and "Intel AMX" in note
    assert f"{precision.AMX_TEST_SPEEDUP:g}x" in note and f"{precision.AMX_TRAINING_SPEEDUP:g}x" in note
    assert precision.precision_note("bf16-mixed", "cpu") is None
    assert precision.precision_note("32-true", "cuda") is None
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: "AVX512-BF16")
    assert "AVX512-BF16" in precision.precision_note("32-true", "cpu")
    assert "not measured" in precision.precision_note("32-true", "cpu")
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: None)
    assert precision.precision_note("32-true", "cpu") is None


def test_note_printed_exactly_once(monkeypatch):
    monkeypatch.setattr(precision, "printed_notes", set())
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: "Intel AMX")
    out = io.StringIO()
    assert precision.print_note_once("bf16-mixed", "cpu", out) is False
    assert out.getvalue() == ""
    assert precision.print_note_once("32-true", "cpu", out) is True
    assert precision.print_note_once("32-true", "cpu", out) is False
    assert precision.print_note_once("32-true", "cpu", out) is False
    lines = out.getvalue().splitlines()
    assert lines == [precision.precision_note("32-true", "cpu")]


def test_no_note_on_a_cpu_without_units(monkeypatch):
    monkeypatch.setattr(precision, "printed_notes", set())
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: None)
    out = io.StringIO()
    assert precision.print_note_once("32-true", "cpu", out) is False
    assert out.getvalue() == ""


def test_16_mixed_is_refused_on_a_cpu():
    with pytest.raises(PNIError, match=r"^--precision 16-mixed is for GPUs") as err:
        precision.check_precision("16-mixed", "cpu")
    assert "\n" not in str(err.value) and "bf16-mixed" in str(err.value)
    with pytest.raises(PNIError, match="--precision must be one of 32-true, 16-mixed, bf16-mixed"):
        precision.check_precision("64-true", "cpu")
    for ok in (("32-true", "cpu"), ("bf16-mixed", "cpu"), ("16-mixed", "cuda"), ("bf16-mixed", "cuda")):
        precision.check_precision(*ok)


def test_device_type_of_accelerators(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert [precision.device_type(a) for a in ("auto", "cpu", "gpu", "cuda", "mps")] == [
        "cpu",
        "cpu",
        "cuda",
        "cuda",
        "mps",
    ]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert precision.device_type("auto") == "cuda"


def test_dtypes_and_autocast_of_each_precision():
    assert [precision.compute_dtype(p) for p in precision.PRECISIONS] == [torch.float32, torch.float16, BF16]
    assert precision.autocast_dtype("32-true") is None
    with precision.autocast("bf16-mixed", "cpu"):
        assert precision.active_autocast_dtype("cpu") == BF16
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == BF16
    assert precision.active_autocast_dtype("cpu") is None
    with precision.autocast("32-true", "cpu"):
        assert precision.active_autocast_dtype("cpu") is None


# ---------------------------------------------------------------- optimizer


def _train_steps(options: dict, steps: int = 3) -> dict[str, torch.Tensor]:
    torch.manual_seed(5)
    model = NeighbourhoodMLP(12, 5, num_layers=4, hidden=16).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, **options)
    x, y = torch.randn(32, 12), torch.randint(0, 5, (32,))
    for _ in range(steps):
        torch.manual_seed(9)  # the same dropout masks for every optimizer
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_adam_of_32_true_is_bit_identical_to_the_default():
    default = _train_steps({"foreach": False})  # the single-tensor loop torch picks on a CPU
    ours = _train_steps(precision.adam_options("32-true", "cpu"))
    assert precision.adam_options("32-true", "cpu") == {"foreach": True}
    for key, value in default.items():
        assert torch.equal(ours[key], value), key
    fused = _train_steps(precision.adam_options("bf16-mixed", "cpu"))
    assert precision.adam_options("bf16-mixed", "cpu") == {"fused": True}
    for key, value in default.items():
        if (key.endswith(".0.bias") and not key.startswith("last_layer")) or "running_mean" in key:
            continue  # BatchNorm cancels these biases (its mean carries them): Adam scales their rounding noise
        torch.testing.assert_close(fused[key], value, rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("trainer_precision", ["32-true", "bf16-mixed"])
def test_module_optimizer_and_training_follow_the_trainer_precision(trainer_precision):
    pl.seed_everything(3, verbose=False)
    rng = np.random.default_rng(3)
    bank = rng.random((3, 8, 8, 6), dtype=np.float32)
    labels = rng.integers(0, 4, size=(3, 16))
    collate = WindowCollate(bank, labels, 2, 1, "original", precision.compute_dtype(trainer_precision))
    module = NeighbourhoodModule(8 * 6, 4, 3, 1e-3, 5)
    trainer = pl.Trainer(
        accelerator="cpu",
        precision=trainer_precision,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    ids = torch.arange(labels.size)
    trainer.fit(module, window_loader(ids, collate, 16, True, 0), window_loader(ids[:8], collate, 16, False, 0))
    options = trainer.optimizers[0].defaults
    assert (options["fused"], options["foreach"]) == (
        (True, None) if trainer_precision == "bf16-mixed" else (None, True)
    )
    assert math.isfinite(module.best_val)
    assert all(torch.isfinite(p).all() for p in module.model.parameters())


# ---------------------------------------------------------------- windows


def _window_case():
    rng = np.random.default_rng(2)
    bank = rng.normal(size=(3, 9, 8, 5)).astype(np.float32)
    img = torch.tensor([0, 2, 1, 2, 1, 0])
    rows = torch.tensor([0, 3, 8, 5, 4, 7])
    cols = torch.tensor([0, 2, 7, 1, 6, 4])
    expected = np.stack(
        [
            reference.sliced_window(bank[i], r, c, 2, "original")
            for i, r, c in zip(*(t.tolist() for t in (img, rows, cols)))
        ]
    )
    return bank, img, rows, cols, torch.from_numpy(expected)


def test_bf16_windows_are_the_float32_windows_rounded():
    bank, img, rows, cols, expected = _window_case()
    for grids in (bank, bank.astype(np.float16), torch.from_numpy(bank), torch.from_numpy(bank).to(BF16)):
        ref = expected if not isinstance(grids, np.ndarray) or grids.dtype == np.float32 else expected.half()
        got = gather_windows(grids, img, rows, cols, 2, "original", BF16)
        assert got.dtype == BF16
        assert torch.equal(got, ref.to(BF16))
        with precision.autocast("bf16-mixed", "cpu"):  # default dtype: the autocast dtype
            assert torch.equal(gather_windows(grids, img, rows, cols, 2, "original"), ref.to(BF16))
    # outside autocast the default stays float32, exactly the reference
    got = gather_windows(bank, img, rows, cols, 2, "original")
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    flat = rows[img == 1] * 8 + cols[img == 1]
    with precision.autocast("bf16-mixed", "cpu"):
        got = grid_windows(torch.from_numpy(bank[1]), flat, 2, "original")
    assert torch.equal(got, expected[img == 1].to(BF16))


@pytest.mark.parametrize("bank_fraction", [1.0, 0.0])
def test_window_collate_in_bf16_with_and_without_the_bank_copy(bank_fraction):
    rng = np.random.default_rng(4)
    bank = rng.normal(size=(2, 7, 7, 3)).astype(np.float32)
    labels = np.arange(2 * 9).reshape(2, 9)  # 3 x 3 interior positions per image (pad 2)
    collate = WindowCollate(bank, labels, 2, 1, "paper", BF16, bank_fraction=bank_fraction)
    assert isinstance(collate.bank, torch.Tensor) == (bank_fraction > 0)
    x, y = collate([0, 4, 17])
    positions = [(0, 2, 2), (0, 3, 3), (1, 4, 4)]  # (image, row, col) of ids 0, 4 and 17
    expected = np.stack([reference.sliced_window(bank[i], r, c, 1, "paper") for i, r, c in positions])
    assert x.dtype == BF16 and torch.equal(x, torch.from_numpy(expected).to(BF16))
    assert y.tolist() == [0, 4, 17]


# ---------------------------------------------------------------- MLP pieces


def test_bf16_linear_matches_a_float64_reference():
    torch.manual_seed(1)
    x = torch.randn(24, 40)
    weight = torch.randn(16, 40, requires_grad=True)
    bias = torch.randn(16, requires_grad=True)
    grad = torch.randn(24, 16)
    out = bf16_linear(x.requires_grad_(), weight, bias)
    with precision.autocast("bf16-mixed", "cpu"):
        assert torch.equal(out, F.linear(x, weight, bias))  # autocast's own forward, bit for bit
    out.backward(grad)
    x16, w16, g16 = (t.detach().to(BF16).double() for t in (x, weight, grad))
    # gradients of the rounded operands, each rounded once to bfloat16 (relative 2^-8)
    torch.testing.assert_close(weight.grad.double(), g16.T @ x16, rtol=8e-3, atol=1e-2)
    torch.testing.assert_close(x.grad.double(), g16 @ w16, rtol=8e-3, atol=1e-2)
    torch.testing.assert_close(bias.grad.double(), g16.sum(0), rtol=1e-5, atol=1e-5)
    assert weight.grad.dtype == bias.grad.dtype == x.grad.dtype == torch.float32


def test_bit_dropout_keeps_half_and_doubles():
    torch.manual_seed(0)
    x = torch.rand(1000, 1003).to(BF16) + 1
    x.requires_grad_()
    state = torch.get_rng_state()
    out = bit_dropout(x)
    kept = out != 0
    assert torch.equal(out[kept], 2 * x.detach()[kept])
    assert abs(kept.double().mean().item() - 0.5) < 0.005  # 10 standard deviations
    # each of the 16 bits of a draw is fair (lanes of the lookup table)
    lanes = kept.reshape(-1)[: (kept.numel() // 16) * 16].reshape(-1, 16).double().mean(0)
    assert (lanes - 0.5).abs().max() < 0.01
    out.sum().backward()
    assert torch.equal(x.grad, kept.to(BF16) * 2)
    torch.set_rng_state(state)
    assert torch.equal(bit_dropout(x.detach()) != 0, kept)  # the global generator decides
    assert not torch.equal(bit_dropout(x.detach()) != 0, kept)


def test_bf16_training_step_is_autocasts_and_close_to_float32():
    torch.manual_seed(2)
    model = NeighbourhoodMLP(40, 6, num_layers=4, hidden=32, dropout=0.0).train()
    x, y = torch.rand(64, 40), torch.randint(0, 6, (64,))

    def grads(how: str) -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad()
        with precision.autocast("32-true" if how == "float32" else "bf16-mixed", "cpu"):
            if how == "modules":  # what autocast runs through the modules' own forward
                h = x
                for block in (model.first_layer, *model.hidden_layers):
                    h = block(h)
                out = model.last_layer(h)
            else:
                out = model(x)
            loss = F.cross_entropy(out, y)
        loss.backward()
        return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss32, grads32 = grads("float32")
    loss16, ours = grads("bf16")
    _, modules = grads("modules")
    assert loss16 == pytest.approx(loss32, rel=1e-2)
    for name, g32 in grads32.items():
        g16 = ours[name]
        assert g16.dtype == torch.float32 and torch.isfinite(g16).all()
        if name.endswith(".0.bias") and not name.startswith("last_layer"):
            continue  # biases before a BatchNorm: it cancels them, their gradients are rounding noise
        # the same products as autocast's (measured: identical); bfloat16 against float32 through
        # BatchNorm's backward: 25% of each gradient's norm (measured up to 16% at these sizes)
        assert float((g16 - modules[name]).norm()) <= 0.01 * float(g32.norm()), name
        assert float((g16 - g32).norm()) <= 0.25 * float(g32.norm()), name


def test_mlp_inference_under_autocast_is_autocasts_result_with_weights_cast_once():
    torch.manual_seed(3)
    model = NeighbourhoodMLP(40, 6, num_layers=4, hidden=32).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    x = torch.rand(10, 40)
    with precision.autocast("bf16-mixed", "cpu"):
        with torch.no_grad():
            cached = model(x)
        plain = model(x).detach()  # grad enabled: the modules' own forward under autocast
        with torch.no_grad():
            model.first_layer[0].weight.mul_(2)  # a changed weight is cast again
            changed = model(x)
        plain_changed = model(x).detach()
    assert cached.dtype == BF16 and torch.equal(cached, plain)
    assert torch.equal(changed, plain_changed) and not torch.equal(changed, cached)
    logits32 = model(x).detach()
    torch.testing.assert_close(changed.float(), logits32, rtol=0.05, atol=0.05 * float(logits32.abs().max()))


# ---------------------------------------------------------------- features and scoring


@pytest.mark.parametrize(("channels", "patchsize", "dim"), [(7, 3, 10), (6, 5, 64), (16, 5, 32)])
def test_pooled_patches_equal_pooling_each_neighbourhood(channels, patchsize, dim):
    torch.manual_seed(channels)
    fmap = torch.rand(2, channels, 6, 5)
    patches = local_patches(fmap, patchsize)
    expected = F.adaptive_avg_pool1d(patches.reshape(2 * 6 * 5, 1, -1), dim).reshape(2, 6, 5, dim)
    got = pooled_patches(fmap, patchsize, dim)
    assert torch.equal(got, expected)  # the same bins, summed in the same order
    weights = reference.adaptive_pool_weights(channels * patchsize**2, dim)
    np.testing.assert_allclose(
        got.double().numpy(), patches.reshape(2, 6, 5, -1).double().numpy() @ weights.T, rtol=1e-5
    )


def test_features_under_bf16_are_float32_and_close():
    extractor = build_feature_extractor("R18", ("layer2", "layer3"), 48, 32, 5, random_init=True)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    feats32 = extractor(images)
    with precision.autocast("bf16-mixed", "cpu"):
        feats16 = extractor(images)
    assert feats16.dtype == torch.float32 and feats16.shape == feats32.shape
    # tolerance: 2% of the largest feature (bfloat16 convolutions, float32 aggregation; measured 0.5%)
    assert float((feats16 - feats32).abs().max()) <= 0.02 * float(feats32.abs().max())
    assert extractor(images).equal(feats32)  # float32 again afterwards: nothing changed in the model


def test_scoring_under_bf16_gives_float32_maps_close_to_float32():
    extractor = build_feature_extractor("R18", ("layer2", "layer3"), 48, 32, 5, random_init=True)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    feats = extractor(images)
    flat = feats.reshape(-1, 32)
    inner = feats[:, 2:-2, 2:-2].reshape(-1, 32)
    gen = torch.Generator().manual_seed(2)
    prior = torch.rand(64, 20, generator=gen)
    art = ScoringArtefacts.build(inner[:12], flat[::6][:20], inner[:6], prior[:, :12], prior)
    torch.manual_seed(4)
    mlp = NeighbourhoodMLP(24 * 32, 6, num_layers=3, hidden=16)
    model = PNIModel(extractor, mlp, art, ScoringConfig(imagesize=64, blursigma=1.0), 2, 64)
    maps32 = model.score(images)
    with precision.autocast("bf16-mixed", "cpu"):
        maps16 = model.score(images)
    for a, b in zip(maps32, maps16):
        for name in MAP_NAMES:
            assert b.maps[name].dtype == torch.float32 and torch.isfinite(b.maps[name]).all()
        # the position and PatchCore maps depend on the features alone: 3% of the largest value
        for name in ("coor", "patchcore"):
            assert float((a.maps[name] - b.maps[name]).abs().max()) <= 0.03 * float(a.maps[name].abs().max())


# ---------------------------------------------------------------- a tiny run end to end


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny run in float32; the test stage again under bf16-mixed on its artefacts; and every
    stage under bf16-mixed in a folder of its own."""
    root = tmp_path_factory.mktemp("precision")
    make_dataset(root / "ds", num_train=4, num_test_per_type=1, image_size=64, categories=["texture"])
    versions = root / "{}" / "result" / "texture" / "R18" / "anomaly" / "lightning_logs" / "version_{}"
    assert tcd.main(path_flags(root / "ds", root / "float32") + TINY + TRAIN) == 0
    assert tcd.main(path_flags(root / "ds", root / "float32") + TINY + ["--precision", "bf16-mixed"]) == 0
    assert tcd.main(path_flags(root / "ds", root / "bf16") + TINY + TRAIN + ["--precision", "bf16-mixed"]) == 0
    return {
        "float32": Path(str(versions).format("float32", 0)),
        "bf16 test stage": Path(str(versions).format("float32", 1)),
        "bf16 all stages": Path(str(versions).format("bf16", 0)),
    }


def largest_map_differences(ref: Path, other: Path) -> dict[str, float]:
    """Per map: the largest difference between the two runs' maps over all test images, over
    the largest value of that map in ``ref``; the other run's maps are float32 and finite."""
    out = {}
    for name in MAPS:
        files = sorted((ref / "sample").glob(f"*_amap_{name}.npy"))
        assert files
        top = max(float(np.abs(np.load(f)).max()) for f in files)
        diff = 0.0
        for f in files:
            theirs = np.load(other / "sample" / f.name)
            assert theirs.dtype == np.float32 and np.isfinite(theirs).all()
            diff = max(diff, float(np.abs(theirs - np.load(f)).max()))
        out[name] = diff / top
    return out


def test_tiny_test_stage_under_bf16_stays_close_to_float32(runs):
    """The same artefacts scored under bf16-mixed (backbone and MLP in bfloat16): every map
    within 2% of its largest float32 value (measured 0.6%)."""
    diffs = largest_map_differences(runs["float32"], runs["bf16 test stage"])
    assert all(d <= 0.02 for d in diffs.values()), diffs


def test_tiny_run_with_every_stage_under_bf16(runs):
    """Every stage under bf16-mixed: finite AUROCs, and maps within 25% of the largest float32
    value. Coreset entries chosen from bfloat16 features can differ from the float32 ones (the
    greedy search's near ties), which moves the PatchCore and position maps far more than the
    scoring's own rounding: measured 14% with the coreset stage under bf16, 0.6% without."""
    diffs = largest_map_differences(runs["float32"], runs["bf16 all stages"])
    assert all(d <= 0.25 for d in diffs.values()), diffs
    aurocs = aurocs_from_saved(runs["bf16 all stages"])
    assert len(aurocs) == 2 * len(MAPS) and all(math.isfinite(v) for v in aurocs.values())


def test_stage_records_show_the_precision(runs):
    """Each stage's settings record shows the precision it ran in (informational: artefacts of
    either precision load under any --precision, as the bf16 test stage on float32 artefacts
    shows)."""
    for name, expected in (("float32", "32-true"), ("bf16", "bf16-mixed")):
        emb = runs["float32"].parents[5] if name == "float32" else runs["bf16 all stages"].parents[5]
        folder = emb / "embeddings_layer2+layer3" / "texture" / "R18"
        for record in ("coreset_settings.json", "nb_settings.json", "coor_settings.json"):
            assert json.loads((folder / record).read_text())["precision"] == expected, (name, record)
    settings = json.loads((runs["bf16 test stage"] / "settings.json").read_text())
    assert settings["precision"] == "bf16-mixed"


# ---------------------------------------------------------------- the CLIs: refusal and note


def _notes(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("note: this CPU has bf16 matrix units")]


@pytest.fixture
def units(monkeypatch):
    """Pretend this CPU has (``units("Intel AMX")``) or lacks (``units(None)``) bf16 matrix
    units; each call starts a fresh process's record of printed notes."""

    def set_units(name):
        monkeypatch.setattr(precision, "cpu_bf16_units", lambda: name)
        monkeypatch.setattr(precision, "printed_notes", set())

    return set_units


def test_check_and_note_prints_on_rank_0_only(units, capsys):
    """What the CLIs call before any work: the refusal, then the note unless ``note=False``
    (the DDP ranks above 0)."""
    units("Intel AMX")
    precision.check_and_note("32-true", "cpu", note=False)
    assert capsys.readouterr().err == ""
    precision.check_and_note("32-true", "cpu")
    precision.check_and_note("32-true", "cpu")
    assert _notes(capsys.readouterr().err) == [precision.precision_note("32-true", "cpu")]
    with pytest.raises(PNIError, match="16-mixed is for GPUs"):
        precision.check_and_note("16-mixed", "cpu", note=False)


def test_16_mixed_on_a_cpu_is_one_line_and_exit_2_before_any_work(tiny_run, tmp_path, capsys):
    cpu = ["--precision", "16-mixed", "--accelerator", "cpu"]
    fragment = "--precision 16-mixed is for GPUs"
    expect_one_error(tcd.main, tiny_run.argv(*TRAIN, *cpu, project=tmp_path / "p", emb_root=tmp_path), capsys, fragment)
    expect_one_error(export_model.main, tiny_run.argv("--output", str(tmp_path / "b"), *cpu), capsys, fragment)
    expect_one_error(predict_cli.main, tiny_run.predict_argv(tiny_run.bundle, tmp_path / "o", *cpu), capsys, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


def test_note_once_per_cli_run_with_32_true_on_a_cpu_with_units(tiny_run, tmp_path, units, capsys):
    """tcd (test stage), export and predict each print the note exactly once."""

    units("Intel AMX")
    assert tcd.main(tiny_run.argv("--accelerator", "cpu", project=tmp_path / "p")) == 0
    assert _notes(capsys.readouterr().err) == [precision.precision_note("32-true", "cpu")]
    units("Intel AMX")
    bundle = tmp_path / "bundle"
    argv = tiny_run.argv("--output", str(bundle), "--calibration_dir", str(tiny_run.calibration))
    assert export_model.main(argv + ["--target_fpr", "0.25"]) == 0
    assert len(_notes(capsys.readouterr().err)) == 1
    units("Intel AMX")
    assert predict_cli.main(tiny_run.predict_argv(tiny_run.bundle, tmp_path / "o")) == 0
    assert len(_notes(capsys.readouterr().err)) == 1


def test_no_note_with_bf16_mixed_or_without_units(tiny_run, tmp_path, units, capsys):

    units("Intel AMX")
    argv = tiny_run.argv("--accelerator", "cpu", "--precision", "bf16-mixed", project=tmp_path / "p")
    assert tcd.main(argv) == 0
    assert _notes(capsys.readouterr().err) == []
    units("Intel AMX")
    assert predict_cli.main(tiny_run.predict_argv(tiny_run.bundle, tmp_path / "o1", "--precision", "bf16-mixed")) == 0
    assert _notes(capsys.readouterr().err) == []
    units(None)
    assert predict_cli.main(tiny_run.predict_argv(tiny_run.bundle, tmp_path / "o2")) == 0
    assert _notes(capsys.readouterr().err) == []
    # onnxruntime runs model.onnx in float32 and never imports torch: no note, no --precision
    units("Intel AMX")
    onnx = tiny_run.predict_argv(tiny_run.bundle, tmp_path / "o3", "--runtime", "onnxruntime")
    expect_one_error(predict_cli.main, onnx + ["--precision", "bf16-mixed"], capsys, "applies to --runtime torch")


# ---------------------------------------------------------------- bundles record their precision


@pytest.fixture
def autocast_spy(monkeypatch):
    """The autocast dtype on the CPU at every neighbourhood-MLP forward (None: float32)."""
    seen: list = []
    forward = NeighbourhoodMLP.forward

    def spy(self, x):
        seen.append(precision.active_autocast_dtype("cpu"))
        return forward(self, x)

    monkeypatch.setattr(NeighbourhoodMLP, "forward", spy)
    return seen


def test_bundle_exported_under_bf16_records_it_and_predicts_under_bf16(tiny_run, tmp_path, units, capsys, autocast_spy):
    bundle = tmp_path / "bundle"
    argv = tiny_run.argv(
        "--output", str(bundle), "--calibration_dir", str(tiny_run.calibration), "--target_fpr", "0.25"
    )
    assert export_model.main(argv + ["--precision", "bf16-mixed"]) == 0
    assert json.loads((bundle / "manifest.json").read_text())["precision"] == "bf16-mixed"
    assert json.loads((tiny_run.bundle / "manifest.json").read_text())["precision"] == "32-true"
    assert autocast_spy and set(autocast_spy) == {BF16}  # calibration scored under bf16
    # the Python API: the bundle's precision by default, another one when asked
    autocast_spy.clear()
    model = load_model(bundle, device="cpu")
    assert model.scorer.precision == "bf16-mixed"
    image = tiny_run.ds / "texture" / "test" / "good"
    first = sorted(image.iterdir())[0]
    bf16 = model.predict(first)
    assert autocast_spy and set(autocast_spy) == {BF16}
    autocast_spy.clear()
    float32 = load_model(bundle, device="cpu", precision="32-true").predict(first)
    assert autocast_spy and set(autocast_spy) == {None}
    assert np.isfinite(bf16.maps["nb_coor"][np.isfinite(float32.maps["nb_coor"])]).all()
    # predict.py: the bundle's precision unless --precision
    autocast_spy.clear()
    units("Intel AMX")
    assert predict_cli.main(tiny_run.predict_argv(bundle, tmp_path / "o1")) == 0
    assert set(autocast_spy) == {BF16} and _notes(capsys.readouterr().err) == []
    autocast_spy.clear()
    units("Intel AMX")
    assert predict_cli.main(tiny_run.predict_argv(bundle, tmp_path / "o2", "--precision", "32-true")) == 0
    assert set(autocast_spy) == {None} and len(_notes(capsys.readouterr().err)) == 1


def test_manifest_without_precision_is_32_true_and_an_unknown_one_is_refused(tiny_run, tmp_path, autocast_spy):
    bundle = tmp_path / "old"
    shutil.copytree(tiny_run.bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["precision"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    model = load_model(bundle, device="cpu")
    assert model.scorer.precision == "32-true"
    model.predict(sorted((tiny_run.ds / "texture" / "test" / "good").iterdir())[0])
    assert set(autocast_spy) == {None}
    manifest["precision"] = "8-mixed"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PNIError, match='"precision" must be one of 32-true, 16-mixed, bf16-mixed') as err:
        load_model(bundle, device="cpu")
    assert str(bundle / "manifest.json") in str(err.value) and "\n" not in str(err.value)
    # a bundle calibrated under 16-mixed (on a GPU) runs on a CPU only in another precision
    manifest["precision"] = "16-mixed"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PNIError, match="calibrated under --precision 16-mixed, a GPU precision"):
        load_model(bundle, device="cpu")
    assert load_model(bundle, device="cpu", precision="bf16-mixed").scorer.precision == "bf16-mixed"
