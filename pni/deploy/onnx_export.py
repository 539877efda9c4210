"""A trained :class:`~pni.model.PNIModel` as one ONNX graph: preprocessed images
``(N, 3, S, S)`` -> the four maps ``(N, 4, S, S)`` (:data:`~pni.maps.MAP_NAMES` order), the
image scores ``(N, 4)`` and the coarse maps ``(N, 4, R, C)``: what :meth:`PNIModel.score`
computes, for the model's variant and ``mask_workers``.

:class:`PNIGraph` is a plain ``nn.Module`` around the model's own modules and tensors (the
backbone, the MLP, the six scoring arrays as buffers), written with operations ONNX has, and
:func:`export_onnx` traces it with ``torch.onnx.export`` (the TorchScript exporter, without
constant folding). Each array of the model is therefore ONE initializer, stored as it is in
the bundle (the original variant reads ``m(k)`` only through its rank columns, a vector of at
most ``D`` ids); what scoring derives from the arrays (the centred coresets and their squared
norms, the thresholded position priors) is computed in the graph from them, which
onnxruntime folds once when it loads the model. The bank never meets a per-position
constant: each coreset enters one matrix product with each image's features.

Each mask chooses an entry from ``q = |y - c|^2 - 2 (x - c).(y - c)`` (the squared distance
less ``|x - c|^2``, as scoring does); the chosen entry's distance is then computed directly as
``|x - y|``, free of the expansion's cancellation. Where :class:`pni.scoring.Scorer`
takes data-dependent shortcuts, the graph makes the same choices without them (each
function below says why they are the same):

- nearest allowed entry: ``argmin`` over ``where(allowed, q, inf)``; nothing allowed -> the
  farthest entry (``argmax``);
- the lost-write rank cut (``keep = ceil(K / workers)``): the nearest allowed entry counts
  only if fewer than ``keep`` entries are strictly nearer (``sum(q < best) < keep``), as
  :func:`pni.scoring_kernels.select_position` counts;
- the original's rank/id mix-up: the first allowed sorted column either from the rank of the
  nearest allowed distribution entry (when ``first`` increases with the rank, the common
  case, :class:`pni.scoring_kernels.RankColumns`) or from the ``R`` nearest distribution entries by
  ``TopK``; then the ``k``-th nearest entry of each row by ``TopK`` over the rows whose
  ``k`` falls in each of a few static ranges (``NonZero`` picks those rows, so a row never pays
  for a larger ``k`` than its range needs, and an empty range costs nothing).

Shapes are static apart from the batch dimension ``N``.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pni.deploy.onnx_runtime import FORMAT, FORMAT_VERSION, INPUT_NAME, ONNX_DATA, ONNX_FILE, OUTPUT_NAMES
from pni.distributions import window_offsets
from pni.errors import PNIError
from pni.features import PatchFeatureExtractor
from pni.maps import MAP_NAMES
from pni.model import ARTEFACT_NAMES, PNIModel
from pni.scoring import interior_indices, pad_interior, parent_share, patchcore_scores
from pni.scoring_kernels import RankColumns, resize_and_blur

OPSET = 17
PROTOBUF_LIMIT = 2**31 - 2**24  # external data above this (protobuf refuses 2 GiB; leave room for the graph)
KTH_FIRST_BOUND = 16  # k-th smallest: TopK over rows with k < 16, then < 128, < 1024... (as pni.scoring_kernels)


# ---------------------------------------------------------------------------------------------
# Patch features


def adaptive_pool_weights(n_in: int, n_out: int) -> Tensor:
    """The matrix ``(n_in / g, n_out / g)``, ``g = gcd(n_in, n_out)``, that averages one period
    of ``adaptive_avg_pool1d(n_in -> n_out)``: output ``j`` averages inputs
    ``floor(j n_in / n_out) .. ceil((j + 1) n_in / n_out) - 1``, and those bins repeat every
    ``n_out / g`` outputs shifted by ``n_in / g`` inputs, within each period of inputs."""
    g = math.gcd(n_in, n_out)
    period_in, period_out = n_in // g, n_out // g
    w = torch.zeros(period_in, period_out, dtype=torch.float32)
    for j in range(period_out):  # a few entries, once per export
        start, stop = (j * n_in) // n_out, -(-((j + 1) * n_in) // n_out)
        w[start:stop, j] = 1.0 / (stop - start)
    return w


class AveragePool(nn.Module):
    """``adaptive_avg_pool1d`` over the last axis, ``(M, n_in) -> (M, n_out)``, as one small
    batched matrix product (ONNX has no adaptive pooling for sizes that do not divide)."""

    weights: Tensor

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.groups = math.gcd(n_in, n_out)
        self.n_in, self.n_out = n_in, n_out
        self.register_buffer("weights", adaptive_pool_weights(n_in, n_out))

    def forward(self, x: Tensor) -> Tensor:
        y = torch.matmul(x.reshape(-1, self.groups, self.n_in // self.groups), self.weights)
        return y.reshape(-1, self.n_out)


def neighbourhood_vectors(fmap: Tensor, patchsize: int) -> Tensor:
    """Every ``patchsize^2`` neighbourhood (zero padding) as a vector, in ``F.unfold``'s order
    (channel, row, column): ``(N, c, h, w) -> (N * h * w, c * patchsize^2)``."""
    _, c, h, w = fmap.shape
    pad = (patchsize - 1) // 2
    padded = F.pad(fmap, (pad, pad, pad, pad))
    shifted = [padded[:, :, dy : dy + h, dx : dx + w] for dy in range(patchsize) for dx in range(patchsize)]
    stacked = torch.stack(shifted, dim=2)  # (N, c, ps^2, h, w)
    return stacked.permute(0, 3, 4, 1, 2).reshape(-1, c * patchsize * patchsize)


class GraphFeatures(nn.Module):
    """:class:`~pni.features.PatchFeatureExtractor`'s computation with ONNX operations, around
    the same backbone module: images ``(N, 3, S, S)`` -> features ``(N, R, C, E)``."""

    def __init__(self, extractor: PatchFeatureExtractor, imagesize: int) -> None:
        super().__init__()
        self.body = extractor.body
        self.layers = list(extractor.layers)
        self.patchsize = extractor.patchsize
        self.pretrain = extractor.pretrain_embed_dimension
        self.target = extractor.target_embed_dimension
        with torch.no_grad():
            probe = self.body(torch.zeros(1, 3, imagesize, imagesize))
        self.shapes = [tuple(int(s) for s in probe[layer].shape[1:]) for layer in self.layers]  # (c, h, w)
        self.grid = self.shapes[0][1:]
        ps2 = self.patchsize**2
        self.layer_pools = nn.ModuleList(AveragePool(c * ps2, self.pretrain) for c, _, _ in self.shapes)
        self.final_pool = AveragePool(len(self.layers) * self.pretrain, self.target)

    def forward(self, images: Tensor) -> Tensor:
        maps = self.body(images)
        rows, cols = self.grid
        pooled = []
        for layer, (_, h, w), pool in zip(self.layers, self.shapes, self.layer_pools):
            vec = pool(neighbourhood_vectors(maps[layer], self.patchsize))  # (N*h*w, pretrain)
            if (h, w) != (rows, cols):  # pooling and resizing commute (pni.features)
                grid = vec.reshape(-1, h, w, self.pretrain).permute(0, 3, 1, 2)
                grid = F.interpolate(grid, size=(rows, cols), mode="bilinear", align_corners=False)
                vec = grid.permute(0, 2, 3, 1).reshape(-1, self.pretrain)
            pooled.append(vec)
        feats = self.final_pool(torch.cat(pooled, dim=1))  # = stack(dim=1) flattened
        return feats.reshape(-1, rows, cols, self.target)


# ---------------------------------------------------------------------------------------------
# Masked selections
#
# Each selection returns the id of the chosen entry; its distance is then computed directly,
# |x - y| (:func:`entry_distance`), not from the expansion |x|^2 - 2 x.y + |y|^2 that chooses it.


def entry_distance(x: Tensor, entries: Tensor, ids: Tensor) -> Tensor:
    """Euclidean distance from each row of ``x`` ``(N, n, E)`` to its entry ``entries[ids]``
    (``ids`` ``(N, n)`` long) -> ``(N, n)``."""
    picked = entries.index_select(0, ids.reshape(-1)).reshape(x.shape)
    diff = x - picked
    return (diff * diff).sum(dim=-1).sqrt()


def masked_nearest(q: Tensor, allowed: Tensor) -> tuple[Tensor, Tensor]:
    """The nearest allowed entry of each row: ``q`` ``(N, n, K)`` (increasing in the distance),
    ``allowed`` ``(n, K)`` or ``(N, n, K)`` bool -> its id ``(N, n, 1)`` and its ``q``, ``inf``
    where nothing is allowed."""
    masked = torch.where(allowed, q, torch.full_like(q, math.inf))
    ids = masked.argmin(dim=-1, keepdim=True)
    return ids, masked.gather(-1, ids)


def position_select(q: Tensor, allowed: Tensor, keep: int | None) -> Tensor:
    """:func:`pni.scoring_kernels.select_position` without row subsets, as entry ids ``(N, n)``: the
    nearest allowed entry, counted only when fewer than ``keep`` entries are strictly nearer
    (``keep`` None: always), else (and where nothing is allowed) the farthest entry. The
    same choice: scoring counts the same strict inequality for the rows whose best is not
    their minimum, and for the others the count is 0."""
    ids, best = masked_nearest(q, allowed)
    found = torch.isfinite(best)
    if keep is not None and keep < q.shape[-1]:
        found = found & ((q < best).sum(dim=-1, keepdim=True) < keep)
    return torch.where(found, ids, q.argmax(dim=-1, keepdim=True)).squeeze(-1)


def kth_buckets(values: list[int], width: int) -> list[tuple[int, int, int]]:
    """Static row groups for :func:`kth_smallest`: ``(lo, hi, topk)`` for the possible ``k``
    ``values`` other than ``0`` (the row minimum) and ``width - 1`` (the row maximum): rows
    with ``lo <= k < hi`` take the ``k``-th of their ``topk`` smallest (``topk`` = the largest
    such ``k`` present + 1). Bounds 16, 128, 1024, ... as :func:`pni.scoring_kernels.kth_smallest`."""
    inner = sorted({v for v in values if 0 < v < width - 1})
    out: list[tuple[int, int, int]] = []
    lo, hi = 1, KTH_FIRST_BOUND
    while inner:
        hi = min(hi, width - 1)  # the row maximum is taken apart
        chosen = [v for v in inner if v < hi]
        if chosen:
            out.append((lo, hi, max(chosen) + 1))
        inner = [v for v in inner if v >= hi]
        lo, hi = hi, hi * 8
    return out


def kth_smallest(q: Tensor, k: Tensor, buckets: list[tuple[int, int, int]]) -> Tensor:
    """Id of the ``k``-th smallest (0-based) entry of each row: ``q`` ``(N, n, K)``, ``k``
    ``(N, n)`` long, each ``0``, ``K - 1`` or in one of the ``buckets`` -> ``(N, n)`` long.
    ``k = 0``: the row's argmin; ``k = K - 1``: its argmax; otherwise, per bucket, ``TopK`` over
    only the rows ``NonZero`` finds in it (none: nothing is computed)."""
    width = q.shape[-1]
    rows = q.reshape(-1, width)
    kk = k.reshape(-1)
    out = torch.where(kk == width - 1, rows.argmax(dim=1), rows.argmin(dim=1))
    for lo, hi, top in buckets:
        idx = torch.nonzero((kk >= lo) & (kk < hi)).reshape(-1)
        order = rows.index_select(0, idx).topk(top, dim=1, largest=False, sorted=True).indices
        out = out.scatter(0, idx, order.gather(1, kk.index_select(0, idx).unsqueeze(1)).reshape(-1))
    return out.reshape(k.shape)


# ---------------------------------------------------------------------------------------------
# The graph


class PNIGraph(nn.Module):
    """:meth:`PNIModel.score` as one traceable module: ``images`` ``(N, 3, S, S)`` ->
    ``(maps (N, 4, S, S), image_scores (N, 4), coarse_maps (N, 4, R, C))``.

    Shares ``model``'s backbone, MLP and arrays (its buffers are the model's tensors); the few
    small derived constants (index lists, pooling and resize matrices, the rank columns) are
    computed here once.
    """

    embedding_without_edge: Tensor
    embedding_with_edge: Tensor
    distribution_coreset: Tensor
    embedding_to_distribution: Tensor
    position_prior: Tensor
    position_prior_with_edge: Tensor
    inner: Tensor
    window_index: Tensor
    first_columns: Tensor

    def __init__(self, model: PNIModel) -> None:
        super().__init__()
        cfg = model.config
        self.features = GraphFeatures(model.extractor, model.imagesize)
        self.mlp = model.mlp.eval()
        for name in ARTEFACT_NAMES:
            self.register_buffer(name, getattr(model, name))
        rows, cols = self.features.grid
        self.rows, self.cols, self.pad = rows, cols, model.pad
        self.imagesize, self.blursigma = cfg.imagesize, float(cfg.blursigma)
        # scoring derives (and caches) its resize-and-blur matrices on first use: derive them now,
        # so that the trace holds them as two small constants rather than the ops making them
        resize_and_blur(torch.zeros(1, rows, cols), self.imagesize, self.blursigma)
        self.dim = self.features.target
        k1, k2 = len(self.embedding_without_edge), len(self.embedding_with_edge)
        d = len(self.distribution_coreset)
        model.artefacts().check(rows, cols, self.dim)
        if not 1 <= cfg.anomaly_nn <= k2:
            raise PNIError(f"--anomaly_nn {cfg.anomaly_nn} must be in 1..{k2} (with-edge coreset)")
        self.k1, self.k2, self.d = k1, k2, d
        self.anomaly_nn = cfg.anomaly_nn
        self.gamma = float(cfg.prob_gamma)
        self.alpha = float(cfg.softmax_temperature_alpha)
        # thresholds as float32, as torch compares float32 tensors with Python floats
        self.nb_threshold = float(np.float32(cfg.softmax_nb_gamma / k1))
        self.coor_threshold = (
            float(np.float32(cfg.softmax_coor_gamma / k1)),
            float(np.float32(cfg.softmax_coor_gamma / k2)),
        )
        self.original = cfg.variant == "original"
        self.keep1 = parent_share(k1, cfg.mask_workers) if self.original else None
        self.keep2 = parent_share(k2, cfg.mask_workers) if self.original else None
        self.register_buffer("inner", interior_indices(rows, cols, self.pad))
        self.p_int = int(self.inner.numel())
        # MLP windows: flat indices into the grid zero-padded by dp on each side
        dp = model.dist_padding
        offsets = window_offsets(dp, model.layout)
        r_in, c_in = self.inner // cols, self.inner % cols
        width = cols + 2 * dp
        window = (r_in[:, None] + dp + offsets[None, :, 0]) * width + (c_in[:, None] + dp + offsets[None, :, 1])
        self.register_buffer("window_index", window.reshape(-1))
        self.dist_padding, self.n_window = dp, int(offsets.shape[0])
        self.rank_columns: RankColumns | None = None
        self.buckets: list[tuple[int, int, int]] = []
        if self.original:
            rc = RankColumns.build(self.embedding_to_distribution, parent_share(d, cfg.mask_workers))
            self.rank_columns = rc
            self.register_buffer("first_columns", rc.first.clone())
            self.ranks = int(rc.first.numel())
            self.buckets = kth_buckets(rc.first.tolist() + [k1 - 1], k1)

    # ------------------------------------------------------------ pieces

    def neighbourhood_logits(self, feats: Tensor) -> Tensor:
        """MLP logits of every interior window: ``(N, R, C, E) -> (N, P_int, D)``."""
        dp = self.dist_padding
        padded = F.pad(feats, (0, 0, dp, dp, dp, dp)).reshape(feats.shape[0], -1, self.dim)
        windows = padded.index_select(1, self.window_index).reshape(-1, self.n_window * self.dim)
        return self.mlp(windows).reshape(-1, self.p_int, self.d)

    def first_allowed(self, q_dist: Tensor, allowed_dist: Tensor) -> Tensor:
        """:meth:`pni.scoring_kernels.RankColumns.first_allowed` over ``(N, n, D)``: the first allowed
        sorted column of each row, ``(N, n)`` long. When ``first`` increases with the rank, it
        is ``first`` at the rank of the nearest allowed distribution entry (the number of
        entries strictly nearer); otherwise the smallest ``first[r]`` over the allowed ones of
        the ``R`` nearest entries (``TopK``)."""
        assert self.rank_columns is not None
        last = torch.full_like(q_dist[..., 0], self.k1 - 1, dtype=torch.long)
        if self.rank_columns.increasing:
            _, nearest = masked_nearest(q_dist, allowed_dist)
            rank = (q_dist < nearest).sum(dim=-1)
            found = torch.isfinite(nearest.squeeze(-1)) & (rank < self.ranks)
            return torch.where(found, self.first_columns[rank.clamp(max=self.ranks - 1)], last)
        order = q_dist.topk(self.ranks, dim=-1, largest=False, sorted=True).indices
        by_rank = allowed_dist.gather(-1, order)  # is the r-th nearest distribution entry allowed
        return torch.where(by_rank, self.first_columns, last.unsqueeze(-1)).amin(dim=-1)

    # ------------------------------------------------------------ forward

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        feats = self.features(images)
        logits = self.neighbourhood_logits(feats)
        n, p, e = feats.shape[0], self.rows * self.cols, self.dim
        x = feats.reshape(n, p, e)
        # Which entry each mask selects comes from q = |y - c|^2 - 2 (x - c).(y - c), the squared
        # distance less |x - c|^2 (c: the with-edge coreset's mean), one matrix product per coreset.
        centre = self.embedding_with_edge.mean(dim=0)
        x_c = x - centre

        def sq_distances(rows: Tensor, entries: Tensor) -> Tensor:  # (N, n, E) -> (N, n, K)
            centred = entries - centre
            return torch.matmul(rows, (-2.0 * centred).t()) + (centred * centred).sum(dim=1)

        # With-edge coreset, all positions: PatchCore and coor.
        q2 = sq_distances(x_c, self.embedding_with_edge)  # (N, P, K2)
        nearest_ids = q2.argmin(dim=-1)
        nearest = entry_distance(x, self.embedding_with_edge, nearest_ids)
        allowed2 = self.position_prior_with_edge > self.coor_threshold[1]
        coor = entry_distance(x, self.embedding_with_edge, position_select(q2, allowed2, self.keep2))
        # Without-edge coreset, interior positions: nb and the position score.
        x_int = x.index_select(1, self.inner)
        q1 = sq_distances(x_c.index_select(1, self.inner), self.embedding_without_edge)  # (N, P_int, K1)
        allowed_dist = torch.softmax(logits / self.alpha, dim=-1) > self.nb_threshold  # (N, P_int, D)
        if self.original:
            q_dist = sq_distances(x_c.index_select(1, self.inner), self.distribution_coreset)
            nb_ids = kth_smallest(q1, self.first_allowed(q_dist, allowed_dist), self.buckets)
        else:  # entry k is allowed where m(k) is
            nb_ids = position_select(q1, allowed_dist.index_select(-1, self.embedding_to_distribution), None)
        nb = entry_distance(x_int, self.embedding_without_edge, nb_ids)
        allowed_int = self.position_prior.index_select(0, self.inner) > self.coor_threshold[0]
        pos = entry_distance(x_int, self.embedding_without_edge, position_select(q1, allowed_int, self.keep1))
        g = self.gamma
        nb, pos, coor = g * nb - math.log(g), g * pos - math.log(g), g * coor - math.log(g)
        nb_coor = 0.5 * (nb + pos)

        # PatchCore image score: the anomaly_nn nearest entries of each image's worst position.
        worst = nearest.argmax(dim=1, keepdim=True)  # (N, 1)
        q_worst = q2.gather(1, worst.unsqueeze(-1).expand(-1, -1, self.k2))  # (N, 1, K2)
        knn_ids = q_worst.topk(self.anomaly_nn, dim=-1, largest=False, sorted=True).indices.squeeze(1)
        x_worst = x.gather(1, worst.unsqueeze(-1).expand(-1, -1, e)).expand(-1, self.anomaly_nn, -1)
        _, image_pc = patchcore_scores(entry_distance(x_worst, self.embedding_with_edge, knn_ids).unsqueeze(1))
        image = torch.stack([nb.amax(dim=1), coor.amax(dim=1), image_pc, nb_coor.amax(dim=1)], dim=1)

        r_int, c_int = self.rows - 2 * self.pad, self.cols - 2 * self.pad
        coarse = torch.stack(
            [
                pad_interior(nb.reshape(-1, r_int, c_int), self.pad),
                coor.reshape(-1, self.rows, self.cols),
                nearest.reshape(-1, self.rows, self.cols),
                pad_interior(nb_coor.reshape(-1, r_int, c_int), self.pad),
            ],
            dim=1,
        )  # (N, 4, R, C) in MAP_NAMES order
        full = resize_and_blur(coarse.reshape(-1, self.rows, self.cols), self.imagesize, self.blursigma)
        return full.reshape(-1, len(MAP_NAMES), self.imagesize, self.imagesize), image, coarse


# ---------------------------------------------------------------------------------------------
# Export


def graph_metadata(model: PNIModel) -> dict[str, str]:
    """What the runtime needs to know about the graph, stored in its ``metadata_props``."""
    cfg = model.config
    return {
        "pni.format": FORMAT,
        "pni.format_version": str(FORMAT_VERSION),
        "pni.maps": ",".join(MAP_NAMES),
        "pni.resize": str(model.resize),
        "pni.imagesize": str(model.imagesize),
        "pni.variant": cfg.variant,
        "pni.mask_workers": str(cfg.mask_workers),
    }


def export_onnx(
    model: PNIModel, folder: str | os.PathLike, opset: int = OPSET, external_data: bool | None = None
) -> list[str]:
    """Write ``model`` (on the CPU) as ``folder/model.onnx``, plus ``model.onnx.data`` holding
    the initializers when ``external_data`` (``None``: when they would pass protobuf's 2 GB);
    returns the names of the files written. Each file appears under its name only when
    complete (the data first); ``onnx.checker`` has passed on it."""
    import onnx

    if opset < OPSET:
        raise PNIError(f"ONNX export needs opset {OPSET} or newer, got {opset}")
    out = Path(folder)
    devices = {t.device.type for t in (*model.parameters(), *model.buffers())}
    if devices != {"cpu"}:
        raise PNIError(f"export the model from the CPU (its tensors are on {', '.join(sorted(devices))})")
    graph = PNIGraph(model).eval()
    example = torch.zeros(2, 3, model.imagesize, model.imagesize)
    dynamic = {name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)}
    tmp = Path(tempfile.mkdtemp(prefix=f".{ONNX_FILE}.partial-", dir=out))
    try:
        traced = tmp / "traced.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
            torch.onnx.export(
                graph,
                (example,),
                str(traced),
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_axes=dynamic,
                do_constant_folding=False,  # keep each array as it is: no folded copies
            )
        proto = onnx.load(str(traced))
        for key, value in graph_metadata(model).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        proto.doc_string = "PNI model: preprocessed images -> maps, image scores, coarse maps"
        if external_data is None:  # protobuf cannot even measure a message past 2 GB: add up the tensors
            external_data = sum(len(t.raw_data) for t in proto.graph.initializer) > PROTOBUF_LIMIT
        external = bool(external_data)
        final = tmp / ONNX_FILE
        onnx.save_model(
            proto,
            str(final),
            save_as_external_data=external,
            all_tensors_to_one_file=True,
            location=ONNX_DATA,
            size_threshold=1024,
        )
        del proto
        onnx.checker.check_model(str(final))  # by path: works for external data too
        names = [ONNX_DATA, ONNX_FILE] if external else [ONNX_FILE]
        for name in names:  # the data first: model.onnx never names a missing file
            os.replace(tmp / name, out / name)
        if not external:
            (out / ONNX_DATA).unlink(missing_ok=True)  # a previous export's, which nothing names now
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sorted(names)


def initializer_report(path: str | os.PathLike) -> dict[str, Any]:
    """Sizes of a written graph: file bytes (with external data), initializer count and bytes,
    and the names of initializers above 1 KB whose contents repeat another's."""
    import hashlib

    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    seen: dict[str, str] = {}
    repeated = []
    total = 0
    for init in proto.graph.initializer:
        arr = numpy_helper.to_array(init)
        total += arr.nbytes
        if arr.nbytes > 1024:
            digest = hashlib.sha256(arr.tobytes() + str(arr.dtype).encode() + str(arr.shape).encode()).hexdigest()
            if digest in seen:
                repeated.append((init.name, seen[digest]))
            seen.setdefault(digest, init.name)
    path = Path(path)
    data = path.with_name(ONNX_DATA)
    return {
        "file_bytes": path.stat().st_size + (data.stat().st_size if data.exists() else 0),
        "initializers": len(proto.graph.initializer),
        "initializer_bytes": total,
        "repeated": repeated,
    }
