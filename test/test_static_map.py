"""Static voxel map: accuracy on a plane, carving of a walked-through 'person', masks, PLY, bounds.

The map's own tests integrate with the automatic pixel stride (pixel_stride=0: every pixel on these
small images); the pipeline's default (MapConfig, every 2nd pixel) is exercised end to end."""
import numpy as np
import pytest

from dynrecon_ros.errors import InputError
from dynrecon_ros.static_map import MapConfig, VoxelMap, read_ply, write_ply

F, W, H = 120.0, 160, 120
K = np.array([[F, 0, W / 2], [0, F, H / 2], [0, 0, 1]])
RGB = np.dstack([np.full((H, W), c, np.uint8) for c in (200, 100, 50)])


def _pose(x=0.0, y=0.0):
    T = np.eye(4)
    T[:3, 3] = (x, y, 0)
    return T


def _wall(z=2.0):
    return np.full((H, W), z, np.float32)


def _with_person(depth, z=1.0):
    d = depth.copy()
    d[30:90, 60:100] = z
    return d


def test_plane_points_lie_within_half_a_voxel():
    m = VoxelMap(MapConfig(pixel_stride=0, voxel_size=0.02, min_weight=2))
    for k in range(4):
        m.integrate(_wall(2.0), RGB, K, _pose(0.02 * k), np.ones((H, W), bool))
    pts = m.points()
    assert pts.shape[1] == 6 and pts.dtype == np.float32 and len(pts) > 500
    assert np.abs(pts[:, 2] - 2.0).max() <= 0.01
    np.testing.assert_allclose(pts[:, 3:], np.tile([200, 100, 50], (len(pts), 1)))
    # the wall spans the field of view at z=2: x in about [-4/3, 4/3] m
    assert pts[:, 0].min() < -1.2 and pts[:, 0].max() > 1.2
    assert len(m) >= len(pts)


def test_single_observation_is_not_published():
    m = VoxelMap(MapConfig(pixel_stride=0, min_weight=2))
    m.integrate(_wall(), RGB, K, _pose(), None)
    assert len(m) > 0 and len(m.points()) == 0
    m.integrate(_wall(), RGB, K, _pose(), None)
    assert len(m.points()) > 0


def test_person_that_walked_away_leaves_no_trail():
    """Frames 0-5 see an unmasked person at 1 m (segmentation missed it); frames 6-15 see the wall behind."""
    m = VoxelMap(MapConfig(pixel_stride=0))
    for k in range(6):
        m.integrate(_with_person(_wall()), RGB, K, _pose(0.01 * k), np.ones((H, W), bool))
    assert (m.points()[:, 2] < 1.5).sum() > 100  # the person is in the map while it stands there
    for k in range(6, 16):
        m.integrate(_wall(), RGB, K, _pose(0.01 * k), np.ones((H, W), bool))
    pts = m.points()
    assert (pts[:, 2] < 1.9).sum() == 0, 'trail left behind'
    assert len(pts) > 1000 and np.abs(pts[:, 2] - 2.0).max() <= 0.01


def test_person_who_paused_long_and_left_leaves_no_trace():
    """A person stands unmasked for 3 s (90 frames: their voxels reach max_weight), then walks off:
    once the wall behind them has been seen for max_weight - min_weight + 1 frames (0.63 s at 30 fps),
    nothing of them is left, even with depth holes on the uncovered wall."""
    cfg = MapConfig()
    m = VoxelMap(cfg)
    for k in range(90):
        m.integrate(_with_person(_wall()), RGB, K, _pose(0.001 * (k % 5)), np.ones((H, W), bool))
    assert (m.points()[:, 2] < 1.5).sum() > 100
    n_clear = int(cfg.max_weight - cfg.min_weight) + 1
    rng = np.random.default_rng(0)
    for k in range(n_clear):
        wall = _wall()
        wall[rng.random((H, W)) < 0.1] = 0  # 10 % of the readings missing
        m.integrate(wall, RGB, K, _pose(0.001 * (k % 5)), np.ones((H, W), bool))
        if k == n_clear - 3:
            assert (m.points()[:, 2] < 1.5).sum() > 0  # not gone before its time: the bound is tight
    assert (m.points()[:, 2] < 1.9).sum() == 0, 'the paused person left a trace'


def test_voxels_seen_as_dynamic_lose_weight():
    m = VoxelMap(MapConfig(pixel_stride=0, free_weight=1.0, dynamic_weight=1.0))
    for k in range(4):
        m.integrate(_with_person(_wall()), RGB, K, _pose(), np.ones((H, W), bool))
    assert (m.points()[:, 2] < 1.5).sum() > 100
    dyn = np.ones((H, W), bool)
    dyn[30:90, 60:100] = False  # now segmentation flags the person: its voxels fade
    for k in range(4):
        m.integrate(_with_person(_wall()), RGB, K, _pose(), dyn)
    assert (m.points()[:, 2] < 1.5).sum() == 0


def test_a_person_who_stood_unmasked_loses_their_voxels_once_the_masks_catch_them():
    """A person stands unmasked for 3 s (revealed by the camera while standing: never seen moving), so their
    voxels reach max_weight; when they walk on, the first frame whose mask covers them at their old place
    removes the voxels it sees them in (dynamic_weight, default: at once), not one weight per frame; the wall
    around them stays."""
    dyn = np.ones((H, W), bool)
    dyn[30:90, 60:100] = False
    for cfg, gone in ((MapConfig(), True), (MapConfig(dynamic_weight=1.0), False)):
        m = VoxelMap(cfg)
        for k in range(90):
            m.integrate(_with_person(_wall()), RGB, K, _pose(0.001 * (k % 5)), np.ones((H, W), bool))
        n_wall = int((m.points()[:, 2] > 1.9).sum())
        assert (m.points()[:, 2] < 1.5).sum() > 100
        m.integrate(_with_person(_wall()), RGB, K, _pose(), dyn)  # the first frame the mask has them
        person = int((m.points()[:, 2] < 1.5).sum())
        assert (person == 0) == gone, (cfg.dynamic_weight, person)
        # the wall stays, but for a few voxels at the mask's corners, where the map's 5 x 5 median gives the
        # masked pixel the wall's depth (the price of the rule: they come back when seen static again)
        assert (m.points()[:, 2] > 1.9).sum() >= 0.99 * n_wall
    with pytest.raises(InputError, match='dynamic_weight'):
        MapConfig(dynamic_weight=-1.0)


def test_dynamic_pixels_never_enter_and_background_behind_them_stays():
    m = VoxelMap(MapConfig(pixel_stride=0, min_weight=0))  # publish every live voxel
    static = np.ones((H, W), bool)
    static[30:90, 60:100] = False
    for k in range(3):  # wall first, seen fully
        m.integrate(_wall(), RGB, K, _pose(0.01 * k), np.ones((H, W), bool))
    n_wall = len(m.points())
    for k in range(10):  # then a masked person stands in front of it
        m.integrate(_with_person(_wall()), RGB, K, _pose(0.01 * k), static)
        assert (m.points()[:, 2] < 1.9).sum() == 0
    assert len(m.points()) >= n_wall  # the occluded wall is not carved


def test_low_confidence_and_out_of_range_depth_are_ignored():
    m = VoxelMap(MapConfig(pixel_stride=0, min_confidence=0.5, max_depth=3.0))
    conf = np.ones((H, W), np.float32)
    conf[:, :80] = 0.1
    d = _wall()
    d[:60] = 5.0  # beyond max_depth
    for _ in range(3):
        m.integrate(d, RGB, K, _pose(), None, conf)
    pts = m.points()
    assert len(pts) > 0 and pts[:, 0].min() > -0.05 and pts[:, 1].min() > -0.05


def test_max_voxels_bound_respected():
    """Beyond max_voxels the map is cut to 90 % of it, the weakest first."""
    m = VoxelMap(MapConfig(pixel_stride=0, voxel_size=0.01, max_voxels=500))
    for k in range(3):
        m.integrate(_wall(), RGB, K, _pose(0.05 * k), None)
        assert len(m) <= 500
    assert len(m) == 450


def test_weakest_voxels_are_lexsorts_first():
    """_weakest picks the n voxels of lowest weight, then least recently seen, then first stored: np.lexsort's
    first n, ties included (few distinct weights and frames, -0.0 weights, n at the ends)."""
    from dynrecon_ros.static_map import _weakest
    rng = np.random.default_rng(5)
    for m in (1, 7, 5000):
        w = rng.choice(np.float32([0.0, -0.0, 0.4, 1.0, 2.0, 20.0]), m)
        w[rng.random(m) < 0.2] = rng.random() * 3  # one fractional weight, many times
        seen = rng.integers(0, 4, m).astype(np.float32)
        order = np.lexsort((seen, w))
        for n in {1, m // 3, m - 1, m} - {0}:
            want = np.zeros(m, bool)
            want[order[:n]] = True
            assert np.array_equal(_weakest(w, seen, n), want), (m, n)


def test_ply_round_trip(tmp_path):
    m = VoxelMap(MapConfig(pixel_stride=0))
    for k in range(3):
        m.integrate(_with_person(_wall()), RGB, K, _pose(0.01 * k), None)
    pts = m.points()
    path = tmp_path / 'map.ply'
    assert m.save_ply(path) == len(pts)
    raw = path.read_bytes()
    end = raw.index(b'end_header\n') + len(b'end_header\n')
    header = raw[:end].decode('ascii').splitlines()
    assert header[0] == 'ply' and header[1] == 'format binary_little_endian 1.0'
    assert f'element vertex {len(pts)}' in header
    props = [line.split()[1:] for line in header if line.startswith('property')]
    assert props == [['float', 'x'], ['float', 'y'], ['float', 'z'], ['uchar', 'red'], ['uchar', 'green'],
                     ['uchar', 'blue']]
    assert len(raw) - end == len(pts) * 15
    rec = np.frombuffer(raw[end:], dtype=np.dtype([('xyz', '<f4', 3), ('rgb', 'u1', 3)]))
    np.testing.assert_array_equal(rec['xyz'], pts[:, :3])
    np.testing.assert_array_equal(rec['rgb'], pts[:, 3:].astype(np.uint8))
    np.testing.assert_array_equal(read_ply(path), pts)


def test_bad_input_is_input_error(tmp_path):
    with pytest.raises(InputError):
        MapConfig(voxel_size=0)
    with pytest.raises(InputError):
        VoxelMap(MapConfig(pixel_stride=0)).integrate(_wall(), RGB[:10], K, _pose(), None)
    with pytest.raises(InputError):
        write_ply(tmp_path / 'x.ply', np.zeros((3, 4)))
    (tmp_path / 'bad.ply').write_bytes(b'not a ply')
    with pytest.raises(InputError):
        read_ply(tmp_path / 'bad.ply')


# ---------------------------------------------------------------- end to end on the synthetic renderer
def _segment(seq, window=5, reach=2):
    """Sliding-window motion masks (N, H, W) bool from GT poses, noisy depth and OpenCV DIS flow."""
    import cv2

    from dynrecon_ros.flow import fb_consistency
    from dynrecon_ros.segmentation import MotionSegmenter

    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    gray = [cv2.cvtColor(f.rgb, cv2.COLOR_RGB2GRAY) for f in seq.frames]
    depths = np.stack([f.depth for f in seq.frames])
    seg, cache = MotionSegmenter(), {}
    out = np.zeros(depths.shape, bool)
    for s in range(len(gray) - window + 1):
        idx = list(range(s, s + window))
        pairs = [(a, b) for a in range(window) for b in range(window) if a != b and abs(a - b) <= reach]
        for a, b in pairs:
            if (idx[a], idx[b]) not in cache:
                cache[(idx[a], idx[b])] = dis.calc(gray[idx[a]], gray[idx[b]], None)
        flows = {(a, b): cache[(idx[a], idx[b])] for a, b in pairs}
        valid = {(a, b): fb_consistency(flows[(a, b)], flows[(b, a)]) for a, b in pairs}
        _, masks = seg.segment([seq.keys[k] for k in idx], depths[idx], seq.K, seq.poses[idx], flows, valid)
        out[idx] = masks > 0
    return out


def _build(seq, static_masks):
    m = VoxelMap(MapConfig(pixel_stride=0))
    for k, f in enumerate(seq.frames):
        m.integrate(f.depth, f.rgb, seq.K, seq.poses[k], static_masks[k], None)
    return m.points()


def test_map_of_rendered_sequence_is_static_and_segmentation_matters():
    from dynrecon_ros.data.synthetic import SyntheticConfig, render_sequence, static_surface_distance

    seq = render_sequence(SyntheticConfig(width=320, height=240, frames=12, movers=2, seed=3,
                                          depth_noise=0.001, depth_holes=0.02))
    dynamic = _segment(seq)

    def off_surface(points):
        return float(np.mean(static_surface_distance(points[:, :3]) > 0.05))

    with_seg = _build(seq, ~dynamic)
    without = _build(seq, np.ones_like(dynamic))
    # segmentation missed the movers in the first 3 frames: carving must leave no trail of them
    late = _build(seq, np.concatenate([np.ones_like(dynamic[:3]), ~dynamic[3:]]))
    print(f'points > 5 cm off static surfaces: segmented {off_surface(with_seg):.4f} ({len(with_seg)} pts), '
          f'unsegmented {off_surface(without):.4f}, segmented from frame 3 {off_surface(late):.4f}')
    assert len(with_seg) > 50000
    assert off_surface(with_seg) <= 0.02
    assert off_surface(late) <= 0.02
    assert off_surface(without) > 0.03 and off_surface(without) > 5 * off_surface(with_seg)


def test_invalid_depth_and_nan_are_ignored():
    m = VoxelMap(MapConfig(pixel_stride=0, min_weight=0))
    m.integrate(np.zeros((H, W), np.float32), RGB, K, _pose(), None)
    m.integrate(np.full((H, W), np.nan, np.float32), RGB, K, _pose(), None)
    assert len(m) == 0 and m.points().shape == (0, 6)
    d = _wall()
    d[::2] = np.nan
    m.integrate(d, RGB, K, _pose(), None)
    assert len(m) > 0 and np.isfinite(m.points()).all()


def test_voxels_inserted_between_stored_ones_keep_their_own_records():
    """New voxels land between stored keys (a wall seen again from a shifted, tilted view): every stored
    record must stay with its key (its mean position inside its voxel), the keys sorted; and the strided integration picks the same pixels as the whole image's stride grid."""
    from dynrecon_ros.static_map import _X, _Z, _keys
    m = VoxelMap(MapConfig(pixel_stride=3, voxel_size=0.02, min_weight=1, median_px=0))
    rng = np.random.default_rng(1)
    for k in range(5):
        depth = (2.0 + 0.3 * rng.random() + 0.002 * np.arange(W)[None, :] * k + np.zeros((H, 1))).astype(np.float32)
        rgb = np.dstack([np.full((H, W), 40 * k + c, np.uint8) for c in (10, 20, 30)])
        m.integrate(depth, rgb, K, _pose(0.013 * k, 0.007 * k), np.ones((H, W), bool))
    keys, data = m._key, m._data
    assert len(keys) > 1000 and np.all(np.diff(keys) > 0)
    idx = np.floor(data[:, _X:_Z + 1] / 0.02).astype(np.int64)
    np.testing.assert_array_equal(_keys(idx), keys)
    # stride 3: only pixels (3v, 3u) are integrated (a single frame, one voxel per pixel at 1 m)
    m1 = VoxelMap(MapConfig(pixel_stride=3, voxel_size=0.001, min_weight=1, median_px=0))
    m1.integrate(np.ones((H, W), np.float32), RGB, K, _pose(), np.ones((H, W), bool))
    assert len(m1) == len(range(0, H, 3)) * len(range(0, W, 3))


def test_carving_hits_exactly_the_voxels_of_the_plain_projection():
    """The carve projects every stored voxel in place (dead ones and those behind the camera masked): the
    voxels it weakens are those of the plain formula (live voxels in front gathered first, then projected)."""
    import cv2
    from dynrecon_ros.static_map import _W, _X, _Y, _Z
    rng = np.random.default_rng(3)
    m = VoxelMap(MapConfig(pixel_stride=0, median_px=0))
    n = 5000
    data = np.zeros((n, 8), np.float32)
    data[:, _X:_Z + 1] = rng.uniform([-3, -2, -1.0], [3, 2, 4.0], (n, 3))  # some behind the camera, some outside
    data[:, _W] = np.where(rng.random(n) < 0.2, 0.0, rng.uniform(1, 5, n))  # dead ones too
    key, data = _keyed(data, m.cfg.voxel_size)
    m._key, m._data = key, data.copy()
    depth = rng.uniform(2.5, 2.6, (H, W)).astype(np.float32)  # a wall: voxels in front of it are seen through
    depth[rng.random((H, W)) < 0.1] = 0
    good = depth > 0
    static = rng.random((H, W)) > 0.1
    pose = np.eye(4)
    pose[:3, :3] = cv2.Rodrigues(np.array([0.05, -0.1, 0.02]))[0]
    pose[:3, 3] = (0.1, -0.05, 0.2)
    m._carve(depth, good, static, K, pose)
    # the plain formula
    cfg = m.cfg
    wc = np.linalg.inv(pose)
    R, t = wc[:3, :3].astype(np.float32), wc[:3, 3].astype(np.float32)
    z = R[2, 0] * data[:, _X] + R[2, 1] * data[:, _Y] + R[2, 2] * data[:, _Z] + t[2]
    alive = np.flatnonzero((z > cfg.min_depth) & (data[:, _W] > 0))
    X, Y, Z, z = data[alive, _X], data[alive, _Y], data[alive, _Z], z[alive]
    u = np.rint((R[0, 0] * X + R[0, 1] * Y + R[0, 2] * Z + t[0]) * (1.0 / z) * np.float32(K[0, 0]) + np.float32(K[0, 2]))
    v = np.rint((R[1, 0] * X + R[1, 1] * Y + R[1, 2] * Z + t[1]) * (1.0 / z) * np.float32(K[1, 1]) + np.float32(K[1, 2]))
    ins = np.flatnonzero((u >= 0) & (u < W) & (v >= 0) & (v < H))
    pix = (v[ins] * np.float32(W) + u[ins]).astype(np.int64)
    zi = z[ins]
    near = cv2.erode(np.where(good, depth, np.float32(np.inf)), np.ones((3, 3), np.uint8)).ravel()
    margin = cfg.carve_margin + cfg.carve_margin_rel * zi
    dyn = good.ravel()[pix] & ~static.ravel()[pix] & (np.abs(zi - depth.ravel()[pix]) <= margin)
    hit = alive[ins][((zi < near[pix] - margin) & np.isfinite(near[pix])) | dyn]
    seen_dyn = alive[ins][dyn]
    want = data[:, _W].copy()
    want[hit] = np.maximum(want[hit] - cfg.free_weight, 0.0)
    want[seen_dyn] = np.maximum(data[seen_dyn, _W] - cfg.dynamic_weight, 0.0)
    assert 100 < hit.size < n // 2 and 0 < seen_dyn.size < hit.size
    np.testing.assert_array_equal(m._data[:, _W], want)


def _keyed(data: np.ndarray, voxel_size: float) -> tuple[np.ndarray, np.ndarray]:
    """(sorted keys, records in their order) of voxel records (n, 8) keyed by their mean position, as the map
    keys them."""
    from dynrecon_ros.static_map import _X, _Z, _keys
    key = _keys(np.floor(data[:, _X:_Z + 1] / np.float32(voxel_size)).astype(np.int64))
    key, first = np.unique(key, return_index=True)
    return key, data[first]


def test_a_wall_beyond_max_depth_is_not_carved():
    """A pixel without a reading within [min_depth, max_depth] carves up to max_depth only: a wall the camera
    moved away from (now read beyond max_depth) keeps its voxels (every voxel in view lost weight there when
    no reading counted as seen through at any depth); one within max_depth behind a hole is carved."""
    m = VoxelMap(MapConfig(pixel_stride=0, median_px=0, max_depth=2.5))
    for k in range(5):
        m.integrate(_wall(), RGB, K, _pose(), None)  # the wall at 2 m
    n = len(m.points())
    back = _pose()
    back[2, 3] = -1.0
    for _ in range(8):  # the camera 1 m back: the wall read at 3 m, beyond max_depth
        m.integrate(_wall(3.0), RGB, K, back, None)
    assert len(m.points()) == n and m._data[:, 0].min() == 5.0
    d = _wall()
    d[20:100, 40:120] = 0  # a hole in the readings, the wall within max_depth behind it
    for _ in range(4):
        m.integrate(d, RGB, K, _pose(), None)
    assert 0 < len(m.points()) < n


def test_carving_scans_only_the_voxels_a_frame_can_reach():
    """The carve projects the run of sorted keys within the view's x-extent (to the farthest depth a carve
    reaches): the same voxels weakened as by projecting every stored voxel, on a map reaching 60 m around."""
    from dynrecon_ros.static_map import _W, _X, _Z
    import cv2
    n = 40000
    for seed in range(4):
        r = np.random.default_rng(seed)
        pose = np.eye(4)
        pose[:3, :3] = cv2.Rodrigues(r.normal(0, 1.0, 3))[0]  # any direction: the x-extent differs
        pose[:3, 3] = r.uniform(-2, 2, 3)
        data = np.zeros((n, 8), np.float32)
        data[:, _X:_Z + 1] = r.uniform(-30, 30, (n, 3))
        z = r.uniform(0.5, 7.5, n // 2)  # half of them in the camera's view, some beyond its reach
        cam = np.c_[r.uniform(-0.7, 0.7, n // 2) * z, r.uniform(-0.5, 0.5, n // 2) * z, z]
        data[: n // 2, _X:_Z + 1] = cam @ pose[:3, :3].T + pose[:3, 3]
        data[:, _W] = r.uniform(1, 5, n)
        m = VoxelMap(MapConfig(pixel_stride=0, median_px=0))
        key, rec = _keyed(data, m.cfg.voxel_size)
        depth = r.uniform(1.0, 6.5, (H, W)).astype(np.float32)
        depth[r.random((H, W)) < 0.05] = 0
        good = (depth > m.cfg.min_depth) & (depth <= m.cfg.max_depth)
        static = r.random((H, W)) > 0.2
        full = VoxelMap(m.cfg)
        full._view_slab = lambda *a: (0, full._key.size)
        for mm in (m, full):
            mm._key, mm._data = key.copy(), rec.copy()
            mm._carve(depth, good, static, K, pose)
        lo, hi = m._view_slab(K, pose, H, W)
        hit = full._data[:, _W] < rec[:, _W]
        assert hit.sum() > 50 and hi - lo < 0.8 * len(key)
        np.testing.assert_array_equal(m._data, full._data)


def test_integrating_every_second_frame_keeps_the_per_frame_meaning_of_the_weights():
    """integrate_every=2: only the 1st, 3rd, ... frames are carved and integrated, each counting for two, so the
    map publishes after as many frames as integrating every frame (min_weight), and a person who paused long
    and left is gone after as many frames of the wall behind them (max_weight, free_weight)."""
    cfg = MapConfig(pixel_stride=0, integrate_every=2)
    m = VoxelMap(cfg)
    m.integrate(_wall(), RGB, K, _pose(), None)  # integrated, counting for 2 frames: published
    n = len(m)
    assert n > 0 and len(m.points()) == n
    m.integrate(_wall(1.5), RGB, K, _pose(), None)  # skipped: nothing carved (the wall at 2 m lies behind 1.5 m)
    assert len(m) == n and (m.points()[:, 2] < 1.8).sum() == 0
    m = VoxelMap(cfg)
    for k in range(90):
        m.integrate(_with_person(_wall()), RGB, K, _pose(0.001 * (k % 5)), np.ones((H, W), bool))
    assert (m.points()[:, 2] < 1.5).sum() > 100
    n_clear = int(cfg.max_weight - cfg.min_weight) + 1
    for k in range(n_clear + 1):  # (+1: the skipped frame of the pair)
        m.integrate(_wall(), RGB, K, _pose(), np.ones((H, W), bool))
    assert (m.points()[:, 2] < 1.9).sum() == 0
    with pytest.raises(InputError, match='integrate_every'):
        MapConfig(integrate_every=0)


def test_unique_inverse_is_numpys_unique():
    """The map's stable-sort unique gives np.unique's sorted keys and inverse (runs, duplicates, one key, none)."""
    from dynrecon_ros.static_map import _unique_inverse
    rng = np.random.default_rng(2)
    runs = np.repeat(rng.integers(-2 ** 40, 2 ** 40, 300), rng.integers(1, 9, 300))
    for key in (runs, rng.integers(0, 50, 1000), np.array([7]), np.zeros(0, np.int64)):
        key = key.astype(np.int64)
        want = np.unique(key, return_inverse=True)
        got = _unique_inverse(key)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1].ravel())
