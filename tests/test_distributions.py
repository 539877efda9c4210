"""Neighbourhood windows, the MLP and its checkpoints, and the position prior."""

import argparse

import numpy as np
import pytest
import reference
import torch

from pni.distributions import (
    NeighbourhoodMLP,
    gather_windows,
    grid_windows,
    load_mlp_checkpoint,
    mlp_from_state_dict,
    normalise_rows,
    position_prior_counts,
    save_mlp_checkpoint,
    window_offsets,
)
from pni.errors import PNIError


@pytest.mark.parametrize("variant", ["original", "paper"])
@pytest.mark.parametrize("dp", [1, 2, 4])
def test_windows_match_sliced_reference(dp, variant):
    rng = np.random.default_rng(dp)
    bank = rng.normal(size=(3, 11, 10, 4)).astype(np.float32)
    img = torch.tensor([0, 2, 1, 2, 1, 0])
    rows = torch.tensor([0, 3, 10, 5, 4, 7])
    cols = torch.tensor([0, 2, 9, 1, 9, 4])
    expected = np.stack(
        [
            reference.sliced_window(bank[i], r, c, dp, variant)
            for i, r, c in zip(img.tolist(), rows.tolist(), cols.tolist())
        ]
    )
    assert expected.shape == (6, ((2 * dp + 1) ** 2 - 1) * 4)
    np.testing.assert_array_equal(gather_windows(bank, img, rows, cols, dp, variant).numpy(), expected)
    np.testing.assert_array_equal(
        gather_windows(torch.from_numpy(bank), img, rows, cols, dp, variant).numpy(), expected
    )
    # one image's grid at flat positions: the same windows
    flat = rows[img == 2] * 10 + cols[img == 2]
    np.testing.assert_array_equal(
        grid_windows(torch.from_numpy(bank[2]), flat, dp, variant).numpy(), expected[(img == 2).numpy()]
    )


def test_window_layouts_by_hand():
    # dp = 1: slots 0..8 row-major; paper drops the centre (slot 4, offset (0, 0)), the
    # original drops slot 5, the right-hand neighbour (0, +1), and keeps the centre.
    assert (0, 0) not in [tuple(o) for o in window_offsets(1, "paper").tolist()]
    assert window_offsets(1, "original").tolist() == [
        [-1, -1],
        [-1, 0],
        [-1, 1],
        [0, -1],
        [0, 0],
        [1, -1],
        [1, 0],
        [1, 1],
    ]
    grid = torch.arange(9, dtype=torch.float32).reshape(3, 3, 1)  # value = slot
    centre = torch.tensor([4])
    assert grid_windows(grid, centre, 1, "original").tolist() == [[0, 1, 2, 3, 4, 6, 7, 8]]
    assert grid_windows(grid, centre, 1, "paper").tolist() == [[0, 1, 2, 3, 5, 6, 7, 8]]
    assert len(window_offsets(4, "original")) == len(window_offsets(4, "paper")) == 80
    with pytest.raises(PNIError, match="--variant"):
        window_offsets(1, "other")


def test_mlp_parameter_names_follow_the_original():
    model = NeighbourhoodMLP(12, 5, num_layers=4, hidden=16)
    keys = set(model.state_dict())
    for k in (
        "first_layer.0.weight",
        "first_layer.1.running_mean",
        "hidden_layers.0.0.weight",
        "hidden_layers.1.1.bias",
        "last_layer.0.weight",
    ):
        assert k in keys
    assert sum(isinstance(m, torch.nn.Linear) for m in model.modules()) == 4


def test_checkpoint_round_trip_weights_only(tmp_path):
    model = NeighbourhoodMLP(12, 5, num_layers=3, hidden=16).eval()
    path = tmp_path / "best_model_dp1_dcs5_n3.pt"
    save_mlp_checkpoint(path, model, {"dist_padding": 1}, 1.5, 1.2)
    raw = torch.load(path, weights_only=True)  # plain tensors and numbers only
    assert raw["val_loss"] == pytest.approx(1.2)
    loaded = mlp_from_state_dict(load_mlp_checkpoint(path)["model"])
    x = torch.randn(6, 12)
    torch.testing.assert_close(loaded(x), model(x))


def test_original_checkpoint_with_namespace_loads(tmp_path):
    model = NeighbourhoodMLP(12, 5, num_layers=3, hidden=16).eval()
    path = tmp_path / "orig.pt"
    torch.save(
        {
            "model": model.state_dict(),
            "args": argparse.Namespace(dist_padding=1, num_layers=3),
            "train_loss": 0.5,
            "val_loss": 0.6,
        },
        path,
    )
    ckpt = load_mlp_checkpoint(path)
    assert ckpt["settings"] == {"dist_padding": 1, "num_layers": 3}
    assert mlp_from_state_dict(ckpt["model"]).last_layer[0].out_features == 5


def test_checkpoint_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "x": Evil()}, path)
    with pytest.raises(PNIError, match="cannot read"):
        load_mlp_checkpoint(path)


def test_position_prior_matches_naive_reference():
    rng = np.random.default_rng(4)
    rows, cols, k, dp = 6, 5, 9, 1
    positions = [r * cols + c for r in range(1, rows - 1) for c in range(1, cols - 1)]
    labels = rng.integers(0, k - 2, size=(3, len(positions)))  # entries k-2, k-1 never used
    counts = position_prior_counts(torch.as_tensor(labels), (rows, cols), k, dp, positions=torch.as_tensor(positions))
    expected = reference.position_counts(labels, positions, rows, cols, k, dp)
    np.testing.assert_array_equal(counts.numpy(), expected)
    prior = normalise_rows(counts)
    np.testing.assert_allclose(prior.sum(1).numpy(), 1.0, rtol=1e-6)
    assert (prior[:, k - 2 :] == 0).all()
    empty = normalise_rows(torch.zeros(2, 3))
    assert torch.equal(empty, torch.zeros(2, 3))


# ---------------------------------------------------------------- stage 2: training the MLP


def test_mlp_training_labels_split_best_weights_and_architecture(tmp_path, monkeypatch):
    """``train_neighbourhood`` on a random bank, every batch recorded: each sample is the
    window of an interior position (original layout) labelled with the nearest distribution
    entry of its centre; a 90/10 split, the same validation tenth every epoch; the saved
    weights are those of the epoch with the best validation loss, that loss is theirs, and the
    network has the method's layers and widths."""
    import copy

    from pni import pipeline
    from pni.config import parse_args, settings_from_flags
    from pni.lightning import NeighbourhoodModule

    rng = np.random.default_rng(0)
    bank = rng.normal(size=(4, 7, 7, 6)).astype(np.float32)  # 4 images, 5 x 5 interior positions
    distribution = bank[rng.integers(0, 4, 5), rng.integers(1, 6, 5), rng.integers(1, 6, 5)]
    settings = settings_from_flags(
        parse_args(
            [
                "--patchsize",
                "3",
                "--dist_padding",
                "1",
                "--dist_coreset_size",
                "5",
                "--num_layers",
                "3",
                "--num_epochs",
                "4",
                "--learning_rate",
                "0.05",
                "--step_size",
                "10",
                "--dist_batchsize",
                "32",
                "--target_embed_dimension",
                "6",
                "--accelerator",
                "cpu",
                "--devices",
                "1",
            ]
        )
    )
    recorded = []

    class Recording(NeighbourhoodModule):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.batches = {"train": [], "val": []}
            self.epochs = []  # (validation loss, weights) after each validation
            recorded.append(self)

        def training_step(self, batch, batch_idx):
            self.batches["train"].append((self.current_epoch, batch[0].numpy().copy(), batch[1].numpy().copy()))
            return super().training_step(batch, batch_idx)

        def validation_step(self, batch, batch_idx):
            self.batches["val"].append((self.current_epoch, batch[0].numpy().copy(), batch[1].numpy().copy()))
            return super().validation_step(batch, batch_idx)

        def on_validation_epoch_end(self):
            super().on_validation_epoch_end()
            self.epochs.append(
                (float(self.trainer.callback_metrics["val_loss"]), copy.deepcopy(self.model.state_dict()))
            )

    monkeypatch.setattr(pipeline, "NeighbourhoodModule", Recording)
    pipeline.train_neighbourhood(settings, bank, {"distribution": distribution}, tmp_path)
    (module,) = recorded

    windows, labels = reference.neighbourhood_samples(bank, distribution, pad=1, dp=1, variant="original")
    assert len(set(labels.tolist())) > 2  # several classes

    def sample_ids(split, epoch):
        ids = []
        for e, x, y in module.batches[split]:
            if e != epoch:
                continue
            for row, label in zip(x, y):
                (match,) = np.flatnonzero((windows == row).all(axis=1))  # the window of exactly one position
                assert label == labels[match]
                ids.append(int(match))
        return ids

    val = [sample_ids("val", e) for e in range(4)]
    train = [sample_ids("train", e) for e in range(4)]
    assert len(val[0]) == 10 and len(set(val[0])) == 10  # a tenth of the 100 positions
    assert all(sorted(v) == sorted(val[0]) for v in val)
    for epoch in range(4):  # every other sample once per epoch, shuffled
        assert sorted(train[epoch] + val[0]) == list(range(100))
    assert train[0] != train[1]
    assert sorted(val[0]) != list(range(10)) and sorted(val[0]) != list(range(90, 100))

    losses = [loss for loss, _ in module.epochs]
    best = int(np.argmin(losses))
    assert best < 3, losses  # the last epoch is not the best: saving the last weights would fail below
    ckpt = torch.load(tmp_path / "best_model_dp1_dcs5_n3.pt", weights_only=True)
    assert ckpt["val_loss"] == pytest.approx(losses[best], rel=1e-6)
    for key, value in module.epochs[best][1].items():
        assert torch.equal(ckpt["model"][key], value), key
    val_ids = np.array(val[0])
    expected = reference.cross_entropy(reference.mlp_logits(ckpt["model"], windows[val_ids]), labels[val_ids])
    assert ckpt["val_loss"] == pytest.approx(expected, rel=1e-4)

    shapes = {k: tuple(v.shape) for k, v in ckpt["model"].items()}
    assert shapes == reference.mlp_parameter_shapes(8 * 6, 5, 3)
    blocks = [module.model.first_layer, *module.model.hidden_layers]
    for block in blocks:
        assert [type(m) for m in block] == [torch.nn.Linear, torch.nn.BatchNorm1d, torch.nn.ReLU, torch.nn.Dropout]
        assert block[3].p == 0.5
    optimisers = module.configure_optimizers()
    assert isinstance(optimisers["optimizer"], torch.optim.Adam)
    assert optimisers["optimizer"].defaults["lr"] == 0.05
    scheduler = optimisers["lr_scheduler"]["scheduler"]
    assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR)
    assert (scheduler.step_size, scheduler.gamma) == (10, 0.1)
