"""Monocular window step: network pointmaps of the window -> global alignment -> poses, depth, focal,
masks (MonST3R + Easi3R, online): the dust3r backend's :class:`~dynrecon_ros.window.WindowStep`
(the RGB-D one: :mod:`dynrecon_ros.rgbd_step`).

Per accepted frame t (:meth:`MonocularWindow.step`):
  1. pairs: the sliding window's pair graph (neighbours + keyframe anchors, ``SlidingWindow.graph``)
     in both directions; the network runs only for pairs not seen before (the predictor caches
     outputs per ordered pair and encoder tokens per frame);
  2. segmentation.mode 'attention' / 'both': Easi3R's masks (:mod:`~dynrecon_ros.attention_segmentation`)
     from the window's decoder cross-attention (returned by the same forward pass) and the frames'
     encoder tokens (k-means, once per window); then the second pass with decoder-1 attention from
     static to dynamic tokens zeroed gives the pointmaps that are aligned and, from its own
     cross-attention, the final masks (Easi3R's);
  3. alignment (:class:`~dynrecon_ros.pointmap_alignment.PointmapAligner`): the first window from
     MST init with the full Adam schedule (DUSt3R objective + MonST3R flow term on the new frame's
     pairs); every later one warm-started from the previous window's state: the new frame placed
     by the robust spanning-tree init, then ``backend.align_warm_iterations`` closed-form sweeps
     over the whole window (data term + MonST3R's flow term on the new frame's pairs, as the
     object-space distance to the flow's line of sight) with the frames already published keeping
     their pose (they fix frame and scale; with ``backend.align_flow: false`` (no flow term)
     and the focal held, the last two sweeps are joint Gauss-Newton steps on all unknowns); the
     optical flow of the new frame's pairs is computed for every window while ``backend.align_flow``
     (default) or the flow segmentation needs it, and its pixels that fail the forward-backward
     check are left out of the flow term (passed as NaN, first window and warm steps alike);
     dynamic pixels are excluded (old frames: their masks; the new frame: the
     previous frame's mask carried along the optical flow, plus its attention mask; a mask over
     more than 90 % of a frame is ignored);
  4. frame and scale, fixed once at the first window: the first frame at ``world_pose``; metres
     from the depth images when frames have them (median ratio, ``metric_scale_from_depth``), else
     ``backend.metric_scale`` metres per network unit, else the first frame's median depth = 1;
  5. intrinsics: a frame's K (camera_info / config) is kept fixed; else the focal is estimated
     (``backend.shared_focal``: one for the stream, or one per frame) with the principal point at
     the centre of the network image;
  6. outputs at input resolution for frames not yet published: pose, depth, K, confidence; then
     segmentation.mode 'flow' / 'both': MonST3R flow segmentation of t and its pair partners from
     the aligned poses and depths (:class:`~dynrecon_ros.segmentation.MotionSegmenter`), combined
     with the attention masks by :func:`~dynrecon_ros.attention_segmentation.combine_masks`.
The first frame alone (no pair yet) gets its depth and focal from the self-pair (t, t).
A frame is skipped with a reason when the network output for it is not finite or its pose jumps
beyond the ``checks`` limits (in the stream's units).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from dynrecon_ros.attention_segmentation import attention_masks, combine_masks, kmeans_labels
from dynrecon_ros.errors import InputError
from dynrecon_ros.flow import warp
from dynrecon_ros.intrinsics import default_principal_point, estimate_focal
from dynrecon_ros.pointmap_alignment import AlignConfig, PointmapAligner, metric_scale_from_depth, transform_state

MAX_DYNAMIC_FRACTION = 0.9  # masks covering more of a frame are not used by the alignment


class MonocularWindow:
    """The monocular window step (see module docstring; a :class:`dynrecon_ros.window.WindowStep`).
    State: the last window's alignment."""

    needs_depth = False
    estimates_intrinsics = True

    def __init__(self, cfg, predictor, flows, segmenter, times, device: str):
        b = cfg.backend
        self.cfg, self.pred, self.flows, self.segmenter, self.times = cfg, predictor, flows, segmenter, times
        self.mode = cfg.segmentation.mode
        self.segment_on = cfg.segmentation.enabled
        self.att_guards = {'min_raw_contrast': cfg.segmentation.attention_min_contrast,
                           'min_separation': cfg.segmentation.attention_min_separation}
        threads = cfg.alignment.threads if cfg.alignment.threads > 0 else None
        self.aligner = PointmapAligner(AlignConfig.from_backend(b, device=device, cpu_threads=threads))
        if torch.device(device).type == 'cuda':
            predictor.tensor_device = device  # pair outputs kept on the aligner's device: a step uploads its new pairs only
        self.state = None  # AlignmentState of the last window (network resolution)
        self.world_pose = None
        self._estimated_K: set[str] = set()  # keys of frames whose K this module estimated
        self._first_depth = None  # (h, w) network-resolution depth of the first frame (stream units)

    # ------------------------------------------------------------------ helpers
    def _K_given(self, frame) -> bool:
        return frame.K is not None and frame.key not in self._estimated_K

    def _outputs_at_input(self, frame, depth_n, conf_n):
        """(depth (H, W) float32, confidence (H, W) float32 in [0, 1)) at input resolution."""
        d, inside = self.pred.to_input(depth_n, frame)
        c, _ = self.pred.to_input(conf_n, frame)
        ok = inside & np.isfinite(d) & (d > 0)
        return np.where(ok, d, 0).astype(np.float32), np.where(ok, 1 - 1 / np.maximum(c, 1), 0).astype(np.float32)

    def _sensor_scale(self, frames, depths_n, masks_n) -> float | None:
        """Metres per stream unit from the frames' depth images (None when none has one)."""
        est, sen, msk = [], [], []
        for k, f in enumerate(frames):
            s = f.meta.get('sensor_depth') if f.meta is not None else None
            if s is None:
                continue
            d, inside = self.pred.to_input(depths_n[k], f)
            est.append(np.where(inside, d, 0))
            sen.append(np.where(np.isfinite(s), s, 0))
            msk.append(np.zeros(d.shape, bool) if masks_n is None else
                       self.pred.to_input(masks_n[k].astype(np.float32), f, nearest=True)[0] > 0.5)
        if not est:
            return None
        try:
            return metric_scale_from_depth(np.stack(est), np.stack(sen), np.stack(msk), min_pixels=10)
        except InputError:
            return None

    # ------------------------------------------------------------------ the step
    def work_frame(self, frame):
        """The frame itself: the predictor resizes for the network."""
        return frame

    def step(self, window, entry, published: set[int], world_pose: np.ndarray) -> str:
        """One window step for the newest ``entry`` of ``window`` (a SlidingWindow). ``published``:
        push indices of frames whose results are out (held). Sets pose, depth, K, masks of the
        window's unpublished entries; returns '' or the reason to skip the new frame."""
        frame = entry.frame
        if frame.depth is not None:  # a depth image only sets the scale; the depth is the network's
            frame.meta = dict(frame.meta or {}, sensor_depth=frame.depth)
            frame.depth = None
        self.world_pose = world_pose
        entries = window.all_entries()
        if len(entries) == 1:
            return self._first(entry)
        t0 = time.perf_counter()
        frames = [e.frame for e in entries]
        pos = {e.index: k for k, e in enumerate(entries)}
        n, t = len(entries), pos[entry.index]
        pairs = [p for a, b in window.graph() if a in pos and b in pos for p in ((pos[a], pos[b]), (pos[b], pos[a]))]
        if not any(t in p for p in pairs):
            return 'not connected to the window (no pair with an earlier frame)'
        use_flow = self.segment_on and self.mode in ('flow', 'both')
        use_att = self.segment_on and self.mode in ('attention', 'both')
        newest_pairs = window.pairs_for_newest()
        # optical flow of the new frame's pairs: for the flow segmentation and for MonST3R's flow term
        # of the alignment (every window; backend.align_flow)
        align_flow = self.cfg.backend.align_flow
        pflows = [self.flows.get(o.key, o.frame.rgb, entry.key, frame.rgb) for o, _ in newest_pairs] \
            if use_flow or align_flow else []
        t0 = self.times.lap('flow', t0)
        out = self.pred.predict_window(frames, pairs, attention=use_att)
        if not self.pred.finite_views(out, pairs, t):
            return 'network output is not finite'
        h, w = out['conf_1'].shape[1:]
        # dynamic masks for the alignment (network resolution)
        masks = np.zeros((n, h, w), bool)
        for k, e in enumerate(entries):
            if e.mask is not None:
                masks[k] = self.pred.to_network(e.mask.astype(np.float32), e.frame, nearest=True) > 0.5
        if use_flow and pflows and newest_pairs[0][0].mask is not None:  # previous mask along the flow
            prior = warp(newest_pairs[0][0].mask.astype(np.float32), pflows[0].bwd) > 0.25
            masks[t] = self.pred.to_network(prior.astype(np.float32), frame, nearest=True) > 0.5
        att_in = None
        if use_att:
            labels = kmeans_labels(self.pred.encoder_tokens(frames))  # both passes cluster the same tokens
            att = self.attention_masks(n, pairs, out, labels, (h, w))
            out = self.pred.reweighted(frames, pairs, att, attention=True)
            if not self.pred.finite_views(out, pairs, t):
                return 'network output (second pass) is not finite'
            att = self.attention_masks(n, pairs, out, labels, (h, w))  # Easi3R's final masks: second pass
            masks |= att
            att_in = [self.pred.to_input(att[k].astype(np.float32), f, nearest=True) for k, f in enumerate(frames)]
            att_in = [(m > 0.5) & inside for m, inside in att_in]
        out = {k: v for k, v in out.items() if not k.startswith('cross_attn')}
        # a mask over nearly the whole frame leaves it no static constraint: ignored by the alignment
        masks[masks.reshape(n, -1).mean(1) > MAX_DYNAMIC_FRACTION] = False
        t0 = self.times.lap('network', t0)
        state = self._align(entries, frames, pairs, out, masks if self.segment_on else None, newest_pairs, pflows,
                            published, t)
        if isinstance(state, str):
            return state
        prev = entries[t - 1]
        if prev.pose is not None:
            reason = self.cfg.checks.jump(np.linalg.inv(prev.pose) @ state.poses[t], frame.stamp - prev.frame.stamp,
                                          unit='stream units')
            if reason:
                return reason
        # commit: outputs of the unpublished frames at input resolution
        self.state = state
        conf_n = {}
        for e_, (i, _) in enumerate(pairs):
            conf_n.setdefault(i, out['conf_1'][e_])
        for k, e in enumerate(entries):
            if e.index in published:
                continue
            e.pose = state.poses[k].copy()
            e.frame.depth, e.data['conf'] = self._outputs_at_input(e.frame, state.depths[k].astype(np.float32),
                                                                   conf_n[k])
            if not self._K_given(e.frame):
                e.frame.K = self.pred.K_from_network(state.focals[k], state.pp, e.frame)
                self._estimated_K.add(e.key)
        t0 = self.times.lap('alignment', t0)
        self._segment(entries, newest_pairs, pflows, att_in, use_flow, published)
        self.times.lap('segmentation', t0)
        keep = {e.key for e in entries}
        self._estimated_K &= keep
        return ''

    def attention_masks(self, n, pairs, out, labels, hw) -> np.ndarray:
        """(n, h, w) bool Easi3R masks at network resolution from one pass's maps in ``out`` and the
        window's (n, h/16, w/16) cluster labels, with the configured optional guards."""
        return attention_masks(n, pairs, out['cross_attn_1'], out['cross_attn_2'], hw, labels=labels,
                               patch=self.pred.patch_size, **self.att_guards) > 0

    def _first(self, entry) -> str:
        """The first frame: pose = world, depth and focal from the self-pair, scale per the rules."""
        f = entry.frame
        out = self.pred.predict_window([f], [(0, 0)])
        if not self.pred.finite_views(out, [(0, 0)], 0):
            return 'network output is not finite'
        pts, conf = out['pts3d_1'][0].astype(np.float64), out['conf_1'][0]
        z = pts[..., 2]
        if (z > 0).mean() < 0.3:
            return f'network gives a positive depth for only {100 * (z > 0).mean():.1f}% of the pixels (min 30%)'
        if not self._K_given(f):
            h, w = z.shape
            pp = default_principal_point(h, w)
            focal = estimate_focal(pts, conf, pp, min_conf=1.0)
            if not np.isfinite(focal) or not (0.1 * max(h, w) < focal < 10 * max(h, w)):
                return f'cannot estimate the focal length from the network pointmap (got {focal:.4g} px); give intrinsics'
            f.K = self.pred.K_from_network(focal, pp, f)
            self._estimated_K.add(f.key)
        zp = np.clip(z, 1e-6, None)
        scale = self._sensor_scale([f], zp[None], None)
        if scale is None:
            scale = self.cfg.backend.metric_scale if self.cfg.backend.metric_scale > 0 else 1 / float(np.median(zp[z > 0]))
        self._first_depth = np.where(z > 0, zp * scale, 0)
        entry.pose = self.world_pose.copy()
        f.depth, entry.data['conf'] = self._outputs_at_input(f, self._first_depth.astype(np.float32), conf)
        return ''

    def _align(self, entries, frames, pairs, out, masks, newest_pairs, pflows, published, t):
        # non-finite outputs of old frames have no weight: the predictor fixed them once, when each
        # pair entered its cache (Dust3rPredictor._entry), with the log-confidence weights 'logw_*'
        fixed_focal, pp = None, None
        if all(self._K_given(f) for f in frames):
            fp = [self.pred.K_to_network(f.K, f) for f in frames]
            fixed_focal, pp = np.array([v[0] for v in fp]), fp[-1][1]
        elif self.state is not None:
            pp = self.state.pp
        flows = {}
        for (o, _), pf in zip(newest_pairs, pflows if self.cfg.backend.align_flow else []):  # MonST3R's flow term
            k = entries.index(o)
            for (a, b), fl, valid in (((k, t), pf.fwd, pf.valid_fwd), ((t, k), pf.bwd, pf.valid_bwd)):
                r = self.pred.network_input(frames[a])
                fl = self.pred.to_network(fl, frames[a]) * np.float32([r.scale_x, r.scale_y])
                # pixels failing the forward-backward check: NaN = no flow there (both alignment paths)
                ok = self.pred.to_network(valid.astype(np.float32), frames[a], nearest=True) > 0.5
                flows[(a, b)] = np.where(ok[..., None], fl, np.nan).astype(np.float32)
        ids = [e.index for e in entries]
        try:
            if self.state is None:  # the first window: MST init, full schedule, then frame and scale
                st = self.aligner.align(pairs, out, masks=masks, flows=flows, frame_ids=ids, fixed_focal=fixed_focal,
                                        pp=pp)
                scale = self._sensor_scale(frames, st.depths, masks)
                if scale is None and self.cfg.backend.metric_scale > 0:
                    scale = self.cfg.backend.metric_scale / float(np.exp(np.mean(np.log(st.pair_scales))))
                if scale is None:
                    ok = (self._first_depth > 0) & (st.depths[0] > 0)
                    if not ok.any():
                        return ('window alignment failed: the first window gives the first frame no pixel of '
                                'positive depth, so the stream has no scale')
                    scale = float(np.median(self._first_depth[ok] / st.depths[0][ok]))
                if not (np.isfinite(scale) and scale > 0):
                    return f'window alignment failed: the first window\'s scale is {scale:.4g}, not a positive number'
                P0 = st.poses[0].copy()
                P0[:3, 3] *= scale
                return transform_state(st, self.world_pose @ np.linalg.inv(P0), scale)
            return self.aligner.align(pairs, out, masks=masks, flows=flows, init=self.state, frame_ids=ids,
                                      fixed_focal=fixed_focal, pp=pp, frozen_ids=published)
        except InputError as exc:
            return f'window alignment failed: {exc}'

    def _segment(self, entries, newest_pairs, pflows, att_in, use_flow, published) -> None:
        """Masks of the window's frames: flow (new frame and its pair partners), attention (all), or both."""
        if not self.segment_on:
            return
        if use_flow and newest_pairs:
            ents, probs, fmasks = self.segmenter.segment_newest(newest_pairs, pflows, measured_depth=False)
            for e, p, mk in zip(ents, probs, fmasks):
                e.data['flow'] = (p, mk)
        for k, e in enumerate(entries):
            flow = e.data.get('flow') if use_flow else None
            if att_in is None:
                if flow is None:
                    continue
                prob, mask = flow
            else:
                a = att_in[k]
                mask = combine_masks(flow[1], a, 'both') if flow is not None else a
                prob = np.maximum(flow[0], a) if flow is not None else a.astype(np.float32)
                mask = mask.astype(np.uint8) * np.uint8(255)
            e.mask = mask > 0  # also for published frames: the prior of later alignments
            if e.index not in published:
                e.data['prob'], e.data['mask'] = prob.astype(np.float32), mask
