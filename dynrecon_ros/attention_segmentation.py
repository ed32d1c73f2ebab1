"""Easi3R motion segmentation from the network's own cross-attention (training-free), stage by stage
as the published code computes it (shared ALGORITHMS.md "Easi3R"; parity files in
shared/parity/easi3r/).

Inputs come from ``net.predict_pairs(..., return_attention=True)`` and ``net.encoder_features``:
    cross_attn_1 (P, L, heads, h, w): decoder 1 logits averaged over view-1 queries, per view-2 key.
    cross_attn_2 (P, L, heads, h, w): decoder 2 logits averaged over view-2 queries, per view-1 key.
    enc_tokens (N, h, w, C): each frame's encoder output after the encoder's final norm.

Stages (each a public function; :func:`attention_masks` chains them):
  1. :func:`fix_attention_sink`: token (0, 0) := mean of (0, 1) and (1, 0), every map;
  2.-4. :func:`aggregate_attention`: per frame t, over the pairs where t is view 2 the mean and
     sample std (ddof 1) of decoder 1's maps, over the pairs where t is view 1 those of decoder 2
     (mean1, std1, mean2, std2: (N, h, w, L*heads)); each min-max normalised over the whole tensor,
     averaged over the channels, min-max normalised over all frames and tokens; raw score
     (1 - mean1) * std1 * mean2 * (1 - std2); plain score = raw min-max normalised per frame.
     Every min-max is (x - min) / (max - min + 1e-6);
  5. :func:`kmeans_labels` (scikit-learn ``KMeans(64, random_state=42)`` on the raw tokens of all
     frames) and :func:`cluster_refine` (each token takes its cluster's mean plain score, then
     per-frame min-max);
  6. :func:`upsample_scores`: bilinear with half-pixel centres (``cv2.INTER_LINEAR``) to (H, W);
  7. :func:`multiotsu_level`: scikit-image ``threshold_multiotsu`` (256 bins) on all frames' pixels
     for 2, 3 and 4 classes; the class count with the largest population variance of its class
     means / sqrt(k) wins (smallest k on a tie); the level is its highest threshold;
  8. masks: pixel score strictly greater than the level;
  9. second pass (the network's, :meth:`Dust3rPredictor.reweighted`): :func:`token_mask` max-pools
     the masks to tokens, :func:`token_mask_for_reweighting` gives the decoder-1 selections; the
     masks are recomputed from the second pass's maps (stages 1-8, same encoder tokens).

A frame in fewer than two pairs in a role (view 1 or view 2) has no sample std there (ddof 1 is
undefined for one value; Easi3R needs two pairs per role). Such a frame is left out of the
aggregation (its statistics would otherwise move the global min-max of every other frame; with
them left out the other frames' scores are exactly what the reference computes without it) and
its plain score is NaN. With encoder tokens its tokens then take the mean plain score of their
k-means cluster over the frames that have one (appearance carries the evidence, as the cluster
step does for every token); tokens of a cluster without any scored token get the frame's minimum.
Without tokens, or when no frame is scored (a window of two frames), the frame's mask is empty.

Two optional guards (off by default: they are not Easi3R's and removed every mask on the reference's
inputs) keep motion-free windows mask-free, since the per-frame min-max stretches noise to [0, 1]:
``min_separation`` (the Otsu split must separate the pixels above from those below by this many
standard deviations of the lower part, else no mask at all) and ``min_raw_contrast`` (per frame,
the tokens it flags must stand out from the window's other tokens in the raw score, before the
per-frame min-max, by this robust z-score (:func:`raw_contrast`), else its mask is empty).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from dynrecon_ros.errors import InputError

SegmentationMode = Literal['flow', 'attention', 'both']

NORM_EPS = 1e-6  # added to every min-max denominator (Easi3R's)
N_CLUSTERS, KMEANS_SEED = 64, 42
KMEANS_THREADS = 1  # threads of the k-means (see kmeans_labels)
OTSU_CLASSES = (2, 3, 4)


def _np(x) -> np.ndarray:
    if hasattr(x, 'detach'):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _minmax(x: np.ndarray, axis=None, eps: float = NORM_EPS) -> np.ndarray:
    """(x - min) / (max - min + eps) over ``axis`` (NaN entries ignored)."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', RuntimeWarning)  # all-NaN slices stay NaN
        lo = np.nanmin(x, axis=axis, keepdims=True)
        hi = np.nanmax(x, axis=axis, keepdims=True)
    return (x - lo) / (hi - lo + eps)


def fix_attention_sink(maps) -> np.ndarray:
    """(..., h, w) -> float64 copy with the top-left token (the attention sink) replaced by the mean of
    its right and lower neighbours (only the one that exists on a 1-wide grid; a 1x1 grid is kept)."""
    a = _np(maps).copy()
    nb = [a[..., 0, 1]] if a.shape[-1] > 1 else []
    nb += [a[..., 1, 0]] if a.shape[-2] > 1 else []
    if nb:
        a[..., 0, 0] = sum(nb) / len(nb)
    return a


@dataclass
class AttentionScores:
    """Stages 2-4 of one pass. All (N, h, w) float64 except agg_minmax (4, 2) and defined (N,).

    agg_minmax: [min, max] of mean1, std1, mean2, std2 over the frames that are defined.
    fused_*: the four fused maps; raw_score: their product; plain_score: raw min-max per frame.
    defined: frames in at least two pairs per role; the others are NaN in every map.
    """

    agg_minmax: np.ndarray
    fused_mean1: np.ndarray
    fused_std1: np.ndarray
    fused_mean2: np.ndarray
    fused_std2: np.ndarray
    raw_score: np.ndarray
    plain_score: np.ndarray
    defined: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))


def aggregate_attention(n_frames: int, pairs, cross_attn_1, cross_attn_2, ddof: int = 1,
                        eps: float = NORM_EPS) -> AttentionScores:
    """Stages 1-4 (module docstring): sink fix, temporal and spatial aggregation, dynamic score.

    pairs: [(i, j)] of length P (view 1 = i, view 2 = j). cross_attn_*: (P, L, heads, h, w) (or
    (P, L*heads, h, w)). ddof: 1 = the sample std as Easi3R (0 = population std).
    Frames with fewer than ``ddof + 1`` pairs (and at least one) in a role are not defined (module
    docstring). The statistics are float64 (Easi3R's are float32: about 1e-6 apart).
    """
    a1, a2 = _np(cross_attn_1), _np(cross_attn_2)
    pairs = [tuple(int(v) for v in p) for p in pairs]
    if a1.ndim not in (4, 5) or a1.shape != a2.shape or len(pairs) != a1.shape[0]:
        raise InputError(f'cross attention must be two (P, L, heads, h, w) arrays for {len(pairs)} pairs, '
                         f'got {a1.shape} and {a2.shape}')
    if any(not (0 <= v < n_frames) for p in pairs for v in p):
        raise InputError(f'pairs {pairs} refer to frames outside 0..{n_frames - 1}')
    P, h, w = a1.shape[0], a1.shape[-2], a1.shape[-1]
    a1 = fix_attention_sink(a1.reshape(P, -1, h, w))
    a2 = fix_attention_sink(a2.reshape(P, -1, h, w))
    C = a1.shape[1]
    stats = np.full((4, n_frames, C, h, w), np.nan)
    defined = np.zeros(n_frames, bool)
    need = max(ddof + 1, 1)
    for t in range(n_frames):
        as_v2 = [e for e, (_, j) in enumerate(pairs) if j == t]
        as_v1 = [e for e, (i, _) in enumerate(pairs) if i == t]
        if len(as_v2) < need or len(as_v1) < need:
            continue  # the std over one pair is undefined: frame left out (module docstring)
        defined[t] = True
        stats[0, t], stats[1, t] = a1[as_v2].mean(0), a1[as_v2].std(0, ddof=ddof)
        stats[2, t], stats[3, t] = a2[as_v1].mean(0), a2[as_v1].std(0, ddof=ddof)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', RuntimeWarning)  # no defined frame: everything NaN
        agg = np.array([[np.nanmin(s), np.nanmax(s)] for s in stats])
        fused = [_minmax(np.nanmean(_minmax(s, eps=eps), axis=1), eps=eps) for s in stats]
    mean1, std1, mean2, std2 = fused
    raw = (1 - mean1) * std1 * mean2 * (1 - std2)
    return AttentionScores(agg, mean1, std1, mean2, std2, raw, _minmax(raw, axis=(1, 2), eps=eps), defined)


def kmeans_labels(enc_tokens, n_clusters: int = N_CLUSTERS, random_state: int = KMEANS_SEED) -> np.ndarray:
    """Stage 5a: (N, h, w, C) encoder tokens -> (N, h, w) int32 cluster labels.

    scikit-learn ``KMeans(n_clusters, random_state=random_state)`` (every other argument at its
    default, as Easi3R) on the raw float32 tokens of all frames pooled in (frame, row, col) order;
    fewer tokens than clusters: one cluster per token count (KMeans refuses more clusters than rows).
    Runs on ``KMEANS_THREADS`` OpenMP/BLAS threads (threadpoolctl): scikit-learn's default, one per
    core, spins against the pipeline's own threads on a busy small CPU (45 s instead of 5 s on 2 cores).
    """
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits
    tok = np.asarray(enc_tokens.detach().float().cpu().numpy() if hasattr(enc_tokens, 'detach') else enc_tokens,
                     dtype=np.float32)
    if tok.ndim != 4:
        raise InputError(f'enc_tokens must be (N, h, w, C), got shape {tok.shape}')
    feats = tok.reshape(-1, tok.shape[-1])
    if not np.isfinite(feats).all():
        raise InputError('enc_tokens has non-finite values')
    with warnings.catch_warnings(), threadpool_limits(limits=KMEANS_THREADS):
        warnings.simplefilter('ignore', ConvergenceWarning)  # fewer distinct tokens than clusters
        labels = KMeans(n_clusters=min(int(n_clusters), len(feats)), random_state=random_state).fit_predict(feats)
    return labels.reshape(tok.shape[:3]).astype(np.int32)


def cluster_refine(plain_score, labels, eps: float = NORM_EPS) -> np.ndarray:
    """Stage 5b: (N, h, w) plain score, (N, h, w) labels -> (N, h, w) float32 clustered score: each
    token takes the mean plain score of its cluster (NaN tokens, of undefined frames, take part only
    as members), then min-max per frame; a token whose cluster has no scored token gets its frame's
    minimum; a frame with no scored token stays NaN."""
    s = _np(plain_score)
    lab = np.asarray(labels)
    if lab.shape != s.shape:
        raise InputError(f'cluster labels {lab.shape} and scores {s.shape} differ in shape')
    lab = lab.reshape(-1).astype(np.int64)
    flat = s.reshape(-1)
    ok = np.isfinite(flat)
    k = int(lab.max()) + 1 if lab.size else 0
    sums = np.bincount(lab[ok], flat[ok], minlength=k)
    counts = np.bincount(lab[ok], minlength=k)
    with np.errstate(invalid='ignore', divide='ignore'):
        means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    out = _minmax(means[lab].reshape(s.shape), axis=(1, 2), eps=eps)
    lo = np.where(np.isfinite(out).any(axis=(1, 2), keepdims=True), 0.0, np.nan)
    return np.where(np.isfinite(out), out, lo).astype(np.float32)


def upsample_scores(score, image_size) -> np.ndarray:
    """Stage 6: (N, h, w) -> (N, H, W) float32, bilinear with half-pixel centres (PyTorch's
    ``interpolate(bilinear, align_corners=False)``; at an integer scale OpenCV's INTER_LINEAR gives
    the same within 1.2e-7)."""
    import cv2
    H, W = int(image_size[0]), int(image_size[1])
    s = np.asarray(score, dtype=np.float32)
    return np.stack([cv2.resize(f, (W, H), interpolation=cv2.INTER_LINEAR) for f in s])


@dataclass
class OtsuLevel:
    """Stage 7's result. threshold: the level (+inf = nothing is dynamic); classes: the chosen class
    count (0 when none could be computed); criterion: (len(class_counts),) score per class count
    (NaN where that count could not be computed); thresholds: {k: (k-1,) thresholds}."""

    threshold: float
    classes: int
    criterion: np.ndarray
    thresholds: dict


def multiotsu_level(pixels, class_counts=OTSU_CLASSES, nbins: int = 256) -> OtsuLevel:
    """Stage 7: one level for the pixels (any shape, pooled; NaN ignored).

    For each k in ``class_counts`` scikit-image's ``threshold_multiotsu(pixels, classes=k,
    nbins=nbins)``; the pixels are split by ``numpy.digitize`` at the thresholds (a value equal to a
    threshold goes to the upper class); criterion = population variance of the k class means (each
    class counts once, empty classes left out) / sqrt(k). Not Otsu's size-weighted between-class
    variance: Easi3R's. The largest criterion wins, the smallest k on a tie; the level is its
    highest threshold. A class count the histogram cannot hold (fewer occupied bins than classes)
    is skipped; none left: level +inf.
    """
    from skimage.filters import threshold_multiotsu
    x = np.asarray(pixels, dtype=np.float32).reshape(-1)
    x = x[np.isfinite(x)]
    crit = np.full(len(class_counts), np.nan)
    ths: dict = {}
    best, best_k = -np.inf, 0
    for n, k in enumerate(class_counts):
        if x.size == 0:
            break
        try:
            th = threshold_multiotsu(x, classes=int(k), nbins=nbins)
        except ValueError:  # too few distinct values for k classes
            continue
        cls = np.digitize(x, bins=th)
        cnt = np.bincount(cls, minlength=k)
        means = np.bincount(cls, x.astype(np.float64), minlength=k)[cnt > 0] / cnt[cnt > 0]
        crit[n] = np.var(means) / np.sqrt(k)
        ths[int(k)] = np.asarray(th, dtype=np.float64)
        if crit[n] > best:  # strict: the smaller k keeps a tie
            best, best_k = crit[n], int(k)
    thr = float(ths[best_k][-1]) if best_k else float('inf')
    return OtsuLevel(thr, best_k, crit, ths)


def separation(pixels, threshold: float) -> float:
    """(mean above - mean at or below) / std at or below the level (the ``min_separation`` guard);
    0 when either side is empty or the lower side has one value."""
    x = np.asarray(pixels, dtype=np.float64).reshape(-1)
    x = x[np.isfinite(x)]
    above, below = x[x > threshold], x[x <= threshold]
    if above.size == 0 or below.size < 2:
        return 0.0
    return float((above.mean() - below.mean()) / max(below.std(), 1e-12))


def raw_contrast(raw, flagged) -> np.ndarray:
    """Per-frame contrast of the flagged tokens in the raw (un-normalised) score.

    raw: (N, h, w) score before the per-frame min-max. flagged: (N, h, w) bool, tokens flagged
    dynamic. Returns (N,) robust z-scores: (mean raw of the frame's flagged tokens - median raw of
    the window's unflagged tokens) / (1.4826 * MAD of the window's unflagged tokens); +inf for a
    frame with nothing flagged or when no token is unflagged (NaN tokens are ignored).
    """
    raw = _np(raw)
    flagged = np.asarray(flagged, bool)
    z = np.full(raw.shape[0], np.inf)
    bulk = raw[~flagged & np.isfinite(raw)]
    if bulk.size == 0:
        return z
    med = np.median(bulk)
    mad = max(1.4826 * np.median(np.abs(bulk - med)), 1e-12)
    for t in range(raw.shape[0]):
        v = raw[t][flagged[t] & np.isfinite(raw[t])]
        if v.size:
            z[t] = (v.mean() - med) / mad
    return z


def token_mask(masks, patch: int = 16) -> np.ndarray:
    """(N, H, W) pixel masks (bool or uint8 > 0), H and W multiples of ``patch`` -> (N, H/patch,
    W/patch) bool: a token is dynamic when any pixel of its patch is (max-pool)."""
    m = np.asarray(masks) > 0
    n, H, W = m.shape
    if H % patch or W % patch:
        raise InputError(f'mask size {H}x{W} is not a multiple of the patch size {patch}')
    return m.reshape(n, H // patch, patch, W // patch, patch).any(axis=(2, 4))


@dataclass
class AttentionResult:
    """One pass of :func:`attention_masks` with every stage's output (see the stage functions).
    masks: (N, H, W) bool; clustered_score: (N, h, w) float32 (the plain score when no tokens were
    given); labels: (N, h, w) int32 or None; level: stage 7."""

    scores: AttentionScores
    labels: np.ndarray | None
    clustered_score: np.ndarray
    level: OtsuLevel
    masks: np.ndarray


def masks_from_scores(clustered_score, image_size, threshold: float | None = None,
                      min_separation: float = 0.0) -> tuple[np.ndarray, OtsuLevel]:
    """Stages 6-8: (N, h, w) clustered score -> ((N, H, W) bool masks, :class:`OtsuLevel`).
    Frames whose score is NaN (undefined) are left out of the level and get empty masks.
    threshold: a fixed level instead of the Otsu one. min_separation: guard (module docstring)."""
    s = np.asarray(clustered_score, dtype=np.float32)
    ok = np.isfinite(s).all(axis=(1, 2))
    px = upsample_scores(np.where(ok[:, None, None], s, 0), image_size)
    level = multiotsu_level(px[ok]) if threshold is None else OtsuLevel(float(threshold), 0, np.full(3, np.nan), {})
    masks = (px > level.threshold) & ok[:, None, None]
    if min_separation > 0 and masks.any() and separation(px[ok], level.threshold) < min_separation:
        masks[:] = False
    return masks, level


def attention_masks(n_frames: int, pairs, cross_attn_1, cross_attn_2, image_size, enc_tokens=None,
                    threshold: float | None = None, min_separation: float = 0.0, min_raw_contrast: float = 0.0,
                    labels=None, patch: int = 16, return_details: bool = False):
    """Easi3R's dynamic masks of one pass: (N, H, W) uint8 (255 = dynamic), stages 1-8.

    image_size: (H, W), the token grid times ``patch``. enc_tokens: (N, h, w, C) encoder tokens for
    the cluster step (Easi3R always clusters; None skips it). labels: (N, h, w) cluster labels to
    use instead of k-means on enc_tokens. threshold: a fixed level instead of the multi-level Otsu.
    min_separation, min_raw_contrast: the optional guards (module docstring; 0 = off, the default).
    With return_details an :class:`AttentionResult` instead.
    """
    sc = aggregate_attention(n_frames, pairs, cross_attn_1, cross_attn_2)
    n, h, w = sc.plain_score.shape
    H, W = int(image_size[0]), int(image_size[1])
    if (H, W) != (h * patch, w * patch):
        raise InputError(f'image size {H}x{W} is not the token grid {h}x{w} times the patch {patch}')
    if labels is None and enc_tokens is not None:
        tok_shape = tuple(np.shape(enc_tokens)[:3])
        if tok_shape != (n, h, w):
            raise InputError(f'enc_tokens must be (N, h, w, C) = ({n}, {h}, {w}, C), got {np.shape(enc_tokens)}')
        labels = kmeans_labels(enc_tokens)
    score = cluster_refine(sc.plain_score, labels) if labels is not None else sc.plain_score.astype(np.float32)
    masks, level = masks_from_scores(score, (H, W), threshold, min_separation)
    if min_raw_contrast > 0:
        masks[raw_contrast(sc.raw_score, token_mask(masks, patch)) < min_raw_contrast] = False
    if return_details:
        return AttentionResult(sc, None if labels is None else np.asarray(labels), score, level, masks)
    return masks.astype(np.uint8) * np.uint8(255)


def dynamic_attention_scores(n_frames: int, pairs, cross_attn_1, cross_attn_2, enc_tokens=None) -> np.ndarray:
    """(N, h, w) float32 score in [0, 1] on the token grid: the clustered score with enc_tokens,
    else the plain score (NaN for undefined frames, module docstring)."""
    sc = aggregate_attention(n_frames, pairs, cross_attn_1, cross_attn_2)
    if enc_tokens is None:
        return sc.plain_score.astype(np.float32)
    return cluster_refine(sc.plain_score, kmeans_labels(enc_tokens))


def token_mask_for_reweighting(masks, pairs, patch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Token selections for the second pass (decoder 1 cross-attention zeroing).

    masks: (N, H, W) dynamic masks (bool or uint8 >0), H and W multiples of ``patch``.
    Returns (query_sel, key_sel), each (P, h, w) bool: query = static tokens of view 1 (token is
    static when no pixel of its patch is dynamic: max-pool), key = dynamic tokens of view 2.
    """
    tok = token_mask(masks, patch)
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
