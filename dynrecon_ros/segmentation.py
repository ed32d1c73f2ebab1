"""Stage 6, motion segmentation: per-frame dynamic probabilities and masks of a window.

The stages, one module each:
  - :mod:`dynrecon_ros.flow_cue`: optical flow against the ego flow that the aligned poses and depth
    induce (MonST3R style), per pair, checked photometrically (a flow failure is not motion); pixels
    without depth judged against the surfaces around them; evidence carried along the flow to the
    pair's other frame;
  - :mod:`dynrecon_ros.depth_cue`: the geometric cue, measured depth against the depth that the
    camera motion predicts from the pair's other frame, with a z^2 noise model (movers along the
    line of sight, textureless and camouflaged movers);
  - :mod:`dynrecon_ros.mask_cleanup`: threshold with hysteresis, morphology, boundaries snapped to
    depth edges, background smeared by the flow dropped, region completion over depth-connected
    smooth surfaces;
  - :mod:`dynrecon_ros.permanence`: object permanence, a region seen moving stays dynamic while it
    stands still.

:class:`MotionSegmenter` ties them: each cue's pair evidence is averaged per frame over the pairs
where it has any (a frame that is only ever the target j of a pair gets the evidence carried along
the flow) and the larger of the two counts, smoothed over time (state keyed by frame key, so a frame
seen by several overlapping windows gets a stable mask), held where permanence says so and cleaned.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from dynrecon_ros.depth_cue import (fill_candidates, nearest_reading, pair_depth_probability,
                                    receded_surfaces, reverse_depth_probability, seen_empty_surfaces,
                                    seen_through_surfaces)
from dynrecon_ros.errors import InputError
from dynrecon_ros.flow import to_gray
from dynrecon_ros.flow_cue import (ego_explains_appearance, ego_flow, flow_match_unconfirmed,  # noqa: F401
                                   matched_scenery_elsewhere, pair_dynamic_probability, pair_probability,
                                   pair_probability_and_landing, pull_from_source, refine_relative_pose,
                                   splat_to_target)
from dynrecon_ros.mask_cleanup import (clean_mask, complete_regions, drop_background_segments,  # noqa: F401
                                       refine_upsampled_mask, snap_holes_to_colour_edges, snap_to_depth_edges,
                                       surface_segments)
from dynrecon_ros.permanence import SeenAsScenery, carry_hold, complete_hold, held_pixels, update_hold
from dynrecon_ros.segmentation_config import SegmentationConfig  # noqa: F401 (re-exported: its users' name)


_GREY = '_grey'  # a frame's attribute: (its rgb array, that image's (H, W) uint8 grey)


def frame_grey(frame) -> np.ndarray:
    """(H, W) uint8 grey of ``frame.rgb`` (:func:`~dynrecon_ros.flow.to_gray`), converted once per frame and kept
    on it (a frame is in several calls; stage A converts the newest ahead); a new rgb array is converted again."""
    g = frame.__dict__.get(_GREY)
    if g is None or g[0] is not frame.rgb:
        g = (frame.rgb, to_gray(frame.rgb))
        frame.__dict__[_GREY] = g
    return g[1]


_MISMATCH = 2  # a pair's flow_mismatch map among its cues' evidence (0 flow, 1 depth)
_SEEN_THROUGH = 3  # a pair's verdict on frame i's surfaces (depth_cue.seen_through_surfaces): not averaged


def _cue_mean(ps: list[np.ndarray] | None) -> np.ndarray | None:
    """(H, W) float32 mean of one cue's pair evidence for a frame over the pairs that have any there (NaN
    where none has: a pair without evidence (NaN) does not dilute the others'); None without pairs.
    One pair's evidence is its own mean (in [0, 1] or NaN, returned as is, not copied); several are summed
    in pair order (the same float32 sums and counts as one accumulator per frame and cue)."""
    if not ps:
        return None
    if len(ps) == 1:
        return ps[0]
    ok = np.isfinite(ps[0])
    s = np.where(ok, ps[0], np.float32(0))
    cnt = ok.astype(np.float32)
    for p in ps[1:]:
        ok = np.isfinite(p, out=ok)
        s += np.where(ok, p, np.float32(0))
        cnt += ok
    with np.errstate(invalid='ignore', divide='ignore'):
        return np.divide(s, cnt, out=s)  # 0 / 0: NaN


class MotionSegmenter:
    """Per-window motion segmentation with temporal memory keyed by frame key.

    Memory is bounded: at most ``cfg.max_tracked_frames`` keys, and keys not seen in
    ``cfg.forget_after_calls`` calls are dropped.
    """

    def __init__(self, cfg: SegmentationConfig | None = None):
        self.cfg = cfg or SegmentationConfig()
        self._state: OrderedDict[str, tuple[np.ndarray, np.ndarray, int]] = OrderedDict()
        # key -> ((inherited hold map, where a partner held the same surface, SeenAsScenery) or None, hold map
        # after the frame's last cleaning or None, call, that cleaning's (H, W) bool mask or None)
        self._holds: OrderedDict[str, tuple] = OrderedDict()
        self._calls = 0
        # the first stamp seen (float64 s): hold maps keep float32 stamps relative to it (an absolute ROS
        # stamp ~1.7e9 s in float32 is rounded to 128 s, which broke ``still_after_s``)
        self._epoch: float | None = None
        self._pool = None  # worker threads (cfg.threads > 1), started on first use
        # (what, key) -> (fingerprint of the frame's depth, value): per-frame results that later calls reuse
        # (and that :meth:`prepare_frame` computes ahead on another thread: hence the lock)
        self._frame_cache: OrderedDict[tuple[str, str], tuple] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._masks_seen = False  # a cleaned mask had pixels (then stage A prepares the depth's surfaces too)
        # key -> (H, W) bool: where the last call's pairs found the frame's optical flow wrong (it matched scenery
        # shown elsewhere, :func:`matched_scenery_elsewhere`, or its point is hidden in the pair's other frame,
        # ``cfg.flow_occlusion_check``): no motion evidence, and no correspondence for a pose
        self.flow_mismatch: dict[str, np.ndarray] = {}
        # far view key -> (nearest_reading of its depth, the call that last compared it) (_seen_empty)
        self._far: dict[str, tuple[np.ndarray, int]] = {}

    def __len__(self) -> int:
        """Number of frame keys currently remembered."""
        return len(self._state)

    def reset(self) -> None:
        self._state.clear()
        self._holds.clear()
        with self._cache_lock:
            self._frame_cache.clear()
        self._masks_seen = False
        self._calls = 0
        self._epoch = None
        self.flow_mismatch = {}
        self._far = {}

    def segment(self, keys: list[str], depths: np.ndarray, K: np.ndarray, poses: np.ndarray,
                flows: dict, flow_valid: dict | None = None,
                target_flows: dict | None = None,
                need_masks: list[bool] | None = None,
                skip_frames: list[bool] | None = None,
                images: np.ndarray | None = None,
                stamps: list[float] | None = None,
                measured_depth: bool = True, shutter=None, twists: list | None = None,
                far_views: list | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Dynamic probability and mask of every frame of a window.

        Args:
            keys: N frame keys (identify frames across overlapping windows).
            depths: (N, H, W) float32 metres.
            K: (3, 3) shared or (N, 3, 3) per-frame intrinsics.
            poses: (N, 4, 4) camera-to-world.
            flows: {(i, j): (H, W, 2) float32 optical flow from frame i to frame j}, window indices.
            flow_valid: {(i, j): (H, W) bool forward-backward consistent}; missing = all valid.
            target_flows: optional {(i, j): ((H, W, 2) flow from frame j to frame i, (H, W) bool valid or
                None)} for pairs of ``flows`` whose frame j gets its evidence carried from i: with it
                j's pixels sample i's probability where their flow leads (a backward warp, cheap; the
                forward-backward check leaves occluded pixels out), without it i's pixels are
                splatted to j along the flow i -> j, z-buffered.
            need_masks: optional N bools: frames whose mask is not needed (False) still have their
                evidence remembered, but their mask is not cleaned and comes back all zero.
            skip_frames: optional N bools: frames whose evidence is not needed at all (True; e.g.
                frames already output, in the window as anchors): nothing is carried to them, their
                memory is not updated, their probability and mask come back all zero.
            images: optional (N, H, W) uint8 grey images: with them (and ``cfg.photometric_check``)
                a pair's flow evidence is dropped where the ego flow explains the appearance at
                least as well as the optical flow (:func:`~dynrecon_ros.flow_cue.ego_explains_appearance`).
            stamps: optional N frame times (seconds): with them (and ``cfg.still_after_s`` > 0) object
                permanence holds regions seen moving while they stand still (:mod:`dynrecon_ros.permanence`).
            measured_depth: False when ``depths`` are a network's estimate (the monocular backend),
                not a sensor's readings: the geometric cue (its noise model is a sensor's) and the
                photometric check (the ego flow is only as exact as the depth) are then off (with
                1 % pointmap noise they flagged noise and raised the monocular ATE 6.0 -> 8.0 mm).
            shutter, twists: optional rolling-shutter timing (:class:`~dynrecon_ros.rolling_shutter.ShutterModel`)
                and N body twists (6,) (None = unknown): the ego flow of a pair whose two twists are
                known sees each row at its own instant.
            far_views: optional older views of the scene than the window's, [(key, (H, W) float32 depth, (3, 3) K,
                (4, 4) camera-to-world pose, stamp seconds)]: with ``stamps`` and ``cfg.seen_empty_share`` > 0,
                the newest frame's surfaces that a view at most ``cfg.still_after_s`` older saw through are
                dynamic (:func:`~dynrecon_ros.depth_cue.seen_empty_surfaces`).

        Returns:
            probs (N, H, W) float32 in [0, 1] and masks (N, H, W) uint8 (255 = dynamic).
        """
        depths = np.asarray(depths, dtype=np.float32)
        n, h, w = depths.shape
        if len(keys) != n or np.asarray(poses).shape != (n, 4, 4):
            raise InputError(f'segment: {len(keys)} keys, depths {depths.shape}, poses '
                             f'{np.asarray(poses).shape} disagree')
        Ks = np.broadcast_to(np.asarray(K, dtype=np.float64), (n, 3, 3))
        poses = np.asarray(poses, dtype=np.float64)
        self._calls += 1
        if not self.cfg.enabled:
            return np.zeros((n, h, w), np.float32), np.zeros((n, h, w), np.uint8)
        flow_valid = flow_valid or {}
        inv = np.linalg.inv(poses)

        for (i, j), flow in flows.items():
            if not (0 <= i < n and 0 <= j < n) or i == j:
                raise InputError(f'segment: flow pair ({i}, {j}) is not a pair of the {n}-frame window')
            if np.shape(flow) != (h, w, 2):
                raise InputError(f'segment: flow ({i}, {j}) has shape {np.shape(flow)}, expected {(h, w, 2)}')

        skip = [False] * n if skip_frames is None else [bool(x) for x in skip_frames]
        near = None
        if self.cfg.depth_cue and measured_depth:  # per frame, reused by later calls (a frame's depth stays)
            near = {k: self._per_frame('near', keys[k], depths[k], nearest_reading)
                    for k in sorted({k for pr in flows for k in pr})}
        cands = {}
        if self.cfg.hole_fill_px > 0:
            for i in sorted({i for i, _ in flows}):
                cands[i] = self._per_frame('holes', keys[i], depths[i], self._hole_candidates)

        grey = None  # float32 once per frame, not per pair
        if images is not None and self.cfg.photometric_check and measured_depth:
            grey = {k: np.asarray(images[k], dtype=np.float32) for k in sorted({k for pr in flows for k in pr})}

        ego = {}  # (i, j) -> ego flow u, v and depth in j of frame i's points (no rolling shutter)

        def pair(item):  # evidence of one pair: [(cue, frame, probability)] (cue _MISMATCH: flow_mismatch's maps)
            (i, j), flow = item
            mismatch = []
            return pair_evidence(i, j, flow, mismatch) + mismatch

        def pair_evidence(i, j, flow, mismatch):
            carry = (j, i) not in flows and not skip[j]  # frame j gets the evidence carried along the flow
            if skip[i] and not carry:
                return []
            flow = np.asarray(flow, dtype=np.float32)
            sh = None if shutter is None or twists is None or twists[i] is None or twists[j] is None \
                else (shutter, twists[i], twists[j])
            p, zj, (eu, ev), landing = pair_probability_and_landing(
                depths[i], Ks[i], inv[j] @ poses[i], flow, flow_valid.get((i, j)), self.cfg, Ks[j],
                candidates=cands.get(i), shutter=sh)
            if sh is None:  # the hold carried from j to i moves i's points as the ego flow does: reused
                ego[(i, j)] = (eu, ev, zj)
            if images is not None and self.cfg.photometric_check and measured_depth:
                # the ego flow explains the appearance clearly better: a flow failure, static evidence;
                # about as well (a uniform surface, where flow means little): no evidence
                with np.errstate(invalid='ignore'):
                    suspect = p > 0.01  # only flow evidence of motion needs the check
                better, match, gain = ego_explains_appearance(grey[i], grey[j], eu, ev, flow, where=suspect,
                                                              landing=landing)
                with np.errstate(invalid='ignore'):
                    np.copyto(p, np.float32(0), where=better >= 1.0)
                    np.copyto(p, np.float32(np.nan), where=(better >= 0) & (better < 1.0))
                if self.cfg.match_grey_tol > 0:
                    # no verdict (the ego warp leaves frame j), the flow's match does not look the same and the
                    # pair's flow failed elsewhere: the flow found nothing (the point is out of view in j)
                    np.copyto(p, np.float32(np.nan), where=suspect & flow_match_unconfirmed(
                        better, match, eu, ev, self.cfg.match_grey_tol, flow_valid.get((i, j))))
                if self.cfg.scenery_grey_tol > 0:
                    # no verdict, and the flow landed on scenery that frame i shows at its own place: no evidence
                    with np.errstate(invalid='ignore'):
                        cand = np.isnan(better) & (p > np.float32(self.cfg.threshold))
                    wrong = matched_scenery_elsewhere(cand, landing, grey[i], grey[j], depths[j], Ks[i], Ks[j],
                                                      inv[i] @ poses[j], gain, self.cfg.scenery_grey_tol)
                    np.copyto(p, np.float32(np.nan), where=wrong)
                    mismatch.append((_MISMATCH, i, wrong))
            if near is None:
                cues = [p]
            else:
                pd, behind = pair_depth_probability(zj, eu, ev, near[j], self.cfg, hidden=True)
                hidden = behind.copy() if self.cfg.seen_through_share > 0 and not skip[i] else None
                if self.cfg.flow_occlusion_check:
                    # a point that frame j does not see (something nearer stands where the camera motion puts it):
                    # its optical flow matched something else (the background a passer-by uncovers): no evidence
                    with np.errstate(invalid='ignore'):
                        behind &= p > np.float32(self.cfg.threshold)
                    np.copyto(p, np.float32(np.nan), where=behind)
                    mismatch.append((_MISMATCH, i, behind))
                cues = [p, pd]
            out = [] if skip[i] else [(c, i, pc) for c, pc in enumerate(cues)]
            if near is not None and not skip[i] and self.cfg.seen_through_share > 0:
                labels_i = self._per_frame('segments', keys[i], depths[i], self._segments)[1]
                whole = seen_through_surfaces(pd, labels_i, self.cfg.threshold, self.cfg.seen_through_share,
                                              hidden=hidden)
                if whole is not None:
                    out.append((_SEEN_THROUGH, i, whole))
            if carry:
                for c, pc in enumerate(cues):
                    if target_flows and (i, j) in target_flows:
                        back, back_valid = target_flows[(i, j)]
                        pj = pull_from_source(pc, back, back_valid)
                    else:
                        pj = splat_to_target(pc, flow, zj)
                    if c == 1:  # the geometric cue seen from j: what walked away from the camera
                        pj = np.fmax(pj, reverse_depth_probability(
                            pc, zj, eu, ev, depths[j], Ks[j], inv[i] @ poses[j], Ks[i], near[i], self.cfg,
                            shutter=None if sh is None else (sh[0], sh[2], sh[1])))
                        # and what walked away slowly: a whole surface read farther (its median beyond the pair's spread)
                        pj = np.fmax(pj, receded_surfaces(
                            depths[j], self._per_frame('segments', keys[j], depths[j], self._segments),
                            Ks[j], inv[i] @ poses[j], Ks[i], depths[i],
                            shutter=None if sh is None else (sh[0], sh[2], sh[1])))
                    out.append((c, j, pj))
            return out

        # per cue (0 flow, 1 depth) and frame: the pairs' evidence, in pair order (deterministic sums)
        evidence: dict[tuple[int, int], list[np.ndarray]] = {}
        for ev in self._map(pair, list(flows.items())):
            for c, k, p in ev:
                evidence.setdefault((c, k), []).append(p)
        self.flow_mismatch = {keys[k]: np.logical_or.reduce(v) for (c, k), v in evidence.items() if c == _MISMATCH}
        self._seen_empty(far_views, evidence, keys, depths, Ks, poses, stamps, skip, near)
        probs = np.zeros((n, h, w), np.float32)
        masks = np.zeros((n, h, w), np.uint8)
        for k, key in enumerate(keys):
            if not skip[k]:
                # either cue's motion evidence counts (the geometric cue sees what the flow cannot)
                m0, m1 = _cue_mean(evidence.get((0, k))), _cue_mean(evidence.get((1, k)))
                p = np.full((h, w), np.nan, np.float32) if m0 is None and m1 is None else \
                    m0 if m1 is None else m1 if m0 is None else np.fmax(m0, m1)
                if (_SEEN_THROUGH, k) in evidence:  # one pair's verdict on a whole surface: the others do not dilute it
                    p = np.fmax(p, np.fmax.reduce(evidence[(_SEEN_THROUGH, k)]))
                has = p == p  # not NaN (the evidence is in [0, 1] or NaN)
                probs[k] = self._remember(key, np.where(has, p, np.float32(0)), has.astype(np.float32))
        todo = [k for k in range(n) if (need_masks is None or need_masks[k]) and not skip[k]]

        permanence = stamps is not None and self.cfg.still_after_s > 0
        if permanence:  # seconds since the first stamp seen: exact enough in the float32 hold maps
            if self._epoch is None:
                self._epoch = float(stamps[0])
            stamps = [float(s) - self._epoch for s in stamps]

        def inherit(k):
            # the hold maps of frame k's nearest and farthest pair partners in time carried to k, the farthest's
            # where the nearest's holds nothing: a still thing that a passer-by hid in the nearest partner keeps
            # the hold of an older partner that saw it (the depth check still drops what left); and (H, W) bool
            # where either partner held the same surface (the depth check alone, see complete_hold's static), and
            # which of k's pixels both saw as scenery (complete_hold's scenery)
            partners = [j for (i, j) in flows if i == k and self._holds.get(keys[j], (None, None))[1] is not None]
            partners = [j for j in partners if np.isfinite(self._holds[keys[j]][1]).any()]
            if not partners:
                return None, None, None
            by_time = sorted(partners, key=lambda j: abs(stamps[j] - stamps[k]))
            out = was = None
            used = by_time[:1] + by_time[1:][-1:]  # the nearest and the farthest (most likely before a passer-by)
            for j in used:
                h_j, w_j = carry_hold(self._holds[keys[j]][1], depths[k], Ks[k], depths[j], Ks[j], inv[j] @ poses[k],
                                      self.cfg, None if images is None else images[k],
                                      None if images is None else images[j], ego=ego.get((k, j)))
                out = h_j if out is None else np.where(np.isnan(out), h_j, out)
                was = w_j if was is None else was | w_j
            # (the partners' depth as their per-frame nearest readings, or a copy: not a view that keeps the window alive)
            return out, was, SeenAsScenery(Ks[k], [(self._holds[keys[j]][3], depths[j].copy() if near is None else near[j],
                                                     Ks[j], inv[j] @ poses[k]) for j in used], self.cfg)

        holds = {}  # what each frame to clean inherited, (hold, was held, scenery) (never its own earlier verdict: no self-locking)
        if permanence:
            for k in todo:
                holds[k] = self._holds[keys[k]][0] if keys[k] in self._holds else inherit(k)

        def clean(k):
            return self._clean(keys[k], probs[k], depths[k], holds.get(k), stamps[k] if permanence else None)

        for k, (m, hold) in zip(todo, self._map(clean, todo)):
            masks[k] = m
            if permanence:
                self._holds[keys[k]] = (holds[k], update_hold(hold, m, probs[k] > self.cfg.threshold, stamps[k]),
                                        self._calls, m > 0)
        if todo:
            self._masks_seen = bool(masks[todo].any())
        if permanence:  # frames not cleaned now (the newest) inherit the holds just updated
            for k in range(n):
                if k not in holds and not skip[k]:
                    h_k = inherit(k)
                    if h_k[0] is not None:
                        self._holds[keys[k]] = (h_k, None, self._calls, None)
        self._forget()
        return probs, masks

    def _seen_empty(self, far_views, evidence, keys, depths, Ks, poses, stamps, skip, near) -> None:
        """The newest frame's surfaces that one of ``far_views`` (see :meth:`segment`) within ``cfg.still_after_s``
        saw through, into ``evidence`` as a seen-through verdict. At most ``cfg.seen_empty_views`` views a call, the
        least recently compared first (each view's turn comes within a few frames; what one finds is held from then
        on by object permanence)."""
        k = len(keys) - 1
        cfg = self.cfg
        share, margin, n_views = cfg.seen_empty_share, cfg.seen_empty_margin_m, cfg.seen_empty_views
        if not far_views or near is None or stamps is None or skip[k] or share <= 0 or cfg.still_after_s <= 0:
            self._far.clear()
            return
        views = [v for v in far_views if 0 < float(stamps[k]) - float(v[4]) <= cfg.still_after_s]
        alive = {v[0] for v in views}
        self._far = {key: v for key, v in self._far.items() if key in alive}
        views = sorted(views, key=lambda v: (self._far[v[0]][1] if v[0] in self._far else -1, float(v[4])))[:n_views]
        if not views:
            return
        for key, depth_v, _, _, _ in views:
            if key in self._far:
                near_v = self._far[key][0]
            else:  # (stage A's, while the frame is still in the per-frame cache)
                depth_v = np.asarray(depth_v, np.float32)
                near_v = self._per_frame('near', key, depth_v, nearest_reading, compute=False)
                near_v = nearest_reading(depth_v) if near_v is None else near_v
            self._far[key] = (near_v, self._calls)
        n_labels, labels = self._per_frame('segments', keys[k], depths[k], self._segments)
        whole = seen_empty_surfaces(depths[k], Ks[k], labels,
                                    [(self._far[key][0], np.asarray(K_v, np.float64),
                                      np.linalg.inv(np.asarray(pose_v, np.float64)) @ poses[k])
                                     for key, _, K_v, pose_v, _ in views],
                                    cfg, share, margin,
                                    step=max(2, depths.shape[2] // 160),  # (~160 columns sampled at any size)
                                    n_labels=n_labels)
        if whole is not None:
            evidence.setdefault((_SEEN_THROUGH, k), []).append(whole)

    def _clean(self, key: str, prob: np.ndarray, depth: np.ndarray, hold3: tuple | None,
               stamp: float | None) -> tuple[np.ndarray, np.ndarray | None]:
        """One frame's cleaned mask (H, W) uint8 and its completed hold map: ``prob`` (H, W) its remembered
        probability, ``depth`` (H, W), ``hold3`` (hold, was held, scenery) it inherited or None, ``stamp`` seconds
        since the first stamp seen (None: no permanence). Pixels without any evidence are not known static
        (region completion)."""
        p = prob.copy()
        hold, was, scenery = hold3 or (None, None, None)
        held = held_pixels(hold, stamp, self.cfg.still_after_s) if stamp is not None else None
        # the depth's surfaces, found once for the hold's and the mask's completion (prepared in stage A, or
        # found here when the hold needs them, else by clean_mask when its mask has pixels)
        segs = self._per_frame('segments', key, depth, self._segments, compute=False)
        if held is not None and held.any():
            if self.cfg.hold_grow_fraction < 1.0 and segs is None:
                segs = self._per_frame('segments', key, depth, self._segments)
            moving = static = None
            if self.cfg.hold_moving_share <= 1.0:
                # known static, less what a pair partner held on the same surface (the inside of a
                # mover whose surface slides along itself: both cues are blind there)
                with np.errstate(invalid='ignore'):
                    static = (p < self.cfg.grow_static) & (self._state[key][1] > 0)
                if was is not None:
                    static &= ~was
                moving = p > self.cfg.threshold
            held, hold = complete_hold(hold, held, depth, self.cfg.hold_grow_fraction, self.cfg.crease, segs,
                                       moving, static, self.cfg.hold_moving_share, self.cfg.max_continuity,
                                       scenery)
            p[held] = 1.0
        return clean_mask(p, self.cfg, depth, evidence=self._state[key][1] > 0, segments=segs), hold

    def newest_mask(self, key: str, prob: np.ndarray, depth: np.ndarray, stamp: float) -> np.ndarray | None:
        """The cleaned mask (H, W) uint8 of a frame segmented only as the newest of its calls (the last frame of a
        stream, or one whose next frame was skipped): cleaned as :meth:`segment` cleans the older frames, with the
        hold it inherited (object permanence: a person standing still stays masked), from ``prob`` (H, W) its
        probability, ``depth`` (H, W) and ``stamp`` (s). None when its evidence is no longer remembered."""
        if not self.cfg.enabled or key not in self._state:
            return None
        permanence = self.cfg.still_after_s > 0 and self._epoch is not None
        hold3 = self._holds[key][0] if permanence and key in self._holds else None
        mask, _ = self._clean(key, np.asarray(prob, np.float32), np.asarray(depth, np.float32), hold3,
                              float(stamp) - self._epoch if permanence else None)
        return mask

    def _map(self, fn, items: list) -> list:
        """[fn(x) for x in items], on ``cfg.threads`` threads when there is more than one item."""
        if self.cfg.threads <= 1 or len(items) <= 1:
            return [fn(x) for x in items]
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor
            self._pool = ThreadPoolExecutor(max_workers=self.cfg.threads, thread_name_prefix='dynrecon-seg')
        return list(self._pool.map(fn, items))

    def segment_newest(self, pairs, pair_flows, carry_back: bool = False, need_masks=None, skip_frames=None,
                       measured_depth: bool = True, shutter=None, far_views=None):
        """:meth:`segment` over the newest frame of ``pairs`` and its pair partners (the one place that
        assembles a window step's call; the RGB-D and the monocular step both use it).

        Args:
            pairs: [(older entry, newest entry)] of the newest frame's pairs; an entry has ``key``,
                ``frame.depth`` (H, W), ``frame.K`` (3, 3) and ``pose`` (4, 4) camera-to-world.
            pair_flows: one :class:`~dynrecon_ros.flow.PairFlow` per pair (older -> newest).
            carry_back: evidence carried to the older frames along the reverse flow (target_flows).
            need_masks, skip_frames: as :meth:`segment`, one per entry (older ones, then the newest).
            measured_depth: as :meth:`segment` (False: the entries' depth is a network's estimate).
            shutter: as :meth:`segment`; the twists are the entries' ``data['twist']``.
            far_views: as :meth:`segment`: entries older than the window's (``key``, ``frame``, ``pose``).

        Returns:
            entries (older ones, then the newest), probs (N, H, W) float32, masks (N, H, W) uint8.
        """
        ents = [o for o, _ in pairs] + [pairs[0][1]]
        n = len(ents)
        flows = {(n - 1, k): pf.bwd for k, pf in enumerate(pair_flows)}
        valid = {(n - 1, k): pf.valid_bwd for k, pf in enumerate(pair_flows)}
        back = {(n - 1, k): (pf.fwd, pf.valid_fwd) for k, pf in enumerate(pair_flows)} if carry_back else None
        probs, masks = self.segment([e.key for e in ents], np.stack([e.frame.depth for e in ents]),
                                    np.stack([e.frame.K for e in ents]), np.stack([e.pose for e in ents]),
                                    flows, valid, target_flows=back, need_masks=need_masks, skip_frames=skip_frames,
                                    images=np.stack([frame_grey(e.frame) for e in ents])
                                    if all(getattr(e.frame, 'rgb', None) is not None for e in ents) else None,
                                    stamps=[float(e.frame.stamp) for e in ents]
                                    if all(hasattr(e.frame, 'stamp') for e in ents) else None,
                                    measured_depth=measured_depth, shutter=shutter,
                                    twists=[e.data.get('twist') for e in ents] if shutter is not None else None,
                                    far_views=None if not far_views else
                                    [(e.key, e.frame.depth, e.frame.K, e.pose, float(e.frame.stamp)) for e in far_views])
        return ents, probs, masks

    def prepare_frame(self, key: str, depth: np.ndarray | None) -> None:
        """Stage A (:meth:`dynrecon_ros.reconstructor.Reconstructor.prepare`, on another thread than :meth:`segment`):
        the per-frame maps of a new frame's (H, W) depth that the next calls read (nearest reading, hole
        candidates, and the depth's surfaces while masks have pixels), into the per-frame cache: the same
        values as computed in :meth:`segment`, off its path."""
        if not self.cfg.enabled or depth is None:
            return
        depth = np.asarray(depth, dtype=np.float32)
        if self.cfg.depth_cue:
            self._per_frame('near', key, depth, nearest_reading)
        if self.cfg.hole_fill_px > 0:
            self._per_frame('holes', key, depth, self._hole_candidates)
        if self._masks_seen:
            self._per_frame('segments', key, depth, self._segments)

    def _segments(self, depth: np.ndarray) -> tuple:
        """:func:`~dynrecon_ros.mask_cleanup.surface_segments` of a frame's depth (``cfg.crease``)."""
        return surface_segments(depth, self.cfg.crease)

    def _per_frame(self, what: str, key: str, depth: np.ndarray, fn, compute: bool = True):
        """``fn(depth)``, computed once per frame key and depth (a frame is in several calls: the older
        frames of a step are the newest of earlier steps, keyframes are in many); at most
        24 entries, the least recently used dropped. The depth's fingerprint (shape, sum, every 7th pixel)
        guards against a key reused for other data. ``compute`` False: None unless cached. Thread-safe
        (``fn`` runs outside the lock)."""
        fp = (depth.shape, float(depth.sum(dtype=np.float64)), depth[::7, ::7].tobytes())
        with self._cache_lock:
            hit = self._frame_cache.get((what, key))
            if hit is not None and hit[0] == fp:
                self._frame_cache.move_to_end((what, key))
                return hit[1]
        if not compute:
            return None
        value = fn(depth)
        with self._cache_lock:
            self._frame_cache[(what, key)] = (fp, value)
            while len(self._frame_cache) > 24:
                self._frame_cache.popitem(last=False)
        return value

    def _hole_candidates(self, depth: np.ndarray) -> tuple:
        """:func:`~dynrecon_ros.depth_cue.fill_candidates` of one frame (without holes: no candidate
        maps, which would be views of the caller's stacked depths and keep them alive in the cache)."""
        holes, near, far = fill_candidates(depth, self.cfg.hole_fill_px)
        return (holes, near, far) if holes.any() else (holes, None, None)

    def _remember(self, key: str, psum: np.ndarray, pcnt: np.ndarray) -> np.ndarray:
        """Blend this window's evidence for ``key`` with the remembered one; (H, W) probability."""
        a = self.cfg.temporal_weight
        if key in self._state and a > 0:
            osum, ocnt, _ = self._state.pop(key)
            if osum.shape == psum.shape:
                # the old evidence keeps weight a relative to the new (both normalised to one count);
                # in place (fresh image-sized temporaries cost page faults), the same float32 operations
                old = np.maximum(ocnt, np.float32(1e-6))
                old = np.divide(osum, old, out=old)
                new = np.maximum(pcnt, np.float32(1e-6))
                new = np.divide(psum, new, out=new)
                wo = np.float32(a) * (ocnt > 0)
                wn = np.float32(1 - a) * (pcnt > 0)
                old *= wo
                new *= wn
                psum = np.add(old, new, out=old)
                pcnt = np.add(wo, wn, out=wo)
        self._state[key] = (psum, pcnt, self._calls)
        has = pcnt > 0
        with np.errstate(invalid='ignore', divide='ignore'):
            prob = np.maximum(pcnt, np.float32(1e-6))
            prob = np.divide(psum, prob, out=prob)
        np.copyto(prob, np.float32(0), where=~has)
        return np.clip(prob, np.float32(0), np.float32(1), out=prob)

    def _forget(self) -> None:
        for state, when in ((self._state, lambda v: v[2]), (self._holds, lambda v: v[2])):
            for k in [k for k, v in state.items() if self._calls - when(v) >= self.cfg.forget_after_calls]:
                del state[k]
            while len(state) > self.cfg.max_tracked_frames:
                state.popitem(last=False)