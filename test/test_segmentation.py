"""Motion segmentation: ego flow by hand-computable cases, the segmenter on a synthetic wall + moving box."""
import numpy as np
import pytest
from scipy import ndimage

from dynrecon_ros.errors import InputError
from dynrecon_ros.flow import fb_consistency
from dynrecon_ros.segmentation import (MotionSegmenter, SegmentationConfig, clean_mask, ego_flow,
                                       pair_dynamic_probability)

F, W, H = 150.0, 160, 120
K = np.array([[F, 0, W / 2], [0, F, H / 2], [0, 0, 1]])


def _T(R=np.eye(3), t=(0, 0, 0)):
    T = np.eye(4)
    T[:3, :3] = R
    T[:3, 3] = t
    return T


def _rot_y(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def test_ego_flow_translation_of_fronto_parallel_plane_is_f_t_over_z():
    z, tx, ty = 2.5, 0.1, -0.05
    flow = ego_flow(np.full((H, W), z, np.float32), K, _T(t=(tx, ty, 0)))
    np.testing.assert_allclose(flow[..., 0], F * tx / z, atol=1e-4)
    np.testing.assert_allclose(flow[..., 1], F * ty / z, atol=1e-4)


def test_ego_flow_forward_motion_is_radial():
    z, tz = 2.0, 0.5  # the camera moves back by 0.5 m: X_j = X_i + (0, 0, 0.5)
    flow = ego_flow(np.full((H, W), z, np.float32), K, _T(t=(0, 0, tz)))
    u, v = np.meshgrid(np.arange(W), np.arange(H))
    np.testing.assert_allclose(flow[..., 0], (u - W / 2) * (z / (z + tz) - 1), atol=1e-4)
    np.testing.assert_allclose(flow[..., 1], (v - H / 2) * (z / (z + tz) - 1), atol=1e-4)


def test_ego_flow_pure_rotation_is_depth_independent_and_a_homography():
    rng = np.random.default_rng(0)
    T = _T(R=_rot_y(0.05))
    f1 = ego_flow(np.full((H, W), 1.0, np.float32), K, T)
    f2 = ego_flow(rng.uniform(0.5, 8, (H, W)).astype(np.float32), K, T)
    np.testing.assert_allclose(f1, f2, atol=1e-3)
    u, v = np.meshgrid(np.arange(W), np.arange(H))
    p = np.stack([u, v, np.ones_like(u)], -1).reshape(-1, 3) @ (K @ _rot_y(0.05) @ np.linalg.inv(K)).T
    expected = (p[:, :2] / p[:, 2:]).reshape(H, W, 2) - np.stack([u, v], -1)
    np.testing.assert_allclose(f1, expected, atol=1e-3)


def test_ego_flow_nan_for_invalid_depth_and_points_behind_camera():
    d = np.full((H, W), 1.0, np.float32)
    d[0, 0], d[0, 1], d[0, 2] = 0, np.nan, -1
    flow = ego_flow(d, K, _T())
    assert np.isnan(flow[0, :3]).all() and np.isfinite(flow[1:]).all()
    np.testing.assert_allclose(flow[1:], 0, atol=1e-4)
    behind = ego_flow(np.full((H, W), 1.0, np.float32), K, _T(t=(0, 0, -2.0)))
    assert np.isnan(behind).all()


# ---------------------------------------------------------------- synthetic wall + moving box scene
WALL_Z, BOX_Z = 3.0, 1.5


def _scene(n=5, box_speed=0.05, noise_px=0.3, seed=0):
    """Camera translating along x and yawing; a wall at world z=3 and a box face at z=1.5 moving in x.

    Returns depths (N,H,W), poses (N,4,4), gt masks (N,H,W) bool and the exact flow function.
    """
    poses = np.stack([_T(_rot_y(0.01 * k), (0.03 * k, 0.01 * k, 0)) for k in range(n)])
    box_x = [-0.35 + box_speed * k for k in range(n)]
    u, v = np.meshgrid(np.arange(W), np.arange(H))
    rays = np.stack([(u - K[0, 2]) / F, (v - K[1, 2]) / F, np.ones_like(u, float)], -1)
    depths, masks = [], []
    for k in range(n):
        dw = rays @ poses[k, :3, :3].T  # world directions of camera rays (camera z = 1)
        t = poses[k, :3, 3]
        s_box = (BOX_Z - t[2]) / dw[..., 2]
        hit = t + s_box[..., None] * dw
        on_box = (hit[..., 0] > box_x[k]) & (hit[..., 0] < box_x[k] + 0.4) & (np.abs(hit[..., 1]) < 0.3)
        depths.append(np.where(on_box, s_box, (WALL_Z - t[2]) / dw[..., 2]).astype(np.float32))
        masks.append(on_box)
    depths, masks = np.stack(depths), np.stack(masks)
    rng = np.random.default_rng(seed)

    def flow(i, j):
        Xc = rays * depths[i][..., None]
        Xw = Xc @ poses[i, :3, :3].T + poses[i, :3, 3]
        Xw[masks[i], 0] += box_x[j] - box_x[i]
        inv = np.linalg.inv(poses[j])
        Xj = Xw @ inv[:3, :3].T + inv[:3, 3]
        uj = F * Xj[..., 0] / Xj[..., 2] + K[0, 2]
        vj = F * Xj[..., 1] / Xj[..., 2] + K[1, 2]
        f = np.stack([uj - u, vj - v], -1)
        return (f + rng.normal(0, noise_px, f.shape)).astype(np.float32)

    return depths, poses, masks, flow


def _pairs(n):
    return [(i, j) for i in range(n) for j in range(n) if i != j and abs(i - j) <= 2]


def _iou(a, b):
    return np.logical_and(a, b).sum() / max(np.logical_or(a, b).sum(), 1)


def test_segmenter_recovers_moving_box():
    depths, poses, gt, flow = _scene()
    n = len(depths)
    flows = {p: flow(*p) for p in _pairs(n)}
    seg = MotionSegmenter(SegmentationConfig())
    probs, masks = seg.segment([str(k) for k in range(n)], depths, K, poses, flows)
    assert probs.shape == (n, H, W) and probs.dtype == np.float32 and masks.dtype == np.uint8
    assert probs.min() >= 0 and probs.max() <= 1 and set(np.unique(masks)) <= {0, 255}
    for k in range(n):
        assert _iou(masks[k] > 0, gt[k]) >= 0.9, (k, _iou(masks[k] > 0, gt[k]))
        assert probs[k][gt[k]].mean() > 0.8 and probs[k][~gt[k]].mean() < 0.05


def test_segmenter_with_forward_flows_only_carries_evidence_to_targets():
    depths, poses, gt, flow = _scene()
    n = len(depths)
    flows = {(i, j): flow(i, j) for i, j in _pairs(n) if i < j}  # last frame is only ever a target
    _, masks = MotionSegmenter().segment([str(k) for k in range(n)], depths, K, poses, flows)
    for k in range(n):
        assert _iou(masks[k] > 0, gt[k]) >= 0.85, (k, _iou(masks[k] > 0, gt[k]))


def test_target_flows_need_masks_and_skip_frames():
    """The reconstructor's options: evidence pulled along j -> i flows instead of splatted, masks
    cleaned only where needed, frames skipped; the same threaded as on one thread."""
    depths, poses, gt, flow = _scene()
    n = len(depths)
    flows = {(n - 1, k): flow(n - 1, k) for k in range(n - 1)}  # the newest frame with each older one
    back = {(n - 1, k): (flow(k, n - 1), None) for k in range(n - 1)}
    keys = [str(k) for k in range(n)]
    p_all, m_all = MotionSegmenter().segment(keys, depths, K, poses, flows, target_flows=back)
    for k in range(n):
        assert _iou(m_all[k] > 0, gt[k]) >= 0.85, (k, _iou(m_all[k] > 0, gt[k]))
    need = [k >= n - 2 for k in range(n)]
    skip = [k == 0 for k in range(n)]
    for threads in (1, 2):
        p, m = MotionSegmenter(SegmentationConfig(threads=threads)).segment(
            keys, depths, K, poses, flows, target_flows=back, need_masks=need, skip_frames=skip)
        assert not p[0].any() and not m[0].any()  # skipped
        assert not m[1:n - 2].any() and np.array_equal(p[1:], p_all[1:])  # remembered, not cleaned
        assert np.array_equal(m[n - 2:], m_all[n - 2:])


def test_segmenter_static_scene_has_no_false_positives():
    depths, poses, gt, flow = _scene(box_speed=0.0, noise_px=0.5)
    n = len(depths)
    flows = {p: flow(*p) for p in _pairs(n)}
    probs, masks = MotionSegmenter().segment([str(k) for k in range(n)], depths, K, poses, flows)
    assert (masks > 0).mean() < 1e-3
    assert probs.mean() < 0.05


def _out_of_view_pair(follow: bool, blur: float = 0.0):
    """A textured wall at 3 m seen by frame 0 and by frame 1 turned 8.6 degrees: frame 1's right edge (about 26
    columns) is out of frame 0's view. The flow 1 -> 0 is zero there, where it passes the forward-backward check,
    and exact but failing that check elsewhere (DIS losing the large displacement). ``follow``: a patch at that
    edge looks the same at the same pixel in both frames (a thing carried with the camera; its flow 0 is a true
    match). ``blur``: the wall's texture blurred by a Gaussian of this many cells (a texture that the camera
    resolves: the same point seen in both frames looks the same). Returns depths (2, H, W), poses (2, 4, 4),
    flows, flow_valid, grey images (2, H, W) uint8, out-of-view and patch (H, W) bool."""
    cv2 = pytest.importorskip('cv2')
    rng = np.random.default_rng(3)
    tex = rng.uniform(0, 255, (200, 400)).astype(np.float32)  # 2 cm cells, about a pixel at 3 m
    if blur:
        tex = cv2.GaussianBlur(tex, (0, 0), blur)
        tex = (tex - tex.mean()) * (60 / tex.std()) + 128  # (contrast restored)
    u, v = np.meshgrid(np.arange(W, dtype=np.float64), np.arange(H, dtype=np.float64))
    rays = np.stack([(u - K[0, 2]) / F, (v - K[1, 2]) / F, np.ones_like(u)], -1)
    poses = np.stack([np.eye(4), _T(_rot_y(0.15))])
    depths, greys = [], []
    for k in range(2):
        X = rays @ poses[k, :3, :3].T
        X *= (WALL_Z / X[..., 2])[..., None]
        depths.append(np.linalg.norm(X, axis=-1) / np.linalg.norm(rays, axis=-1))
        greys.append(cv2.remap(tex, (X[..., 0] / 0.02 + 200).astype(np.float32),
                               (X[..., 1] / 0.02 + 100).astype(np.float32), cv2.INTER_LINEAR))
    depths = np.stack(depths).astype(np.float32)
    ego = ego_flow(depths[1], K, np.linalg.inv(poses[0]) @ poses[1])
    out = (u + ego[..., 0] > W - 1) | (u + ego[..., 0] < 0)
    flow = np.where(out[..., None], np.float32(0), ego).astype(np.float32)
    patch = np.zeros((H, W), bool)
    if follow:
        patch[30:60, W - 14:] = True
        own = rng.uniform(0, 255, (H, W)).astype(np.float32)
        for g in greys:
            g[patch] = own[patch]
    images = np.stack([np.clip(g, 0, 255).astype(np.uint8) for g in greys])
    return depths, poses, {(1, 0): flow}, {(1, 0): out.copy()}, images, out, patch


@pytest.mark.parametrize('follow', [False, True])
def test_failed_flow_that_matched_nothing_out_of_view_is_no_evidence(follow):
    # the static scene's edge that the long pair's other frame does not see: the flow (0) disagrees with the ego
    # flow (out of the image, so the photometric check has no verdict), frame 0 through it does not look like
    # frame 1 (it matched nothing) and the pair's flow failed on the rest of the view: no evidence (it flagged
    # static_effects 700's border: 276 pixels). A patch that follows the camera looks the same: still motion
    depths, poses, flows, valid, images, out, patch = _out_of_view_pair(follow)
    assert 2000 < out.sum() < 4000
    probs, _ = MotionSegmenter().segment(['a', 'b'], depths, K, poses, flows, valid, images=images)
    wall = out & ~patch
    assert (probs[1][wall] > 0.5).mean() < 0.02, (probs[1][wall] > 0.5).mean()
    if follow:  # (its inside: the 5 x 5 match of its edge pixels sees the wall beside it too)
        assert (probs[1][32:58, W - 12:] > 0.5).mean() > 0.95
    off, _ = MotionSegmenter(SegmentationConfig(match_grey_tol=0)).segment(['a', 'b'], depths, K, poses, flows,
                                                                           valid, images=images)
    assert (off[1][wall] > 0.5).mean() > 0.9  # the gate off: the flow's failure reads as motion
    # a pair whose flow holds on the rest of the view gives no sign that it failed: the evidence stays (unless
    # the flow matched scenery that frame 1 shows elsewhere: the next test)
    held, _ = MotionSegmenter(SegmentationConfig(scenery_grey_tol=0)).segment(['a', 'b'], depths, K, poses, flows,
                                                                              images=images)
    assert (held[1][wall] > 0.5).mean() > 0.9


@pytest.mark.parametrize('follow', [False, True])
def test_flow_that_matched_scenery_shown_elsewhere_is_no_evidence(follow):
    # the same edge out of frame 0's view, in a pair whose flow holds elsewhere: the zero flow lands on the wall
    # that frame 1 shows 26 columns to the left, looking the same there (a wall panned into view: stop_and_go 922's
    # held border strip). That match is no evidence. The patch that follows the camera is not where the static
    # hypothesis puts what the flow matched (frame 1 shows wall there): still motion
    depths, poses, flows, _, images, out, patch = _out_of_view_pair(follow, blur=2.0)
    seg = MotionSegmenter()
    probs, _ = seg.segment(['a', 'b'], depths, K, poses, flows, images=images)
    wall = out & ~ndimage.binary_dilation(patch, np.ones((5, 5), bool))  # (a 5 x 5 window reaching the patch sees it)
    assert (probs[1][wall] > 0.5).mean() < 0.02, (probs[1][wall] > 0.5).mean()
    # and the segmenter says where the flow is wrong (the RGB-D pose step keeps those pixels out of its pairs)
    assert seg.flow_mismatch['b'][wall].mean() > 0.9 and not seg.flow_mismatch['b'][patch].any()
    assert seg.flow_mismatch['b'][~out].sum() == 0
    if follow:
        assert (probs[1][32:58, W - 12:] > 0.5).mean() > 0.95
    off, _ = MotionSegmenter(SegmentationConfig(scenery_grey_tol=0)).segment(['a', 'b'], depths, K, poses, flows,
                                                                             images=images)
    assert (off[1][wall] > 0.5).mean() > 0.9  # the check off: the match reads as motion
    # frame 0 exposed 25 % shorter: the pair's gain makes the scenery look the same again
    dark = images.copy()
    dark[0] = np.round(dark[0] * 0.75).astype(np.uint8)
    lit, _ = MotionSegmenter().segment(['a', 'b'], depths, K, poses, flows, images=dark)
    assert (lit[1][wall] > 0.5).mean() < 0.02, (lit[1][wall] > 0.5).mean()


def test_segmenter_disabled_returns_all_static():
    depths, poses, gt, flow = _scene(n=3)
    flows = {(0, 1): flow(0, 1)}
    probs, masks = MotionSegmenter(SegmentationConfig(enabled=False)).segment(['a', 'b', 'c'], depths, K, poses, flows)
    assert not masks.any() and not probs.any()


def test_flow_valid_excludes_pixels():
    depths, poses, gt, flow = _scene(n=2)
    cfg = SegmentationConfig()
    f = flow(0, 1)
    T = np.linalg.inv(poses[1]) @ poses[0]
    valid = ~gt[0]  # say the whole box failed the forward-backward check: no evidence there
    p = pair_dynamic_probability(depths[0], K, T, f, valid, cfg)
    assert np.isnan(p[gt[0]]).all() and np.isfinite(p[~gt[0]]).mean() > 0.9  # (border pixels leave the view)
    assert np.nanmax(p) < 0.5


def test_temporal_state_is_bounded_and_stabilises_masks():
    depths, poses, gt, flow = _scene(n=8)
    cfg = SegmentationConfig(max_tracked_frames=6, forget_after_calls=3)
    seg = MotionSegmenter(cfg)
    win = 4
    seen = []
    for start in range(0, 8 - win + 1):
        idx = list(range(start, start + win))
        flows = {(a, b): flow(idx[a], idx[b]) for a, b in _pairs(win)}
        probs, masks = seg.segment([f'f{k}' for k in idx], depths[idx], K, poses[idx], flows)
        seen.append({f'f{k}': masks[m] for m, k in enumerate(idx)})
        assert len(seg) <= cfg.max_tracked_frames
        for m, k in enumerate(idx):
            assert _iou(masks[m] > 0, gt[k]) >= 0.9
    assert 'f0' not in seg._state  # not seen for >= 3 calls
    # many more calls with fresh keys: memory stays bounded
    for c in range(20):
        seg.segment([f'g{c}a', f'g{c}b'], depths[:2], K, poses[:2], {(0, 1): flow(0, 1)})
        assert len(seg) <= cfg.max_tracked_frames


def test_temporal_memory_blends_evidence_of_a_frame_across_calls():
    depths, poses, gt, flow = _scene(n=2)
    seg = MotionSegmenter(SegmentationConfig(temporal_weight=0.5))
    p1, _ = seg.segment(['a', 'b'], depths, K, poses, {(0, 1): flow(0, 1), (1, 0): flow(1, 0)})
    # same keys again, but now with flows that agree with ego motion everywhere (no mover):
    ego = {(0, 1): ego_flow(depths[0], K, np.linalg.inv(poses[1]) @ poses[0]),
           (1, 0): ego_flow(depths[1], K, np.linalg.inv(poses[0]) @ poses[1])}
    p2, _ = seg.segment(['a', 'b'], depths, K, poses, ego)
    box = gt[0]
    assert p1[0][box].mean() > 0.8
    assert 0.3 < p2[0][box].mean() < 0.7  # half the old evidence remains


def test_clean_mask_removes_specks_and_fills_holes():
    prob = np.zeros((H, W), np.float32)
    prob[40:80, 40:80] = 0.9
    prob[60, 60] = 0.0  # hole
    prob[10, 10] = 0.9  # speck
    m = clean_mask(prob, SegmentationConfig(dilate_px=0))
    assert m[60, 60] == 255 and m[10, 10] == 0
    assert _iou(m > 0, prob > 0.5) > 0.9


def test_bad_config_and_input_are_input_errors():
    with pytest.raises(InputError):
        SegmentationConfig(threshold=1.5)
    with pytest.raises(InputError, match='attention_min_contrast'):
        SegmentationConfig(attention_min_contrast=-1.0)
    with pytest.raises(InputError, match='seen_through_share'):
        SegmentationConfig(seen_through_share=1.5)
    with pytest.raises(InputError):
        MotionSegmenter().segment(['a'], np.ones((2, H, W), np.float32), K, np.stack([np.eye(4)] * 2), {})
    with pytest.raises(InputError):
        MotionSegmenter().segment(['a', 'b'], np.ones((2, H, W), np.float32), K, np.stack([np.eye(4)] * 2),
                                  {(0, 5): np.zeros((H, W, 2), np.float32)})


# ---------------------------------------------------------------- end to end on the synthetic renderer
def segment_sequence(seq, cfg=None, window=5, reach=2):
    """Sliding-window segmentation of a rendered sequence with GT poses and OpenCV DIS flow.

    Returns (N, H, W) uint8 masks (the last window's verdict for every frame) and the segmenter.
    """
    import cv2

    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    gray = [cv2.cvtColor(f.rgb, cv2.COLOR_RGB2GRAY) for f in seq.frames]
    depths = np.stack([f.depth for f in seq.frames])
    cache = {}

    def flow(i, j):
        if (i, j) not in cache:
            cache[(i, j)] = dis.calc(gray[i], gray[j], None)
        return cache[(i, j)]

    seg = MotionSegmenter(cfg or SegmentationConfig())
    n = len(seq.frames)
    out = np.zeros(depths.shape, np.uint8)
    for start in range(n - window + 1):
        idx = list(range(start, start + window))
        pairs = [(a, b) for a in range(window) for b in range(window) if a != b and abs(a - b) <= reach]
        flows = {(a, b): flow(idx[a], idx[b]) for a, b in pairs}
        valid = {(a, b): fb_consistency(flows[(a, b)], flows[(b, a)])
                 for a, b in pairs}
        _, masks = seg.segment([seq.keys[k] for k in idx], depths[idx], seq.K, seq.poses[idx], flows, valid)
        out[idx] = masks
    return out, seg


@pytest.fixture(scope='module')
def rendered():
    from dynrecon_ros.data.synthetic import SyntheticConfig, render_sequence

    return render_sequence(SyntheticConfig(width=320, height=240, frames=12, movers=2, seed=3,
                                           depth_noise=0.001, depth_holes=0.02))


def test_segmenter_matches_ground_truth_on_rendered_sequence(rendered):
    masks, seg = segment_sequence(rendered)
    gt = rendered.masks
    assert gt.mean() > 0.03  # the movers are in view
    ious = [_iou(masks[k] > 0, gt[k]) for k in range(len(gt))]
    fp = np.mean([((masks[k] > 0) & ~gt[k]).sum() / (~gt[k]).sum() for k in range(len(gt))])
    print(f'IoU per frame {np.round(ious, 3)} mean {np.mean(ious):.3f}; false positives {fp:.4f} of static px')
    assert np.mean(ious) >= 0.9 and min(ious) >= 0.85
    assert fp < 0.02


def test_segmenter_on_rendered_sequence_without_movers_flags_nothing():
    from dynrecon_ros.data.synthetic import SyntheticConfig, render_sequence

    seq = render_sequence(SyntheticConfig(width=160, height=120, frames=7, movers=0, seed=5,
                                          depth_noise=0.001, depth_holes=0.02))
    masks, _ = segment_sequence(seq)
    assert (masks > 0).mean() < 0.002


def test_background_smeared_between_and_beside_movers_is_dropped():
    from dynrecon_ros.segmentation import drop_background_segments

    depth = np.full((H, W), 4.0, np.float32)
    depth[20:, 30:60] = 2.0  # mover A
    depth[20:, 70:100] = 2.2  # mover B, a 10 px background gap between them
    depth[20:, 140:152] = 1.5  # mover C near the right border, background strip 152..159
    flow_mask = np.zeros((H, W), np.uint8)
    flow_mask[20:, 30:100] = 1  # the flow smeared A's and B's motion over the gap
    flow_mask[20:, 140:] = 1  # and C's over the strip to the border
    out = drop_background_segments(flow_mask, depth, 0.6)
    truth = depth < 3
    assert _iou(out > 0, truth) > 0.97, _iou(out > 0, truth)
    # a mover occluded by another at almost the same depth keeps both
    both = np.zeros((H, W), np.uint8)
    both[20:, 30:100] = 1
    d2 = np.full((H, W), 4.0, np.float32)
    d2[20:, 30:65] = 1.9
    d2[20:, 65:100] = 2.05
    assert _iou(drop_background_segments(both, d2, 0.6) > 0, both > 0) > 0.97


def test_segment_newest_matches_the_window_result():
    """The reconstructor's call (the newest frame with its older pair partners, PairFlow objects)."""
    from types import SimpleNamespace

    from dynrecon_ros.flow import PairFlow

    depths, poses, gt, flow = _scene(n=3)
    ents = [SimpleNamespace(key=str(k), pose=poses[k], frame=SimpleNamespace(depth=depths[k], K=K)) for k in range(3)]
    pairs = [(ents[1], ents[2]), (ents[0], ents[2])]
    pflows = [PairFlow(flow(o, 2), flow(2, o), None, None) for o in (1, 0)]
    got, probs, masks = MotionSegmenter().segment_newest(pairs, pflows, carry_back=True)
    assert [e.key for e in got] == ['1', '0', '2'] and masks.dtype == np.uint8
    for m, k in zip(masks, (1, 0, 2)):
        assert _iou(m > 0, gt[k]) >= 0.9, (k, _iou(m > 0, gt[k]))
    # a static scene through the same path flags nothing
    d0, p0, _, f0 = _scene(n=2, box_speed=0.0)
    e0 = [SimpleNamespace(key=f's{k}', pose=p0[k], frame=SimpleNamespace(depth=d0[k], K=K)) for k in range(2)]
    _, _, m0 = MotionSegmenter().segment_newest([(e0[0], e0[1])], [PairFlow(f0(0, 1), f0(1, 0), None, None)])
    assert not m0.any()


def test_refine_relative_pose_recovers_pose_despite_movers(rendered):
    import cv2

    from dynrecon_ros.segmentation import refine_relative_pose

    seq = rendered
    g0, g2 = (cv2.cvtColor(seq.frames[k].rgb, cv2.COLOR_RGB2GRAY) for k in (0, 2))
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    f02, f20 = dis.calc(g0, g2, None), dis.calc(g2, g0, None)
    valid = fb_consistency(f02, f20)
    T_true = np.linalg.inv(seq.poses[2]) @ seq.poses[0]
    c, s_ = np.cos(np.deg2rad(0.4)), np.sin(np.deg2rad(0.4))
    T_init = _T(np.array([[c, 0, s_], [0, 1, 0], [-s_, 0, c]]) @ T_true[:3, :3], T_true[:3, 3] + [0.01, -0.005, 0.003])

    def err(T):
        dR = np.rad2deg(np.arccos(np.clip((np.trace(T[:3, :3].T @ T_true[:3, :3]) - 1) / 2, -1, 1)))
        return dR, np.linalg.norm(T[:3, 3] - T_true[:3, 3])

    T = refine_relative_pose(seq.frames[0].depth, seq.K, T_init, f02, valid)
    assert err(T)[0] < 0.1 and err(T)[1] < 0.005, err(T)
    # segmentation fed the perturbed pose: refinement keeps the background static
    depths = np.stack([seq.frames[k].depth for k in (0, 2)])
    P = np.stack([seq.poses[0], seq.poses[0] @ np.linalg.inv(T_init)])
    flows, fv = {(0, 1): f02, (1, 0): f20}, {(0, 1): valid, (1, 0): fb_consistency(f20, f02)}
    _, refined = MotionSegmenter(SegmentationConfig(refine_pose=True)).segment(['a', 'b'], depths, seq.K, P, flows, fv)
    _, raw = MotionSegmenter(SegmentationConfig(refine_pose=False)).segment(['a', 'b'], depths, seq.K, P, flows, fv)
    gt = seq.masks[0]
    assert _iou(refined[0] > 0, gt) >= 0.85 and _iou(refined[0] > 0, gt) > _iou(raw[0] > 0, gt) + 0.05, \
        (_iou(refined[0] > 0, gt), _iou(raw[0] > 0, gt))


def test_all_invalid_depth_frame_gives_empty_mask_without_error():
    depths, poses, gt, flow = _scene(n=3)
    flows = {p: flow(*p) for p in _pairs(3)}
    depths[1] = 0.0  # a frame whose depth failed entirely
    Ks = np.stack([K] * 3)  # per-frame intrinsics are accepted too
    probs, masks = MotionSegmenter().segment(['a', 'b', 'c'], depths, Ks, poses, flows)
    assert np.isfinite(probs).all()
    assert _iou(masks[0] > 0, gt[0]) >= 0.9 and _iou(masks[2] > 0, gt[2]) >= 0.9
    # frame b has no depth of its own; it only gets evidence carried from a and c
    assert (masks[1] > 0).mean() < gt[1].mean() * 1.5


# ---------------------------------------------------------------- the geometric cue and depth holes
def _approaching_box(n=4, step=0.12):
    """A static camera, a wall at 3 m and a box face walking toward the camera (1.8 m, then nearer by
    ``step`` per frame): its optical flow is the ego flow (zero; a textureless face shows none)."""
    poses = np.stack([np.eye(4)] * n)
    depths = np.full((n, H, W), WALL_Z, np.float32)
    gt = np.zeros((n, H, W), bool)
    gt[:, 30:90, 50:110] = True
    for k in range(n):
        depths[k][gt[k]] = 1.8 - step * k
    flows = {p: np.zeros((H, W, 2), np.float32) for p in _pairs(n)}
    return depths, poses, gt, flows


@pytest.mark.parametrize('depth_cue', [True, False])
def test_geometric_cue_catches_a_mover_along_the_line_of_sight(depth_cue):
    depths, poses, gt, flows = _approaching_box()
    n = len(depths)
    _, masks = MotionSegmenter(SegmentationConfig(depth_cue=depth_cue)).segment(
        [str(k) for k in range(n)], depths, K, poses, flows)
    ious = [_iou(masks[k] > 0, gt[k]) for k in range(1, n)]  # frame 0: the box is farthest there, nothing vacated
    if depth_cue:
        assert min(ious) >= 0.9, ious
    else:
        assert max(ious) < 0.1, ious


def test_geometric_cue_flags_nothing_on_a_static_scene_with_sensor_noise():
    """Kinect-like noise (the cue's own model) and quantised depth on a static wall + box."""
    depths, poses, _, flow = _scene(box_speed=0.0, noise_px=0.3)
    rng = np.random.default_rng(4)
    sigma = 0.0012 + 0.0019 * (depths - 0.4) ** 2
    noisy = (depths + rng.standard_normal(depths.shape) * sigma).astype(np.float32)
    noisy = (np.round(noisy * 200) / 200).astype(np.float32)  # 5 mm steps
    n = len(depths)
    probs, masks = MotionSegmenter().segment([str(k) for k in range(n)], noisy, K, poses,
                                             {p: flow(*p) for p in _pairs(n)})
    assert not masks.any() and probs.mean() < 0.05


def _boxes_and_a_receding_one(n=4, step=0.014, noise=False, seed=5):
    """A static camera before a wall at 4 m and four static boxes (2-3.5 m), and a box face walking slowly away
    from the camera: 2.8 m, then ``step`` farther a frame (0.5 %: 1.5 cm, a third of the per-pixel tolerance
    there). Its flow is the ego flow (zero): a world-fixed pattern, or straight-away motion. The pipeline's
    flows: newest -> each older frame (the older ones get their evidence carried). ``noise``: Kinect-like
    noise (the cue's own model) and 5 mm steps on every frame."""
    depths = np.full((n, H, W), 4.0, np.float32)
    gt = np.zeros((n, H, W), bool)
    for z, (r, c) in zip((2.0, 2.5, 3.0, 3.5), ((5, 5), (5, 110), (75, 5), (75, 110))):
        depths[:, r:r + 38, c:c + 45] = z
    gt[:, 40:80, 58:102] = True
    for k in range(n):
        depths[k][gt[k]] = 2.8 + step * k
    if noise:
        rng = np.random.default_rng(seed)
        depths = depths + rng.standard_normal(depths.shape) * (0.0012 + 0.0019 * (depths - 0.4) ** 2)
        depths = (np.round(depths * 200) / 200).astype(np.float32)
    flows = {(n - 1, k): np.zeros((H, W, 2), np.float32) for k in range(n - 1)}
    return depths, np.stack([np.eye(4)] * n), gt, flows


@pytest.mark.parametrize('pooled, noise', [(True, False), (False, False), (True, True)])
def test_a_mover_walking_slowly_away_is_caught_over_its_whole_surface(pooled, noise, monkeypatch):
    """Each pixel steps back less than its tolerance; the surface's median steps back beyond the spread of
    the pair's static surfaces (depth_cue.receded_surfaces): with it the older frames mask the box, without it
    nothing. With Kinect-like noise too (each median's own sampling error, RECEDE_SE_FACTOR, stays below the
    box's 0.5 % a frame)."""
    from dynrecon_ros import depth_cue

    if not pooled:
        monkeypatch.setattr(depth_cue, 'RECEDE_FLOOR', np.inf)
    depths, poses, gt, flows = _boxes_and_a_receding_one(noise=noise)
    n = len(depths)
    _, masks = MotionSegmenter().segment([str(k) for k in range(n)], depths, K, poses, flows)
    ious = [_iou(masks[k] > 0, gt[k]) for k in range(n - 1)]
    if pooled:
        assert min(ious) >= 0.9, ious
    else:
        assert max(ious) < 0.1, ious


def test_the_pooled_depth_test_flags_no_static_surface_under_sensor_noise():
    """The same scene with the box standing still, Kinect-like noise and 5 mm quantisation: no surface's median
    leaves the pair's spread."""
    from dynrecon_ros.depth_cue import receded_surfaces
    from dynrecon_ros.mask_cleanup import surface_segments

    depths, poses, _, flows = _boxes_and_a_receding_one(n=6, step=0.0, noise=True)
    _, masks = MotionSegmenter().segment([str(k) for k in range(6)], depths, K, poses, flows)
    assert not masks.any()
    for k in range(5):
        segs = surface_segments(depths[k], SegmentationConfig().crease)
        assert segs[0] > 5  # (the test compares surfaces)
        assert np.isnan(receded_surfaces(depths[k], segs, K, np.eye(4), K, depths[5])).all()


@pytest.mark.parametrize('own_error_term', [True, False])
def test_the_pooled_depth_test_holds_a_noisy_far_surface_to_its_own_sampling_error(own_error_term, monkeypatch):
    """The renderer's static room with every sensor effect, seed 1600: a box at 4.6 m whose pooled depth the first
    pairs read 0.31 % farther than the pair's centre (a Kinect's disparity steps are 1.3 % of z there, its noise
    0.8 %) was flagged by the 0.2 % floor, 3647 pixels on frames 0-2. Held to its median's own sampling error
    (depth_cue.RECEDE_SE_FACTOR) no pair flags a surface and no pixel is masked. (Without it the pairs flag the
    box; since the landing error is taken from the surfaces' own slants the frames' masks no longer show it.)"""
    from dynrecon_ros import depth_cue, segmentation
    from dynrecon_ros.config import ReconConfig
    from dynrecon_ros.data.scenarios import scenario_config
    from dynrecon_ros.data.synthetic import render_sequence
    from dynrecon_ros.reconstructor import Reconstructor

    if not own_error_term:
        monkeypatch.setattr(depth_cue, 'RECEDE_SE_FACTOR', 0.0)
    pooled_flags = []

    def recording(*args, **kwargs):
        out = depth_cue.receded_surfaces(*args, **kwargs)
        pooled_flags.append(int(np.isfinite(out).sum()))
        return out
    monkeypatch.setattr(segmentation, 'receded_surfaces', recording)
    cfg = scenario_config('static_effects', seed=1600, frames=8)
    rc = ReconConfig()
    rc.backend.rolling_shutter_s, rc.backend.depth_delay_s = cfg.rolling_shutter, cfg.depth_delay
    rec = Reconstructor(rc, device='cpu')
    out = [r for f in render_sequence(cfg).frames for r in rec.push(f)] + rec.flush()
    flagged = [int((r.mask > 0).sum()) for r in out if r.status == 'ok']
    assert len(flagged) == 8
    assert len(pooled_flags) >= 8
    if own_error_term:
        assert sum(flagged) == 0 and sum(pooled_flags) == 0, (flagged, pooled_flags)
    else:
        assert sum(pooled_flags) > 1000, pooled_flags


@pytest.mark.parametrize('landing_error_term, noise', [(True, False), (False, False), (True, True)])
def test_the_pooled_depth_test_allows_for_a_landing_a_pixel_off_on_slanted_surfaces(landing_error_term, noise,
                                                                                     monkeypatch):
    """A floor seen at a grazing angle reads ~1 % off when the pair's landing is a pixel off (depth taken a few
    ms after colour under hand tremor); the test takes that error from the pair's slanted surfaces: the floor
    stays static, a fronto-parallel box that stepped back 0.6 % is still caught. With Kinect-like noise and
    5 mm steps too: a surface's slant is the median of its signed gradients (the median of their magnitudes
    counted the noise as slant on every fronto-parallel surface, diluted the landing error, and flagged the floor
    on 4 of 5 noise seeds; static_effects 1691 at 640x480)."""
    from dynrecon_ros import depth_cue
    from dynrecon_ros.depth_cue import receded_surfaces
    from dynrecon_ros.mask_cleanup import surface_segments

    if not landing_error_term:  # no surface counts as slanted: the landing error is taken as 0
        monkeypatch.setattr(depth_cue, 'RECEDE_SLOPED', np.inf)
    depths, _, gt, _ = _boxes_and_a_receding_one(n=2, step=0.0)
    gt = gt[0]
    d = depths[0].copy()
    v = np.arange(H, dtype=np.float32)[:, None]
    floor = np.broadcast_to(v >= 85, (H, W))
    d[floor] = np.broadcast_to(0.667 * F / np.maximum(v - K[1, 2], 1), (H, W))[floor]  # meets the wall at row 85
    gt &= ~floor
    exact = d
    for seed in range(4) if noise else [None]:
        if noise:
            rng = np.random.default_rng(seed)
            d = exact + rng.standard_normal(d.shape) * (0.0012 + 0.0019 * (exact - 0.4) ** 2)
            d = (np.round(d * 200) / 200).astype(np.float32)
        segs = surface_segments(d, SegmentationConfig().crease)
        later = np.roll(d, 1, axis=0)  # the next frame read one row off (the landing error), nothing moved
        later[0] = d[0]
        flagged = np.isfinite(receded_surfaces(d, segs, K, np.eye(4), K, later))
        if not landing_error_term:
            assert flagged[floor].mean() > 0.5  # the floor would count as receded
            return
        assert not flagged.any(), seed
        later[gt] *= 1.006  # the box stepped back 0.6 %
        out = receded_surfaces(d, segs, K, np.eye(4), K, later) == 1
        if noise:  # (the noise splits the box into a few surfaces; the larger ones are caught)
            assert out[gt].mean() > 0.5 and not out[~gt].any(), seed
        else:
            np.testing.assert_array_equal(out, segs[1] == segs[1][60, 80])  # the box's surface, nothing else


def test_seen_through_surfaces_takes_a_surface_whole_from_one_pair():
    """depth_cue.seen_through_surfaces: a surface whose compared points the other frame saw through on at least
    the share (and at least SEEN_THROUGH_MIN_SAMPLES of them) is dynamic whole; not compared points do not count."""
    from dynrecon_ros.depth_cue import SEEN_THROUGH_MIN_SAMPLES, seen_through_surfaces

    labels = np.zeros((H, W), np.int32)
    labels[:, :40], labels[:, 41:100], labels[:, 101:] = 1, 2, 3
    labels[1, 1] = 4  # a speck between the sampled pixels
    prob = np.full((H, W), np.nan, np.float32)
    prob[:, :40] = 0.0
    prob[:30, :40] = 0.9  # surface 1: a quarter of its points seen through
    prob[:, 41:70] = 0.95  # surface 2: only its left half compared, all of it seen through
    prob[:, 101:] = 0.02  # surface 3: compared, static
    out = seen_through_surfaces(prob, labels, 0.5, 0.5)
    np.testing.assert_array_equal(out == 1, labels == 2)  # whole, the part not compared too
    assert np.isnan(out[labels != 2]).all()
    assert (seen_through_surfaces(prob, labels, 0.5, 0.25) == 1)[labels == 1].all()  # a lower share: surface 1 too
    assert seen_through_surfaces(prob, labels, 0.5, 0.0) is None  # off
    few = np.full((H, W), np.nan, np.float32)
    few[0, :2 * SEEN_THROUGH_MIN_SAMPLES - 2:2] = 1.0  # (every 2nd pixel of row 0: too few compared samples)
    assert seen_through_surfaces(few, labels, 0.5, 0.5) is None
    # surface 2's right half not compared because frame j saw something nearer there (background that the mover
    # uncovered, joined to it in one surface): left out; the part that was out of j's view (not hidden) stays in
    hidden = np.zeros((H, W), bool)
    hidden[:, 70:100] = True
    out = seen_through_surfaces(prob, labels, 0.5, 0.5, hidden=hidden)
    np.testing.assert_array_equal(out == 1, (labels == 2) & ~hidden)


@pytest.mark.parametrize('seen_through', [True, False])
def test_a_mover_sliding_into_view_is_masked_whole_from_the_longer_pair(seen_through):
    """A fronto-parallel box slides into view from the left border, 4 px a frame, its pattern fixed in the world
    (the flow is the ego flow, zero): in the adjacent pair only a 4-pixel strip at its leading edge stands where
    the older frame saw the wall; in the pair with the frame 4 back, two thirds of it. That pair's verdict takes the
    surface whole (segmentation.seen_through_share); averaged with the shorter pairs' (blind inside the box: its
    depth does not change) the evidence covers part of it (camouflage 1691: 1.2 % of the map on such a box)."""
    n, speed, width = 5, 4, 24
    depths = np.full((n, H, W), 4.0, np.float32)
    gt = np.zeros((n, H, W), bool)
    for k in range(n):
        gt[k, 30:110, :max(width - speed * (n - 1 - k), 0)] = True
    depths[gt] = 2.5
    flows = {(n - 1, k): np.zeros((H, W, 2), np.float32) for k in range(n - 1)}
    cfg = SegmentationConfig(seen_through_share=0.5 if seen_through else 0.0)
    _, masks = MotionSegmenter(cfg).segment([str(k) for k in range(n)], depths, K, np.stack([np.eye(4)] * n), flows)
    iou = _iou(masks[-1] > 0, gt[-1])
    assert iou >= 0.95 if seen_through else iou < 0.8, iou


def _box_with_arm(n=3, speed_px=3, band=2):
    """A static camera, a wall at 3 m, a box at 1.5 m with a thin arm (10 px) moving right by
    ``speed_px`` per frame; like a structured-light sensor, no depth within ``band`` px of the
    silhouette (both sides) nor in two blobs on the box. Flow: exact."""
    import cv2

    depths = np.full((n, H, W), WALL_Z, np.float32)
    gt = np.zeros((n, H, W), bool)
    for k in range(n):
        x = 30 + speed_px * k
        gt[k, 30:90, x:x + 40] = True
        gt[k, 50:60, x + 40:x + 75] = True  # the arm, 10 px thick
        depths[k][gt[k]] = BOX_Z
        edge = cv2.dilate(gt[k].astype(np.uint8), np.ones((2 * band + 1,) * 2, np.uint8)) > \
            cv2.erode(gt[k].astype(np.uint8), np.ones((2 * band + 1,) * 2, np.uint8))
        depths[k][edge] = 0
        depths[k][40:48, x + 8:x + 16] = 0
        depths[k][70:76, x + 20:x + 30] = 0
    poses = np.stack([np.eye(4)] * n)

    def flow(i, j):
        f = np.zeros((H, W, 2), np.float32)
        f[gt[i], 0] = speed_px * (j - i)
        return f

    return depths, poses, gt, {p: flow(*p) for p in _pairs(n)}


@pytest.mark.parametrize('hole_fill_px', [8, 0])
def test_pixels_without_depth_get_flow_evidence_and_thin_limbs_stay(hole_fill_px):
    depths, poses, gt, flows = _box_with_arm()
    n = len(depths)
    _, masks = MotionSegmenter(SegmentationConfig(hole_fill_px=hole_fill_px)).segment(
        [str(k) for k in range(n)], depths, K, poses, flows)
    arm = np.zeros((H, W), bool)
    arm[50:60, 73:108] = True  # frame 1's arm
    iou, arm_kept = _iou(masks[1] > 0, gt[1]), (masks[1][arm] > 0).mean()
    if hole_fill_px:
        assert iou >= 0.9 and arm_kept >= 0.9, (iou, arm_kept)
    else:
        assert iou < 0.85 and arm_kept < 0.5, (iou, arm_kept)


def _box_on_floor():
    """Depth of a camera 1.2 m above a floor looking along it: a wall at 4 m and a box face at 2 m
    standing on the floor (continuous depth at its foot). Returns depth (H, W) and the box mask."""
    u, v = np.meshgrid(np.arange(W, dtype=np.float64), np.arange(H, dtype=np.float64))
    x, y = (u - K[0, 2]) / F, (v - K[1, 2]) / F
    with np.errstate(divide='ignore'):
        floor = np.where(y > 0, 1.2 / y, np.inf)
    box = (np.abs(2.0 * x) < 0.3) & (2.0 * y > 0.2) & (2.0 * y <= 1.2)
    depth = np.minimum(floor, 4.0)
    depth[box] = 2.0
    return depth.astype(np.float32), box


@pytest.mark.parametrize("grow_fraction", [0.2, 1.0])
def test_region_completion_masks_the_whole_mover_but_not_the_floor(grow_fraction):
    import cv2

    depth, box = _box_on_floor()
    ring = box & ~(cv2.erode(box.astype(np.uint8), np.ones((17, 17), np.uint8)) > 0)  # motion at the edges only (8 px)
    # the box's uniform face gives no evidence inside (NaN); floor and wall are textured: known static
    prob = np.where(ring, 0.9, np.where(box, np.nan, 0.0)).astype(np.float32)
    m = clean_mask(prob, SegmentationConfig(grow_fraction=grow_fraction), depth) > 0
    if grow_fraction < 1:
        assert _iou(m, box) >= 0.95, _iou(m, box)
    else:
        assert _iou(m, box) < 0.8, _iou(m, box)
    assert (m & ~box).sum() < 0.01 * box.sum()  # the floor it stands on stays static


# ---------------------------------------------------------------- object permanence
def _stop_and_go(n=14, move_until=5, speed_px=4, fps=30.0, flow_rows=None):
    """A static camera, a wall at 3 m and a textured box at 1.5 m that moves right by ``speed_px``
    per frame up to frame ``move_until`` and then stands still. Returns entries as the reconstructor
    keeps them (key, pose, frame with depth, K, stamp), gt masks and the exact flow function (with
    ``flow_rows``: the box's motion shows in the flow of its rows above that image row only; below,
    the flow says static, as on a part of a mover whose texture the flow cannot follow)."""
    from types import SimpleNamespace

    xs = [20 + speed_px * min(k, move_until) for k in range(n)]
    gt = np.zeros((n, H, W), bool)
    depths = np.full((n, H, W), WALL_Z, np.float32)
    for k in range(n):
        gt[k, 30:90, xs[k]:xs[k] + 40] = True
        depths[k][gt[k]] = BOX_Z
    ents = [SimpleNamespace(key=f'{k}', pose=np.eye(4), frame=SimpleNamespace(depth=depths[k], K=K, stamp=k / fps))
            for k in range(n)]

    def flow(i, j):
        f = np.zeros((H, W, 2), np.float32)
        f[gt[i], 0] = xs[j] - xs[i]
        if flow_rows is not None:
            f[flow_rows:] = 0
        return f

    return ents, gt, flow


def _run_like_the_reconstructor(seg, ents, flow, neighbours=2):
    """One segment_newest call per new frame with its previous ``neighbours`` frames; returns each
    frame's last cleaned mask (N, H, W) bool."""
    from dynrecon_ros.flow import PairFlow

    out = np.zeros((len(ents), H, W), bool)
    for t in range(1, len(ents)):
        older = [ents[t - d] for d in range(1, neighbours + 1) if t - d >= 0]
        pairs = [(o, ents[t]) for o in older]
        pfs = [PairFlow(flow(int(o.key), t), flow(t, int(o.key)), None, None) for o in older]
        got, _, masks = seg.segment_newest(pairs, pfs, carry_back=True,
                                           need_masks=[True] * len(older) + [False])
        for e, m in zip(got[:-1], masks[:-1]):
            out[int(e.key)] = m > 0
    return out


@pytest.mark.parametrize('still_after_s', [5.0, 0.0])
def test_object_permanence_holds_a_mover_that_stopped(still_after_s):
    ents, gt, flow = _stop_and_go()
    masks = _run_like_the_reconstructor(MotionSegmenter(SegmentationConfig(still_after_s=still_after_s)), ents, flow)
    moving = [_iou(masks[k], gt[k]) for k in range(1, 5)]
    assert min(moving) >= 0.9, moving  # seen moving: found by the cues either way
    stopped = [_iou(masks[k], gt[k]) for k in range(9, 13)]  # stood still for 4+ frames
    if still_after_s:
        assert min(stopped) >= 0.9, stopped
    else:
        assert max(stopped) < 0.1, stopped


def test_the_newest_frame_cleaned_at_the_end_of_a_stream_keeps_its_hold():
    """The stream's last frame is segmented only as the newest of its call (no later call cleans it): its mask,
    made when it is emitted (MotionSegmenter.newest_mask), holds a mover that stopped, as the older frames' do;
    cleaned from its probability alone it would lose it (stop_and_go 1661, 200 frames: a person standing still
    in the last frame, recall 0.82 -> 0.64)."""
    from dynrecon_ros.flow import PairFlow

    ents, gt, flow = _stop_and_go(n=12)
    seg = MotionSegmenter(SegmentationConfig(still_after_s=5.0))
    for t in range(1, len(ents)):
        older = [ents[t - d] for d in (1, 2) if t - d >= 0]
        pfs = [PairFlow(flow(int(o.key), t), flow(t, int(o.key)), None, None) for o in older]
        _, probs, _ = seg.segment_newest([(o, ents[t]) for o in older], pfs, carry_back=True,
                                         need_masks=[True] * len(older) + [False])
    last = ents[-1]
    mask = seg.newest_mask(last.key, probs[-1], last.frame.depth, last.frame.stamp) > 0
    assert _iou(mask, gt[-1]) >= 0.9, _iou(mask, gt[-1])
    plain = clean_mask(probs[-1], SegmentationConfig(), last.frame.depth) > 0
    assert _iou(plain, gt[-1]) < 0.1  # (what the emission did before: the hold left out)
    assert seg.newest_mask('never seen', probs[-1], last.frame.depth, last.frame.stamp) is None


@pytest.mark.parametrize('hold_grow_fraction', [0.2, 1.0])
def test_object_permanence_holds_the_whole_surface_of_a_mover_seen_moving_in_part(hold_grow_fraction):
    # the box's lower third (rows 70..89) shows no motion in the flow: while it moves, its moving part
    # carries the mask; once it stands still, only what was held stays, unless the hold spreads over
    # the depth-connected surface it mostly covers (permanence.complete_hold)
    ents, gt, flow = _stop_and_go(flow_rows=70)
    masks = _run_like_the_reconstructor(
        MotionSegmenter(SegmentationConfig(hold_grow_fraction=hold_grow_fraction)), ents, flow)
    stopped = [_iou(masks[k], gt[k]) for k in range(9, 13)]
    if hold_grow_fraction < 1:
        assert min(stopped) >= 0.9, stopped
    else:
        assert max(stopped) < 0.8, stopped
    assert not (masks[9:13] & ~gt[9:13]).any()  # never onto the wall around it


def test_object_permanence_keeps_the_hold_of_a_still_mover_a_passer_by_hid():
    # the box stops at frame 5; from frame 8 a nearer, narrow box (at 1 m) sweeps across it at 8 px per
    # frame, hiding each of its pixels for about two frames: the pixels it uncovers were held in the
    # older pair partners, which the newest frame inherits from where its nearest partner saw the passer-by
    ents, gt, flow = _stop_and_go(n=22)
    xb = [-20 + 8 * max(k - 8, 0) for k in range(22)]
    passer = np.zeros((22, H, W), bool)
    for k, e in enumerate(ents):
        passer[k, 20:100, max(xb[k], 0):max(xb[k] + 12, 0)] = True
        e.frame.depth = e.frame.depth.copy()
        e.frame.depth[passer[k]] = 1.0

    def flow2(i, j):
        f = flow(i, j)
        f[passer[i]] = (xb[j] - xb[i], 0.0)
        return f

    # (hold_grow_fraction 1: the hold of what stays visible does not win the rest back by itself)
    masks = _run_like_the_reconstructor(MotionSegmenter(SegmentationConfig(hold_grow_fraction=1.0)), ents, flow2,
                                        neighbours=4)
    seen = gt & ~passer  # the still box where the passer-by does not hide it
    after = [(masks[k] & seen[k]).sum() / seen[k].sum() for k in range(17, 21)]  # the passer-by has gone by
    assert min(after) >= 0.9, after


@pytest.mark.parametrize('t0', [0.0, 1700000060.0])
def test_object_permanence_lets_go_after_still_after_s_and_when_the_mover_leaves(t0):
    # t0: stamps as a ROS clock gives them (in float32, 1.7e9 s is rounded to 128 s: the hold maps must
    # keep their stamps relative, or a hold lasts until the next 128 s boundary or is never kept)
    ents, gt, flow = _stop_and_go()
    for e in ents:
        e.frame.stamp += t0
    masks = _run_like_the_reconstructor(MotionSegmenter(SegmentationConfig(still_after_s=0.2)), ents, flow)
    assert _iou(masks[8], gt[8]) >= 0.9  # stopped at frame 5 (0.167 s): still held at 0.1 s of standing
    assert not masks[12].any()  # 0.23 s later: scenery
    # a mover that stood still and then left: its old place is not held (the wall is farther)
    ents, gt, flow = _stop_and_go(n=14, move_until=5)
    for k in range(10, 14):  # frames 10..13: the box is gone (walked out of view)
        ents[k].frame.depth = np.full((H, W), WALL_Z, np.float32)
        gt[k] = False

    def flow2(i, j):
        return np.zeros((H, W, 2), np.float32) if i >= 10 or j >= 10 else flow(i, j)

    # (max_continuity 1: the cleaning does not drop a held patch of the wall by itself)
    masks = _run_like_the_reconstructor(MotionSegmenter(SegmentationConfig(max_continuity=1.0)), ents, flow2)
    assert _iou(masks[9], gt[9]) >= 0.9 and not masks[11:13].any()


@pytest.mark.parametrize('s,radius', [(2, 12), (2, 3), (3, 6), (4, 1)])
def test_block_morphology_equals_the_morphology_of_the_repeated_mask(s, radius):
    """The input-size snapping erodes and dilates the work-size mask repeated over s x s blocks on the
    work grid (mask_cleanup._block_morphology): the same pixels as cv2 on the repeated mask, borders too."""
    import cv2

    from dynrecon_ros.mask_cleanup import _block_morphology, _kernel
    rng = np.random.default_rng(s * 100 + radius)
    c = (cv2.GaussianBlur(rng.random((37, 53)).astype(np.float32), (7, 7), 0) > 0.5).astype(np.uint8)
    c[0, :5] = 1  # pieces on the border
    c[-3:, -1] = 1
    up = np.repeat(np.repeat(c, s, 0), s, 1)
    for op, fn in ((cv2.MORPH_ERODE, cv2.erode), (cv2.MORPH_DILATE, cv2.dilate)):
        np.testing.assert_array_equal(_block_morphology(c, s, radius, op), fn(up, _kernel(radius)))


def test_refine_upsampled_mask_is_the_snapping_of_the_repeated_mask():
    """refine_upsampled_mask (block morphology on the work grid) = snap_to_depth_edges on the repeated mask."""
    from dynrecon_ros.mask_cleanup import refine_upsampled_mask, snap_to_depth_edges
    rng = np.random.default_rng(3)
    h, w, s = 40, 60, 2
    mask = np.zeros((h, w), np.uint8)
    mask[10:30, 15:35] = 255
    depth = np.full((h * s, w * s), 3.0, np.float32)
    depth[18:62, 34:66] = 1.5  # the mover's depth edge a few pixels off the mask's
    depth += rng.normal(0, 0.005, depth.shape).astype(np.float32)
    prob = np.where(np.repeat(np.repeat(mask, s, 0), s, 1) > 0, 0.9, 0.1).astype(np.float32)
    cfg = SegmentationConfig()
    got = refine_upsampled_mask(mask, s, depth, prob, cfg)
    up = np.repeat(np.repeat((mask > 0).astype(np.uint8), s, 0), s, 1)
    want = snap_to_depth_edges(up, depth, cfg.snap_px * s, prob < 0.5 * cfg.threshold) * np.uint8(255)
    np.testing.assert_array_equal(got, want)
    assert (got[18:62, 34:66] > 0).all() and got[:18].sum() == 0  # snapped onto the depth edge


@pytest.mark.parametrize('hold_moving_share', [0.01, 2.0])
def test_object_permanence_does_not_hold_static_surface_merged_with_a_moving_mover(hold_moving_share):
    # a box moving right along a static ledge at its own depth (the ledge's top meets the box's bottom:
    # no depth step, no crease, one surface of surface_segments, as a mover's side and the floor behind
    # it where the crease is lost); the box's held pixels cover > 20 % of that surface. The ledge is
    # textured and still (its flow and depth say static): completing the moving box's hold over the
    # surface would hold the ledge, which then holds itself (hold_moving_share > 1: the guard off)
    ents, gt, flow = _stop_and_go(n=12, move_until=12, speed_px=3)
    ledge = np.zeros((H, W), bool)
    ledge[90:104, :] = True
    for e in ents:
        e.frame.depth = e.frame.depth.copy()
        e.frame.depth[ledge] = BOX_Z
    masks = _run_like_the_reconstructor(
        MotionSegmenter(SegmentationConfig(hold_moving_share=hold_moving_share)), ents, flow)
    on_ledge = [int((masks[k] & ledge).sum()) for k in range(3, 10)]
    boxes = [_iou(masks[k], gt[k]) for k in range(3, 10)]
    if hold_moving_share <= 1:
        assert max(on_ledge) < 0.05 * ledge.sum(), on_ledge
        assert min(boxes) >= 0.9, boxes  # the box itself is still masked whole
    else:  # (the check that the partner saw the ledge as scenery slows this creep: 44 % in 7 frames, growing)
        assert max(on_ledge) > 0.3 * ledge.sum(), on_ledge


def _column_surfaces(cols: np.ndarray, *edges: int) -> tuple[int, np.ndarray]:
    """surface_segments-like (count, (H, W) int32 labels) of surfaces between the given column edges of ``cols``
    ((H, W) column indices), labelled 1, 2, ..."""
    return len(edges) + 1, np.searchsorted(np.asarray(edges[1:]), cols, side='right').astype(np.int32) + 1


@pytest.mark.parametrize('scene', ['floor', 'box'])
def test_hold_completion_does_not_spread_from_piece_to_piece_of_a_continuous_surface(scene):
    """What the hold's completion joins to a still surface that continues into its surroundings (a piece of a
    tilted floor) is held but does not count towards a surface's share in the next frame, whose surfaces are
    cut differently (sensor noise): the hold cannot creep over the floor piece by piece. A still thing in
    front of a wall (a box) stands out: its joined pixels count, so the hold wins back what it lost."""
    from dynrecon_ros.permanence import complete_hold, held_pixels, stamps_of
    h, w = 40, 80
    if scene == 'floor':  # inverse depth affine in the row: a plane, 2.5 .. 5 m
        depth = np.broadcast_to(1.0 / (0.2 + 0.005 * np.arange(h, dtype=np.float32))[:, None], (h, w)).copy()
    else:  # a box at 1 m over columns 0..59, the wall at 3 m beyond
        depth = np.full((h, w), 3.0, np.float32)
        depth[:, :60] = 1.0
    cols = np.broadcast_to(np.arange(w), (h, w))

    still = dict(moving=np.zeros((h, w), bool), static=np.ones((h, w), bool))
    # frame 1: held (seen moving at t = 1 s) on columns 0..29: all of surface 1, a quarter of surface 2
    hold = np.where(cols < 30, np.float32(1.0), np.float32(np.nan))
    held, hold = complete_hold(hold, cols < 30, depth, 0.2, 0.01, _column_surfaces(cols, 0, 20, 60), **still)
    assert held[:, :60].all() and not held[:, 60:].any()  # surface 2 joined, the surroundings not
    np.testing.assert_array_equal(stamps_of(hold)[held], 1.0)
    # frame 2: surfaces cut differently; columns 10..29 lost their hold (the depth check missed them)
    hold[:, 10:30] = np.nan
    held2 = held_pixels(hold, 1.5, 5.0)
    assert held2[:, 30:60].all() and not held2[:, 10:30].any()
    held2, hold2 = complete_hold(hold, held2, depth, 0.2, 0.01, _column_surfaces(cols, 0, 10, 60), **still)
    if scene == 'floor':  # columns 30..59 were joined to a piece of the floor: they do not spread the hold
        assert not held2[:, 10:30].any() and not held2[:, 60:].any()
    else:  # the box's joined pixels count: its whole surface is held again, with the oldest stamp
        assert held2[:, :60].all() and not held2[:, 60:].any()
        np.testing.assert_array_equal(stamps_of(hold2)[:, 10:30], 1.0)


def test_hold_completion_of_a_moving_surface_does_not_carry_the_floor_patch_it_took():
    """A moving thing whose foot meets the floor at its own depth shares a surface with a patch of floor (the crease
    lost; camouflage 1836 at 640x480: a camouflaged cylinder, the floor beside its base without evidence of either
    kind). The completion joins the patch while the thing moves, but what it joins without motion evidence of its
    own, where a finer cut of the depth's surfaces would not have joined it, is marked: in the next frame, whose
    surfaces are cut differently, the patch does not count towards the floor's share, so the hold does not creep over
    the floor (it did: to 13 % of the image, mask IoU 0.52). (What lies on the mover's own finer surface stays
    unmarked: the default sequence's cylinder turning at the image border keeps it, mask IoU 0.992 there.)"""
    from dynrecon_ros.permanence import complete_hold, held_pixels, stamps_of
    h, w = 40, 160
    # the floor (inverse depth affine in the row, 2.5 .. 5 m) and the mover, upright at 3 m, over columns 0..19; the
    # surfaces given to the completion merge the mover with the floor up to column 59 (the crease lost at its foot),
    # the finer cut the completion makes of the depth itself does not (its boundary band, columns ~20..27, stays
    # unmarked)
    depth = np.broadcast_to(1.0 / (0.2 + 0.005 * np.arange(h, dtype=np.float32))[:, None], (h, w)).copy()
    cols = np.broadcast_to(np.arange(w), (h, w))
    depth[:, :20] = 3.0

    mover = cols < 20
    none = np.zeros((h, w), bool)
    # frame 1: the mover (columns 0..19, moving, held) and the floor patch (20..59, no evidence) are one surface
    hold = np.where(mover, np.float32(1.0), np.float32(np.nan))
    held, hold = complete_hold(hold, mover, depth, 0.2, 0.01, _column_surfaces(cols, 0, 60), moving=mover, static=none)
    assert held[:, :60].all() and not held[:, 60:].any()  # the patch is held in this frame
    assert (hold[:, :20] >= 0).all() and (hold[8:30, 30:60] < 0).all()  # ... but marked (inside the finer cut)
    np.testing.assert_array_equal(stamps_of(hold)[held], 1.0)
    # frame 2: the patch is cut into a surface with more floor (columns 20..119); the mover moves on
    held2 = held_pixels(hold, 1.1, 5.0)
    held2, hold2 = complete_hold(hold, held2, depth, 0.2, 0.01, _column_surfaces(cols, 0, 20, 120), moving=mover, static=none)
    assert not held2[:, 60:].any()  # the floor beyond the patch is not joined
    assert held2[:, :20].all()


@pytest.mark.parametrize('check', [True, False])
def test_object_permanence_does_not_hold_scenery_merged_with_a_still_mover(check, monkeypatch):
    # a box (columns 40..79 once still) that stops at frame 5 on a static ledge across the image at its own
    # depth (one surface of surface_segments, as a mover's foot and the floor where the crease is lost); once
    # still, no cue tells the box's part of that surface from the ledge's, and the box covers > 20 % of it.
    # The ledge was scenery (unmasked, at the same depth) in the nearest pair partner: the hold's completion
    # does not join it (check False: it does, and the whole ledge then holds itself). Next to the box the
    # cleaning's snapping masks a few pixels of the ledge, which the hold keeps (no cue can say otherwise)
    from dynrecon_ros import permanence
    if not check:
        monkeypatch.setattr(permanence.SeenAsScenery, 'at', lambda self, rows, cols, z: np.zeros(rows.shape, bool))
    ents, gt, flow = _stop_and_go(n=20)
    ledge = np.zeros((H, W), bool)
    ledge[90:104, :] = True
    for e in ents:
        e.frame.depth = e.frame.depth.copy()
        e.frame.depth[ledge] = BOX_Z
    masks = _run_like_the_reconstructor(MotionSegmenter(SegmentationConfig()), ents, flow)
    far = ledge.copy()
    far[:, 20:100] = False  # the ledge more than 20 pixels from the still box
    on_far = [int((masks[k] & far).sum()) for k in range(6, 19)]
    boxes = [(masks[k] & gt[k]).sum() / gt[k].sum() for k in range(6, 19)]
    assert min(boxes) >= 0.95, boxes  # the still box itself stays held
    if check:
        assert max(on_far) == 0, on_far
    else:
        assert min(on_far) > 0.3 * far.sum(), on_far


def test_flow_of_background_hidden_in_the_other_frame_is_no_evidence():
    # frame 1's wall that the box hid in frame 0 (the box moved on and uncovered it): DIS drags the box's flow over
    # it, which disagrees with the ego flow. The point is not seen in frame 0 (the depth there reads the box, nearer
    # than the wall): that flow matched the box, not the wall, so it is no evidence (stop_and_go 930: the wall a
    # passer-by uncovered at the border was masked and held for 100 frames) and no correspondence for the pose
    depths, poses, gt, flow = _scene(n=2, box_speed=0.12, noise_px=0.0)
    f = flow(1, 0)
    ego = ego_flow(depths[1], K, np.linalg.inv(poses[0]) @ poses[1])
    u, v = np.meshgrid(np.arange(W), np.arange(H))
    lu = np.clip(np.rint(u + ego[..., 0]), 0, W - 1).astype(int)
    lv = np.clip(np.rint(v + ego[..., 1]), 0, H - 1).astype(int)
    uncovered = ~gt[1] & gt[0][lv, lu]
    uncovered &= ~ndimage.binary_dilation(gt[1], np.ones((5, 5), bool))  # (away from the box's own edge)
    assert uncovered.sum() > 300
    f[uncovered] = np.median(f[gt[1]], axis=0)  # the box's flow, dragged over what it uncovered
    off, _ = MotionSegmenter(SegmentationConfig(flow_occlusion_check=False)).segment(['a', 'b'], depths, K, poses,
                                                                                   {(1, 0): f})
    flagged = uncovered & (off[1] > 0.5)
    assert flagged.sum() > 0.6 * uncovered.sum()  # the check off: the dragged flow reads as motion
    seg = MotionSegmenter()
    probs, _ = seg.segment(['a', 'b'], depths, K, poses, {(1, 0): f})
    assert (probs[1][uncovered] > 0.5).mean() < 0.02, (probs[1][uncovered] > 0.5).mean()
    assert seg.flow_mismatch['b'][flagged].all()
    assert (probs[1][gt[1]] > 0.5).mean() > 0.9  # the box keeps its evidence
    assert not seg.flow_mismatch['b'][gt[1]].any()


@pytest.mark.parametrize('case', ['seen_empty', 'off', 'too_old', 'was_there'])
def test_a_person_found_standing_where_an_older_view_saw_through_is_masked(case):
    """segmentation.seen_empty_share: the window's three frames show a box (a person) standing still at 2 m
    before a wall at 4 m, the camera moving sideways (no motion in view: the flow is the ego flow, no depth
    change). A far view from 2 s earlier, 0.6 m to the left, saw the wall through the place where the box stands:
    the box arrived since and is masked whole. Not when the cue is off, nor when that view is older than
    ``still_after_s`` (the box may have stood there long enough to count as scenery), nor when that view saw the
    box there too (it is scenery)."""
    n = 3
    u, v = np.meshgrid(np.arange(W), np.arange(H))

    def view(x_cam, box):  # a wall at 4 m, the box at 2 m (x in [0.1, 0.5] m, rows 40-99), camera at x = x_cam
        d = np.full((H, W), 4.0, np.float32)
        if box:
            x = (u - W / 2) / F * 2.0 + x_cam
            d[(x >= 0.1) & (x <= 0.5) & (v >= 40) & (v < 100)] = 2.0
        return d

    xs = [0.0, 0.01, 0.02]
    depths = np.stack([view(x, True) for x in xs])
    poses = np.stack([_T(t=(x, 0, 0)) for x in xs])  # camera-to-world
    flows = {(n - 1, k): ego_flow(depths[n - 1], K, np.linalg.inv(poses[k]) @ poses[n - 1]) for k in range(n - 1)}
    far = [('far', view(-0.6, case == 'was_there'), K, _T(t=(-0.6, 0, 0)), -8.0 if case == 'too_old' else 0.0)]
    cfg = SegmentationConfig(seen_empty_share=0.0 if case == 'off' else 0.5)
    stamps = [2.0, 2.0 + 1 / 30, 2.0 + 2 / 30]
    _, masks = MotionSegmenter(cfg).segment([str(k) for k in range(n)], depths, K, poses, flows, stamps=stamps,
                                            far_views=far)
    box_now = depths[-1] < 3.0
    if case == 'seen_empty':
        assert _iou(masks[-1] > 0, box_now) >= 0.9, _iou(masks[-1] > 0, box_now)
    else:
        assert (masks[-1] > 0).sum() < 0.05 * box_now.sum(), (masks[-1] > 0).sum()


@pytest.mark.slow  # 320x240, 120 frames, twice: ~25 s of CPU
def test_people_who_stopped_out_of_view_are_masked_when_the_pan_finds_them():
    """The stop_and_go preset, seed 1816 (where session 34 found the failure): two walkers leave the view walking, stop out of it and are
    found standing by the pan from frame ~55 until they walk on ~30 frames later; no motion cue sees them then. The
    far keyframes, older views from before they stopped there, saw through those places
    (segmentation.seen_empty_share): IoU over the sequence 0.59 without, 0.88 with (docs/MEASUREMENTS.md)."""
    from dynrecon_ros.config import ReconConfig
    from dynrecon_ros.data.scenarios import scenario_config
    from dynrecon_ros.data.synthetic import render_sequence
    from dynrecon_ros.reconstructor import Reconstructor

    seq = render_sequence(scenario_config('stop_and_go', seed=1816))
    ious = {}
    for share in (0.5, 0.0):
        rc = ReconConfig()
        rc.segmentation.seen_empty_share = share
        rec = Reconstructor(rc, device='cpu')
        out = {r.key: r for f in seq.frames for r in rec.push(f)}
        out.update({r.key: r for r in rec.flush()})
        assert all(out[k].status == 'ok' for k in seq.keys)
        pred = np.stack([out[k].mask > 0 for k in seq.keys])
        ious[share] = _iou(pred, np.stack(seq.masks) > 0)
    assert ious[0.5] >= 0.8 and ious[0.0] < 0.7, ious

