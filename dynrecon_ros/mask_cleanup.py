"""Motion segmentation, mask cleanup: a probability map becomes a clean mask.

Threshold with hysteresis, morphological opening and closing, small regions dropped, boundaries
snapped to depth edges (flow bleeds across silhouettes; depth does not), and background that the
flow smeared between or beside movers dropped (depth valleys between masked pixels; mask pieces
depth-continuous with their surroundings).
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    from dynrecon_ros.segmentation import SegmentationConfig


def _kernel(size: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * size + 1, 2 * size + 1)) if size > 1 else \
        np.ones((2 * size + 1, 2 * size + 1), np.uint8)


def mask_boxes(mask: np.ndarray, margin: int, max_boxes: int = 8) -> list[tuple[slice, slice]]:
    """Boxes that hold the masked pixels, each piece's bounding box grown by ``margin`` pixels (clipped
    to the image) and overlapping boxes merged, so that no masked pixel outside a box lies within
    ``margin`` pixels of it: work that reads the mask (and what lies around it) at most ``margin``
    pixels away gives the same in each box as on the whole image, at a fraction of the cost when the
    movers cover a small part of the view. One box around all pieces when there are more than
    ``max_boxes`` (specks: the per-box overhead would outweigh the saving); none for an empty mask.

    Args:
        mask: (H, W) uint8, > 0 = masked.
        margin: pixels.

    Returns:
        [(rows slice, columns slice)], disjoint.
    """
    h, w = mask.shape
    # pieces found on 8 x 8 blocks (any masked pixel marks its block: 255 / 64 rounds to 4): cheap, and
    # a block box holds its pixels' boxes, so the guarantee above holds
    b = 8
    hb, wb = -(-h // b), -(-w // b)
    m = ((mask > 0) * np.uint8(255)).astype(np.uint8)
    if (hb * b, wb * b) != (h, w):
        m = cv2.copyMakeBorder(m, 0, hb * b - h, 0, wb * b - w, cv2.BORDER_CONSTANT, value=0)
    blocks = (cv2.resize(m, (wb, hb), interpolation=cv2.INTER_AREA) > 0).astype(np.uint8)
    n, _, stats, _ = cv2.connectedComponentsWithStatsWithAlgorithm(blocks, 8, cv2.CV_32S, cv2.CCL_BBDT)
    if n <= 1:
        return []
    x0, y0 = b * stats[1:, cv2.CC_STAT_LEFT], b * stats[1:, cv2.CC_STAT_TOP]
    x1, y1 = x0 + b * stats[1:, cv2.CC_STAT_WIDTH], y0 + b * stats[1:, cv2.CC_STAT_HEIGHT]
    boxes = [[max(int(a) - margin, 0), max(int(c) - margin, 0), min(int(e) + margin, h), min(int(f) + margin, w)]
             for a, c, e, f in zip(y0, x0, y1, x1)]
    if len(boxes) > max_boxes:
        boxes = [[min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]]
    merged = True
    while merged:  # a few boxes: pairwise merging until none overlap
        merged = False
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]:
                    boxes[i] = [min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])]
                    del boxes[j]
                    merged = True
                    break
            if merged:
                break
    return [(slice(a, c), slice(b, d)) for a, b, c, d in boxes]


def morphology(mask: np.ndarray, op: int, radius: int) -> np.ndarray:
    """(H, W) uint8 opening or closing (``cv2.MORPH_OPEN`` / ``cv2.MORPH_CLOSE``) of a 0/1 mask by the
    ellipse of ``radius``, computed in the boxes of :func:`mask_boxes` (neither adds pixels outside
    the pieces' bounding boxes; a margin of 2 radius + 2 keeps every box's result the whole image's)."""
    out = np.zeros_like(mask)
    k = _kernel(radius)
    for box in mask_boxes(mask, 2 * radius + 2):
        out[box] = cv2.morphologyEx(mask[box], op, k)
    return out


def snap_to_depth_edges(mask: np.ndarray, depth: np.ndarray, radius: int,
                        static_hint: np.ndarray | None = None, coarse: tuple | None = None) -> np.ndarray:
    """Move mask boundaries onto depth discontinuities.

    Optical flow bleeds a few pixels across a mover's silhouette, so the flow-based mask is a band
    too wide or too narrow there. Pixels within ``radius`` of the boundary are re-labelled by depth:
    dynamic when their depth is closer to the mean depth of the confidently dynamic pixels nearby
    (the mask eroded by ``radius``) than to that of the confidently static ones nearby.

    Args:
        mask: (H, W) uint8 0/1.
        depth: (H, W) float32 metres (invalid pixels keep their label).
        radius: band half-width in pixels.
        static_hint: optional (H, W) bool of pixels known static (e.g. low probability) that count
            as confidently static even near the boundary (narrow gaps between movers).
        coarse: optional (c, s): ``mask`` is the (H / s, W / s) uint8 0/1 mask ``c`` repeated over s x s
            blocks (H, W multiples of s); the erosion and dilation that find the band then run on ``c``
            (:func:`_block_morphology`: the same result at a quarter of the work or less).

    Returns:
        (H, W) uint8 0/1.
    """
    if radius <= 0 or not mask.any():
        return mask
    out = mask.copy()
    c, s = coarse if coarse is not None else (None, 1)
    if c is not None and (c.shape[0] * s, c.shape[1] * s) != mask.shape:
        raise ValueError(f'snap_to_depth_edges: coarse mask {c.shape} x {s} is not the mask {mask.shape}')
    # a band pixel (within radius of the mask) reads depths 2 radius around it: boxes 3 radius around the pieces
    for box in mask_boxes(mask, 3 * radius):
        morph = None
        if c is not None and all(x.start % s == 0 and x.stop % s == 0 for x in box):
            cb = c[box[0].start // s:box[0].stop // s, box[1].start // s:box[1].stop // s]
            morph = (_block_morphology(cb, s, radius, cv2.MORPH_ERODE), _block_morphology(cb, s, radius, cv2.MORPH_DILATE))
        out[box] = _snap_in_box(mask[box], depth[box], radius, None if static_hint is None else static_hint[box], morph)
    return out


@functools.lru_cache(maxsize=32)
def _phase_kernels(radius: int, s: int) -> dict:
    """The kernel :func:`_kernel` (``radius``) seen from each pixel phase (a, b) of s x s blocks: the block
    offsets its elements fall in, as {(a, b): (kernel on the block grid, anchor (x, y))}."""
    ey, ex = np.nonzero(_kernel(radius))
    ey, ex = ey - radius, ex - radius
    out = {}
    for a in range(s):
        for b in range(s):
            dy, dx = (a + ey) // s, (b + ex) // s
            k = np.zeros((dy.max() - dy.min() + 1, dx.max() - dx.min() + 1), np.uint8)
            k[dy - dy.min(), dx - dx.min()] = 1
            out[a, b] = (k, (-int(dx.min()), -int(dy.min())))
    return out


def _block_morphology(c: np.ndarray, s: int, radius: int, op: int) -> np.ndarray:
    """(h s, w s) uint8 ``cv2.erode`` / ``cv2.dilate`` (``op``: cv2.MORPH_ERODE / MORPH_DILATE, default borders)
    by ``_kernel(radius)`` of the (h, w) mask ``c`` repeated over s x s blocks, computed on ``c``: pixel
    (s Y + a, s X + b) sees the blocks (Y + (a + ey) // s, X + (b + ex) // s) of the kernel's elements
    (ey, ex), so each phase (a, b) is one morphology of ``c`` by the kernel of those block offsets
    (exact: minima and maxima; outside the image neutral on both grids)."""
    fn = cv2.erode if op == cv2.MORPH_ERODE else cv2.dilate
    out = np.empty((c.shape[0] * s, c.shape[1] * s), c.dtype)
    for (a, b), (k, anchor) in _phase_kernels(radius, s).items():
        out[a::s, b::s] = fn(c, k, anchor=anchor)
    return out


def _snap_in_box(mask, depth, radius, static_hint, morph=None):
    """:func:`snap_to_depth_edges` within one box of :func:`mask_boxes` (same arguments, cropped; ``morph``:
    the mask's erosion and dilation by ``_kernel(radius)`` when the caller has them)."""
    if morph is None:
        k = _kernel(radius)
        morph = cv2.erode(mask, k), cv2.dilate(mask, k)
    dyn = morph[0]
    stat = 1 - morph[1]
    band = (dyn == 0) & (stat == 0)
    if static_hint is not None:
        stat = np.maximum(stat, (static_hint & (dyn == 0)).astype(np.uint8))
    good = (np.isfinite(depth) & (depth > 0)).astype(np.float32)
    d = np.where(good > 0, depth, 0).astype(np.float32)
    win = (4 * radius + 1, 4 * radius + 1)

    def local_mean(sel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        wsel = sel.astype(np.float32) * good
        n = cv2.boxFilter(wsel, -1, win, normalize=False)
        s = cv2.boxFilter(wsel * d, -1, win, normalize=False)
        return s / np.maximum(n, 1e-6), n > 0.5

    d_dyn, has_dyn = local_mean(dyn)
    d_stat, has_stat = local_mean(stat)
    decide = band & (good > 0) & has_dyn
    near_dyn = np.abs(d - d_dyn)
    # with no static reference nearby (a narrow gap between movers) a pixel whose depth is far from
    # the movers' (more than 10 % + 10 cm) is background seen through the gap
    is_dyn = np.where(has_stat, near_dyn < np.abs(d - d_stat), near_dyn < 0.1 * d_dyn + 0.1)
    out = mask.copy()
    out[decide] = is_dyn[decide]
    return out


def drop_background_segments(mask: np.ndarray, depth: np.ndarray, max_continuity: float) -> np.ndarray:
    """Remove parts of a mask that are background seen beside or between movers.

    Flow smears a mover's motion over thin background strips (between two movers, or between a
    mover and the image border) wider than the boundary band of :func:`snap_to_depth_edges`. The
    mask is cut along depth discontinuities (the far-side pixel of every depth step is removed) and
    each piece is checked: a mover is surrounded by depth steps (except where it touches the floor),
    while background is depth-continuous with what lies around it. Pieces whose outside neighbours
    are depth-continuous for more than ``max_continuity`` of their boundary are dropped.

    Args:
        mask: (H, W) uint8 0/1.
        depth: (H, W) float32 metres (0/NaN = invalid).
        max_continuity: 0..1; 1 disables.

    Returns:
        (H, W) uint8 0/1.
    """
    if max_continuity >= 1.0 or not mask.any():
        return mask
    h, w = mask.shape
    reach = max(3, int(0.08 * max(h, w)))  # of the valley test below
    band = hole_band_px(w)
    out = mask.copy()
    # what a piece's test reads lies within reach (+ 3 pixels out, + the median's 1) of the mask, or
    # 3 pixels and a hole band out
    for box in mask_boxes(mask, max(reach, band + 3) + 5):
        out[box] = _drop_in_box(mask[box], depth[box], max_continuity, reach, band)
    return out


def _drop_in_box(mask, depth, max_continuity, reach, band):
    """:func:`drop_background_segments` within one box of :func:`mask_boxes` (``reach``: the valley
    test's, ``band``: :func:`hole_band_px`, both from the whole image's size)."""
    d = np.where(np.isfinite(depth) & (depth > 0), depth, 0).astype(np.float32)
    d = cv2.medianBlur(d, 3)
    good = d > 0
    step = np.float32(0.05) + np.float32(0.05) * d  # a depth step: 5 cm + 5 %
    h, w = d.shape
    far_edge = np.zeros((h, w), bool)
    shifts = ((0, 1), (0, -1), (1, 0), (-1, 0))

    def shifted(a, dy, dx, fill):
        out = np.full_like(a, fill)
        ys, yd = (slice(dy, None), slice(None, h - dy)) if dy >= 0 else (slice(None, h + dy), slice(-dy, None))
        xs, xd = (slice(dx, None), slice(None, w - dx)) if dx >= 0 else (slice(None, w + dx), slice(-dx, None))
        out[yd, xd] = a[ys, xs]  # out[p] = a[p + (dy, dx)]
        return out

    # a depth step hidden by a band without readings (a structured-light sensor's shadow, its
    # silhouette holes) is still a step: compared across the band, along the line (across_holes)
    first = {sh: across_holes(d, *sh, band) for sh in shifts}  # the next reading each way, across a band
    # across a band a step must be a clear one (HOLE_STEP_M + 10 %: a mover in front of what is behind it),
    # not a slanted or curved surface continuing under the band
    step_hole = np.float32(HOLE_STEP_M) + np.float32(0.1) * d
    for dy, dx in shifts:
        dq = shifted(first[(dy, dx)], dy, dx, 0)
        far_edge |= good & (dq > 0) & (dq < d - np.where(shifted(d, dy, dx, 0) > 0, step, step_hole))
    # background in a gap between movers is a depth valley: nearer masked pixels on both sides
    # (left and right, or above and below) within `reach` pixels
    dm = np.where((mask > 0) & good, d, np.float32(1e6)).astype(np.float32)
    valley = np.zeros((h, w), bool)
    for dy, dx in ((0, 1), (1, 0)):  # horizontal, vertical
        kern = np.ones((1 + dy * (reach - 1), 1 + dx * (reach - 1)), np.uint8)
        # min over [p - reach*e, p] (anchor at the window's end) and over [p, p + reach*e]
        upto = cv2.erode(dm, kern, anchor=(dx * (reach - 1), dy * (reach - 1)),
                         borderType=cv2.BORDER_CONSTANT, borderValue=1e6)
        onwards = cv2.erode(dm, kern, anchor=(0, 0), borderType=cv2.BORDER_CONSTANT, borderValue=1e6)
        before = shifted(upto, -dy, -dx, 1e6)  # p excluded
        after = shifted(onwards, dy, dx, 1e6)
        valley |= good & (before < d - step) & (after < d - step)
    mask = np.where(valley, 0, mask).astype(np.uint8)
    pieces = (mask > 0) & ~far_edge
    n, labels = cv2.connectedComponents(pieces.astype(np.uint8), connectivity=4)
    if n <= 1:
        return mask
    n_out = np.zeros(n)
    n_cont = np.zeros(n)
    n_direct, n_direct_cont, n_hole_step = np.zeros(n), np.zeros(n), np.zeros(n)
    # outside pixels that count: unmasked, not in a hole enclosed by the mask, and not in a seam of
    # at most 2 pixels between masked pieces (the unmasked region is eroded); compared 3 pixels out
    nh, hole_labels = cv2.connectedComponents((mask == 0).astype(np.uint8), connectivity=4)
    touches = np.zeros(nh, bool)  # unmasked regions that reach the border (no stats: 4x faster)
    for edge in (hole_labels[0], hole_labels[-1], hole_labels[:, 0], hole_labels[:, -1]):
        touches[edge] = True
    touches[0] = False  # label 0: the mask itself
    counts = cv2.erode(((mask == 0) & touches[hole_labels]).astype(np.uint8), np.ones((3, 3), np.uint8),
                       borderType=cv2.BORDER_CONSTANT, borderValue=1) > 0
    for dy, dx in shifts:
        lq = shifted(labels, dy, dx, -1)
        # a boundary pixel without a reading reads the first one inwards, the outside the first one
        # outwards: a depth step hidden by a band without readings is still a step
        d_in = first[(-dy, -dx)]
        dq = shifted(first[(dy, dx)], 3 * dy, 3 * dx, 0)
        cq = shifted(counts, 3 * dy, 3 * dx, False)
        border = (labels > 0) & (lq != labels) & cq & (d_in > 0) & (dq > 0)
        lab = labels[border]
        n_out += np.bincount(lab, minlength=n)
        crossed = (d <= 0) | (shifted(d, 3 * dy, 3 * dx, 0) <= 0)
        step_in = np.where(crossed, np.float32(HOLE_STEP_M) + np.float32(0.1) * d_in,
                           np.float32(0.05) + np.float32(0.05) * d_in)
        cont = (np.abs(d_in - dq) < step_in)[border]
        n_cont += np.bincount(lab, weights=cont, minlength=n)
        direct = ~crossed[border]
        n_direct += np.bincount(lab, weights=direct, minlength=n)
        n_direct_cont += np.bincount(lab, weights=direct & cont, minlength=n)
        n_hole_step += np.bincount(lab, weights=~direct & ~cont, minlength=n)
    # judged on the readings on both sides where the boundary has them (a static surface beside a thin
    # band of holes, e.g. along a box's edge, stays background), unless steps across hole bands make
    # more than half of the boundary (a mover behind its shadow, whose only direct readings are the
    # background the flow smeared beyond the band); a boundary without direct readings: all of it
    background = np.where(n_direct > 0,
                          (n_direct_cont > max_continuity * n_direct) & (n_hole_step <= 0.5 * n_out),
                          (n_cont > max_continuity * np.maximum(n_out, 1)) & (n_out > 0))
    background = np.flatnonzero(background)
    background = background[background > 0]
    out = mask.copy()
    if background.size:
        out[np.isin(labels, background)] = 0
    out[far_edge & (mask > 0) & ~cv2.dilate(out, np.ones((3, 3), np.uint8)).astype(bool)] = 0
    return out


# the smallest depth step (metres, plus 10 % of the depth) that counts across a band without readings
HOLE_STEP_M = 0.3


def hole_band_px(width: int) -> int:
    """Widest band without depth readings (pixels) between two surfaces that still counts as their
    common edge, for an image ``width`` pixels wide: 5 % of the width. A structured-light sensor's
    projector shadow beside a mover is ``f b (1 / z_mover - 1 / z_background)`` wide: a Kinect v1
    (baseline 7.5 cm) shows a person 0.85 m away in front of a wall 4 m away with a 18-pixel
    shadow at 320 pixels wide (f = 268), 6 % of it, one 2 m away with 5 pixels."""
    return max(2, int(round(0.05 * width)))


def across_holes(d: np.ndarray, dy: int, dx: int, radius: int) -> np.ndarray:
    """The first reading from each pixel in direction ``(dy, dx)`` (one of the 4 axis directions),
    the pixel's own if it has one, at most ``radius`` pixels on: what lies on the other side of a band
    without readings, along that line (0 where none is that close).

    Args:
        d: (H, W) float32 metres, 0 = no reading.
        dy, dx: the direction, e.g. (0, 1) = to the right.
        radius: pixels.

    Returns:
        (H, W) float32.
    """
    hole = d <= 0
    if not hole.any() or radius <= 0:
        return d
    axis = 0 if dy else 1
    n = d.shape[axis]
    pos = np.arange(n).reshape((-1, 1) if axis == 0 else (1, -1))
    if dy + dx > 0:  # the next reading onwards: running minimum of the reading positions, from the end
        idx = np.where(hole, n, pos)
        idx = np.flip(np.minimum.accumulate(np.flip(idx, axis), axis=axis), axis)
        ok = (idx < n) & (idx - pos <= radius)
    else:  # the previous reading: running maximum from the start
        idx = np.maximum.accumulate(np.where(hole, -1, pos), axis=axis)
        ok = (idx >= 0) & (pos - idx <= radius)
    idx = np.clip(idx, 0, n - 1)
    got = np.take_along_axis(d, idx, axis=axis)
    return np.where(ok, got, np.float32(0)).astype(np.float32)


def surface_segments(depth: np.ndarray, crease: float) -> tuple[int, np.ndarray]:
    """Depth-connected smooth surfaces: pixels joined where the depth neither steps nor creases.

    Inverse depth is affine in the pixel coordinates on a plane, so its second difference over
    3 pixels, relative to its value, is ~0 on planes, small on smooth curved surfaces (a body) and
    large where a surface meets another at an angle (a person's feet on the floor, a box on it).
    Pixels whose step to a 4-neighbour exceeds 3 cm + 3 % of the depth, or whose relative second
    difference in u or v exceeds ``crease``, or without depth, are boundaries (thickened by one
    pixel); the rest is labelled by 4-connectivity (OpenCV).

    Args:
        depth: (H, W) float32 metres (0/NaN = none).
        crease: relative second difference of inverse depth that separates two surfaces.

    Returns:
        (number of labels, (H, W) int32 labels; 0 = boundary).
    """
    ok = np.isfinite(depth) & (depth > 0)
    d = np.asarray(depth, dtype=np.float32) if ok.all() else np.where(ok, depth, np.float32(0)).astype(np.float32)
    d = cv2.medianBlur(d, 5)
    ok &= d > 0
    inv = np.divide(np.float32(1), np.maximum(d, np.float32(1e-3)))
    np.copyto(inv, np.float32(0), where=~ok)
    edge = ~ok
    step = np.float32(0.03) * d
    step += np.float32(0.03)
    edge[:, 1:] |= np.abs(d[:, 1:] - d[:, :-1]) > step[:, 1:]
    edge[1:, :] |= np.abs(d[1:, :] - d[:-1, :]) > step[1:, :]
    k2 = np.array([[1, 0, 0, -2, 0, 0, 1]], np.float32)
    den = np.maximum(inv, np.float32(1e-6), out=step)
    with np.errstate(invalid='ignore', divide='ignore'):
        for kern in (k2, k2.T):
            dd = cv2.filter2D(inv, -1, kern, borderType=cv2.BORDER_REPLICATE)
            np.abs(dd, out=dd)
            dd /= den
            edge |= dd > crease
    # a crease is found on one or two pixels and noise breaks it: thickened, it leaks less
    edge = cv2.dilate(edge.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    return cv2.connectedComponents((~edge).astype(np.uint8), connectivity=4)


def complete_regions(mask: np.ndarray, depth: np.ndarray, fraction: float, crease: float,
                     static: np.ndarray | None = None, segments: tuple | None = None) -> np.ndarray:
    """Evidence on part of a surface spreads over the whole surface (DynaSLAM grows its regions).

    A mover whose motion shows only at its edges (a uniform or background-like surface that the
    flow cannot follow) gets masked whole: every surface of :func:`surface_segments` whose pixels
    not known static the mask covers for at least ``fraction`` joins the mask, except its pixels
    known static. The floor a mover stands on is another surface (a crease at the feet) and where
    the crease is lost in noise its textured pixels are known static; large background surfaces
    are covered by far less.

    Args:
        mask: (H, W) uint8 0/1.
        depth: (H, W) float32 metres.
        fraction: 0..1 share of a surface the mask must cover; 1 disables.
        crease: see :func:`surface_segments`.
        static: optional (H, W) bool pixels known static (their evidence says so); they never join.
        segments: optional :func:`surface_segments` of ``depth`` with ``crease``, when the caller has them.

    Returns:
        (H, W) uint8 0/1.
    """
    if fraction >= 1.0 or not mask.any():
        return mask
    n, labels = surface_segments(depth, crease) if segments is None else segments
    if n <= 1:
        return mask
    free = np.ones(mask.shape, bool) if static is None else ~static | (mask > 0)
    area = np.bincount(labels[free], minlength=n)
    covered = np.bincount(labels[free], weights=(mask[free] > 0), minlength=n)
    grow = covered >= fraction * np.maximum(area, 1)
    grow[0] = False
    out = mask.copy()
    out[grow[labels] & free] = 1
    return out


def clean_mask(prob: np.ndarray, cfg: SegmentationConfig, depth: np.ndarray | None = None,
               evidence: np.ndarray | None = None, segments: tuple | None = None) -> np.ndarray:
    """Threshold (with hysteresis, ``cfg.hysteresis``) and clean one probability map.

    Args:
        prob: (H, W) float32 dynamic probability (NaN = no evidence = static).
        cfg: threshold and morphology parameters.
        depth: optional (H, W) float32 metres; when given, boundaries snap to depth edges
            (:func:`snap_to_depth_edges`, ``cfg.snap_px``).
        evidence: optional (H, W) bool pixels with any evidence: region completion
            (``cfg.grow_fraction``) never joins pixels known static, i.e. below ``cfg.grow_static``
            with evidence (without this map: below it and not NaN).
        segments: optional :func:`surface_segments` of ``depth`` (``cfg.crease``) for region completion.

    Returns:
        (H, W) uint8, 255 = dynamic.
    """
    p0 = np.fmax(prob, np.float32(0))  # NaN -> 0 (probabilities are >= 0)
    m = (p0 > cfg.threshold).astype(np.uint8)
    if cfg.hysteresis < 1.0 and m.any():
        # hysteresis: weaker evidence connected to strong evidence is part of the same mover (a slow
        # mover's flow error hovers around the tolerance; partial detections inside a mover would
        # otherwise be dropped as depth-continuous background by drop_background_segments)
        n, lab = cv2.connectedComponents((p0 > cfg.hysteresis * cfg.threshold).astype(np.uint8), connectivity=8)
        keep = np.zeros(n, bool)
        keep[lab[m > 0]] = True
        keep[0] = False
        m = keep[lab].astype(np.uint8)
    if cfg.open_px:
        m = morphology(m, cv2.MORPH_OPEN, cfg.open_px)
    if cfg.close_px:
        m = morphology(m, cv2.MORPH_CLOSE, cfg.close_px)
    m = drop_small_regions(m, cfg.min_area_frac)
    if depth is not None and cfg.snap_px:
        with np.errstate(invalid='ignore'):  # NaN (no evidence) is not a static hint
            hint = prob < np.float32(0.5 * cfg.threshold)
        m = snap_to_depth_edges(m, depth, cfg.snap_px, hint)
        m = drop_background_segments(m, depth, cfg.max_continuity)
        if cfg.open_px:
            m = morphology(m, cv2.MORPH_OPEN, cfg.open_px)
    if depth is not None and cfg.grow_fraction < 1.0:  # seeds: what survived the cleaning
        with np.errstate(invalid='ignore'):
            known_static = prob < cfg.grow_static  # NaN (no evidence) is not known static
        if evidence is not None:
            known_static &= evidence
        m = complete_regions(m, depth, cfg.grow_fraction, cfg.crease, known_static, segments)
    if cfg.dilate_px:
        m = cv2.dilate(m, _kernel(cfg.dilate_px))
    return m * np.uint8(255)


def drop_small_regions(mask: np.ndarray, min_area_frac: float) -> np.ndarray:
    """(H, W) uint8 0/1 ``mask`` (changed in place) without its 8-connected regions smaller than ``min_area_frac``
    of the image (0: none dropped)."""
    if min_area_frac > 0 and mask.any():
        n, labels = cv2.connectedComponents(mask, connectivity=8)  # areas by bincount: 3x faster than with stats
        small = np.flatnonzero(np.bincount(labels.ravel(), minlength=n) < min_area_frac * mask.size)
        small = small[small > 0]
        if small.size:
            mask[np.isin(labels, small)] = 0
    return mask


def snap_holes_to_colour_edges(mask: np.ndarray, depth: np.ndarray, rgb: np.ndarray, radius: int,
                               min_area_frac: float = 0.0) -> np.ndarray:
    """Pixels without a depth reading near the mask's boundary take the side their colour joins.

    Depth snapping (:func:`snap_to_depth_edges`) cannot place a boundary where the sensor has no
    reading: a structured-light sensor has none in the projector's shadow beside a mover and on
    its silhouette, so the mask ends there wherever the flow's band happened to end (too wide
    beside the mover, too narrow on its own rim, or on thin limbs). Those pixels (no reading,
    within ``radius`` of the boundary) are flooded from both sides in the colour image, and each
    takes the side that reaches it first along the smallest colour steps: the mask's boundary then
    lies on the colour edge between mover and background (OpenCV's marker watershed, which is
    exactly that flooding; computed in the boxes of :func:`mask_boxes`).

    Args:
        mask: (H, W) uint8 0/1.
        depth: (H, W) float32 metres (0/NaN = no reading).
        rgb: (H, W, 3) uint8 colour image of the same frame (any channel order).
        radius: pixels from the boundary that may change side; 0 disables.
        min_area_frac: regions that lost pixels and are now below this fraction of the image are dropped whole, as
            :func:`clean_mask` drops small regions (false patches of holes kept a corner or a lone reading); 0: off.

    Returns:
        (H, W) uint8 0/1.
    """
    if radius <= 0 or not mask.any():
        return mask
    hole = ~(np.isfinite(depth) & (depth > 0))
    if not hole.any():
        return mask
    out = mask.copy()
    k = np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)  # a square: separable, fast at any radius
    for box in mask_boxes(mask, radius + 2):
        m = mask[box]
        unknown = hole[box] & (cv2.dilate(m, k) > 0) & (cv2.erode(m, k, borderType=cv2.BORDER_CONSTANT,
                                                                   borderValue=1) == 0)
        if not unknown.any():
            continue
        markers = np.where(m > 0, 1, 2).astype(np.int32)
        markers[unknown] = 0
        img = np.ascontiguousarray(rgb[box], dtype=np.uint8)
        cv2.watershed(cv2.GaussianBlur(img, (3, 3), 0), markers)
        _resolve_watershed_lines(markers, img, unknown)
        side = markers[unknown]
        o = out[box]
        o[unknown] = np.where(side == 1, 1, np.where(side == 2, 0, m[unknown]))
    if min_area_frac > 0 and (out < mask).any():
        _, lab = cv2.connectedComponents(mask, connectivity=8)
        shrunk = np.isin(lab, np.unique(lab[out < mask]))  # (the regions untouched were judged by clean_mask)
        out = np.where(shrunk, drop_small_regions(out * shrunk, min_area_frac), out)
    return out


def _resolve_watershed_lines(markers: np.ndarray, img: np.ndarray, where: np.ndarray) -> None:
    """In place: the pixels of ``cv2.watershed``'s lines between regions (-1) within ``where`` take the label of
    the 4-neighbour most like them in colour (the line pixel lies on the colour edge, on either side).

    Args:
        markers: (h, w) int32 labels after ``cv2.watershed`` (-1 on the lines).
        img: (h, w, 3) uint8 the colour image it flooded.
        where: (h, w) bool the pixels that need a label.
    """
    line = (markers == -1) & where
    if not line.any():
        return
    ys, xs = np.nonzero(line)
    (h, w), c = markers.shape, img[ys, xs].astype(np.int32)
    best, label = np.full(len(ys), np.iinfo(np.int32).max), np.full(len(ys), -1, np.int32)
    for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
        y2, x2 = np.clip(ys + dy, 0, h - 1), np.clip(xs + dx, 0, w - 1)
        lab = markers[y2, x2]
        dist = np.abs(img[y2, x2].astype(np.int32) - c).sum(axis=1)
        better = (lab > 0) & (dist < best)
        best[better], label[better] = dist[better], lab[better]
    markers[ys, xs] = label


def refine_upsampled_mask(mask: np.ndarray, s: int, depth: np.ndarray | None, prob: np.ndarray,
                          cfg: SegmentationConfig) -> np.ndarray:
    """A mask computed at 1/s of the input size, back at the input size with its edges on the
    input depth's edges.

    The (h, w) mask is repeated over s x s blocks (the block layout of the reconstructor's
    processing size), then pixels within ``cfg.snap_px`` work pixels (snap_px * s input pixels) of its
    boundary are re-labelled by
    :func:`snap_to_depth_edges` on the input-size depth.

    Args:
        mask: (h, w) uint8, 255 = dynamic.
        s: integer factor; the input is (H, W) with H // s == h and W // s == w.
        depth: (H, W) float32 metres of the input (None: no snapping).
        prob: (H, W) float32 dynamic probability at the input size (low = known static).
        cfg: the segmentation parameters (threshold; snap_px = 0 disables the snapping).

    Returns:
        (H, W) uint8, 255 = dynamic.
    """
    H, W = prob.shape
    h, w = mask.shape
    c = (mask > 0).astype(np.uint8)
    m = cv2.resize(c, (w * s, h * s), interpolation=cv2.INTER_NEAREST)
    exact = m.shape == (H, W)  # (the input's size a multiple of s: m is c repeated over s x s blocks)
    if not exact:
        m = cv2.copyMakeBorder(m, 0, H - h * s, 0, W - w * s, cv2.BORDER_REPLICATE)
    if depth is not None and cfg.snap_px and m.any():
        m = snap_to_depth_edges(m, depth, cfg.snap_px * s, prob < 0.5 * cfg.threshold,
                                coarse=(c, s) if exact and s > 1 else None)
    return m * np.uint8(255)
