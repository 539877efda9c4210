"""Test-wide settings: no network, caches in temporary folders, few threads, seeds."""

import os
import tempfile

_TMP = tempfile.mkdtemp(prefix="pni-tests-")
os.environ.setdefault("MPLCONFIGDIR", os.path.join(_TMP, "mpl"))
os.environ["TORCH_HOME"] = os.path.join(_TMP, "torch")
os.environ.setdefault("XDG_CACHE_HOME", os.path.join(_TMP, "cache"))
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("PNI_NO_NETWORK", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    np.random.seed(0)
    torch.manual_seed(0)
    yield
