"""Motion segmentation, object permanence: a region seen moving stays dynamic while it stands still.

A person who stops shows neither flow nor depth change, so both cues go quiet. Each frame therefore
keeps a *hold map*: per pixel, the time (stamp, seconds) its region last showed motion, NaN where
nothing is held. Hold maps are float32: their stamps are seconds since a reference (the segmenter's
first stamp), never absolute clock stamps (~1.7e9 s, rounded to 128 s in float32). A stamp t is
stored as -1 - t on pixels that the hold's completion joined to a still surface continuous with its
surroundings (:func:`complete_hold`; :func:`stamps_of` reads both). A new frame inherits its pair
partner's hold map where it sees the same surface at the same place: its point, moved by the camera
motion into the partner, lands on a held pixel whose reading agrees with the predicted depth (within
the geometric cue's noise model). What stands still keeps its hold; where the held thing walked off,
the uncovered background is farther than the thing was and the hold is dropped (carrying the hold
along the optical flow instead left ghosts: background of about the mover's depth took over its
hold); a moving thing needs no hold (its cues speak). Held pixels whose region has not moved for
``cfg.still_after_s`` seconds are let go: they count as scenery from then on (a parked cart, a person
who sat down).

A frame inherits from two partners, the nearest in time and, where that one holds nothing, the
farthest (a still person whom a passer-by hid in the nearest partner was held in an older one), and
the hold spreads over the depth-connected smooth surfaces it mostly covers (:func:`complete_hold`:
a still thing shows no motion to win back the pixels its hold loses from frame to frame), but not
from one piece of a continuous surface to the next.
What was never seen moving is never held: a person who comes into view as they stop, or who stood
hidden behind another the whole time they moved, stays static until they walk on, unless an older view saw
through the place where they now stand (``segmentation.seen_empty_share``: the person the camera left walking and
finds standing elsewhere; that verdict is motion evidence, held from then on like any). Nor does the hold
spread onto what the partners it came from saw as scenery at the same place (:class:`SeenAsScenery`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import cv2
import numpy as np

from dynrecon_ros.depth_cue import depth_tolerance
from dynrecon_ros.flow_cue import ego_at, exposure_gain, nan_box_mean
from dynrecon_ros.geometry import pixel_axes
from dynrecon_ros.mask_cleanup import surface_segments

if TYPE_CHECKING:
    from dynrecon_ros.segmentation import SegmentationConfig


def carry_hold(hold_j: np.ndarray, depth_k: np.ndarray, K_k: np.ndarray, depth_j: np.ndarray,
               K_j: np.ndarray, T_j_k: np.ndarray, cfg: 'SegmentationConfig',
               gray_k: np.ndarray | None = None, gray_j: np.ndarray | None = None,
               ego: tuple | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Frame j's hold map carried to frame k (see the module docstring).

    Args:
        hold_j: (H, W) float32 stamps of frame j (NaN = not held).
        depth_k, depth_j: (H, W) float32 metres (0 = no reading).
        K_k, K_j: (3, 3) intrinsics.
        T_j_k: (4, 4) with ``X_j = T_j_k @ X_k``.
        cfg: depth_sigma_a, depth_sigma_b, depth_tol_sigmas, depth_rel_tol, hold_grey_tol.
        gray_k, gray_j: optional (H, W) uint8 grey images: the hold is also dropped where frame j
            there does not look like frame k (5 x 5 mean absolute difference after one gain above
            ``cfg.hold_grey_tol`` grey levels): a person who left, uncovering background at about
            their depth (a wall they walked along).
        ego: optional ``ego_at(u, v, depth_k, K_k, T_j_k, K_j)`` ((H, W) du, dv, depth in camera j; not
            changed) when the caller has it (the flow cue's ego flow of the pair k -> j, without rolling shutter).
    Returns:
        ((H, W) float32 stamps of frame k (NaN = not held), (H, W) bool where k sees a surface that j held
        by the depth check alone: also where the grey check dropped the hold (the held thing's look
        changed: a camouflaged mover's surface that slides along itself)).
    """
    h, w = hold_j.shape
    u, v = pixel_axes(h, w)
    if ego is None:
        du, dv, z_pred = ego_at(u, v, depth_k, K_k, T_j_k, K_j)
        # where k's points land in j, as two float maps (no ego flow: -1e4, outside)
        du += u
        dv += v
    else:
        du, dv, z_pred = np.add(ego[0], u), np.add(ego[1], v), ego[2]
    mx, my = np.fmax(du, np.float32(-1e4), out=du), np.fmax(dv, np.float32(-1e4), out=dv)
    held = cv2.remap(np.asarray(hold_j, dtype=np.float32), mx, my, cv2.INTER_NEAREST,
                     borderMode=cv2.BORDER_CONSTANT, borderValue=np.nan)
    fin = np.isfinite(held)
    rows, cols = np.flatnonzero(fin.any(axis=1)), np.flatnonzero(fin.any(axis=0))
    if rows.size == 0:
        return held, fin
    # the checks only where something is held (its bounding box, 2 pixels more for the 5 x 5 grey means)
    box = (slice(max(rows[0] - 2, 0), min(rows[-1] + 3, h)), slice(max(cols[0] - 2, 0), min(cols[-1] + 3, w)))
    bx, by, zp = np.ascontiguousarray(mx[box]), np.ascontiguousarray(my[box]), z_pred[box]
    zj_meas = cv2.remap(np.asarray(depth_j, dtype=np.float32), bx, by, cv2.INTER_NEAREST,
                        borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    same = _same_surface(zj_meas, zp, cfg)
    surf = np.zeros((h, w), bool)
    surf[box] = same & fin[box]
    if gray_k is not None and gray_j is not None:
        gj = gray_j.astype(np.float32)
        gk = gray_k.astype(np.float32)
        # one gain from every 7th pixel of the whole image (remap is per pixel: these are the full remap's)
        seen7 = cv2.remap(gj, np.ascontiguousarray(mx[::7, ::7]), np.ascontiguousarray(my[::7, ::7]),
                          cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=np.nan)
        gain = exposure_gain(seen7, gk[::7, ::7])
        seen = cv2.remap(gj, bx, by, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=np.nan)
        with np.errstate(invalid='ignore'):
            same &= nan_box_mean(np.abs(seen - gain * gk[box]), (5, 5)) <= cfg.hold_grey_tol
    out = np.full((h, w), np.nan, np.float32)
    out[box] = np.where(same, held[box], np.nan)
    return out, surf


def _same_surface(z_meas: np.ndarray, z_pred: np.ndarray, cfg: 'SegmentationConfig') -> np.ndarray:
    """bool, elementwise: a reading ``z_meas`` (0, inf or NaN = none) is the predicted point ``z_pred`` (NaN = none)
    within the depth noise model (:func:`~dynrecon_ros.depth_cue.depth_tolerance`): the same surface seen."""
    with np.errstate(invalid='ignore'):
        return (z_meas > 0) & np.isfinite(z_meas) & (np.abs(z_meas - z_pred) <= depth_tolerance(z_pred, z_meas, cfg))


class SeenAsScenery:
    """Which pixels of frame k its pair partners saw as scenery: the point, moved by the camera motion into
    partner j, lands on a pixel that j's final mask left out and whose reading agrees with the predicted
    depth (:func:`~dynrecon_ros.depth_cue.depth_tolerance`). Asked for a few pixels at a time
    (:func:`complete_hold`'s candidates), so nothing image-sized is computed when nothing is asked; it keeps
    references to the partners' arrays, not copies.

    Args:
        K_k: (3, 3) frame k's intrinsics.
        partners: [((H, W) bool final mask of j, (H, W) float32 depth of j (0 or inf = no reading; its
            :func:`~dynrecon_ros.depth_cue.nearest_reading` does), (3, 3) K_j, (4, 4) T_j_k with
            ``X_j = T_j_k @ X_k``)].
        cfg: the depth noise model (depth_sigma_a, depth_sigma_b, depth_tol_sigmas, depth_rel_tol).
    """

    def __init__(self, K_k: np.ndarray, partners: list, cfg: 'SegmentationConfig'):
        self.K_k, self.partners, self.cfg = K_k, partners, cfg

    def at(self, rows: np.ndarray, cols: np.ndarray, z: np.ndarray) -> np.ndarray:
        """(M,) bool for frame k's pixels (rows, cols) (M,) with depth z (M,) float32 metres: True where every
        partner saw scenery there."""
        out = np.ones(rows.shape, bool)
        u, v = cols.astype(np.float32), rows.astype(np.float32)
        for mask_j, depth_j, K_j, T_j_k in self.partners:
            h, w = mask_j.shape
            du, dv, z_pred = ego_at(u, v, z, self.K_k, T_j_k, K_j)
            with np.errstate(invalid='ignore'):
                x, y = np.rint(u + du), np.rint(v + dv)
                inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)  # NaN (no ego flow): False
            xi, yi = np.where(inside, x, 0).astype(np.intp), np.where(inside, y, 0).astype(np.intp)
            z_j = np.where(inside, depth_j[yi, xi], np.float32(0))
            out &= inside & ~mask_j[yi, xi] & _same_surface(z_j, z_pred, self.cfg)
        return out


# the crease (a fraction of segmentation.crease) of the finer cut that decides which of a moving surface's joins without
# motion evidence are marked (complete_hold): those on a finer surface the held pixels do not cover for the same
# fraction. camouflage 1836 at 640x480: a cylinder and the floor patch at its foot (~4 m) are one surface at the crease
# 0.01, two at 0.005
FINE_CREASE = 0.5


def complete_hold(hold: np.ndarray, held: np.ndarray, depth: np.ndarray, fraction: float,
                  crease: float, segments: tuple | None = None, moving: np.ndarray | None = None,
                  static: np.ndarray | None = None, moving_share: float = 0.01,
                  max_continuity: float = 0.8, scenery: SeenAsScenery | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The hold spread over the depth-connected smooth surfaces it mostly covers (region completion
    of :mod:`dynrecon_ros.mask_cleanup`, for what stands still).

    A held region loses pixels from frame to frame (a silhouette pixel whose carried depth misses, a
    leg the cleaning's opening cut off, a part of the body that comes into view while it stands
    still) and a still thing has no motion evidence to win them back: every surface of
    :func:`~dynrecon_ros.mask_cleanup.surface_segments` that the held pixels cover for at least
    ``fraction`` is held whole, each of its pixels with the oldest stamp held on it (so the surface
    lets go no later than its oldest part would). The floor a person stands on is another surface
    (a crease at the feet) and far larger than the feet, so the hold stays off it.

    Where the crease is lost (a mover's side meets the floor behind it at its own depth), one surface
    holds a mover and a patch of floor. While the held part of a surface shows motion now (at
    least ``moving_share`` of its held pixels, and one), the cues see that thing move, and pixels they
    call static (``static``) are the static part of the surface: they are not joined. Joined, the
    patch would hold itself (static scenery passes every check of :func:`carry_hold`) and take static
    pixels from the pose; a surface whose held part stands still (a person who stopped) still joins
    all of it, as a still thing looks static everywhere, except what both pair partners the hold came
    from saw as scenery at the same place (``scenery``, :class:`SeenAsScenery`: outside their final mask,
    at the predicted depth). A held thing that no cue sees move (a camouflaged mover; a person who
    stopped) and whose foot meets the floor at its own depth otherwise joined the whole floor, which then
    held itself (camouflage seed 921: 12-16k pixels of floor for 44 frames, mask IoU 0.57); asking the
    nearest partner alone kept a person's arm from being won back once one frame had lost it. What a moving surface
    joins without motion evidence of its own is marked as well (below) where the depth's surfaces cut at a finer
    crease (``FINE_CREASE``) would not have joined it: a camouflaged cylinder whose base met the floor at its own
    depth took a patch of floor without evidence of either kind beside its foot, which then counted towards the
    next frames' floor pieces and crept over the floor (camouflage 1836 at 640x480: to 13 % of the image, mask IoU
    0.52; marked: 0.98). What lies on the mover's own finer surface, or in the finer cut's boundary band, stays
    unmarked (marking all of it, the default sequence's cylinder turning at the image border lost parts: 0.992 ->
    0.979).

    A still surface that does not stand out of its surroundings (:func:`stands_out`: a piece of floor
    or wall that sensor noise cut off the rest) is joined too, but its joined pixels are marked
    (stored as -1 - stamp) and do not count towards a surface's share in later frames. Counted, they
    spread the hold by themselves: the depth's surfaces change from frame to frame (a Kinect's noise
    and disparity steps cut a floor into small pieces, differently each time), so the pixels joined
    as one piece make up a share of another piece the next frame, and a patch of floor held once
    crept over the floor (walking_people seed 773: to 10 % of the image in 2.5 s, mask IoU 0.70).
    Marking every still surface's joined pixels instead loses a mover that pauses (the default
    sequence's cylinder at its turnaround at the image border: the cues see almost none of it).

    Args:
        hold: (H, W) float32 stamps (NaN = not held; < 0: joined and marked, see above).
        held: (H, W) bool pixels held now (:func:`held_pixels`).
        depth: (H, W) float32 metres (0 = no reading).
        fraction: 0..1 share of a surface the held pixels must cover; >= 1 disables.
        crease: see :func:`~dynrecon_ros.mask_cleanup.surface_segments`.
        segments: optional ``surface_segments(depth, crease)``, when the caller has them.
        moving: optional (H, W) bool pixels with motion evidence now (either cue).
        static: optional (H, W) bool pixels known static (their evidence says so; the caller leaves
            out those a pair partner held on the same surface, :func:`carry_hold`'s second output:
            the inside of a mover whose surface slides along itself, where both cues are blind).
            With ``moving``, the guard above; without, none.
        moving_share: 0..1 share of a surface's held pixels with motion evidence that makes it moving.
        max_continuity: 0..1 :func:`stands_out`'s; 1: every surface stands out (nothing marked).
        scenery: optional :class:`SeenAsScenery` of this frame: its pixels are never joined.

    Returns:
        held (H, W) bool and stamps (H, W) float32, both grown.
    """
    if fraction >= 1.0 or not held.any():
        return held, hold
    n, labels = surface_segments(depth, crease) if segments is None else segments
    if n <= 1:
        return held, hold
    lab_held = labels[held]
    hold_held = hold[held]
    counted = hold_held >= 0  # marked pixels (< 0) do not count; NaN >= 0 is False, but held pixels are never NaN

    def covered(surfaces: np.ndarray, count: int) -> np.ndarray:
        """(count,) bool: the surfaces of the (H, W) labels ``surfaces`` that the counted held pixels cover for
        ``fraction``."""
        return np.bincount(surfaces[held], weights=counted, minlength=count) >= \
            fraction * np.maximum(np.bincount(surfaces.ravel(), minlength=count), 1)

    grow = covered(labels, n)
    grow[0] = False
    if not grow.any():
        return held, hold
    oldest = np.full(n, np.inf)
    np.minimum.at(oldest, lab_held, stamps_of(hold_held).astype(np.float64))  # held pixels only: a few thousand
    joined = grow[labels] & ~held
    if scenery is not None and joined.any():
        rows, cols = np.nonzero(joined)
        joined[rows, cols] = ~scenery.at(rows, cols, depth[rows, cols])
    live = np.zeros(n, bool)
    if moving is not None:
        n_mov = np.bincount(lab_held, weights=moving[held], minlength=n)
        live = (n_mov > 0) & (n_mov >= moving_share * np.bincount(lab_held, minlength=n))
        if static is not None:
            joined &= ~(live[labels] & static)
    out = np.array(hold, dtype=np.float32, copy=True)
    lab_joined = labels[joined]
    t = oldest[lab_joined]
    still = grow & ~live & (np.bincount(lab_joined, minlength=n) > 0)
    still[still] = ~stands_out(labels, still, held | joined, depth, max_continuity)[still]
    mark = still[lab_joined]
    if moving is not None:
        # a moving surface's pixels joined without motion evidence of their own are marked where the surfaces cut at
        # a finer crease would not have joined them (a patch of floor at a mover's foot), not where they lie on the
        # mover's own finer surface (what comes into view at the border while it turns)
        cand = live[lab_joined] & ~moving[joined]
        if cand.any():
            n_fine, fine = surface_segments(depth, FINE_CREASE * crease)
            rows, cols = np.nonzero(joined)
            lab_fine = fine[rows[cand], cols[cand]]
            own = covered(fine, n_fine)
            # (the finer cut's boundary pixels, at its creases and depth steps, are left unmarked: marked, the default
            # sequence's cylinder lost its silhouette band at its turnaround, mask IoU 0.992 -> 0.981)
            mark[cand] = (lab_fine > 0) & ~own[lab_fine]
    out[joined] = np.where(mark, -1.0 - t, t).astype(np.float32)
    return held | joined, out


# how far stands_out looks across a surface's edge: past the band of surface_segments' boundary pixels
# (its 7-pixel second differences, 5 x 5 median and 3 x 3 thickening flag up to ~9 pixels around a depth step)
STAND_OUT_REACH_PX = 10


def stands_out(labels: np.ndarray, which: np.ndarray, outside_not: np.ndarray, depth: np.ndarray,
               max_continuity: float, tol: float = 0.05) -> np.ndarray:
    """Which surfaces stand out of their surroundings: a thing in front of the scene, not a piece of a
    larger surface.

    At each pixel of a surface, ``STAND_OUT_REACH_PX`` pixels out in each of the 4 directions, in
    another surface or boundary pixel (and not in ``outside_not``), the inverse depth is compared with
    the linear extrapolation of the surface's own (its pixel and the one as far inside): the
    surroundings continue the surface where they differ by at most ``tol`` of its inverse depth (a
    plane's inverse depth is affine in the pixel coordinates: a tilted floor continues, a person in
    front of a wall does not). A surface stands out where at most ``max_continuity`` of these
    comparisons continue it, or where none can be made (as :func:`~dynrecon_ros.mask_cleanup.drop_background_segments`
    tells a mover from background).

    Args:
        labels: (H, W) int32 :func:`~dynrecon_ros.mask_cleanup.surface_segments` labels (0 = boundary).
        which: (n,) bool surfaces to test (the others come back False).
        outside_not: (H, W) bool pixels that are not surroundings (the held thing itself).
        depth: (H, W) float32 metres (0/NaN = none).
        max_continuity: 0..1.
        tol: relative inverse-depth tolerance.

    Returns:
        (n,) bool.
    """
    n = which.shape[0]
    if not which.any():
        return np.zeros(n, bool)
    h, w = labels.shape
    r = STAND_OUT_REACH_PX
    with np.errstate(divide='ignore', invalid='ignore'):
        inv = np.where(np.isfinite(depth) & (depth > 0), np.float32(1) / depth, np.float32(0)).astype(np.float32)
    lab = np.pad(labels, r)  # 0 (boundary) outside the image
    ip = np.pad(inv, r)  # 0 (no reading): never compared
    skip = np.pad(outside_not, r, constant_values=True)
    mid = (slice(r, r + h), slice(r, r + w))
    l0, i0 = lab[mid], ip[mid]
    base = which[l0] & (i0 > 0)
    cont = np.zeros(n)
    tot = np.zeros(n)
    for dy, dx in ((0, r), (0, -r), (r, 0), (-r, 0)):
        out_ = (slice(r + dy, r + dy + h), slice(r + dx, r + dx + w))
        in_ = (slice(r - dy, r - dy + h), slice(r - dx, r - dx + w))
        sel = base & (lab[out_] != l0) & ~skip[out_] & (ip[out_] > 0) & (lab[in_] == l0) & (ip[in_] > 0)
        if sel.any():
            ls, a = l0[sel], i0[sel]
            c = np.abs(ip[out_][sel] - (2 * a - ip[in_][sel])) <= tol * a
            cont += np.bincount(ls, weights=c, minlength=n)
            tot += np.bincount(ls, minlength=n)
    return which & ((tot == 0) | (cont <= max_continuity * tot))


def update_hold(hold: np.ndarray | None, mask: np.ndarray, moving: np.ndarray, stamp: float) -> np.ndarray:
    """A frame's hold map after its mask is final: ``stamp`` on masked pixels with motion evidence
    now, the inherited stamp (marked or not, see :func:`complete_hold`) on masked pixels without, NaN elsewhere.

    Pixels that the cleaning added without either (region completion, morphology) get no stamp:
    the hold never spreads by itself over static surfaces it touches (it would then sustain itself
    there, since static scenery passes every check of :func:`carry_hold`).

    Args:
        hold: (H, W) float32 the frame's inherited stamps (NaN = none), or None.
        mask: (H, W) uint8 final mask (> 0 = dynamic).
        moving: (H, W) bool pixels with motion evidence in this frame (either cue).
        stamp: the frame's time, seconds.

    Returns:
        (H, W) float32 stamps.
    """
    base = np.full(mask.shape, np.nan, np.float32) if hold is None else np.asarray(hold, dtype=np.float32)
    out = np.where(moving, np.float32(stamp), base)
    out[mask == 0] = np.nan
    return out.astype(np.float32)


def held_pixels(hold: np.ndarray | None, stamp: float, still_after_s: float) -> np.ndarray | None:
    """(H, W) bool pixels still held at ``stamp`` (moved less than ``still_after_s`` seconds ago)."""
    if hold is None:
        return None
    with np.errstate(invalid='ignore'):
        return stamp - stamps_of(hold) < still_after_s


def stamps_of(hold: np.ndarray) -> np.ndarray:
    """(H, W) float32 stamps (NaN = not held) of a hold map, its marked pixels' (stored as -1 - stamp) included."""
    hold = np.asarray(hold, dtype=np.float32)
    return np.where(hold < 0, np.float32(-1) - hold, hold)
