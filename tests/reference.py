"""Naive references written from the method (docs/METHOD.md; "METHOD n" is its section n),
independent of the ``pni`` code they check.

Plain loops or explicit weight matrices built from the formulas, float64, numpy (torch only
to run a torchvision backbone's own layers). Tests compare the package with these; the
scoring benchmark times its naive port from here too.

- transforms (METHOD 1): :func:`resize_and_crop`, :func:`image_tensor`;
- patch features (METHOD 2): :func:`resnet_layer_maps`, :func:`patch_features`, built from
  :func:`neighbourhoods`, :func:`bilinear_weights` and :func:`adaptive_pool_weights`;
- greedy coreset (METHOD 3): :func:`brute_force_farthest_point`, :func:`jl_min_dim`;
- learned priors (METHOD 4): :func:`sliced_window`, :func:`neighbourhood_samples`, :func:`mlp_logits`,
  :func:`mlp_parameter_shapes`, :func:`cross_entropy`, :func:`position_counts`;
- scoring (METHOD 5): :func:`naive_scores` (the original's loop structure, lost parallel
  writes included) and :func:`full_size_maps` (bilinear resize, then scipy's Gaussian blur).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Callable

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HIDDEN_WIDTH = 2048  # METHOD 4: hidden layers of the neighbourhood MLP
BATCHNORM_EPS = 1e-5  # torch.nn.BatchNorm1d's default, which the MLP keeps


# ---------------------------------------------------------------------------------------------
# Resampling weights


def bilinear_weights(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` weights of linear interpolation with pixel centres aligned
    (align_corners=False): output pixel ``i`` samples the input at
    ``x = (i + 0.5) * n_in / n_out - 0.5`` (clamped at 0), between pixels ``floor(x)`` and the
    next one (the last pixel repeats past the end)."""
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        x = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = min(int(math.floor(x)), n_in - 1)
        hi = min(lo + 1, n_in - 1)
        frac = x - lo
        w[i, lo] += 1.0 - frac
        w[i, hi] += frac
    return w


def bilinear_resize(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize (align_corners=False) of the last two axes of ``a`` to ``size``."""
    rows = bilinear_weights(a.shape[-2], size[0])
    cols = bilinear_weights(a.shape[-1], size[1])
    return rows @ np.asarray(a, dtype=np.float64) @ cols.T


def adaptive_pool_weights(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` weights of adaptive average pooling: output ``i`` is the mean of
    inputs ``floor(i * n_in / n_out) .. ceil((i + 1) * n_in / n_out) - 1``."""
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        start = (i * n_in) // n_out
        end = -((-(i + 1) * n_in) // n_out)
        w[i, start:end] = 1.0 / (end - start)
    return w


# ---------------------------------------------------------------------------------------------
# METHOD 1: test-time transform


def resize_and_crop(image: Image.Image, resize: int, imagesize: int) -> np.ndarray:
    """Shorter side resized to ``resize`` with PIL's bilinear filter (the longer one to
    ``int(resize * long / short)``), then the centre ``imagesize`` square (offset
    ``round((size - imagesize) / 2)``): ``uint8 (imagesize, imagesize[, channels])``."""
    w, h = image.size
    size = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
    resized = np.asarray(image.resize(size, Image.Resampling.BILINEAR))
    top = int(round((size[1] - imagesize) / 2.0))
    left = int(round((size[0] - imagesize) / 2.0))
    return resized[top : top + imagesize, left : left + imagesize]


def image_tensor(image: Image.Image, resize: int, imagesize: int) -> np.ndarray:
    """RGB PIL image -> ``(3, imagesize, imagesize)`` float64: :func:`resize_and_crop`, scaled
    to [0, 1], ImageNet normalisation."""
    crop = resize_and_crop(image.convert("RGB"), resize, imagesize).astype(np.float64) / 255.0
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    return ((crop - mean) / std).transpose(2, 0, 1)


# ---------------------------------------------------------------------------------------------
# METHOD 2: patch features


def resnet_layer_maps(model, images, layers: Sequence[str]) -> list[np.ndarray]:
    """Raw outputs ``(B, C, h, w)`` of a torchvision ResNet's ``layers`` (eval mode), running
    its stem and residual stages one module after the other. ``images``: torch tensor."""
    import torch

    model = model.eval()
    out = {}
    with torch.no_grad():
        x = model.maxpool(model.relu(model.bn1(model.conv1(images))))
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(model, name)(x)
            if name in layers:
                out[name] = x.double().numpy()
            if len(out) == len(layers):
                break
    return [out[name] for name in layers]


def neighbourhoods(fmap: np.ndarray, patchsize: int) -> np.ndarray:
    """Every ``patchsize x patchsize`` neighbourhood, zero padding ``(patchsize-1)//2``,
    stride 1: ``(B, C, h, w) -> (B, C, ps, ps, h, w)``, element ``[.., i, j, r, c]`` =
    ``fmap[.., r + i - pad, c + j - pad]``."""
    pad = (patchsize - 1) // 2
    b, c, h, w = fmap.shape
    padded = np.pad(fmap, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out = np.empty((b, c, patchsize, patchsize, h, w))
    for i in range(patchsize):
        for j in range(patchsize):
            out[:, :, i, j] = padded[:, :, i : i + h, j : j + w]
    return out


def patch_features(layer_maps: Sequence[np.ndarray], patchsize: int, pretrain_dim: int, target_dim: int) -> np.ndarray:
    """METHOD 2, in the method's order: per layer, each position's neighbourhood as a
    ``C * patchsize^2`` vector (channel-major), every neighbourhood element of a coarser layer
    brought to the first layer's grid by bilinear interpolation, each vector average-pooled to
    ``pretrain_dim``; the layers' vectors concatenated and pooled to ``target_dim``.
    ``(B, C_l, h_l, w_l)`` per layer -> ``(B, R, C, target_dim)``."""
    rows, cols = layer_maps[0].shape[-2:]
    pooled = []
    for fmap in layer_maps:
        nb = neighbourhoods(fmap, patchsize)
        if nb.shape[-2:] != (rows, cols):
            nb = bilinear_resize(nb, (rows, cols))
        vec = nb.reshape(nb.shape[0], -1, rows, cols).transpose(0, 2, 3, 1)  # (B, R, C, C_l*ps*ps)
        pooled.append(vec @ adaptive_pool_weights(vec.shape[-1], pretrain_dim).T)
    stacked = np.concatenate(pooled, axis=-1)
    return stacked @ adaptive_pool_weights(stacked.shape[-1], target_dim).T


# ---------------------------------------------------------------------------------------------
# METHOD 3: greedy coreset


def jl_min_dim(n_samples: int, eps: float) -> float:
    """The Johnson-Lindenstrauss bound ``4 ln(n) / (eps^2/2 - eps^3/3)``."""
    return 4.0 * math.log(n_samples) / (eps**2 / 2.0 - eps**3 / 3.0)


def brute_force_farthest_point(points: np.ndarray, n_select: int, start: int) -> list[int]:
    """Full distance matrix; repeatedly the point farthest from the start and the points
    chosen so far. The start itself is not selected (METHOD 3)."""
    d = np.sqrt(((points[:, None, :] - points[None, :, :]) ** 2).sum(-1))
    centres, chosen = [start], []
    while len(chosen) < n_select:
        nearest_centre = d[:, centres].min(axis=1)
        nearest_centre[centres] = -1
        pick = int(np.argmax(nearest_centre))
        chosen.append(pick)
        centres.append(pick)
    return chosen


def greedy_start(points: np.ndarray, selection: Sequence[int]) -> int | None:
    """A start point from which :func:`brute_force_farthest_point` gives ``selection``
    (``None`` if there is none): the selection is a greedy order whatever the start rule."""
    d = np.sqrt(((points[:, None, :] - points[None, :, :]) ** 2).sum(-1))
    selection = [int(i) for i in selection]
    for start in np.flatnonzero(d.argmax(axis=1) == selection[0]):
        if start in selection:
            continue
        nearest_centre = np.minimum(d[start], d[selection[0]])
        ok = True
        for step in range(1, len(selection)):
            candidates = nearest_centre.copy()
            candidates[[start] + selection[:step]] = -1
            if int(np.argmax(candidates)) != selection[step]:
                ok = False
                break
            nearest_centre = np.minimum(nearest_centre, d[selection[step]])
        if ok:
            return int(start)
    return None


# ---------------------------------------------------------------------------------------------
# METHOD 4: neighbourhood windows and the MLP


def sliced_window(grid: np.ndarray, r: int, c: int, dp: int, variant: str) -> np.ndarray:
    """Slice the ``(2dp+1)^2`` window around ``(r, c)`` out of the grid ``(R, C, E)`` padded
    with ``dp`` zeros, flatten it row-major and drop one slot: the centre
    ``((2dp+1)^2 - 1) / 2`` (paper) or ``((2dp+1)^2 + 1) // 2`` (original)."""
    padded = np.pad(grid, ((dp, dp), (dp, dp), (0, 0)))
    window = padded[r : r + 2 * dp + 1, c : c + 2 * dp + 1].reshape((2 * dp + 1) ** 2, -1)
    n = (2 * dp + 1) ** 2
    drop = (n - 1) // 2 if variant == "paper" else (n + 1) // 2
    return np.delete(window, drop, axis=0).reshape(-1)


def neighbourhood_samples(
    bank: np.ndarray, distribution: np.ndarray, pad: int, dp: int, variant: str
) -> tuple[np.ndarray, np.ndarray]:
    """The MLP's training samples (METHOD 4) of every image's interior positions, image by image,
    row-major: windows ``(N_img * P_int, ((2dp+1)^2 - 1) * E)`` (:func:`sliced_window`) and
    labels ``(N_img * P_int,)``, the nearest distribution entry to the centre feature."""
    n_img, rows, cols, _ = bank.shape
    x, y = [], []
    for i in range(n_img):
        for r in range(pad, rows - pad):
            for c in range(pad, cols - pad):
                x.append(sliced_window(bank[i], r, c, dp, variant))
                y.append(int(np.argmin(((distribution - bank[i, r, c]) ** 2).sum(axis=1))))
    return np.stack(x), np.array(y)


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean of ``logsumexp(logits) - logits[label]`` over the rows."""
    top = logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
    return float(np.mean(lse - logits[np.arange(len(labels)), labels]))


def position_counts(labels: np.ndarray, positions: Sequence[int], rows: int, cols: int, k: int, dp: int) -> np.ndarray:
    """METHOD 4's position histogram: for every image and every flat position ``positions[q]``
    labelled ``labels[img, q]``, add one at that label to every grid position within ``dp``
    (clipped to the grid). ``(R*C, k)``."""
    counts = np.zeros((rows * cols, k))
    for img in range(labels.shape[0]):
        for q, pos in enumerate(positions):
            r, c = divmod(pos, cols)
            for rr in range(max(0, r - dp), min(rows, r + dp + 1)):
                for cc in range(max(0, c - dp), min(cols, c + dp + 1)):
                    counts[rr * cols + cc, labels[img, q]] += 1
    return counts


def mlp_parameter_shapes(
    in_features: int, num_classes: int, num_layers: int, hidden: int = HIDDEN_WIDTH
) -> dict[str, tuple[int, ...]]:
    """State-dict entries of the method's MLP with the original's names: ``num_layers`` linear
    layers, the ``num_layers - 1`` hidden ones each Linear -> BatchNorm1d (-> ReLU -> Dropout,
    no parameters), the last a Linear to ``num_classes``."""
    shapes: dict[str, tuple[int, ...]] = {}
    blocks = ["first_layer"] + [f"hidden_layers.{i}" for i in range(num_layers - 2)]
    for k, block in enumerate(blocks):
        n_in = in_features if k == 0 else hidden
        shapes[f"{block}.0.weight"] = (hidden, n_in)
        shapes[f"{block}.0.bias"] = (hidden,)
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{block}.1.{name}"] = (hidden,)
        shapes[f"{block}.1.num_batches_tracked"] = ()
    shapes["last_layer.0.weight"] = (num_classes, hidden)
    shapes["last_layer.0.bias"] = (num_classes,)
    return shapes


def mlp_logits(state: dict, x: np.ndarray) -> np.ndarray:
    """The MLP in evaluation mode, from its state dict (arrays): per hidden block
    ``relu(batchnorm(x W^T + b))`` with the running statistics (dropout is the identity),
    then the last linear layer. ``(B, in) -> (B, classes)``."""
    p = {k: np.asarray(v, dtype=np.float64) for k, v in state.items()}

    def block(prefix: str, h: np.ndarray) -> np.ndarray:
        h = h @ p[f"{prefix}.0.weight"].T + p[f"{prefix}.0.bias"]
        h = (h - p[f"{prefix}.1.running_mean"]) / np.sqrt(p[f"{prefix}.1.running_var"] + BATCHNORM_EPS)
        return np.maximum(h * p[f"{prefix}.1.weight"] + p[f"{prefix}.1.bias"], 0.0)

    h = block("first_layer", np.asarray(x, dtype=np.float64))
    i = 0
    while f"hidden_layers.{i}.0.weight" in p:
        h = block(f"hidden_layers.{i}", h)
        i += 1
    return h @ p["last_layer.0.weight"].T + p["last_layer.0.bias"]


# ---------------------------------------------------------------------------------------------
# METHOD 5: scoring, with the original's loop structure


def _dist(a: np.ndarray, b: np.ndarray) -> float:
    return math.sqrt(sum((float(x) - float(y)) ** 2 for x, y in zip(a, b)))


def _neg_log_max(probs: list[float], mask: list[bool]) -> float:
    return -math.log(max(p * (1.0 if a else 0.0) for p, a in zip(probs, mask)))


def naive_m(emb: np.ndarray, dcs: np.ndarray) -> np.ndarray:
    """``m(k)``: the nearest distribution entry of each embedding entry."""
    return np.array([int(np.argmin([_dist(e, c) for c in dcs])) for e in emb])


def pymp_split(n: int, workers: int) -> list[range]:
    """How pymp's ``p.range(n)`` shares a loop among ``workers`` processes: contiguous chunks,
    the first ``n % workers`` of them one iteration longer; worker 0 is the parent."""
    base, extra = divmod(n, workers)
    chunks, start = [], 0
    for w in range(workers):
        size = base + (1 if w < extra else 0)
        chunks.append(range(start, start + size))
        start += size
    return chunks


def parallel_fill(n: int, workers: int, write: Callable[[int], None]) -> None:
    """Run ``write(it)`` for every iteration of an ``n``-iteration pymp loop, keeping only the
    writes that survive in the original: those of the parent process (worker 0). The forked
    workers' writes into a plain numpy array are lost."""
    for worker, chunk in enumerate(pymp_split(n, workers)):
        for it in chunk:
            if worker == 0:
                write(it)


def naive_scores(feat, logits, emb1, emb2, dcs, m, prior1, prior2, cfg):
    """Coarse ``(R, C)`` maps and image scores the way the original computes them: per
    position, every coreset entry sorted by distance (the original's faiss search with k = all),
    masks filled in loops (``parallel_fill`` under ``variant='original'``), scores from the
    sorted probabilities. ``cfg``: anything with the scoring flags' attributes
    (``pni.scoring.ScoringConfig``)."""
    g = cfg.prob_gamma
    rows, cols, _ = feat.shape
    pp = (cfg.patchsize - 1) // 2
    k1, k2 = len(emb1), len(emb2)
    workers = cfg.mask_workers if cfg.variant == "original" else 1

    def position_score(d: list[float], prior_row, k: int) -> float:
        order = sorted(range(k), key=lambda q: d[q])  # ids by rank
        mask = [False] * k

        def write(rank):  # the original's loop over ranks
            mask[rank] = prior_row[order[rank]] > cfg.softmax_coor_gamma / k

        parallel_fill(k, workers, write)
        mask[-1] = True  # the farthest entry
        return _neg_log_max([g * math.exp(-g * d[q]) for q in order], mask)

    # With edge, all positions.
    pc_pixel, knn_rows, coor = [], [], []
    for r in range(rows):
        for c in range(cols):
            i = r * cols + c
            d = [_dist(feat[r, c], e) for e in emb2]
            knn = sorted(d)[: cfg.anomaly_nn]
            pc_pixel.append(knn[0])
            knn_rows.append(knn)
            coor.append(position_score(d, prior2[i], k2))
    best = int(np.argmax(pc_pixel))
    s_star = pc_pixel[best]
    if cfg.anomaly_nn == 1:
        w = 1.0
    else:
        w = 1.0 - math.exp(s_star) / sum(math.exp(x) for x in knn_rows[best])
    image_pc = w * s_star

    # Without edge, interior positions.
    nb, pos = [], []
    j = 0
    for r in range(pp, rows - pp):
        for c in range(pp, cols - pp):
            i = r * cols + c
            d = [_dist(feat[r, c], e) for e in emb1]
            z = [float(v) / cfg.softmax_temperature_alpha for v in logits[j]]
            ex = [math.exp(v - max(z)) for v in z]
            soft = [v / sum(ex) for v in ex]
            allowed_dist = [s > cfg.softmax_nb_gamma / k1 for s in soft]
            if cfg.variant == "paper":
                mask = [allowed_dist[m[k]] for k in range(k1)]
                mask[int(np.argmax(d))] = True
                nb.append(_neg_log_max([g * math.exp(-g * x) for x in d], mask))
            else:
                dd = [_dist(feat[r, c], x) for x in dcs]
                order = sorted(range(len(dcs)), key=lambda q: dd[q])
                by_rank = [allowed_dist[order[q]] for q in range(len(dcs))]
                mask = [False] * k1

                def write(jd):  # the original's loop over distribution ids
                    for k in range(k1):
                        if m[k] == jd:
                            mask[k] = by_rank[jd]  # noqa: B023 - called at once below; column k: the k-th nearest entry

                parallel_fill(len(dcs), workers, write)
                mask[-1] = True
                probs_sorted = [g * math.exp(-g * x) for x in sorted(d)]
                nb.append(_neg_log_max(probs_sorted, mask))
            pos.append(position_score(d, prior1[i], k1))
            j += 1

    ri, ci = rows - 2 * pp, cols - 2 * pp
    nb_int = np.array(nb).reshape(ri, ci)
    nbc_int = ((np.array(nb) + np.array(pos)) / 2).reshape(ri, ci)
    coarse = {
        "nb": np.pad(nb_int, pp, mode="edge"),
        "coor": np.array(coor).reshape(rows, cols),
        "patchcore": np.array(pc_pixel).reshape(rows, cols),
        "nb_coor": np.pad(nbc_int, pp, mode="edge"),
    }
    image = {"nb": nb_int.max(), "coor": max(coor), "patchcore": image_pc, "nb_coor": nbc_int.max()}
    return coarse, image


def full_size_maps(coarse: dict[str, np.ndarray], imagesize: int, sigma: float) -> dict[str, np.ndarray]:
    """Each coarse map resized to ``imagesize`` (:func:`bilinear_resize`) and blurred with
    scipy's ``gaussian_filter`` (the original's call: mode 'reflect', truncate 4)."""
    return {
        name: gaussian_filter(bilinear_resize(c, (imagesize, imagesize)), sigma=sigma, mode="reflect", truncate=4.0)
        for name, c in coarse.items()
    }
