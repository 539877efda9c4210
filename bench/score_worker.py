#!/usr/bin/env python
"""One runtime scoring random images in a process of its own, so that its peak memory is its
own (``bench_predict.py`` starts it): one JSON line with the seconds per image, the peak
resident memory and what ran; the maps of the timed images go to ``--maps`` (.npy).

``--runtime onnxruntime --model model.onnx``: imports numpy and onnxruntime, never torch.
``--runtime torch --model STATE.safetensors --spec SPEC.json``: the :class:`pni.model.PNIModel`
of ``bench_predict.paper_model`` with that state. Images: standard normal, seeded, scored one
per call after one warm-up image.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pni.maps import MAP_NAMES  # noqa: E402


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux ``VmHWM``; ``ru_maxrss`` elsewhere)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def onnx_scorer(model: str):
    from pni.deploy.onnx_runtime import OnnxScorer

    scorer = OnnxScorer(model)
    return scorer, f"onnxruntime on {', '.join(scorer.providers)}"


def torch_scorer(state_file: str, spec_file: str):
    import torch
    from safetensors.torch import load_file

    from pni.deploy.torch_runtime import TorchScorer
    from pni.distributions import NeighbourhoodMLP, window_count
    from pni.features import build_feature_extractor
    from pni.model import PNIModel
    from pni.scoring import ScoringArtefacts, ScoringConfig

    spec = json.loads(Path(spec_file).read_text())
    dim, p, k1, k2, dcs = spec["dim"], spec["positions"], spec["k1"], spec["k2"], spec["dcs"]
    extractor = build_feature_extractor(spec["backbone"], ("layer2", "layer3"), 1024, dim, 5, random_init=True)
    mlp = NeighbourhoodMLP(window_count(spec["dist_padding"]) * dim, dcs, spec["num_layers"])
    art = ScoringArtefacts(  # the shapes; the values come with the state
        torch.zeros(k1, dim),
        torch.zeros(k2, dim),
        torch.zeros(dcs, dim),
        torch.zeros(k1, dtype=torch.long),
        torch.zeros(p, k1),
        torch.zeros(p, k2),
    )
    config = ScoringConfig(imagesize=spec["imagesize"])
    model = PNIModel(extractor, mlp, art, config, spec["dist_padding"], spec["imagesize"])
    model.load_state_dict(load_file(state_file))
    return TorchScorer(model.eval(), "cpu"), f"torch {torch.__version__} ({torch.get_num_threads()} threads)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runtime", required=True, choices=("torch", "onnxruntime"))
    p.add_argument("--model", required=True, help="model.onnx, or the PNIModel's state (safetensors)")
    p.add_argument("--spec", default=None, help="the PNIModel's sizes (JSON), for --runtime torch")
    p.add_argument("--imagesize", type=int, required=True)
    p.add_argument("--images", type=int, default=2, help="timed images, after one warm-up image")
    p.add_argument("--maps", default=None, help="write the timed images' maps (N, 4, S, S) here (.npy)")
    args = p.parse_args(argv)
    t = time.perf_counter()
    scorer, what = onnx_scorer(args.model) if args.runtime == "onnxruntime" else torch_scorer(args.model, args.spec)
    load = time.perf_counter() - t
    rng = np.random.default_rng(1)
    images = rng.standard_normal((args.images + 1, 3, args.imagesize, args.imagesize), dtype=np.float32)
    scorer.score(images[:1])  # warm-up
    times, maps, scores = [], [], []
    for x in images[1:]:
        t = time.perf_counter()
        [result] = scorer.score(x[None])
        times.append(time.perf_counter() - t)
        maps.append(np.stack([result.maps[m] for m in MAP_NAMES]))
        scores.append([result.image[m] for m in MAP_NAMES])
    if args.maps:
        np.save(args.maps, np.stack(maps))
    print(json.dumps({"runtime": what, "load": load, "times": times, "scores": scores, "peak_rss": peak_rss_bytes()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
