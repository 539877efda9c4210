"""Lightning DDP on the CPU (gloo, 2 processes): test scoring of the shared tiny run's
artefacts agrees with one process, and the MLP trains under DDP.

Lightning's ``ddp`` strategy starts the other rank by running the command line again, so
the DDP runs are subprocesses of ``train_coreset_distribution.py``.
"""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
import reference
import torch
from helpers import REPO as ROOT
from helpers import TINY, TRAIN, aurocs_from_saved, path_flags

import train_coreset_distribution as tcd

DDP = ["--devices", "2", "--strategy", "ddp"]


def run_script(argv, timeout=900):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PNI_DDP_RUN")
    }
    env["OMP_NUM_THREADS"] = "1"  # two processes on a two-core machine
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train_coreset_distribution.py")] + argv,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def versions(root):
    return root / "result" / "texture" / "R18" / "anomaly" / "lightning_logs"


def score_rows(root):
    with open(root / "result" / "score_result.csv") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def dataset(tiny_run, tmp_path_factory):
    """The shared run's dataset with 7 test images: the distributed sampler repeats one to
    give both ranks 4."""
    root = tmp_path_factory.mktemp("ddp")
    cat = tiny_run.copy_dataset(root / "ds")
    (cat / "test" / "scratch" / "001.png").unlink()
    (cat / "ground_truth" / "scratch" / "001_mask.png").unlink()
    return root


def test_ddp_scoring_matches_one_process(tiny_run, dataset):
    root = dataset / "score"
    tiny_run.copy_artefacts(root)  # the shared run's artefacts (same training images)
    base = path_flags(dataset / "ds", root) + TINY
    assert tcd.main(base) == 0  # scores on one process: version_0
    proc = run_script(base + DDP)  # the same artefacts, scored by 2 processes: version_1
    assert proc.stdout.count("stage 4/4") == 1  # progress and tables from rank 0 only
    v0, v1 = versions(root) / "version_0", versions(root) / "version_1"
    assert sorted(p.name for p in versions(root).iterdir()) == ["version_0", "version_1"]
    files = sorted(p.name for p in (v0 / "sample").iterdir())
    assert files == sorted(p.name for p in (v1 / "sample").iterdir())
    maps = [f for f in files if "_amap_" in f and f.endswith(".npy")]
    assert len(maps) == 7 * 4
    for name in maps:
        np.testing.assert_allclose(
            np.load(v1 / "sample" / name), np.load(v0 / "sample" / name), rtol=0, atol=1e-5, err_msg=name
        )
    with open(v0 / "image_scores.csv") as a, open(v1 / "image_scores.csv") as b:
        one, two = list(csv.reader(a)), list(csv.reader(b))
    assert len(one) == 8 and [r[:3] for r in one] == [r[:3] for r in two]  # same images, same order
    np.testing.assert_allclose(
        np.array([r[3:] for r in two[1:]], float), np.array([r[3:] for r in one[1:]], float), rtol=0, atol=1e-5
    )
    rows = score_rows(root)
    assert [r["version"] for r in rows] == ["version_0", "version_1"]
    expected = aurocs_from_saved(v1)  # scikit-learn on the files the two ranks wrote
    for key, value in expected.items():
        assert float(rows[1][key]) == pytest.approx(value, abs=1e-6), key
        assert float(rows[0][key]) == pytest.approx(float(rows[1][key]), abs=1e-6), key


def test_ddp_training_runs_every_stage(dataset):
    root = dataset / "train"
    base = path_flags(dataset / "ds", root) + TINY
    run_script(base + TRAIN + DDP)
    emb = root / "embeddings_layer2+layer3" / "texture" / "R18"
    assert not any(p.name.startswith(".") for p in emb.iterdir())  # no scratch or temporary left
    ckpt = torch.load(emb / "best_model_dp2_dcs16_n3.pt", weights_only=True)
    assert ckpt["model"]["first_layer.0.weight"].shape == (2048, 24 * 32)
    # The recorded validation loss is the cross-entropy of the saved weights on the validation
    # tenth of the windows, both ranks' shares together.
    x, y = validation_samples(dataset / "ds", emb)
    assert len(y) == 6  # 10% of 4 images x 4 x 4 interior positions
    expected = reference.cross_entropy(reference.mlp_logits(ckpt["model"], x), y)
    assert ckpt["val_loss"] == pytest.approx(expected, rel=1e-4)
    assert (emb / "coor_model_sp25_with_edge.npy").is_file()
    assert sorted(p.name for p in versions(root).iterdir()) == ["version_0"]
    assert len(list((versions(root) / "version_0" / "sample").glob("*_amap_nb.npy"))) == 7
    (row,) = score_rows(root)
    for key, value in aurocs_from_saved(versions(root) / "version_0").items():
        assert float(row[key]) == pytest.approx(value, abs=1e-6), key


def validation_samples(dataset_path, emb):
    """Windows and labels of the validation split (seed 22), from the training images'
    features and the saved distribution coreset."""
    import faiss

    from pni.data.datasets import build_datasets
    from pni.features import build_feature_extractor
    from pni.lightning import split_train_val

    train_ds, _ = build_datasets("MVTec", dataset_path, "texture", resize=64, imagesize=64)
    extractor = build_feature_extractor("R18", pretrain_embed_dimension=48, target_embed_dimension=32, random_init=True)
    bank = extractor(torch.stack([train_ds[i]["image"] for i in range(len(train_ds))])).double().numpy()
    index = faiss.read_index(str(emb / "dist_coreset_index_16.faiss"))
    distribution = index.reconstruct_n(0, index.ntotal).astype(np.float64)
    x, y = reference.neighbourhood_samples(bank, distribution, pad=2, dp=2, variant="original")
    _, val_ids = split_train_val(len(y), seed=22)
    return x[val_ids.numpy()], y[val_ids.numpy()]
