"""Easi3R motion segmentation from the network's own cross-attention (training-free).

Inputs come from ``net.predict_pairs(..., return_attention=True)``:
    cross_attn_1 (P, L, heads, h, w): decoder 1 logits averaged over view-1 queries, per view-2 key.
    cross_attn_2 (P, L, heads, h, w): decoder 2 logits averaged over view-2 queries, per view-1 key.
Static tokens are attended consistently by the other view; dynamic ones little and inconsistently.

Steps (see shared ALGORITHMS.md, "Easi3R"): attention-sink fix on the top-left token; per frame the
mean and std over pairs of decoder-1 maps (frame is view 2) and decoder-2 maps (frame is view 1);
fuse each (min-max over the tensor, mean over layers*heads, min-max); score =
(1 - mean1) * std1 * mean2 * (1 - std2); per-frame min-max; optional k-means refinement on encoder
tokens; multi-level Otsu threshold.

When nothing moves the per-frame min-max still stretches noise to [0, 1] and Otsu splits it. Two
guards keep such frames mask-free: the minimum-separation test of the Otsu split
(:func:`otsu_multilevel_threshold`, ``min_separation``, on the normalised scores) and the raw-contrast
test (:func:`raw_contrast`, ``min_raw_contrast``): per frame, the tokens above the threshold must stand
out from the window's other tokens in the raw score (before the per-frame normalisation) by a robust
z-score (median / MAD). Stretched noise reaches z ~ 2..13; a dynamic region, whose static background
collapses the product of the four factors, reaches z >> 100.
"""
from __future__ import annotations

from itertools import combinations
from typing import Literal

import numpy as np

from dynrecon_ros.errors import InputError

SegmentationMode = Literal['flow', 'attention', 'both']


def _np(x) -> np.ndarray:
    if hasattr(x, 'detach'):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _minmax(x: np.ndarray, axis=None) -> np.ndarray:
    lo = x.min(axis=axis, keepdims=True)
    hi = x.max(axis=axis, keepdims=True)
    return (x - lo) / np.maximum(hi - lo, 1e-12)


def _fix_sink(a: np.ndarray) -> np.ndarray:
    """(..., h, w): replace the top-left token (attention sink) by the mean of its right/lower neighbours."""
    a = a.copy()
    nb = [a[..., 0, 1]] if a.shape[-1] > 1 else []
    nb += [a[..., 1, 0]] if a.shape[-2] > 1 else []
    if nb:  # a 1x1 grid has no neighbour: left as is
        a[..., 0, 0] = sum(nb) / len(nb)
    return a


def _fuse(x: np.ndarray) -> np.ndarray:
    """(N, L*heads, h, w) -> (N, h, w): min-max over the tensor, mean over channels, min-max."""
    return _minmax(_minmax(x).mean(axis=1))


def dynamic_attention_scores(n_frames: int, pairs, cross_attn_1, cross_attn_2, enc_tokens=None,
                             n_clusters: int = 64, seed: int = 0, return_raw: bool = False):
    """Per-frame dynamic-attention score on the token grid.

    pairs: [(i, j)] of length P (view 1 = i, view 2 = j). cross_attn_*: (P, L, heads, h, w).
    enc_tokens: optional (N, h, w, C) encoder tokens for the k-means refinement (each token takes
    the mean score of its cluster; ``n_clusters`` clusters over all frames).
    Returns (N, h, w) float32 in [0, 1] (per-frame min-max); with return_raw also the (N, h, w)
    score before the per-frame normalisation (used by the no-motion guard).
    """
    a1, a2 = _fix_sink(_np(cross_attn_1)), _fix_sink(_np(cross_attn_2))
    pairs = [tuple(map(int, p)) for p in pairs]
    if a1.ndim != 5 or a1.shape != a2.shape or len(pairs) != a1.shape[0]:
        raise InputError(f'cross attention must be two (P, L, heads, h, w) arrays for {len(pairs)} pairs, '
                         f'got {a1.shape} and {a2.shape}')
    P, L, H, h, w = a1.shape
    a1 = a1.reshape(P, L * H, h, w)
    a2 = a2.reshape(P, L * H, h, w)
    stats = np.zeros((4, n_frames, L * H, h, w))
    for t in range(n_frames):
        as_v2 = [e for e, (_, j) in enumerate(pairs) if j == t]
        as_v1 = [e for e, (i, _) in enumerate(pairs) if i == t]
        if not as_v2 or not as_v1:
            raise InputError(f'frame {t} must appear as view 1 and as view 2 in some pair (use symmetric pairs)')
        stats[0, t], stats[1, t] = a1[as_v2].mean(0), a1[as_v2].std(0)
        stats[2, t], stats[3, t] = a2[as_v1].mean(0), a2[as_v1].std(0)
    mean1, std1, mean2, std2 = (_fuse(s) for s in stats)
    raw = (1 - mean1) * std1 * mean2 * (1 - std2)
    score = _minmax(raw, axis=(1, 2))
    if enc_tokens is not None:
        score = _kmeans_refine(score, _np(enc_tokens), n_clusters, seed)
        score = _minmax(score, axis=(1, 2))
    score = score.astype(np.float32)
    return (score, raw.astype(np.float32)) if return_raw else score


def _kmeans_refine(score: np.ndarray, tokens: np.ndarray, k: int, seed: int) -> np.ndarray:
    from scipy.cluster.vq import kmeans2
    n, h, w = score.shape
    feats = tokens.reshape(n * h * w, -1)
    if tokens.shape[:3] != (n, h, w):
        raise InputError(f'enc_tokens must be (N, h, w, C) = ({n}, {h}, {w}, C), got {tokens.shape}')
    feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    _, labels = kmeans2(feats, min(k, len(feats)), minit='++', seed=seed)
    flat = score.reshape(-1)
    sums = np.bincount(labels, flat, minlength=k)
    counts = np.maximum(np.bincount(labels, minlength=k), 1)
    return (sums / counts)[labels].reshape(n, h, w)


def otsu_multilevel_threshold(scores, classes=(2, 3, 4), nbins: int = 64,
                              min_separation: float = 0.0) -> float:
    """Multi-level Otsu: for each class count the thresholds maximising between-class variance;
    keep the count with the best between-class variance / sqrt(count); return its highest threshold.

    Exhaustive search over histogram bin edges (scikit-image is not a dependency; 64 bins keep the
    4-class search at ~40k candidate triples). ``min_separation`` guards against splitting noise:
    if (mean above - mean below) / std(below) < min_separation, returns +inf (nothing is above).
    """
    x = _np(scores).reshape(-1)
    x = x[np.isfinite(x)]
    if x.size == 0 or x.max() - x.min() < 1e-12:
        return float('inf')
    hist, edges = np.histogram(x, bins=nbins)
    centres = 0.5 * (edges[1:] + edges[:-1])
    cw = np.concatenate([[0], np.cumsum(hist)]).astype(np.float64)
    cs = np.concatenate([[0], np.cumsum(hist * centres)])
    mu = cs[-1] / cw[-1]
    best, best_thr = -np.inf, None
    for k in classes:
        cuts = np.array(list(combinations(range(1, nbins), k - 1)), dtype=np.int64)  # (M, k-1)
        b = np.concatenate([np.zeros((len(cuts), 1), np.int64), cuts,
                            np.full((len(cuts), 1), nbins, np.int64)], axis=1)
        W = cw[b[:, 1:]] - cw[b[:, :-1]]
        S = cs[b[:, 1:]] - cs[b[:, :-1]]
        with np.errstate(divide='ignore', invalid='ignore'):
            var = np.where(W > 0, S * S / np.maximum(W, 1e-12), 0).sum(1) / cw[-1] - mu * mu
        m = int(np.argmax(var))
        crit = var[m] / np.sqrt(k)
        if crit > best:
            best, best_thr = crit, edges[cuts[m, -1]]
    above, below = x[x >= best_thr], x[x < best_thr]
    if min_separation > 0:
        if above.size == 0 or below.size < 2:
            return float('inf')
        sep = (above.mean() - below.mean()) / max(below.std(), 1e-12)
        if sep < min_separation:
            return float('inf')
    return float(best_thr)


def raw_contrast(raw, flagged) -> np.ndarray:
    """Per-frame contrast of the flagged tokens in the raw (un-normalised) score.

    raw: (N, h, w) score before the per-frame min-max. flagged: (N, h, w) bool, tokens above the
    threshold. Returns (N,) robust z-scores: (mean raw of the frame's flagged tokens - median raw of
    the window's unflagged tokens) / (1.4826 * MAD of the window's unflagged tokens); +inf for a
    frame with nothing flagged or when no token is unflagged. The scale is the window's, so a frame
    whose noise was stretched by its own min-max stays within the static bulk.
    """
    raw = _np(raw)
    flagged = np.asarray(flagged, bool)
    z = np.full(raw.shape[0], np.inf)
    bulk = raw[~flagged]
    if bulk.size == 0:
        return z
    med = np.median(bulk)
    mad = max(1.4826 * np.median(np.abs(bulk - med)), 1e-12)
    for t in range(raw.shape[0]):
        if flagged[t].any():
            z[t] = (raw[t][flagged[t]].mean() - med) / mad
    return z


def attention_masks(n_frames: int, pairs, cross_attn_1, cross_attn_2, image_size, enc_tokens=None,
                    threshold: float | None = None, min_separation: float = 4.0,
                    min_raw_contrast: float = 30.0) -> np.ndarray:
    """Dynamic masks (N, H, W) uint8 (255 = dynamic) from Easi3R token scores, upsampled to pixels.

    image_size: (H, W). threshold: fixed score threshold in [0, 1], default multi-level Otsu over
    all frames' scores with the ``min_separation`` guard. min_raw_contrast: no-motion guard, a frame
    whose flagged tokens' :func:`raw_contrast` is below it gets an empty mask (0 disables).
    """
    import cv2
    score, raw = dynamic_attention_scores(n_frames, pairs, cross_attn_1, cross_attn_2, enc_tokens,
                                          return_raw=True)
    H, W = int(image_size[0]), int(image_size[1])
    thr = otsu_multilevel_threshold(score, min_separation=min_separation) if threshold is None else threshold
    flagged = score >= thr
    if min_raw_contrast > 0:
        flagged[raw_contrast(raw, flagged) < min_raw_contrast] = False
    # threshold on the token grid, then nearest upsampling: a token's patch is all in or all out
    # (bilinear score upsampling + a low Otsu level would grow the region by up to a patch)
    tok = flagged.astype(np.uint8) * 255
    return np.stack([cv2.resize(t, (W, H), interpolation=cv2.INTER_NEAREST) for t in tok])


def token_mask_for_reweighting(masks, pairs, patch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Token selections for the second pass (decoder 1 cross-attention zeroing).

    masks: (N, H, W) dynamic masks (bool or uint8 >0), H and W multiples of ``patch``.
    Returns (query_sel, key_sel), each (P, h, w) bool: query = static tokens of view 1 (token is
    static when no pixel of its patch is dynamic: max-pool), key = dynamic tokens of view 2.
    """
    m = np.asarray(masks) > 0
    n, H, W = m.shape
    if H % patch or W % patch:
        raise InputError(f'mask size {H}x{W} is not a multiple of the patch size {patch}')
    tok = m.reshape(n, H // patch, patch, W // patch, patch).any(axis=(2, 4))  # max-pool
    i = np.array([p[0] for p in pairs], dtype=np.int64)
    j = np.array([p[1] for p in pairs], dtype=np.int64)
    return ~tok[i], tok[j]


def combine_masks(flow_mask, attention_mask, mode: SegmentationMode = 'both', rule: str = 'union') -> np.ndarray:
    """Combine flow-based (MonST3R) and attention-based (Easi3R) masks, (N, H, W) -> bool.

    mode 'flow' or 'attention' picks one (the other may be None). 'both' combines with ``rule``:
    'union' (default: a pixel is dynamic if either says so; masking a few static pixels only loses
    constraints, missing a mover corrupts poses) or 'and' (both must agree: fewer false positives).
    """
    if mode == 'flow':
        if flow_mask is None:
            raise InputError("segmentation 'flow' needs a flow mask")
        return np.asarray(flow_mask) > 0
    if mode == 'attention':
        if attention_mask is None:
            raise InputError("segmentation 'attention' needs an attention mask")
        return np.asarray(attention_mask) > 0
    if mode != 'both':
        raise InputError(f"segmentation must be 'flow', 'attention' or 'both', got {mode!r}")
    if flow_mask is None or attention_mask is None:
        raise InputError("segmentation 'both' needs flow and attention masks")
    f, a = np.asarray(flow_mask) > 0, np.asarray(attention_mask) > 0
    if rule == 'union':
        return f | a
    if rule == 'and':
        return f & a
    raise InputError(f"combine rule must be 'union' or 'and', got {rule!r}")
