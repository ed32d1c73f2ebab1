"""Motion segmentation, the geometric cue: measured depth against the depth the camera motion predicts.

Frame i's point at pixel p (depth z_i) moved by the relative camera motion lands in frame j at pixel
q with depth z_pred. If the scene is static there, frame j measures about z_pred at q. If j
measures clearly *farther* there, the surface that i saw at p is gone: p shows something that moved
(a person who walked on, or who stepped toward or away from the camera: little optical flow, large
depth change). If j measures clearly *nearer*, something else stands in front in j (an occluder or
a mover arriving there): no evidence about p either way (NaN). The comparison uses j's nearest
reading within one pixel of q (the minimum over 3 x 3), so depth edges a pixel off never count as
"farther".

Noise model: a depth reading of z metres has the axial standard deviation of a structured-light
sensor (Kinect v1, Nguyen et al. 2012) ``sigma(z) = depth_sigma_a + depth_sigma_b * (z - 0.4)^2``;
the tolerance of the difference is ``depth_tol_sigmas * sqrt(sigma(z_pred)^2 + sigma(z_j)^2) +
depth_rel_tol * z_pred`` (the relative part covers pose error and depth taken a few ms off the
colour), and the per-pair probability is the same soft step as the flow cue's,
``r^s / (1 + r^s)``, r = (z_j - z_pred) / tolerance for r > 0, 0 for small |r|.

Pooled over a surface (:func:`receded_surfaces`): a mover walking slowly away steps back by less than the
tolerance at each pixel, but a whole depth-connected surface of the older frame that the newer one reads
farther by more than the spread of the pair's static surfaces is motion evidence all the same. And the other way
(:func:`seen_through_surfaces`): a surface of the newer frame whose compared points the older one mostly saw through
moved in as a whole, though the pair's other frames see nothing inside it (a face sliding along itself). The same
test against views seconds older than the window's (:func:`seen_empty_surfaces`, the far keyframes): what stands now
where such a view saw through arrived since (a person who stopped out of view and is found standing by the pan).

Also here: candidate depths for pixels without a reading (:func:`fill_candidates`), so the flow cue
can still judge them: the nearest and the farthest reading around a hole (a hole on a silhouette
borders both the mover and the background; the pixel is static if its flow fits either).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import cv2
import numpy as np

from dynrecon_ros.geometry import pixel_axes, project, transform_points, unproject_pixels
from dynrecon_ros.photometric import fast_median


if TYPE_CHECKING:
    from dynrecon_ros.segmentation import SegmentationConfig

_SQUARE3 = np.ones((3, 3), np.uint8)


def depth_sigma(z: np.ndarray, a: float, b: float) -> np.ndarray:
    """(H, W) axial depth noise (metres) of readings ``z`` (metres): ``a + b (z - 0.4)^2``."""
    return np.float32(a) + np.float32(b) * (z - np.float32(0.4)) ** 2


def depth_tolerance(z_a: np.ndarray, z_b: np.ndarray, cfg: 'SegmentationConfig') -> np.ndarray:
    """(N,) or (H, W) largest |z_a - z_b| (metres) of two readings of one static point (predicted ``z_a``,
    measured ``z_b``): ``depth_tol_sigmas * sqrt(sigma(z_a)^2 + sigma(z_b)^2) + depth_rel_tol * z_a``
    (the module's noise model; :func:`pair_depth_probability` computes it in place, image-sized)."""
    a, b = cfg.depth_sigma_a, cfg.depth_sigma_b
    return np.float32(cfg.depth_tol_sigmas) * np.sqrt(depth_sigma(z_a, a, b) ** 2 + depth_sigma(z_b, a, b) ** 2) + \
        np.float32(cfg.depth_rel_tol) * z_a


def soft_step_of_inverse(q: np.ndarray, s: float) -> np.ndarray:
    """float32 ``r^s / (1 + r^s)`` for ``r = 1 / q`` >= 0, written ``1 / (1 + q^s)``: 0 at r = 0 (q = inf),
    1 at r = inf (q = 0), NaN stays NaN; an integer s (the default 4) by multiplications, which are
    ~25x faster than float32 ``np.power``."""
    with np.errstate(over='ignore', invalid='ignore'):
        x = power(q, s)
        if x is q:  # s = 1: q itself, the caller's
            x = x.copy()
        x += np.float32(1)
        return np.divide(np.float32(1), x, out=x)


def power(x: np.ndarray, s: float) -> np.ndarray:
    """``x ** s`` (float32 array, s > 0), by repeated squaring when s is an integer up to 16."""
    n = int(s)
    if n != s or not 1 <= n <= 16:
        return np.power(x, np.float32(s))
    out, sq = None, x
    while True:
        if n & 1:
            out = sq if out is None else (np.multiply(out, sq, out=out) if out is not x else out * sq)
        n >>= 1
        if not n:
            return out
        sq = sq * sq if sq is x or sq is out else np.multiply(sq, sq, out=sq)


def nearest_reading(depth: np.ndarray) -> np.ndarray:
    """(H, W) float32: the smallest valid reading in each 3 x 3 neighbourhood; inf where none is valid."""
    d = np.where(np.isfinite(depth) & (depth > 0), depth, np.float32(np.inf)).astype(np.float32)
    return cv2.erode(d, _SQUARE3, borderType=cv2.BORDER_CONSTANT, borderValue=np.inf)


def pair_depth_probability(z_pred: np.ndarray, eu: np.ndarray, ev: np.ndarray, near_j: np.ndarray,
                           cfg: 'SegmentationConfig', hidden: bool = False):
    """Dynamic probability of frame i's pixels from frame j's depth (see the module docstring).

    Args:
        z_pred: (H, W) float32 depth of frame i's points in camera j (NaN = invalid).
        eu, ev: (H, W) float32 ego flow of frame i's pixels into frame j (NaN = invalid).
        near_j: (H, W) float32 :func:`nearest_reading` of frame j's depth.
        cfg: depth_sigma_a, depth_sigma_b, depth_tol_sigmas, depth_rel_tol, steepness.
        hidden: also return where something nearer stands in front in j.

    Returns:
        (H, W) float32 in [0, 1]; NaN where there is no evidence (no depth, lands outside j or on
        j's holes, or something nearer stands in front in j). With ``hidden``: (that, the (H, W) bool
        pixels whose point j reads nearer than the tolerance: hidden in j, or a mover that stood there).
    """
    h, w = z_pred.shape
    # where frame i's points land in j (NaN -> -1: outside, the border's inf); two float maps, no stacking
    u, v = pixel_axes(h, w)
    mx = np.add(u, eu)
    my = np.add(v, ev)
    zj = cv2.remap(near_j, np.fmax(mx, np.float32(-1), out=mx), np.fmax(my, np.float32(-1), out=my),
                   cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=np.inf)
    with np.errstate(invalid='ignore', over='ignore', divide='ignore'):
        # in place (image-sized temporaries cost page faults): tol = k sqrt(s(z_pred)^2 + s(z_j)^2) + rel z_pred
        s2 = _sigma_squared(z_pred, cfg, mx)
        s2 += _sigma_squared(zj, cfg, my)
        tol = np.sqrt(s2, out=s2)
        tol *= np.float32(cfg.depth_tol_sigmas)
        tol += np.float32(cfg.depth_rel_tol) * z_pred
        diff = np.subtract(zj, z_pred, out=my)
        # r = diff / tol; the soft step of max(r, 0); no evidence where j has no reading there, i no
        # depth, or j's reading is nearer by more than the tolerance (r < -1)
        keep = zj < np.inf
        behind = keep & (diff < -tol) if hidden else None  # (NaN: False)
        keep &= diff >= -tol
        prob = soft_step_of_inverse(np.divide(tol, np.fmax(diff, np.float32(0), out=zj), out=zj), cfg.steepness)
    np.copyto(prob, np.float32(np.nan), where=~keep)
    return (prob, behind) if hidden else prob


def reverse_depth_probability(prob_i: np.ndarray, z_pred: np.ndarray, eu: np.ndarray, ev: np.ndarray,
                              depth_j: np.ndarray,
                              K_j: np.ndarray, T_i_j: np.ndarray, K_i: np.ndarray, near_i: np.ndarray,
                              cfg: 'SegmentationConfig', shutter=None) -> np.ndarray:
    """Dynamic probability of frame j's pixels where j reads clearly *nearer* than frame i's points
    predict: the geometric cue seen from j (a mover walking away from the camera between j and i).

    :func:`pair_depth_probability` judges frame i's pixels; where j reads nearer it has no evidence
    (an occluder in j, or a mover that stood there in j). The two differ from j's side: a static
    occluder's point, moved into frame i, lands where i reads it again, a mover's lands where i now
    reads farther. So j's pixels that i's points find nearer are candidates, and each is checked
    as the cue checks i's pixels, in the other direction (its reading moved into i against i's
    nearest reading within one pixel). Sparse: only the candidates are moved (a few per cent of the
    pixels when something moved along the line of sight, the parallax edges otherwise).

    Args:
        prob_i: (H, W) float32 :func:`pair_depth_probability` of the pair (NaN = no evidence: the
            candidates are among these pixels).
        z_pred: (H, W) float32 depth of frame i's points in camera j (NaN = invalid).
        eu, ev: (H, W) float32 ego flow of frame i's pixels into frame j (NaN = invalid).
        depth_j: (H, W) float32 frame j's readings (0 = none).
        K_j, K_i: (3, 3) intrinsics; T_i_j: (4, 4) with ``X_i = T_i_j @ X_j``.
        near_i: (H, W) :func:`nearest_reading` of frame i's depth.
        cfg: as :func:`pair_depth_probability`.
        shutter: optional (ShutterModel, twist_j, twist_i): rows seen at their own instants, as the
            flow cue's ego flow (:func:`~dynrecon_ros.flow_cue.ego_at`), from j into i.

    Returns:
        (H, W) float32 probability of frame j's pixels; NaN where there is no evidence (not a
        candidate, or the check has none).
    """
    h, w = z_pred.shape
    out = np.full((h, w), np.nan, np.float32)
    # candidates: i's pixels without evidence of the forward cue (j nearer, or no reading of j) that
    # land in j on a reading clearly nearer than predicted (sparse from here on)
    cand = np.isnan(prob_i)
    cand &= np.isfinite(eu)
    ys, xs = np.nonzero(cand)
    if not len(ys):
        return out
    zp = z_pred[ys, xs]
    qx, qy = np.rint(xs + eu[ys, xs]).astype(np.int64), np.rint(ys + ev[ys, xs]).astype(np.int64)
    inside = (qx >= 0) & (qx < w) & (qy >= 0) & (qy < h)
    qx, qy, zp = qx[inside], qy[inside], zp[inside]
    zq = depth_j[qy, qx]
    with np.errstate(invalid='ignore'):
        tol = depth_tolerance(zp, zq, cfg)
        near = (zq > 0) & (zp - zq > tol)
    if not near.any():
        return out
    q = np.unique(qy[near] * w + qx[near])
    qy, qx = np.divmod(q, w)
    from dynrecon_ros.flow_cue import ego_at  # (flow_cue imports this module)
    du, dv, zi_pred = ego_at(qx.astype(np.float32), qy.astype(np.float32), depth_j[qy, qx], K_j, T_i_j, K_i,
                             None if shutter is None else (*shutter, h))
    with np.errstate(invalid='ignore'):
        pu = np.rint(qx + du)
        pv = np.rint(qy + dv)
        ok = np.isfinite(zi_pred) & (pu >= 0) & (pu <= w - 1) & (pv >= 0) & (pv <= h - 1)
    qy, qx, zi_pred = qy[ok], qx[ok], zi_pred[ok]
    zi = near_i[pv[ok].astype(np.int64), pu[ok].astype(np.int64)]
    with np.errstate(invalid='ignore', over='ignore', divide='ignore'):
        tol = depth_tolerance(zi_pred, zi, cfg)
        diff = zi - zi_pred
        keep = np.isfinite(zi) & (diff >= -tol)
        prob = soft_step_of_inverse((tol / np.fmax(diff, np.float32(0))).astype(np.float32), cfg.steepness)
    out[qy[keep], qx[keep]] = prob[keep]
    return out


def _sigma_squared(z: np.ndarray, cfg: 'SegmentationConfig', out: np.ndarray) -> np.ndarray:
    """:func:`depth_sigma` squared, written into ``out``."""
    x = np.subtract(z, np.float32(0.4), out=out)
    x *= x
    x *= np.float32(cfg.depth_sigma_b)
    x += np.float32(cfg.depth_sigma_a)
    x *= x
    return x


def fill_candidates(depth: np.ndarray, max_radius: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Near and far candidate depths for the pixels without a reading.

    Holes are filled by repeated 3 x 3 grey erosion (nearest reading) and dilation (farthest reading)
    from their rims, at most ``max_radius`` pixels deep.

    Args:
        depth: (H, W) float32 metres, 0 / NaN = no reading.
        max_radius: pixels farther than this from any reading get no candidate.

    Returns:
        holes (H, W) bool (no reading, but a candidate), near and far (H, W) float32 candidate depths
        (the reading itself where there is one; NaN where neither).
    """
    ok = np.isfinite(depth) & (depth > 0)
    if ok.all():
        return np.zeros(depth.shape, bool), depth, depth
    near = np.where(ok, depth, np.float32(np.inf)).astype(np.float32)
    far = np.where(ok, depth, np.float32(0)).astype(np.float32)
    for _ in range(max_radius):
        if np.isfinite(near).all():
            break
        # explicit borders: OpenCV's default for erosion is the largest float, a finite 'reading'
        near = np.where(np.isfinite(near), near, cv2.erode(near, _SQUARE3, borderType=cv2.BORDER_CONSTANT,
                                                           borderValue=np.inf))
        far = np.where(far > 0, far, cv2.dilate(far, _SQUARE3, borderType=cv2.BORDER_CONSTANT, borderValue=0))
    holes = ~ok & np.isfinite(near)
    near = np.where(np.isfinite(near), near, np.nan).astype(np.float32)
    far = np.where(far > 0, far, np.nan).astype(np.float32)
    return holes, near, far


# The pooled test (receded_surfaces): a surface counts as receded when the median of its samples' relative step
# back exceeds both the floor and RECEDE_SIGMAS robust spreads of the pair's surfaces around their centre.
RECEDE_FLOOR = 0.002  # 0.2 % of z: static surfaces' medians measured within +-0.012 % of the centre (exact depth)
RECEDE_SIGMAS = 4.0
RECEDE_MIN_SAMPLES = 100  # compared samples of a surface (every 2nd pixel both ways: ~400 pixels)
RECEDE_MIN_SHARE = 0.4  # of a surface's samples compared (landed in view, on four readings)
RECEDE_MIN_SURFACES = 5  # surfaces compared, for the centre and the spreads
RECEDE_SLOPED = 0.002  # relative depth change per pixel from which a surface tells the pair's landing error
# A surface's median is also held to its own sampling error: RECEDE_SIGMAS times RECEDE_SE_FACTOR standard errors
# of a median of its samples (1.2533 x 1.4826 MAD / sqrt(n)). The factor: the samples' errors are not independent
# (a structured-light sensor's quantisation plateaus, the pair's pose and shutter errors vary smoothly over a
# surface): static surfaces' offsets from the centre were 1.2-1.3 such standard errors (robust spread) with tails
# to 5-9 on static_effects 1600 / 1603 (1235 / 634 surfaces); a box at 4.6 m read 0.31 % farther by a Kinect's
# 1.3 % disparity steps was flagged by the 0.2 % floor (static_effects 1600, 3647 pixels).
RECEDE_SE_FACTOR = 2.0


SEEN_THROUGH_MIN_SAMPLES = 25  # compared samples of a surface (seen_through_surfaces: every 2nd pixel, ~100 pixels)


def seen_through_surfaces(prob: np.ndarray, labels: np.ndarray, threshold: float, share: float,
                          step: int = 2, hidden: np.ndarray | None = None) -> np.ndarray | None:
    """Dynamic probability of frame i's surfaces that frame j saw through over most of what both see: i's points
    that j read farther away than the tolerance (j looked through the place where i's surface now stands), on at
    least ``share`` of a surface's compared points (at least :data:`SEEN_THROUGH_MIN_SAMPLES`, sampled every
    ``step`` pixels both ways). A static surface's compared points agree up to the sensor's noise and the pair's
    pose error (a few scattered ones); a mover's are seen through where it moved in. The whole surface is then
    dynamic: a mover revealed at the border whose face slides along itself shows no evidence in the adjacent pair
    (its depth and texture stay), while a longer pair's older frame saw the background where it now stands (the
    part that lands in that frame's view).

    Args:
        prob: (H, W) float32 :func:`pair_depth_probability` of frame i against frame j (NaN = not compared).
        labels: (H, W) int32 :func:`~dynrecon_ros.mask_cleanup.surface_segments` labels of frame i (0 = boundary).
        threshold: evidence above it counts as seen through.
        share: the share of a surface's compared points that must be seen through (0: none tested).
        step: sample every ``step``-th pixel in both directions.
        hidden: optional (H, W) bool pixels whose point frame j reads nearer (something stood in front there in j):
            left out of the verdict. Background that a mover uncovered since j is such, and one depth surface may
            join it to the mover where they meet at the same depth (camouflage_small 871: the floor at a cylinder's
            foot, masked with it from frame 13 and then held, IoU 0.672; left out, 0.924).

    Returns:
        (H, W) float32, 1 on those surfaces (less ``hidden``) and NaN elsewhere; None when there are none.
    """
    if share <= 0:
        return None
    lab, p = labels[::step, ::step].ravel(), prob[::step, ::step].ravel()
    with np.errstate(invalid='ignore'):
        through = p > np.float32(threshold)
    # (on the sample grid: no boolean gathers; every label of the full grid gets a count)
    hit = _mostly_seen_through(lab, ~np.isnan(p), through, int(labels.max()) + 1, share)
    if not hit.any():
        return None
    out = np.full(prob.shape, np.nan, np.float32)
    on = hit[labels]
    if hidden is not None:
        on &= ~hidden
    out[on] = 1.0
    return out


def _mostly_seen_through(lab: np.ndarray, compared: np.ndarray, through: np.ndarray, n: int,
                         share: float) -> np.ndarray:
    """(n,) bool: the surfaces whose samples (labels ``lab`` (N,) int, each < n) were compared (``compared`` (N,) bool)
    at least :data:`SEEN_THROUGH_MIN_SAMPLES` times and seen through (``through`` (N,) bool) on at least ``share`` of
    those; never label 0 (boundaries). The one rule of :func:`seen_through_surfaces` and :func:`seen_empty_surfaces`."""
    n_cmp = np.bincount(lab, weights=compared, minlength=n)
    hit = (n_cmp >= SEEN_THROUGH_MIN_SAMPLES) & (np.bincount(lab, weights=through, minlength=n) >= share * n_cmp)
    hit[0] = False
    return hit


def seen_empty_surfaces(depth: np.ndarray, K: np.ndarray, labels: np.ndarray, views: list, cfg: 'SegmentationConfig',
                        share: float, margin_m: float, step: int = 2, n_labels: int | None = None) -> np.ndarray | None:
    """Dynamic probability of a frame's surfaces that an older view saw through: the frame's points (every
    ``step``-th pixel both ways) moved into each view, whose nearest reading there is farther than predicted by
    more than the noise model's tolerance plus ``margin_m``, on at least ``share`` of a surface's compared points
    (at least :data:`SEEN_THROUGH_MIN_SAMPLES`). What stands now where a view saw empty space arrived since:
    a person the camera left walking and finds standing still elsewhere shows no motion, but a view from before
    they stopped there looked through that place. A static surface is never seen through (a view reads it, or
    something nearer in front of it); ``margin_m`` covers the drift between poses seconds apart. (Leaving out the
    samples where a view read the surface itself, as a floor patch joined to a person's feet would be, cost
    stop_and_go 1819 0.919 -> 0.908: a view from before the stop often saw the walking person partly where they
    now stand.)

    Args:
        depth: (H, W) float32 the frame's readings (0 = none).
        K: (3, 3) its intrinsics.
        labels: (H, W) int32 :func:`~dynrecon_ros.mask_cleanup.surface_segments` labels of the frame (0 = boundary).
        views: [(near (H', W') float32 :func:`nearest_reading` of the view's depth, K (3, 3), T (4, 4) with
            ``X_view = T @ X_frame``)].
        cfg: the noise model (depth_sigma_a, depth_sigma_b, depth_tol_sigmas, depth_rel_tol).
        share: the share of a surface's compared points one view must see through (0: none tested).
        margin_m: metres beyond the tolerance.
        step: sample every ``step``-th pixel in both directions.
        n_labels: labels.max() + 1 when the caller knows it (surface_segments' count).

    Returns:
        (H, W) float32, 1 on those surfaces and NaN elsewhere; None when there are none.
    """
    if share <= 0 or not views:
        return None
    z = depth[::step, ::step]
    lab = labels[::step, ::step]
    with np.errstate(invalid='ignore'):
        ok = (lab > 0) & (z > 0) & (z < np.inf)
    vs, us = np.nonzero(ok)
    if not len(vs):
        return None
    lab, z = lab[ok], z[ok]
    f32 = np.float32
    P = unproject_pixels(us * step, vs * step, z, K).astype(f32)  # the samples' points in the frame's camera (N, 3)
    n_lab = int(lab.max()) + 1  # (the sampled surfaces' labels: the others cannot be hit)
    hit = np.zeros(n_lab, bool)
    for near, K_v, T in views:
        hv, wv = near.shape
        Q = transform_points(np.asarray(T, f32), P)
        zq = Q[:, 2]
        with np.errstate(invalid='ignore', divide='ignore'):
            u, v = project(Q, np.asarray(K_v, f32))
            u, v = np.rint(u), np.rint(v)
            idx = np.flatnonzero((zq > f32(0.1)) & (u >= 0) & (u <= wv - 1) & (v >= 0) & (v <= hv - 1))
        zr = near.ravel()[(v[idx] * wv + u[idx]).astype(np.int64)]
        zp = zq[idx]
        seen = zr < np.inf
        with np.errstate(invalid='ignore'):
            through = zr - zp > depth_tolerance(zp, zr, cfg) + f32(margin_m)  # (inf - x > y: unseen is False below)
        through &= seen
        hit |= _mostly_seen_through(lab[idx], seen, through, n_lab, share)
    if not hit.any():
        return None
    lut = np.full(int(labels.max()) + 1 if n_labels is None else n_labels, np.nan, np.float32)
    lut[np.flatnonzero(hit)] = 1.0
    # written over the box of the hit surfaces' samples, ``step`` more each way (the whole image costs 0.6 ms at
    # 640x480; a surface's few unsampled pixels beyond it are the mask's region completion's to join)
    on = hit[lab]
    r0, r1 = max(int(vs[on].min() - 1) * step, 0), min(int(vs[on].max() + 2) * step, depth.shape[0])
    c0, c1 = max(int(us[on].min() - 1) * step, 0), min(int(us[on].max() + 2) * step, depth.shape[1])
    out = np.full(depth.shape, np.nan, np.float32)
    out[r0:r1, c0:c1] = lut[labels[r0:r1, c0:c1]]
    return out


def _bilinear_at(img: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(N,) float32 bilinear reads of the (H, W) float32 ``img`` at (N,) float32 points ``(x, y)`` inside it
    (``cv2.remap`` on maps laid out as 1024-wide rows: OpenCV's maps must be under 32767 on each side)."""
    n = len(x)
    rows = max(1, -(-n // 1024))
    mx, my = np.zeros(rows * 1024, np.float32), np.zeros(rows * 1024, np.float32)
    mx[:n], my[:n] = x, y
    return cv2.remap(img, mx.reshape(rows, 1024), my.reshape(rows, 1024), cv2.INTER_LINEAR).ravel()[:n]


def receded_surfaces(depth_j: np.ndarray, segments_j: tuple, K_j: np.ndarray, T_i_j: np.ndarray, K_i: np.ndarray,
                     depth_i: np.ndarray, shutter=None, step: int = 2) -> np.ndarray:
    """Dynamic probability of frame j's surfaces that frame i (in the pipeline the newest, j an older one)
    reads farther away *as a whole*: a mover walking slowly away from the camera (0.4 % of its depth a frame
    at 0.4 m/s and 3 m), whose step at each pixel stays inside the per-pixel tolerance, and whose flow
    (straight away) is a fraction of a pixel.

    Each depth-connected surface of j (``segments_j``) is sampled every ``step`` pixels; each sample is moved
    into frame i and compared with i's depth read bilinearly at the exact landing (all four readings present;
    a rounded landing would read a slanted surface off by its gradient, and the 3 x 3 nearest reading of the
    per-pixel cue biases every surface nearer). Per surface, the median of ``z_i / z_pred - 1``; the pair's
    surfaces give a centre (their median: a common error of the pair's pose along the line of sight) and a
    spread (1.4826 median absolute deviation: the sensor's noise and the pose's error as they are in this
    pair, tiny with an exact sensor, larger with a structured-light one and a rolling shutter). A surface
    whose median exceeds the centre by more than ``max(RECEDE_FLOOR, RECEDE_SIGMAS * spread)`` receded, unless
    it is slanted: a landing ``e`` pixels off reads a surface whose depth changes by ``slope`` (relative, per
    pixel: the norm of the medians of its samples' signed gradients, so that a noisy sensor's steps do not count
    as slant) off by ``e * slope`` (a floor seen at a grazing angle: ~1 % a pixel), so the pair's landing error in
    pixels is taken from its slanted surfaces (1.4826 median of ``|median - centre| / slope``; ~1 px with depth
    taken 10 ms after colour under hand tremor, ~0 with an exact, synchronous sensor) and a surface must also
    exceed ``RECEDE_SIGMAS * e * slope``, and ``RECEDE_SIGMAS`` times its own median's sampling error (from the spread
    of its samples, ``RECEDE_SE_FACTOR``: with a noisy, quantised sensor a far surface's median wanders more than
    the floor). Nearer is not tested: from this side an occluder standing in front in i reads nearer too.

    Args:
        depth_j: (H, W) float32 frame j's readings (0 = none).
        segments_j: (n, (H, W) int32 labels, 0 = boundary) :func:`~dynrecon_ros.mask_cleanup.surface_segments`
            of ``depth_j``.
        K_j, K_i: (3, 3) intrinsics; T_i_j: (4, 4) with ``X_i = T_i_j @ X_j``.
        depth_i: (H, W) float32 frame i's readings (0 = none).
        shutter: optional (ShutterModel, twist_j, twist_i): rows seen at their own instants, as
            :func:`reverse_depth_probability`'s.
        step: sample every ``step``-th pixel in both directions.

    Returns:
        (H, W) float32: 1 on the receded surfaces, NaN elsewhere (no evidence either way).
    """
    h, w = depth_j.shape
    labels = segments_j[1]
    out = np.full((h, w), np.nan, np.float32)
    lab = labels[::step, ::step]
    z = depth_j[::step, ::step]
    ys, xs = np.nonzero((lab > 0) & (z > 0))
    if len(ys) < RECEDE_MIN_SURFACES * RECEDE_MIN_SAMPLES:
        return out
    gy, gx = np.gradient(z)  # on the samples' grid: the relative depth change per pixel (holes: a median drops them)
    with np.errstate(invalid='ignore', divide='ignore'):  # signed: the sensor's noise cancels in a median
        gx, gy = (gx / (step * z))[ys, xs], (gy / (step * z))[ys, xs]
    lab, z = lab[ys, xs], z[ys, xs]
    ys, xs = (ys * step).astype(np.float32), (xs * step).astype(np.float32)
    from dynrecon_ros.flow_cue import ego_at  # (flow_cue imports this module)
    du, dv, zp = ego_at(xs, ys, z, K_j, T_i_j, K_i, None if shutter is None else (*shutter, h))
    with np.errstate(invalid='ignore'):
        mu, mv = xs + du, ys + dv
        ok = (mu >= 0) & (mu <= w - 1) & (mv >= 0) & (mv <= h - 1) & (zp > 0)
    mu, mv = mu[ok], mv[ok]
    with np.errstate(divide='ignore'):  # inverse depth: affine in the pixel on a plane, so its bilinear read is exact there
        inv_i = np.where(depth_i > 0, np.float32(1) / depth_i, np.float32(0)).astype(np.float32)
    wi = _bilinear_at(inv_i, mu, mv)
    full = _bilinear_at((inv_i > 0).astype(np.float32), mu, mv) > 0.999
    with np.errstate(invalid='ignore', divide='ignore'):
        r = np.float32(1) / (wi * zp[ok]) - 1
    full &= np.isfinite(r)
    lg, rg, gx, gy = lab[ok][full], r[full], gx[ok][full], gy[ok][full]
    n_all = np.bincount(lab)
    n_cmp = np.bincount(lg, minlength=len(n_all))
    cand = np.flatnonzero((n_cmp >= RECEDE_MIN_SAMPLES) & (n_cmp >= RECEDE_MIN_SHARE * n_all))
    if len(cand) < RECEDE_MIN_SURFACES:
        return out
    order = np.argsort(lg, kind='stable')  # each surface's samples contiguous
    rg, gx, gy = rg[order], gx[order], gy[order]
    starts = np.searchsorted(lg[order], cand)
    med = np.array([fast_median(rg[s0:s0 + n_cmp[c]]) for c, s0 in zip(cand, starts)])
    slope = np.hypot([fast_median(gx[s0:s0 + n_cmp[c]]) for c, s0 in zip(cand, starts)],  # the surface's own slant
                     [fast_median(gy[s0:s0 + n_cmp[c]]) for c, s0 in zip(cand, starts)])
    se = np.array([fast_median(np.abs(rg[s0:s0 + n_cmp[c]] - m)) for c, s0, m in zip(cand, starts, med)]) \
        * (1.2533 * 1.4826 * RECEDE_SE_FACTOR) / np.sqrt(n_cmp[cand])  # each median's own sampling error
    centre = np.median(med)
    err = med - centre
    spread = 1.4826 * np.median(np.abs(err))
    sloped = slope >= RECEDE_SLOPED
    px = 1.4826 * np.median(np.abs(err[sloped]) / slope[sloped]) if sloped.any() else 0.0  # landing error
    limit = np.maximum(max(RECEDE_FLOOR, RECEDE_SIGMAS * spread), RECEDE_SIGMAS * np.maximum(px * slope, se))
    receded = cand[err > limit]
    if len(receded):
        out[np.isin(labels, receded)] = 1.0
    return out
