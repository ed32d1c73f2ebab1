"""The motion segmentation's parameters (:class:`SegmentationConfig`; the stages are in
:mod:`dynrecon_ros.segmentation`, which re-exports it). Its own module so that the RGB-D pose step, which
reads the sensor's depth noise model from it, does not import the segmentation stages."""
from __future__ import annotations

from dataclasses import dataclass

from dynrecon_ros.errors import InputError


@dataclass
class SegmentationConfig:
    """Parameters of motion segmentation (they become ROS parameters, same names).

    Attributes:
        enabled: when False, :meth:`MotionSegmenter.segment` returns all-static masks.
        mode: 'flow' (MonST3R: optical flow vs ego flow), 'attention' (Easi3R: the network's
            cross-attention, network backends only) or 'both' (union of the two masks).
        threshold: dynamic where the smoothed probability exceeds it (0..1).
        hysteresis: pixels above ``hysteresis * threshold`` connected to pixels above ``threshold``
            are dynamic too (weak evidence inside a slow mover); 1 disables.
        min_flow_px: absolute flow tolerance in pixels (flow noise of DIS on textured regions).
        flow_rel_tol: extra tolerance as a fraction of the ego-flow magnitude (depth/pose noise).
        steepness: exponent s of the soft step ``r^s / (1 + r^s)``, r = error / tolerance.
        refine_pose: refine each pair's relative pose on the flow of the pixels that agree with it
            before computing the ego flow (:func:`refine_relative_pose`, like MonST3R's two-view
            alignment), so pose errors of a few tenths of a degree do not flag the background.
            Off by default: the RGB-D poses after windowed alignment are good to ~0.01 degree, and
            the PnP refinement on DIS flow cost time and lowered the bench's mask IoU (0.89 -> 0.86).
        edge_radius_px: the error of a pixel is the smallest in this radius (pixels), so depth
            edges a pixel off do not light up as motion; 0 disables.
        open_px: radius in pixels of the morphological opening (ellipse) that removes specks; 0 disables.
        close_px: radius in pixels of the closing that fills holes inside movers; 0 disables.
        snap_px: mask boundaries within this many pixels move onto depth edges (flow bleeds
            across silhouettes; depth does not); 0 disables.
        max_continuity: mask pieces (cut at depth steps) whose boundary is depth-continuous with
            their surroundings for more than this fraction are background smeared by the flow and are
            dropped (:func:`drop_background_segments`); 1 disables. The same share tells a still
            surface that the hold's completion joined from one that stands out
            (:func:`~dynrecon_ros.permanence.stands_out`).
        dilate_px: radius of a final dilation that covers the soft boundary of movers; 0 disables.
        min_area_frac: connected dynamic regions smaller than this fraction of the image are dropped.
        temporal_weight: weight (0..1) of the evidence remembered from earlier windows for a frame
            key relative to the evidence of the current window (0 = no memory).
        max_tracked_frames: at most this many frame keys are remembered.
        forget_after_calls: a frame key not seen in this many calls is forgotten.
        threads: threads for the per-pair and per-frame work of one call (NumPy and OpenCV release
            the GIL in their loops, so a second core shares it); 1 = all on the calling thread.
        attention_min_contrast: optional no-motion guard of the attention masks (modes 'attention'
            and 'both'; not Easi3R's, 0 = off, the default): a frame's attention mask is kept only
            when its flagged tokens stand out from the window's other tokens by this robust z-score
            in the raw dynamic-attention score (before Easi3R's per-frame min-max, which stretches
            pure noise to 0..1). 30 clears the motion-free windows and frames of the synthetic tests;
            on the reference's inputs (shared/parity/easi3r) it keeps the planted mover's mask and
            removes the random network's (14-19 % of the pixels, which Easi3R flags).
        attention_min_separation: optional guard (not Easi3R's, 0 = off, the default): the window's
            attention masks are dropped unless the pixels above the Otsu level exceed those below by
            this many standard deviations of the lower part (4 clears the synthetic motion-free
            windows of the unit tests but kept one frame's noise (38 %) of ten on the oracle's
            motion-free stream; on the reference's inputs it acts as the contrast guard; one test for
            the whole window, so a window where only some frames move loses all its masks).
        depth_cue: the geometric cue (:mod:`dynrecon_ros.depth_cue`) beside the flow cue: a pixel
            whose point, moved by the camera motion, lies clearly in front of what the pair's other
            frame measures there is dynamic (movers along the line of sight, textureless or
            camouflaged movers, whose optical flow says little).
        depth_sigma_a, depth_sigma_b: the depth noise model of that cue, ``sigma(z) = a + b (z - 0.4)^2``
            metres (Kinect v1, Nguyen et al. 2012; a stereo or time-of-flight camera: fit a and b to
            its datasheet); the RGB-D pose step's depth gate uses the same model (backend.ransac_depth_sigmas).
        depth_tol_sigmas: the depth difference reaches the cue's tolerance at this many sigmas.
        depth_rel_tol: extra tolerance of that cue as a fraction of the depth (pose error, depth
            taken a few ms off the colour).
        hole_fill_px: pixels without depth within this many pixels of a reading still get flow
            evidence (their flow against the ego flow of the nearest and of the farthest reading
            around the hole); 0 = no evidence there.
        photometric_check: a pair's flow evidence counts only where the optical flow explains the
            other frame's appearance better than the ego flow (gain-compensated sums of absolute
            differences; DIS losing a large displacement otherwise flags static background).
        grow_fraction: region completion (:func:`~dynrecon_ros.mask_cleanup.complete_regions`): a
            smooth depth-connected surface that the mask covers for at least this fraction joins it
            whole (a mover whose motion shows only at its edges); 1 disables.
        grow_static: pixels whose evidence (either cue) stays below this probability are known
            static and never joined by region completion (the textured floor a mover stands on).
        seen_through_share: a depth-connected surface of a frame counts as moving, whole, when one pair's
            other frame saw through at least this share of the surface's points compared there (the
            geometric cue's evidence of motion; at least ~100 pixels): a mover revealed at the border whose
            face slides along itself is invisible to both cues in the adjacent pair, but a longer pair's
            older frame saw the background where it now stands (a pair's verdict on a surface, not averaged
            with the other pairs' evidence); 0 disables.
        seen_empty_share, seen_empty_margin_m: a depth-connected surface of the newest frame counts as moving,
            whole, when an older view than the window's (a far keyframe, at most ``still_after_s`` older) saw
            through at least ``seen_empty_share`` of its points compared there, each by more than the depth
            cue's tolerance plus ``seen_empty_margin_m`` (the drift between poses seconds apart): a person the
            camera left walking and finds standing still elsewhere shows no motion in view, but a view from
            before they stopped there looked through that place (RGB-D only; 0 disables). seen_empty_views: that
            many older views compared a frame, the least recently compared first.
        still_after_s: object permanence (:mod:`dynrecon_ros.permanence`): a region seen moving
            stays dynamic while it stands still (followed by flow and depth) until it leaves, or
            until it has not moved for this many seconds: then it counts as scenery (a parked cart,
            a person who sat down for good); 0 disables.
        hold_grey_tol: a held pixel loses its hold where the frame it inherits from does not look
            the same there (5 x 5 mean absolute grey difference after one gain above this): the
            held thing left, uncovering background at about its depth.
        match_grey_tol: where the ego warp leaves the pair's other frame (the static hypothesis puts the
            point out of its view, so the photometric check has no verdict) and the pair's flow failed
            (forward-backward consistent on less than half of the pixels both frames see), a pair's flow
            evidence counts only if that frame seen through the optical flow looks like the pixel: 5 x 5
            mean absolute grey difference after one gain at most this; above, the flow matched nothing
            (DIS losing a long pair's large displacement ends near zero at the border and passes the
            forward-backward check there: a static scene's border flagged) and the pair gives no evidence
            there. A mover following the camera at the border is matched and keeps it
            (:func:`~dynrecon_ros.flow_cue.flow_match_unconfirmed`); 0 disables.
        scenery_grey_tol: where the photometric check has no verdict, a pair's flow evidence of motion
            (above ``threshold``) does not count when the optical flow landed on a point of the other frame
            that the static hypothesis shows elsewhere in this frame, looking the same there (5 x 5 mean
            absolute grey difference after one gain at most this): the flow matched scenery, not the pixel
            (a wall panned into view beside a near edge, where DIS's flow is near zero)
            (:func:`~dynrecon_ros.flow_cue.matched_scenery_elsewhere`); 0 disables.
        flow_occlusion_check: a pair's flow evidence of motion (above ``threshold``) does not count where the
            other frame reads something nearer, beyond the depth cue's tolerance, where the camera motion puts
            the point: the point is hidden there, and its optical flow matched something else (the background
            a passer-by uncovers, its flow dragged along with the passer-by); those pixels' flow stays out of
            the RGB-D pose too (:attr:`MotionSegmenter.flow_mismatch`). Needs ``depth_cue``.
        crease: relative second difference of inverse depth over 3 pixels that separates two
            surfaces meeting at an angle (a mover's feet and the floor), so completion stops there.
        hold_grow_fraction: a smooth depth-connected surface that held pixels cover for at least this
            fraction is held whole (:func:`~dynrecon_ros.permanence.complete_hold`: a still person's
            hold keeps the limbs and silhouette pixels it would otherwise lose frame by frame); 1
            disables.
        hold_moving_share: while at least this share of a surface's held pixels shows motion now, the
            hold's completion leaves out its pixels known static that no pair partner held on the same
            surface (a patch of floor one surface with a mover whose side meets it at its own
            depth: held, it would hold itself and take static pixels from the pose); > 1 disables.
        colour_snap_px: pixels without a depth reading within this many processing-size pixels of
            the final mask's boundary take the side their colour joins in the input-size colour
            image (:func:`~dynrecon_ros.mask_cleanup.snap_holes_to_colour_edges`: a structured-light
            sensor's shadow beside a mover and its silhouette holes); RGB-D backend only; 0 disables.
    """

    enabled: bool = True
    mode: str = 'flow'
    threshold: float = 0.5
    hysteresis: float = 0.4
    min_flow_px: float = 1.0
    flow_rel_tol: float = 0.15
    steepness: float = 4.0
    refine_pose: bool = False
    edge_radius_px: int = 1
    open_px: int = 3
    close_px: int = 7
    snap_px: int = 6
    max_continuity: float = 0.8
    dilate_px: int = 0
    min_area_frac: float = 0.0005
    temporal_weight: float = 0.7
    max_tracked_frames: int = 64
    forget_after_calls: int = 8
    threads: int = 2
    attention_min_contrast: float = 0.0
    attention_min_separation: float = 0.0
    depth_cue: bool = True
    depth_sigma_a: float = 0.0012
    depth_sigma_b: float = 0.0019
    depth_tol_sigmas: float = 3.0
    depth_rel_tol: float = 0.01
    hole_fill_px: int = 8
    grow_fraction: float = 0.2
    photometric_check: bool = True
    grow_static: float = 0.1
    seen_through_share: float = 0.5
    seen_empty_share: float = 0.5
    seen_empty_margin_m: float = 0.1
    seen_empty_views: int = 1
    still_after_s: float = 5.0
    hold_grey_tol: float = 12.0
    match_grey_tol: float = 12.0
    scenery_grey_tol: float = 12.0
    flow_occlusion_check: bool = True
    crease: float = 0.01
    hold_grow_fraction: float = 0.2
    hold_moving_share: float = 0.01
    colour_snap_px: int = 10

    def __post_init__(self) -> None:
        if self.mode not in ('flow', 'attention', 'both'):
            raise InputError(f"segmentation.mode must be 'flow', 'attention' or 'both', got {self.mode!r}")
        if not 0.0 < self.threshold < 1.0:
            raise InputError(f'segmentation threshold must be in (0, 1), got {self.threshold}')
        if not 0.0 < self.hysteresis <= 1.0:
            raise InputError(f'segmentation hysteresis must be in (0, 1], got {self.hysteresis}')
        if self.min_flow_px <= 0 or self.flow_rel_tol < 0 or self.steepness <= 0:
            raise InputError('segmentation min_flow_px and steepness must be > 0, flow_rel_tol >= 0')
        if not 0.0 <= self.temporal_weight < 1.0:
            raise InputError(f'segmentation temporal_weight must be in [0, 1), got {self.temporal_weight}')
        if self.depth_sigma_a <= 0 or self.depth_sigma_b < 0 or self.depth_tol_sigmas <= 0 or self.depth_rel_tol < 0:
            raise InputError('segmentation depth_sigma_a and depth_tol_sigmas must be > 0, depth_sigma_b and '
                             'depth_rel_tol >= 0')
        for name in ('edge_radius_px', 'open_px', 'close_px', 'snap_px', 'dilate_px', 'hole_fill_px',
                     'colour_snap_px'):
            if getattr(self, name) < 0:
                raise InputError(f'segmentation {name} must be >= 0, got {getattr(self, name)}')
        for name in ('match_grey_tol', 'scenery_grey_tol'):
            if getattr(self, name) < 0:
                raise InputError(f'segmentation {name} must be >= 0 (0 = off), got {getattr(self, name)}')
        if self.max_tracked_frames < 1 or self.forget_after_calls < 1 or self.threads < 1:
            raise InputError('segmentation max_tracked_frames, forget_after_calls and threads must be >= 1')
        for name in ('attention_min_contrast', 'attention_min_separation'):
            if getattr(self, name) < 0:
                raise InputError(f'segmentation {name} must be >= 0 (0 = guard off), got {getattr(self, name)}')
        if not 0.0 < self.grow_fraction <= 1.0 or self.crease <= 0:
            raise InputError('segmentation grow_fraction must be in (0, 1] and crease > 0')
        if self.hold_moving_share < 0:
            raise InputError(f'segmentation hold_moving_share must be >= 0 (> 1 = off), got {self.hold_moving_share}')
        if not 0.0 < self.hold_grow_fraction <= 1.0:
            raise InputError(f'segmentation hold_grow_fraction must be in (0, 1], got {self.hold_grow_fraction}')
        if not 0.0 <= self.seen_through_share <= 1.0:
            raise InputError('segmentation seen_through_share must be in [0, 1] (0 = off), '
                             f'got {self.seen_through_share}')
        if not 0.0 <= self.seen_empty_share <= 1.0 or not self.seen_empty_margin_m >= 0:
            raise InputError('segmentation seen_empty_share must be in [0, 1] (0 = off) and seen_empty_margin_m '
                             f'>= 0, got {self.seen_empty_share}, {self.seen_empty_margin_m}')
        if self.seen_empty_views < 1:
            raise InputError(f'segmentation seen_empty_views must be >= 1, got {self.seen_empty_views}')
        if self.still_after_s < 0:
            raise InputError(f'segmentation still_after_s must be >= 0 (0 = off), got {self.still_after_s}')
        if not 0.0 <= self.grow_static < self.threshold:
            raise InputError('segmentation grow_static must be in [0, threshold)')
        if not 0.0 <= self.max_continuity <= 1.0 or not 0.0 <= self.min_area_frac < 1.0:
            raise InputError('segmentation max_continuity must be in [0, 1] and min_area_frac in [0, 1)')
