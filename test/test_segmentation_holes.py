"""Motion masks where a structured-light sensor has no depth: a mover's shadow band and silhouette holes
(issue 16). Small hand-made images; each test fails when its mechanism is switched off."""
import numpy as np
import pytest

from dynrecon_ros.mask_cleanup import (across_holes, drop_background_segments, hole_band_px,
                                       snap_holes_to_colour_edges)

H, W = 120, 160


def _iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


def _textured(seed, base):
    """(H, W, 3) uint8 smooth random texture around the colour ``base``."""
    import cv2

    rng = np.random.default_rng(seed)
    noise = cv2.GaussianBlur(rng.normal(0, 25, (H, W, 3)).astype(np.float32), (0, 0), 2.0)
    return np.clip(np.asarray(base, np.float32) + noise, 0, 255).astype(np.uint8)


def _person_with_shadow(shadow_px):
    """A near mover (1 m, columns 90.., touching the top, bottom and right border like a person close
    to the camera entering the view) in front of a wall at 4 m, with no readings in a ``shadow_px``
    band left of it (the projector's shadow) and on a 2-pixel rim inside its silhouette. Returns
    depth and truth."""
    depth = np.full((H, W), 4.0, np.float32)
    truth = np.zeros((H, W), bool)
    truth[:, 90:] = True
    depth[truth] = 1.0
    depth[:, 90 - shadow_px:92] = 0  # shadow on the wall + the mover's own rim
    return depth, truth


@pytest.mark.parametrize('band', [None, 0])
def test_a_depth_step_hidden_by_the_shadow_band_keeps_the_mover(band):
    """The flow's mask covers the mover, the shadow band and 3 pixels of the wall beyond it. The only
    readings on the piece's boundary are the wall's (the border and the shadow hold the rest), so a
    continuity test that does not look across the band takes the mover for smeared background."""
    depth, truth = _person_with_shadow(6)
    mask = np.zeros((H, W), np.uint8)
    mask[:, 81:] = 1
    if band is None:
        out = drop_background_segments(mask, depth, 0.8)
        assert (out[truth] > 0).mean() > 0.95, (out[truth] > 0).mean()
    else:  # looking across no hole at all: the mover is dropped (what main did)
        import dynrecon_ros.mask_cleanup as mc

        orig = mc.hole_band_px
        mc.hole_band_px = lambda width: 0
        try:
            out = drop_background_segments(mask, depth, 0.8)
        finally:
            mc.hole_band_px = orig
        assert (out[truth] > 0).mean() < 0.5, (out[truth] > 0).mean()


def test_smeared_background_beside_a_hole_is_still_dropped():
    """A piece of the wall (depth-continuous all round) next to a random hole blob stays background."""
    depth = np.full((H, W), 4.0, np.float32)
    depth[40:60, 60:70] = 0  # a blob without readings
    mask = np.zeros((H, W), np.uint8)
    mask[30:70, 50:90] = 1
    assert drop_background_segments(mask, depth, 0.8).sum() == 0


def test_across_holes_reads_the_first_reading_along_the_line():
    depth, _ = _person_with_shadow(6)
    right, left = across_holes(depth, 0, 1, 10), across_holes(depth, 0, -1, 10)
    ok = depth > 0
    assert np.array_equal(right[ok], depth[ok]) and np.array_equal(left[ok], depth[ok])
    assert np.all(right[:, 84:92] == 1.0) and np.all(left[:, 84:92] == 4.0)  # the shadow band: mover / wall
    assert np.all(across_holes(depth, 0, 1, 3)[:, 84:88] == 0)  # farther than 3 pixels from any reading
    assert hole_band_px(320) == 16 and hole_band_px(20) == 2


@pytest.mark.parametrize('radius', [10, 0])
def test_pixels_without_depth_at_the_boundary_take_the_side_of_their_colour(radius):
    """A red-clothed mover on a grey textured wall; no depth in a 10-pixel shadow band beside it and on
    a 3-pixel rim inside its silhouette. The flow's mask (depth-snapped where there is depth) covers the
    shadow band and misses the rim on the other side: colour puts both on the right side."""
    depth = np.full((H, W), 4.0, np.float32)
    truth = np.zeros((H, W), bool)
    truth[20:110, 70:110] = True
    depth[truth] = 1.5
    rgb = np.where(truth[..., None], _textured(1, (200, 60, 50)), _textured(2, (120, 120, 120)))
    depth[20:110, 60:73] = 0  # shadow band (10 px on the wall) + 3 px of the mover's rim
    depth[20:110, 107:110] = 0  # the rim on the other side
    depth[30:40, 20:30] = 0  # a blob far from the mover: never touched
    mask = np.zeros((H, W), np.uint8)
    mask[20:110, 60:107] = 1  # too wide over the shadow, too narrow on the right rim
    out = snap_holes_to_colour_edges(mask, depth, rgb, radius) > 0
    if radius:
        assert _iou(out, truth) > 0.97, _iou(out, truth)
        assert not out[30:40, 20:30].any()
        assert np.array_equal(out[depth > 0], mask[depth > 0] > 0)  # pixels with depth keep their label
    else:
        assert _iou(out, truth) < 0.85


def test_colour_snapping_without_holes_or_mask_changes_nothing():
    depth = np.full((H, W), 2.0, np.float32)
    rgb = _textured(3, (100, 100, 100))
    mask = np.zeros((H, W), np.uint8)
    mask[30:60, 30:60] = 1
    assert np.array_equal(snap_holes_to_colour_edges(mask, depth, rgb, 10), mask)
    assert not snap_holes_to_colour_edges(np.zeros_like(mask), depth * 0, rgb, 10).any()


# ---------------------------------------------------------------- the geometric cue seen from the older frame
@pytest.mark.parametrize('reverse', [True, False])
def test_a_mover_walking_away_from_the_camera_is_caught_in_the_older_frames(reverse, monkeypatch):
    """A static camera, a wall at 3 m, a textureless box face walking away from the camera (1.2 m, then
    farther by 12 cm per frame): zero optical flow, and from the newest frame the older one reads the box
    *nearer* (no evidence, as an occluder would give). Seen from the older frame, its box moved into the
    newest lands where that reads farther. Pairs as the pipeline makes them: newest -> older, the
    evidence carried back."""
    import dynrecon_ros.segmentation as seg
    from dynrecon_ros.segmentation import MotionSegmenter, SegmentationConfig

    if not reverse:
        monkeypatch.setattr(seg, 'reverse_depth_probability', lambda p, *a, **k: np.full(p.shape, np.nan, np.float32))
    f = 150.0
    K = np.array([[f, 0, W / 2], [0, f, H / 2], [0, 0, 1]])
    n = 4
    depths = np.full((n, H, W), 3.0, np.float32)
    gt = np.zeros((n, H, W), bool)
    gt[:, 30:90, 50:110] = True
    for k in range(n):
        depths[k][gt[k]] = 1.2 + 0.12 * k
    zero = np.zeros((H, W, 2), np.float32)
    flows = {(i, j): zero for i in range(n) for j in range(n) if i > j}
    seg_ = MotionSegmenter(SegmentationConfig(photometric_check=False))
    _, masks = seg_.segment([str(k) for k in range(n)], depths, K, np.stack([np.eye(4)] * n), flows,
                            target_flows={p: (zero, None) for p in flows})
    ious = [_iou(masks[k] > 0, gt[k]) for k in range(n - 1)]  # the newest frame is nobody's older frame
    if reverse:
        assert min(ious) >= 0.9, ious
    else:
        assert max(ious) < 0.1, ious


def test_the_reverse_geometric_cue_leaves_a_static_occluder_alone():
    """A static box in front of a wall seen by a translating camera: the parallax makes the older frame
    read the box where the newest frame's wall points land (nearer), but the box's own points land on
    the box again: no motion."""
    from dynrecon_ros.depth_cue import nearest_reading, pair_depth_probability, reverse_depth_probability
    from dynrecon_ros.flow_cue import ego_flow_and_depth
    from dynrecon_ros.segmentation import SegmentationConfig

    f = 150.0
    K = np.array([[f, 0, W / 2], [0, f, H / 2], [0, 0, 1]])
    u, v = np.meshgrid(np.arange(W), np.arange(H))

    def view(cx):  # camera at x = cx looking along z: box x in [-0.2, 0.2] at 1.5 m, wall at 3 m
        x_box = (u - W / 2) / f * 1.5 + cx
        return np.where((np.abs(x_box) < 0.2) & (np.abs(v - H / 2) < 30), 1.5, 3.0).astype(np.float32)

    d_i, d_j = view(0.1), view(0.0)
    T_j_i = np.eye(4)
    T_j_i[0, 3] = 0.1  # X_j = X_i + (0.1, 0, 0)
    fl, zj = ego_flow_and_depth(d_i, K, T_j_i)
    nearer = (zj - nearest_reading(d_j)[np.clip(np.rint(v + fl[..., 1]).astype(int), 0, H - 1),
                                       np.clip(np.rint(u + fl[..., 0]).astype(int), 0, W - 1)]) > 0.5
    assert nearer.sum() > 100  # the parallax hides wall points behind the box in j
    cfg = SegmentationConfig()
    fwd = pair_depth_probability(zj, fl[..., 0], fl[..., 1], nearest_reading(d_j), cfg)
    p = reverse_depth_probability(fwd, zj, fl[..., 0], fl[..., 1], d_j, K, np.linalg.inv(T_j_i), K,
                                  nearest_reading(d_i), cfg)
    assert np.isfinite(p).sum() > 100 and np.nanmax(p) < 0.1


# ---------------------------------------------------------------- through the pipeline
def test_pipeline_masks_on_kinect_people_reach_the_silhouette_where_depth_is_missing():
    """Articulated people with Kinect v1 depth (shadows, silhouette holes, 3 % blobs): the colour snapping
    of the output masks changes only pixels without a reading (but for the remnants of regions it shrank below
    min_area_frac, dropped whole) and brings the masks closer to the truth."""
    from dynrecon_ros.config import ReconConfig
    from dynrecon_ros.data.scenarios import scenario_config
    from dynrecon_ros.data.synthetic import render_sequence
    from dynrecon_ros.reconstructor import Reconstructor

    seq = render_sequence(scenario_config('walking_people', width=320, height=240, frames=12, seed=11))
    index = {k: i for i, k in enumerate(seq.keys)}
    masks = {}
    for px in (10, 0):
        rc = ReconConfig()
        rc.segmentation.colour_snap_px = px
        rec = Reconstructor(rc)
        out = []
        for f in seq.frames:
            out += rec.push(f)
        out += rec.flush()
        masks[px] = {r.key: r.mask > 0 for r in out if r.status == 'ok'}

    def iou(ms):
        tp = sum((m & seq.masks[index[k]]).sum() for k, m in ms.items())
        union = sum((m | seq.masks[index[k]]).sum() for k, m in ms.items())
        return tp / union

    on, off = iou(masks[10]), iou(masks[0])
    assert on > off + 0.04, (on, off)
    small = rc.segmentation.min_area_frac * seq.masks[0].size
    for k, m in masks[10].items():
        read = seq.frames[index[k]].depth > 0
        assert not (m & ~masks[0][k] & read).any()  # never a pixel with a reading added
        assert (~m & masks[0][k] & read).sum() < small  # removed: only remnants


# ---------------------------------------------------------------- hole candidates
def test_fill_candidates_reads_nothing_beyond_the_image():
    """OpenCV's default erosion border is the largest float: it must not become a 'reading' in a ring at
    the image border (those pixels then got candidate depths of 1e38 m)."""
    from dynrecon_ros.depth_cue import fill_candidates

    holes, near, far = fill_candidates(np.zeros((H, W), np.float32), 8)
    assert not holes.any()
    d = np.zeros((H, W), np.float32)
    d[60, 80] = 2.0
    holes, near, far = fill_candidates(d, 8)
    assert holes.sum() == 17 * 17 - 1 and np.nanmax(near) == 2.0 and np.nanmax(far) == 2.0


@pytest.mark.parametrize('beyond', [True, False])
def test_a_hole_that_sees_beyond_the_sensor_range_is_static(beyond, monkeypatch):
    """A camera translating 5 cm and turning 1 degree; a static person-sized surface at 1 m on the left,
    and on the right a wall too far for the sensor (no readings: its flow is the rotation's). Hole pixels
    next to the near surface get only its depth as candidates; their flow fits the far-away surface."""
    import dynrecon_ros.flow_cue as fc
    from dynrecon_ros.flow_cue import ego_flow_and_depth, pair_probability
    from dynrecon_ros.segmentation import SegmentationConfig

    if not beyond:
        monkeypatch.setattr(fc, 'BEYOND_RANGE_M', float('nan'))
    f = 150.0
    K = np.array([[f, 0, W / 2], [0, f, H / 2], [0, 0, 1]])
    c, s = np.cos(np.radians(1)), np.sin(np.radians(1))
    T = np.eye(4)
    T[:3, :3] = [[c, 0, s], [0, 1, 0], [-s, 0, c]]
    T[0, 3] = 0.05
    depth = np.zeros((H, W), np.float32)
    depth[:, :80] = 1.0
    truth = np.where(depth > 0, depth, np.float32(1e4))  # the far wall
    flow, _ = ego_flow_and_depth(truth, K, T)
    p, _, _ = pair_probability(depth, K, T, flow.astype(np.float32), None, SegmentationConfig(hole_fill_px=8))
    band = p[:, 82:88]  # hole pixels with the near surface's candidates
    if beyond:
        assert np.nanmax(band) < 0.1
    else:
        assert np.nanmin(band) > 0.9


def test_a_patch_of_holes_the_colour_snap_gives_back_leaves_no_remnant():
    """A false dynamic patch made of depth holes in an image corner (static_effects seed 702, frame 7: 71
    pixels) whose colour joins the background: the colour snap returns it to the background but for the
    corner pixel (the erosion counts the image border as mask); the outputs drop what the snap shrank below
    min_area_frac, as the cleanup does, so the published mask is empty. A mover's patch stays whole."""
    from dynrecon_ros.config import ReconConfig
    from dynrecon_ros.frames import Frame
    from dynrecon_ros.reconstructor import Reconstructor
    h, w = 120, 160
    rng = np.random.default_rng(1)
    rgb = np.clip(rng.normal(120, 3, (h, w, 3)), 0, 255).astype(np.uint8)  # one surface, sensor noise
    depth = np.full((h, w), 3.0, np.float32)
    depth[100:, :12] = 0  # the sensor's holes in the corner
    mask = np.zeros((h, w), np.uint8)
    mask[104:, :6] = 1  # a false patch inside them (96 px > min_area_frac of 19 px)
    K = np.array([[150.0, 0, 80], [0, 150.0, 60], [0, 0, 1]])
    f = Frame(0.0, rgb, depth, K)
    rec = Reconstructor(ReconConfig())
    assert mask.sum() > rec.cfg.segmentation.min_area_frac * mask.size
    res, _ = rec._outputs(f, f, np.zeros((h, w), np.float32), mask * 255, None, np.eye(4))
    assert not res.mask.any()
    # the same patch around a lone reading (static_effects seed 772, frame 39: 88 holes and 1 reading at 5.1 m), a
    # speck of the wall's texture unlike its neighbours: the snap gives back the holes, the reading's pixel is left
    # alone and is dropped as a remnant too
    depth1, rgb1 = depth.copy(), rgb.copy()
    depth1[110, 3], rgb1[110, 3] = 3.0, 200
    f1 = Frame(0.0, rgb1, depth1, K)
    res1, _ = rec._outputs(f1, f1, np.zeros((h, w), np.float32), mask * 255, None, np.eye(4))
    assert not res1.mask.any()
    # a mover in a larger hole, its own colour: kept (the snap moves its boundary onto its colour edge)
    rgb2, depth2, mask2 = rgb.copy(), depth.copy(), np.zeros((h, w), np.uint8)
    depth2[80:, :40] = 0
    rgb2[80:, :30] = 30
    mask2[84:, :26] = 1
    f2 = Frame(0.0, rgb2, depth2, K)
    res2, _ = rec._outputs(f2, f2, np.zeros((h, w), np.float32), mask2 * 255, None, np.eye(4))
    assert (res2.mask > 0).sum() >= mask2.sum()
