"""RGB-D window step: flow + depth pair poses -> windowed pose alignment -> flow segmentation.
Used by the Reconstructor for the RGB-D predictor (:class:`dynrecon_ros.window.WindowStep`; the
network's step is :mod:`dynrecon_ros.monocular`).

The frame first goes to the processing size (:meth:`RGBDStep.work_frame`): depth readings that are
not finite and positive become 0; frames wider than ``max_work_width`` are downscaled by an integer
s (:func:`~dynrecon_ros.work_size.downscale_frame`; 640x480 -> 320x240), the Reconstructor brings the outputs back.
Per accepted frame t (:meth:`RGBDStep.step`):
  1. the first frame defines the world (pose ``world_pose``, confidence where depth is valid);
  2. flow for each pair (older, t) of the pair graph (neighbours + keyframe anchors, nearest first),
     cached by the shared :class:`~dynrecon_ros.flow.FlowCache`;
  3. relative pose per pair from the predictor (RANSAC Umeyama on flow + depth, then direct
     refinement, on the older frame's pixels outside its mask and a band around it: :func:`static_prior`;
     long pairs start from the tracked poses and, under a rolling shutter or a depth delay, hold each
     frame's in-frame velocity to the trajectory's: ``VELOCITY_SIGMA``; a long pair that moves t far from
     where the nearest pair put it is dropped unless another long pair agrees with it, or it spans a frame
     whose nearest pair had no mask prior (a stream's first): :meth:`_long_pair_moves`, and then the nearest
     pair is verified again from where they put it: :meth:`_refit_adjacent` (those prior-less pairs too, once
     aligned: :meth:`_reverify_unmasked`); one that finds no inliers at its start is fitted from scratch when it has
     enough correspondences: ``FALLBACK_MIN``; one with too few inliers, of its own correspondences or beside
     the nearest pair's, is dropped: ``LONG_PAIR_MIN_INLIERS``, ``LONG_PAIR_MIN_SHARE``; when all are, a pair with
     the frame two back stands in: :meth:`RGBDStep._span_pair`),
     initial pose of t from the nearest pair; tracking-lost (inlier ratio) and jump (``checks``) tests;
     once every ``window.keyframe_max_gap`` frames a pair with a keyframe published long ago that still sees
     what t sees (``window.far_keyframes``, pose only: :meth:`RGBDStep._far_pair`, :mod:`dynrecon_ros.far_anchors`);
  4. static correspondences of every pair that gave a pose are stored (:meth:`_make_constraint`), and
     the poses not published yet are aligned over all stored pairs of the window
     (:class:`~dynrecon_ros.alignment.WindowAligner`; published frames and the first are held); under a rolling
     shutter the pairs of the frame ``backend.shutter_smoothing_frames`` back are then refined again with the
     in-frame motions of the aligned trajectory, and the window aligned again (:meth:`_smooth_motions`);
  5. motion segmentation of t and refresh of its pair partners from flow vs ego flow
     (:class:`~dynrecon_ros.segmentation.MotionSegmenter`).
A frame between window steps (``window.step_every``, or the node falling behind) skips all that: :meth:`RGBDStep.track`
pairs it with the newest stepped frame and keyframe, :meth:`RGBDStep.settle` adds the next stepped frame's pair and
aligns its pose alone.
"""
from __future__ import annotations

import time

import cv2
import numpy as np

from dynrecon_ros.alignment import PairConstraint, WindowAligner
from dynrecon_ros.errors import InputError
from dynrecon_ros.far_anchors import FAR_MAX_MOVE_M, FAR_OVERLAP, camera_flow, overlap
from dynrecon_ros.geometry import project, transform_points, unproject_pixels
from dynrecon_ros.rolling_shutter import band_derivatives, trajectory_velocity
from dynrecon_ros.segmentation import frame_grey
from dynrecon_ros.window import SlidingWindow, WindowEntry
from dynrecon_ros.work_size import downscale_frame


# Under a rolling shutter or a depth delay each frame's in-frame velocity is taken from the aligned trajectory for
# its long pairs (keyframe anchors), not carried over from one adjacent pair's fit (0.11-0.12 m/s RMS off,
# uncorrelated with the truth; the long pairs then come out ~1 % short and the trajectory's scale follows them):
# the central difference of its neighbours' aligned poses once the next frame is aligned, the backward difference
# over its adjacent pair for the newest frame (rolling_shutter.trajectory_velocity). The spreads (m/s) are those
# differences' errors on the renderer's hand-held path (0.04 / 0.07). The angular rate and the higher terms stay
# the fitted ones. A depth delay alone (a global-shutter colour camera, depth 10 ms late) needs it as much: its
# long pairs otherwise start the velocity at the pair's mean over 5-8 frames, which hand tremor leaves far from
# the frame's (close_crossing 880-887 ATE 1.92 -> 1.67 mm mean, docs/MEASUREMENTS.md).
VELOCITY_SIGMA = (0.04, 0.07)

# Under a rolling shutter a frame's pairs are refined again once K = backend.shutter_smoothing_frames later frames
# are aligned (:meth:`RGBDStep._smooth_motions`): its in-frame motion then comes from the smoothed trajectory, the
# angular rate and its rate from the K aligned frames on either side (rolling_shutter.band_derivatives), the
# velocity from its neighbours (trajectory_velocity), the linear acceleration near zero. Spreads of that
# prior, m/s, rad/s, m/s^2, rad/s^2: a tenth of the smoothed motion's errors on the renderer's hand-held path
# (every_effect 1300-1308: 0.07 m/s, 0.02 rad/s, 1.3 rad/s^2 RMS off the truth, where a pair's fit is 0.17 m/s and
# 0.08 rad/s off). At the errors themselves a pair's own rows pulled the held motion off the truth (angular rates
# 0.008 -> 0.015-0.019 rad/s off in a static room), and with the renderer's exact motion held so every_effect 1927
# came out 3.78 mm, held 100x tighter 2.55. every_effect 48 never-run seeds (1964-2011): mean ATE 2.346 -> 2.185 mm,
# above 3 mm 6 -> 4, 30 better / 14 worse; static_effects neutral (docs/MEASUREMENTS.md, session 39).
SMOOTHED_SPREAD = (0.005, 0.002, 0.5, 0.1)

# A long pair is verified at the pose its adjacent pair gives the newest frame; when that pair came out off (a close
# person over 45 % of the view, a far wall left: close_crossing seed 905, 12 mm) no correspondence verifies there and
# every long pair was lost, so nothing corrected the frame. A long pair that fails so, with at least this fraction of
# the adjacent pair's verified correspondences (not a keyframe that barely overlaps), is fitted from scratch (RANSAC)
# instead, as an adjacent pair is (under a sensor model its fit also sets the newest frame's in-frame motion)
# (905: 6.53 -> 4.50 mm; 37 other runs of every condition identical: it never fired there).
FALLBACK_MIN = 0.5

# A long pair whose inliers are fewer than this fraction of its verified correspondences is dropped: a keyframe 10+
# frames back that barely overlaps can still verify a handful of points at the tracked pose and refine far off, yet
# weighs in the alignment like a good pair (close_crossing seed 906: 12 -> 24, 117 of 1006, 16 mm off, frame 24 pulled
# 11 mm: 5.96 -> 1.40 mm ATE). Good long pairs keep 27-66 % (the same sequences); of 49 other runs of every condition
# 6 changed, by -0.12 to +0.06 mm (docs/MEASUREMENTS.md).
LONG_PAIR_MIN_INLIERS = 0.2

# A long pair whose inliers are fewer than this fraction of the adjacent pair's is dropped as well. The alignment takes
# ``alignment.points_per_pair`` points of every pair, so such a pair weighs like the adjacent one on a fifth of its
# evidence or less: a keyframe 10-20 frames back that sees only a band of far wall beside a close person, where a
# small rotation error turns into a translation the far points hardly see. every_effect seed 1321: 21 -> 38 with 182
# inliers (the adjacent pair 4211), 16 mm / 0.10 deg off, moved frames 37 / 38 from 5.5 / 4.3 to 11.2 / 19.7 mm off in
# the window alignment (5.3 / 5.2 without it), and the drift stayed: ATE 13.7 -> 5.1 mm. The pairs it drops were 4-8 mm
# off (median per run) where the kept long pairs were 1.4-3.0; every_effect 42 seeds mean 3.39 -> 2.83 mm, 12 never-run
# ones 3.07 -> 3.08 (docs/MEASUREMENTS.md).
LONG_PAIR_MIN_SHARE = 0.2

# A pair's pose uses the older frame's pixels outside its mask and outside a band this fraction of the work width
# around it (3 px at 320): the mask of the newest frame, from motion evidence alone, stops short of the mover's
# silhouette (mixed pixels at the depth edge, the flow smoothed over the occlusion), and the border pixels it misses
# are the mover's, in front of the room. every_effect seed 1305: a person 2.5 m away before a wall 5 m away; 2-6 % of
# the adjacent pairs' inliers lay on its border, 1-10 px outside the mask (median 2-4), and pulled the pairs 10-17 mm
# sideways: ATE 29.5 -> 2.6 mm (docs/MEASUREMENTS.md).
PRIOR_MARGIN = 3 / 320


def static_prior(mask: np.ndarray | None) -> np.ndarray | None:
    """(H, W) bool, a frame's movers -> (H, W) bool, the pixels its pairs' poses may use: outside the mask grown by
    ``PRIOR_MARGIN`` of the width (a disc); None (no mask yet) -> None."""
    if mask is None:
        return None
    r = int(round(PRIOR_MARGIN * mask.shape[1]))
    if r < 1 or not mask.any():
        return ~mask
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    return cv2.dilate(mask.astype(np.uint8), disc) == 0


class RGBDStep:
    """The RGB-D window step (see module docstring). State: the stored pair constraints.

    Args:
        cfg: the pipeline's :class:`~dynrecon_ros.config.ReconConfig`.
        predictor: the :class:`~dynrecon_ros.predictors.rgbd.RGBDPredictor` (``relative_pose``).
        flows, segmenter, times: the Reconstructor's flow cache, motion segmenter and stage timer.
        device: torch device of the alignment.

    Raises InputError when ``segmentation.mode`` needs attention maps (network backends only).
    """

    needs_depth = True
    estimates_intrinsics = False
    far_anchors = True  # pairs with keyframes published long ago (window.far_keyframes): _far_pair

    def __init__(self, cfg, predictor, flows, segmenter, times, device: str):
        mode = cfg.segmentation.mode
        if mode != 'flow':
            raise InputError(f"segmentation.mode {mode!r} needs the decoder attention of a network backend "
                             "(backend dust3r); this backend has none: use segmentation.mode flow")
        self.cfg, self.pred, self.flows, self.segmenter, self.times = cfg, predictor, flows, segmenter, times
        self.aligner = WindowAligner(cfg.alignment, device)
        self._constraints: dict[tuple[int, int], PairConstraint] = {}  # by push indices
        # (a, b, T_a_b, inliers of a) of each stepped pair (by push indices) and the last stepped entries, oldest
        # first: the pairs refined again under a rolling shutter (_smooth_motions)
        self._fits: dict[tuple[int, int], tuple] = {}
        self._stepped: list[WindowEntry] = []
        self._smooth_k = predictor.smoothing_frames
        self._rng = np.random.default_rng(0)
        self._next_far = 0  # push index from which the next far anchor pair is due (_far_pair)
        self._far_failed: set[int] = set()  # far anchors whose pair failed since the last one that held
        # unpublished frames whose adjacent pair had no mask prior -> that pair's older frame (_skips_unmasked)
        self._unmasked: dict[int, int] = {}

    def work_frame(self, frame):
        """The frame at the processing size (see ReconConfig.max_work_width); its depth readings that
        are not finite and positive set to 0 (in place: the outputs carry the cleaned depth)."""
        if frame.depth is not None:  # (d < inf is False for inf and NaN)
            d = np.asarray(frame.depth, dtype=np.float32)
            frame.depth = np.where((d > 0) & (d < np.float32(np.inf)), d, np.float32(0))
        mw = self.cfg.max_work_width
        w = frame.rgb.shape[1]
        if mw <= 0 or w <= mw:
            return frame
        return downscale_frame(frame, -(-w // mw))

    def prepare_frame(self, work, tracked: bool = False) -> None:
        """Stage A's per-frame work on the frame at its processing size (``Reconstructor.prepare``: on the
        caller's thread, while stage B steps the previous frame): what the pose step and the segmentation
        derive from the frame alone (grey levels, gradients and sampling stacks, valid depth, grid points;
        nearest readings, hole candidates, the depth's surfaces), so that stage B finds it computed. The
        same values either way (a frame's images never change once prepared). ``tracked``: a frame between
        window steps (:meth:`track`): the pose's part only."""
        if work.depth is None:
            return
        self.pred.prepare_frame(work)
        if self.cfg.segmentation.enabled and not tracked:  # (a tracked frame is not segmented)
            self.segmenter.prepare_frame(work.key, work.depth)
            if self.cfg.segmentation.photometric_check or self.cfg.segmentation.still_after_s > 0:
                frame_grey(work)

    def step(self, window: SlidingWindow, entry: WindowEntry, published: set[int], world_pose: np.ndarray) -> str:
        """One window step for the newest ``entry`` of ``window``. ``published``: push indices of frames
        whose results are out (held). Sets the entry's pose and confidence, realigns the unpublished
        poses, segments; returns '' or the reason to skip the new frame."""
        frame = entry.frame
        if len(window) == 1 and not window.keyframes:
            # the first accepted frame defines the world
            entry.pose = world_pose.copy()
            entry.data['conf'] = (frame.depth > 0).astype(np.float32) if frame.depth is not None else None
            self._stepped = [entry] if self._smooth_k else []
            return ''
        t = time.perf_counter()
        pairs = window.pairs_for_newest()
        pflows = [self.flows.get(o.key, o.frame.rgb, entry.key, frame.rgb) for o, _ in pairs]
        t = self.times.lap('flow', t)
        rel = []
        statics = [static_prior(old.mask) for old, _ in pairs]
        for k, ((old, _), pf, static) in enumerate(zip(pairs, pflows, statics)):
            init = None
            if k > 0 and rel[0][0] is not None:
                # long pair: predict from the tracked poses and the nearest pair, verify + refine only
                init = np.linalg.inv(old.pose) @ pairs[0][0].pose @ rel[0][0]
            # (a long pair's move test is _long_pair_moves', over all of the frame's pairs)
            T, inl, n = self.pred.relative_pose(old.frame, frame, pf, static, init=init, move_gate=False)
            if T is None and init is not None and n >= FALLBACK_MIN * rel[0][2]:  # (see FALLBACK_MIN)
                T, inl, n = self.pred.relative_pose(old.frame, frame, pf, static, init=None, move_gate=False)
            if k > 0 and T is not None and (inl.sum() < LONG_PAIR_MIN_INLIERS * n or  # (see LONG_PAIR_MIN_INLIERS
                                            inl.sum() < LONG_PAIR_MIN_SHARE * rel[0][1].sum()):  # and _SHARE)
                T = None
            rel.append((T, inl, n))
            if k == 0 and T is not None and self.pred.shutter.active:
                self._newest_velocity(old, entry, T)
        if statics[0] is None and self.cfg.segmentation.enabled:
            self._unmasked[entry.index] = pairs[0][0].index
        overruled = False
        if rel[0][0] is not None and len(rel) > 1:
            rel, agreed = self._long_pair_moves(pairs, rel)
            overruled = any(self._skips_unmasked(pairs[k][0]) for k in agreed)
            if agreed:
                self._refit_adjacent(pairs, pflows[0], statics[0], rel, agreed, entry)
        t = self.times.lap('pose', t)
        T0, inl0, n0 = rel[0]
        prev = pairs[0][0]  # the previous accepted frame
        reason = self._lost(prev, frame, T0, inl0, n0)
        if reason:
            return reason
        entry.pose = prev.pose @ T0
        for e in [old for old, _ in pairs] + [entry]:  # fitted body twists (rolling shutter): segmentation
            if e.data.get('twist') is None:
                e.data['twist'] = self.pred.frame_twist(e.frame)
        # store static correspondences of every pair that produced a pose
        for (old, _), (T, inl, n) in zip(pairs, rel):
            if T is not None:
                self._store_pair(old, entry, T, inl)
        if len(rel) > 1 and all(r[0] is None for r in rel[1:]):  # every long pair dropped: see _span_pair
            self._span_pair(window, entry, pairs, rel)
        if window.far and entry.index >= self._next_far:
            self._far_pair(window, entry, int(rel[0][1].sum()))
        entry.data['conf'] = (pflows[0].valid_bwd & (frame.depth > 0)).astype(np.float32)
        t = time.perf_counter()
        if self.cfg.alignment.enabled:
            self._align(window, published)
            if overruled and self._reverify_unmasked(window, published):
                self._align(window, published)
        if self.pred.shutter.active:
            self._trajectory_velocities(window)
        if self._smooth_k and self._smooth_motions(entry) and self.cfg.alignment.enabled:
            self._align(window, published)
        t = self.times.lap('alignment', t)
        self._segment(pairs, pflows, published, window.far)
        self.times.lap('segmentation', t)
        keep = {e.index for e in window.all_entries()}
        self._constraints = {k: v for k, v in self._constraints.items() if k[0] in keep and k[1] in keep}
        self._fits = {k: v for k, v in self._fits.items() if k[0] in keep and k[1] in keep}
        self._unmasked = {u: a for u, a in self._unmasked.items() if u in keep and a in keep and u not in published}
        return ''

    def _lost(self, prev: WindowEntry, frame, T, inl, n: int) -> str:
        """'' or why ``frame`` is not tracked from ``prev`` by their pair (T (4, 4) or None, inliers, n verified
        correspondences): the tracking-lost (inlier ratio) and jump tests (``checks``)."""
        c = self.cfg.checks
        if T is None or inl.sum() < c.min_inlier_ratio * max(n, 1):
            got = 0 if T is None else int(inl.sum())
            return (f'tracking lost against frame {prev.key}: {got} of {n} '
                    'correspondences fit a rigid motion (sudden jump or unusable image)')
        return c.jump(T, frame.stamp - prev.frame.stamp, where=f' from frame {prev.key}')

    def track(self, anchor: WindowEntry, work, keyframe: WindowEntry | None = None) -> tuple:
        """A tracked frame (``window.step_every`` > 1): ``work`` (at the processing size) against ``anchor``, the
        newest stepped frame, by their pair (the adjacent pair's fit, the anchor's mask as the static prior), and
        against ``keyframe`` (the newest keyframe, when it is another frame) by a long pair verified from there
        (dropped by the step's tests for long pairs). :meth:`settle` gives its final pose.

        Returns (T_anchor_work (4, 4), the anchor pair's backward flow (H, W, 2) work -> anchor, confidence (H, W)
        float32, links: [(entry, PairConstraint entry -> work, inliers)]) or a str: why the frame cannot be tracked (the
        step's tracking-lost and jump tests)."""
        try:
            pf = self.flows.get(anchor.key, anchor.frame.rgb, work.key, work.rgb)
            T, inl, n = self.pred.relative_pose(anchor.frame, work, pf, static_prior(anchor.mask), move_gate=False)
            reason = self._lost(anchor, work, T, inl, n)
            if reason:
                return reason
            me = WindowEntry(-1, work, pose=anchor.pose @ T)
            links = [(anchor, self._make_constraint(anchor, me, T, inl), int(inl.sum()))]
            if keyframe is not None and keyframe is not anchor:
                link = self._link(keyframe, me, links[0][2])
                links += [link] if link else []
            return T, pf.bwd, (pf.valid_bwd & (work.depth > 0)).astype(np.float32), links
        finally:
            self.pred.forget(work)  # its per-frame data: no later pair has it

    def settle(self, work, pose: np.ndarray, links: list, later: WindowEntry | None) -> np.ndarray:
        """A tracked frame's final pose (4, 4) world <- camera: aligned over its :meth:`track` links and, with
        ``later`` (the next stepped frame), a long pair from that one, every other frame held at its pose now.
        Without them its pose rests on one pair, where a stepped frame's is aligned over the pairs of the frames
        after it too (default 1301, the tracked frames: 1.49 mm on the anchor's pair alone, 1.19 with the keyframe's,
        1.06 with the next stepped frame's)."""
        me = WindowEntry(-1, work, pose=np.asarray(pose, dtype=np.float64))
        if later is not None:
            link = self._link(later, me, links[0][2])
            self.pred.forget(work)
            links = links + [link] if link else links
        if len(links) < 2:
            return me.pose
        ents = [e for e, _, _ in links] + [me]
        cons = [PairConstraint(k, len(links), c.pts_a, c.pts_b, c.uv_b, c.weight) for k, (_, c, _) in enumerate(links)]
        res = self.aligner.align(np.stack([e.pose for e in ents]), np.arange(len(ents)) < len(links), cons,
                                 np.stack([e.frame.K for e in ents]))
        return res.poses[-1]

    def _link(self, e: WindowEntry, me: WindowEntry, n_ref: int, pk=None, max_move: float | None = None):
        """(e, PairConstraint e -> me, inliers) from a long pair verified at me's pose, or None when the step's tests
        for long pairs drop it (``n_ref``: the inliers of me's nearest pair, ``LONG_PAIR_MIN_SHARE``'s base; ``pk``:
        the pair's flow, else the flow cache's; ``max_move``: the move gate in m, else the long pairs')."""
        if pk is None:
            pk = self.flows.get(e.key, e.frame.rgb, me.key, me.frame.rgb)
        T, inl, n = self.pred.relative_pose(e.frame, me.frame, pk, static_prior(e.mask),
                                            init=np.linalg.inv(e.pose) @ me.pose,
                                            move_gate=True if max_move is None else max_move)
        if T is None or inl.sum() < LONG_PAIR_MIN_INLIERS * n or inl.sum() < LONG_PAIR_MIN_SHARE * n_ref:
            return None
        return e, self._make_constraint(e, me, T, inl), int(inl.sum())

    def _span_pair(self, window: SlidingWindow, entry: WindowEntry, pairs, rel) -> None:
        """The newest frame left with its adjacent pair alone (every long pair dropped by the gates above, beside a
        close person over the view): a pair with the frame two back in the window, verified from the tracked poses
        and held to the same tests, joins its constraints (pose only), so that one adjacent pair off does not carry
        the frame (close_crossing 905: pair 40 -> 41 13 mm off, frames 42-46 without a long pair). close_crossing
        34 seeds 1.775 -> 1.660 mm, above 3 mm 5 -> 2 (1317 3.55 -> 1.76, 1335 3.75 -> 2.36, 1321 3.33 -> 2.39; 1314
        1.64 -> 2.29); every_effect 54 seeds 2.974 -> 2.964; the other conditions identical (it never fires)."""
        ents = window.entries
        if len(ents) < 3 or any(o is ents[-3] for o, _ in pairs):
            return
        link = self._link(ents[-3], entry, int(rel[0][1].sum()))
        if link is not None:
            self._constraints[(ents[-3].index, entry.index)] = link[1]

    def _far_pair(self, window: SlidingWindow, entry: WindowEntry, n_ref: int) -> None:
        """A pair of the newest frame with a far anchor (``window.far_keyframes``: keyframes older than the window's
        anchors), pose only: the oldest that still sees most of what the newest frame sees (FAR_OVERLAP at the
        tracked poses), verified from the tracked poses and held to the long pairs' tests (:meth:`_link`). Its
        constraint ties the newest frame to a pose published long ago, so the chain of window pairs cannot drift
        away from a place the camera comes back to. One every ``window.keyframe_max_gap`` frames; after a failed
        one, the next frame tries the next anchor."""
        self._far_failed &= {a.index for a in window.far}  # (bounded by the anchors kept)
        for a in window.far:
            if a.index in self._far_failed or overlap(a, entry) < FAR_OVERLAP:
                continue
            flow = self.flows.guided(a.key, a.frame.rgb, entry.key, entry.frame.rgb, camera_flow(a, entry))
            link = self._link(a, entry, n_ref, flow, FAR_MAX_MOVE_M)
            if link is None:
                self._far_failed.add(a.index)
                self._next_far = entry.index + 1
                return
            self._constraints[(a.index, entry.index)] = link[1]
            window.link_far(a, entry)
            self._far_failed.clear()
            self._next_far = entry.index + window.kf_max_gap
            return

    def _long_pair_moves(self, pairs, rel):
        """The long pairs' move test (``backend.long_pair_max_move_m``): a long pair whose refinement moved the
        newest frame farther than that from where the adjacent pair put it is dropped, unless another long pair
        moved it to the same place (within half that distance): then the adjacent pair is the one that is off
        (its flow fit and in-frame motions trade a rotation for a translation over a far background), and the
        agreeing long pairs are kept. rel: [(T_old_new, inliers, n)] in the order of ``pairs`` (adjacent
        first) -> (the same with the dropped pairs' T None, the indices of the agreeing far pairs kept)."""
        max_move = self.cfg.backend.long_pair_max_move_m
        prev = pairs[0][0]
        w0 = prev.pose @ rel[0][0]  # the newest frame's pose by the adjacent pair
        pos = {k: (pairs[k][0].pose @ T)[:3, 3] for k, (T, _, _) in enumerate(rel) if k > 0 and T is not None}
        far = {k for k, p in pos.items() if np.linalg.norm(p - w0[:3, 3]) > max_move}
        keep = {k for k in far if any(np.linalg.norm(pos[k] - pos[m]) < 0.5 * max_move for m in pos if m != k)}
        keep |= {k for k in far if self._skips_unmasked(pairs[k][0])}
        return [(None, r[1], r[2]) if k in far - keep else r for k, r in enumerate(rel)], keep

    def _refit_adjacent(self, pairs, flow, static, rel, agreed: set[int], entry: WindowEntry) -> None:
        """The adjacent pair verified and refined again from where the agreeing long pairs ``agreed`` (indices into
        ``pairs`` / ``rel``, see :meth:`_long_pair_moves`) put the newest frame (the one with the most inliers);
        rel[0] replaced in place when that gives a pose. flow, static: the adjacent pair's flow and static prior.

        Why: those long pairs say the adjacent pair is off, yet it stayed the frame's start and one of its
        constraints in the alignment, as heavy as any long pair. The default sequence, seed 1191: a mover over 42 %
        of the view, a fifth of it outside the previous frame's mask, pulled pairs 9 -> 10 to 12 -> 13 40 mm
        off ("the camera moved with the mover"), while the long pairs 5 -> 10 and 0 -> 10 agreed within 4 mm of
        the truth; the alignment sided with the chain of adjacent pairs (ATE 35.9 mm). Verified at the long
        pairs' pose, the mover's pixels are outliers and the pair comes out right (0.99 mm). It fired 8 times in
        63 runs of every condition (docs/MEASUREMENTS.md)."""
        m = max(agreed, key=lambda k: int(rel[k][1].sum()))
        prev = pairs[0][0]
        init = np.linalg.inv(prev.pose) @ pairs[m][0].pose @ rel[m][0]
        T, inl, n = self.pred.relative_pose(prev.frame, entry.frame, flow, static, init=init, move_gate=False)
        if T is None:
            return
        rel[0] = (T, inl, n)
        if self.pred.shutter.active:
            self._newest_velocity(prev, entry, T)

    def _skips_unmasked(self, old: WindowEntry) -> bool:
        """Whether a long pair from ``old`` to the newest frame spans a frame, not published yet, whose adjacent pair had no mask prior
        (a stream's first pair), while ``old``'s own pose does not rest on one (``backend.startup_long_pairs``):
        then :meth:`_long_pair_moves` keeps it alone, and :meth:`_reverify_unmasked` follows.

        Why: without a mask, slow movers near the camera pass for its motion. walking_people seed 1866 (never-run
        seeds): three people 2-3 m away, under a pixel a frame at 320 wide, over 22 % of the view before a wall
        5 m away; every hypothesis of the first pair lands 20-30 mm off (the wall alone leaves the translation
        free), 12 mm after the refinement, the next pair 6 mm (the first frame's mask near empty). The long pair
        0 -> 2, where the people moved twice as far, came out 2 mm off, but a lone long pair far from the chain
        is dropped, so the trajectory stayed 25 mm off the first frame: ATE 3.23 -> 0.79 mm, IoU 0.907 -> 0.914
        (docs/MEASUREMENTS.md)."""
        return (self.cfg.backend.startup_long_pairs and old.index not in self._unmasked
                and any(u > old.index for u in self._unmasked))

    def _reverify_unmasked(self, window: SlidingWindow, published: set[int]) -> bool:
        """The adjacent pairs fitted without a mask prior (``self._unmasked``) verified and refined again at the
        poses the window's alignment gives them now that long pairs overruled them (:meth:`_long_pair_moves`),
        with the older frame's mask as their prior; each stored constraint replaced where that gives a pose.
        Returns whether one was."""
        by_index = {e.index: e for e in window.all_entries()}
        changed = False
        for u, older in sorted(self._unmasked.items()):
            a, b = by_index.get(older), by_index.get(u)
            if a is None or b is None or (a.index, b.index) not in self._constraints or b.index in published:
                continue
            flow = self.flows.get(a.key, a.frame.rgb, b.key, b.frame.rgb)
            init = np.linalg.inv(a.pose) @ b.pose
            T, inl, _ = self.pred.relative_pose(a.frame, b.frame, flow, static_prior(a.mask), init=init,
                                                move_gate=False)
            if T is not None:
                self._store_pair(a, b, T, inl)
                changed = True
        return changed

    def _store_pair(self, a: WindowEntry, b: WindowEntry, T_a_b: np.ndarray, inliers: np.ndarray) -> None:
        """A pair's pose stored: its static correspondences for the alignment (:meth:`_make_constraint`) and, under
        a rolling shutter, its fit for the refinement again (:meth:`_smooth_motions`)."""
        self._constraints[(a.index, b.index)] = self._make_constraint(a, b, T_a_b, inliers)
        if self._smooth_k:
            self._fits[(a.index, b.index)] = (a, b, T_a_b, inliers)

    def _newest_velocity(self, prev: WindowEntry, entry: WindowEntry, T_prev_new: np.ndarray) -> None:
        """The newest frame's velocity for its long pairs (rolling shutter or depth delay): the backward difference
        over its pair with the previous frame (T_prev_new (4, 4), the pair's pose), held within VELOCITY_SIGMA[1]."""
        v = trajectory_velocity(np.linalg.inv(T_prev_new), np.eye(4), None, entry.frame.stamp - prev.frame.stamp)
        if v is not None:
            self.pred.set_frame_velocity(entry.frame, v, VELOCITY_SIGMA[1])

    def _smooth_motions(self, entry: WindowEntry) -> bool:
        """Under a rolling shutter, with ``entry`` the newest stepped frame: the frame K stepped frames back (K =
        ``backend.shutter_smoothing_frames``) gets its in-frame motion from the aligned poses of the K frames on
        either side (SMOOTHED_SPREAD), and its pairs with older frames that have theirs are refined again with both
        motions held; their constraints replace the first fits'. Returns whether any pair was refined again.

        Why: a pair sees mostly the difference of its two frames' in-frame motions, which its own fit gets 0.03-0.04
        rad/s off under hand tremor, and that error goes into the pair's translation and the trajectory's scale
        (every_effect 1302: 4.27 mm ATE, Sim(3) scale 1.024; the exact motions held: 1.57 mm). The aligned poses
        sampled at the frame rate hold the tremor below its Nyquist limit, but only once frames on both sides are in
        (docs/MEASUREMENTS.md)."""
        k = self._smooth_k
        self._stepped = (self._stepped + [entry])[-(2 * k + 1):]
        if len(self._stepped) < 2 * k + 1:
            return False
        ents = self._stepped
        e = ents[k]
        t = np.array([x.frame.stamp - e.frame.stamp for x in ents])
        dt = np.diff(t)
        if not (dt > 0).all() or dt.max() > 2.5 * np.median(dt):  # frames lost between: their motion is not seen
            return False
        d1, d2 = band_derivatives(np.stack([x.pose for x in ents]), t, 0.4 / float(np.median(dt)))
        v = trajectory_velocity(ents[k - 1].pose, e.pose, ents[k + 1].pose, -t[k - 1], t[k + 1])
        sv, sw, sa, sal = SMOOTHED_SPREAD
        self.pred.set_frame_motion(e.frame, np.concatenate([v, d1[3:], np.zeros(3), d2[3:]]),
                                   np.repeat([sv, sw, sa, sal], 3))
        done = False
        for key, (a, b, T, inl) in list(self._fits.items()):
            if b is e and self.pred.has_frame_motion(a.frame):
                T = self.pred.refine_held(a.frame, e.frame, T, inl)
                self._constraints[key] = self._make_constraint(a, e, T, inl)
                del self._fits[key]
                done = True
        return done

    def _trajectory_velocities(self, window: SlidingWindow) -> None:
        """Each window frame with both neighbours in the window: its velocity from the aligned poses (central
        difference), held within VELOCITY_SIGMA[0] in its later long pairs (rolling shutter or depth delay)."""
        ents = window.entries
        for a, e, b in zip(ents[:-2], ents[1:-1], ents[2:]):
            v = trajectory_velocity(a.pose, e.pose, b.pose, e.frame.stamp - a.frame.stamp,
                                    b.frame.stamp - e.frame.stamp)
            if v is not None:
                self.pred.set_frame_velocity(e.frame, v, VELOCITY_SIGMA[0])

    def _make_constraint(self, a: WindowEntry, b: WindowEntry, T_a_b: np.ndarray, inliers: np.ndarray) -> PairConstraint:
        """Static correspondences a -> b for the alignment, from the pair prediction.

        The points are a's static inlier pixels; their match in b is where the pair's relative pose
        puts them (the predictor's pointmap of the pair: for RGB-D the refined direct alignment,
        which is more precise than the raw flow end points).
        """
        fa, fb = a.frame, b.frame
        da = fa.depth.reshape(-1)
        use = np.flatnonzero(inliers.reshape(-1) & np.isfinite(da) & (da > 0))
        n = self.cfg.alignment.points_per_pair
        if len(use) > n:
            use = self._rng.choice(use, n, replace=False)
        # a's points, unprojected only where used
        vs, us = np.divmod(use, fa.depth.shape[1])
        Pa = unproject_pixels(us, vs, da[use], fa.K)
        Pb = transform_points(np.linalg.inv(T_a_b), Pa)
        uv = np.stack(project(Pb, fb.K), -1)
        return PairConstraint(a.index, b.index, Pa, Pb, uv, np.ones(len(use)))

    def _align(self, window: SlidingWindow, published: set[int]) -> None:
        """Align the window's poses over its stored constraints; published frames and the first held."""
        entries = window.all_entries()
        pos = {e.index: k for k, e in enumerate(entries)}
        cons = []
        for (ia, ib), c in self._constraints.items():
            if ia in pos and ib in pos and len(c.weight):
                cons.append(PairConstraint(pos[ia], pos[ib], c.pts_a, c.pts_b, c.uv_b, c.weight))
        fixed = np.array([e.index in published or e.index == 0 for e in entries])
        if fixed.all() or not cons:
            return
        poses = np.stack([e.pose for e in entries])
        K = np.stack([e.frame.K for e in entries])
        res = self.aligner.align(poses, fixed, cons, K)
        for e, p in zip(entries, res.poses):
            e.pose = p

    def _segment(self, pairs, pflows, published: set[int], far: list | None = None) -> None:
        """Segment the newest frame from its pairs; the older frames of those pairs get refreshed. far: the far
        anchors (older views: what the newest frame shows where one of them saw through arrived since)."""
        new = pairs[0][1]
        ents = [o for o, _ in pairs] + [new]
        # cleaned masks only for frames not emitted yet (older keyframes keep theirs as the pose
        # prior) and not for the newest frame: the next step refreshes it (its neighbour pair) and
        # cleans it then; until then its pose prior is the thresholded probability
        lag0 = self.cfg.window.output_lag == 0
        need = [e.index not in published and (e is not new or lag0) for e in ents]
        skip = [e.index in published for e in ents]
        # a published older frame gets no evidence (neither its own nor carried back along the forward
        # flow): the forward flow's full check is not needed for its pair (the pose checked its grid)
        pflows = [pf.backward_only() if s else pf for pf, s in zip(pflows, skip)]
        _, probs, masks = self.segmenter.segment_newest(pairs, pflows, carry_back=True, need_masks=need,
                                                        skip_frames=skip,
                                                        shutter=self.pred.shutter if self.pred.shutter.active else None,
                                                        far_views=far)
        for e, p, m, nd in zip(ents, probs, masks, need):
            if nd:
                e.data['prob'] = p
                e.data['mask'] = m
                e.mask = m > 0
            elif e is new:
                e.data['prob'] = p
                e.data.pop('mask', None)  # cleaned later (next step or when emitted)
                e.mask = p > self.cfg.segmentation.threshold
        # pixels whose optical flow the segmenter found wrong (segmenter.flow_mismatch): no motion, but no
        # correspondence for a pose either (default, 12 seeds: ATE 0.92 mm kept out, 1.02 when the pose used them)
        for e in ents:
            wrong = self.segmenter.flow_mismatch.get(e.key)
            if wrong is not None and e.mask is not None:
                e.mask = e.mask | wrong
