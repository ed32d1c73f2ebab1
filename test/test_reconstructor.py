"""End-to-end tests of the Reconstructor on rendered sequences with exact ground truth."""
import cv2
import numpy as np
import pytest

from dynrecon_ros.config import ReconConfig
from dynrecon_ros.data.synthetic import SyntheticConfig, render_sequence
from dynrecon_ros.frames import Frame
from dynrecon_ros.reconstructor import FrameResult, Reconstructor


def ate_rmse(est: np.ndarray, gt: np.ndarray) -> float:
    """SE(3)-aligned ATE RMSE of (N, 4, 4) positions (Umeyama without scale)."""
    A, B = est[:, :3, 3], gt[:, :3, 3]
    ma, mb = A.mean(0), B.mean(0)
    U, _, Vt = np.linalg.svd((B - mb).T @ (A - ma))
    D = np.eye(3)
    D[2, 2] = np.sign(np.linalg.det(U @ Vt))
    R = U @ D @ Vt
    e = A @ R.T + (mb - R @ ma) - B
    return float(np.sqrt((e ** 2).sum(1).mean()))


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    return float((pred & gt).sum() / max((pred | gt).sum(), 1))


def run(seq, cfg=None, frames=None):
    rec = Reconstructor(cfg or ReconConfig())
    out = []
    for f in (frames if frames is not None else seq.frames):
        out += rec.push(f)
    out += rec.flush()
    return rec, out


def map_outlier_fraction(rec, seq, first_index=0):
    pts = rec.static_map()
    P0 = seq.poses[first_index]
    d = seq.static_surface_distance(pts[:, :3] @ P0[:3, :3].T + P0[:3, 3])
    return float((d > 0.05).mean()), len(pts)


@pytest.fixture(scope='module')
def seq():
    # the default sequence's opening: movers cover about a quarter of the view
    return render_sequence(SyntheticConfig(width=320, height=240, frames=30, seed=0))


@pytest.fixture(scope='module')
def clip(seq):
    return seq.frames, seq.poses, seq.masks


@pytest.fixture(scope='module')
def result(clip):
    frames, _, _ = clip
    return run(None, frames=frames)


def test_tracks_with_movers_in_view(clip, result):
    frames, poses, masks = clip
    rec, out = result
    assert [r.key for r in out] == [f.key for f in frames]
    assert all(isinstance(r, FrameResult) and r.status == 'ok' for r in out)
    est = np.array([r.pose for r in out])
    assert np.allclose(est[0], np.eye(4))  # world = first camera
    ate = ate_rmse(est, poses)
    assert ate < 0.01, f'ATE {ate * 1000:.1f} mm'
    pred = np.array([r.mask > 0 for r in out])
    assert masks.mean() > 0.1
    m_iou = iou(pred[2:], masks[2:])  # the first frames have little evidence yet
    assert m_iou > 0.75, f'IoU {m_iou:.3f}'
    r = out[5]
    assert r.depth.shape == (240, 320) and r.mask.dtype == np.uint8 and r.dynamic_prob.dtype == np.float32
    assert r.confidence.shape == (240, 320) and r.K.shape == (3, 3)
    assert set(rec.timings) >= {'flow', 'pose', 'alignment', 'segmentation', 'map', 'total'}


def test_static_map_has_no_movers(seq, clip, result):
    rec, _ = result
    far, n = map_outlier_fraction(rec, seq, first_index=0)
    assert n > 1000
    assert far < 0.02, f'{100 * far:.2f}% of map points > 5 cm from static surfaces'


def test_segmentation_matters(seq, clip, result):
    """Without masking the movers, the map collects them.

    The trajectory comparison is in test_full_default_sequence_targets: on this 30-frame clip both
    ATEs are ~0.6-0.7 mm and their order is sampling noise (main before the speed work: off/on =
    0.92; variants of the RANSAC / refinement sampling: 0.83-1.10), while over 90 frames, where a
    mover comes close to the camera, segmentation-off is clearly worse (off/on 1.27-1.5).
    """
    frames, poses, _ = clip
    cfg = ReconConfig()
    cfg.segmentation.enabled = False
    rec_off, out_off = run(None, cfg, frames=frames)
    rec_on, out_on = result
    far_on, _ = map_outlier_fraction(rec_on, seq, 0)
    far_off, _ = map_outlier_fraction(rec_off, seq, 0)
    assert far_off > 3 * far_on and far_off > 0.02, (far_on, far_off)


def test_static_scene_flags_no_pixel():
    """Without movers the whole pipeline (poses, windowed segmentation with hysteresis) flags nothing."""
    static = render_sequence(SyntheticConfig(width=320, height=240, frames=20, seed=5, movers=0))
    _, out = run(static)
    assert all(r.status == 'ok' for r in out)
    assert sum(int((r.mask > 0).sum()) for r in out) == 0


def test_bad_frames_are_skipped_with_reasons(seq):
    good = seq.frames[:12]
    logs = []
    rec = Reconstructor(log=logs.append)
    f = good
    black = Frame(f[3].stamp + 0.001, np.zeros_like(f[3].rgb), f[3].depth, f[3].K, key='black')
    nodepth = Frame(f[4].stamp + 0.001, f[4].rgb, np.zeros_like(f[4].depth), f[4].K, key='nodepth')
    dup = Frame(f[5].stamp, f[5].rgb, f[5].depth, f[5].K, key='dup')
    noK = Frame(f[6].stamp + 0.001, f[6].rgb, f[6].depth, None, key='noK')
    # a frame from elsewhere in the sequence (a jump) with a plausible stamp
    far = seq.frames[29]
    jump = Frame(f[7].stamp + 0.01, far.rgb, far.depth, far.K, key='jump')
    stream = [f[0], f[1], f[2], f[3], black, f[4], nodepth, f[5], dup, f[6], noK, f[7], jump] + list(f[8:])
    out = []
    for fr in stream:
        out += rec.push(fr)
    out += rec.flush()
    assert [r.key for r in out] == [fr.key for fr in stream]
    status = {r.key: (r.status, r.reason) for r in out}
    for k in ['black', 'nodepth', 'dup', 'noK', 'jump']:
        assert status[k][0] == 'skipped', k
        assert status[k][1]
    assert 'constant' in status['black'][1]
    assert 'depth' in status['nodepth'][1]
    assert 'timestamp' in status['dup'][1]
    assert 'intrinsics' in status['noK'][1]
    assert 'jump' in status['jump'][1] or 'tracking lost' in status['jump'][1]
    assert sum(s == 'ok' for s, _ in status.values()) == len(good)
    assert len(logs) == 5 and all('skipped' in m for m in logs)
    est = np.array([r.pose for r in out if r.status == 'ok'])
    assert ate_rmse(est, seq.poses[:12]) < 0.01  # tracking continued through the bad frames


def test_default_intrinsics_used_when_frames_have_none(seq):
    K = seq.K
    cfg = ReconConfig.from_dict({'intrinsics': [K[0, 0], K[1, 1], K[0, 2], K[1, 2]]})
    frames = [Frame(f.stamp, f.rgb, f.depth, None, key=f.key) for f in seq.frames[:6]]
    _, out = run(None, cfg, frames=frames)
    assert all(r.status == 'ok' for r in out)
    assert np.allclose(out[0].K, K)
    assert ate_rmse(np.array([r.pose for r in out]), seq.poses[:6]) < 0.005


@pytest.mark.slow
def test_full_default_sequence_targets():
    """The issue's targets on the 90-frame default sequence (320x240, two movers)."""
    seq = render_sequence(SyntheticConfig(width=320, height=240, frames=90, seed=0))
    rec, out = run(seq)
    est = np.array([r.pose for r in out])
    ate = ate_rmse(est, seq.poses)
    assert ate < 0.01, f'ATE {ate * 1000:.1f} mm'
    pred = np.array([r.mask > 0 for r in out])
    m_iou = iou(pred, seq.masks)
    assert m_iou > 0.9, f'IoU {m_iou:.3f}'  # target 0.85, aim 0.9 (bench: 0.92)
    far, _ = map_outlier_fraction(rec, seq)
    assert far < 0.02
    # segmentation matters: without it the map collects the movers. (The trajectory no longer depends
    # on it here: RANSAC, the motion halo and the gain-compensated photometric refinement give 0.82 mm
    # without masks, 0.83 mm with them; the movers' share of the pose is tested in test_predictor_rgbd.)
    cfg = ReconConfig()
    cfg.segmentation.enabled = False
    rec_off, out_off = run(seq, cfg)
    ate_off = ate_rmse(np.array([r.pose for r in out_off]), seq.poses)
    assert ate_off < 0.01, f'ATE without segmentation {ate_off * 1000:.1f} mm'
    far_off, _ = map_outlier_fraction(rec_off, seq)
    assert far_off > 0.02 and far_off > 3 * far, (far_off, far)


def test_downscale_frame_keeps_geometry_and_foreground_edges():
    from dynrecon_ros.work_size import downscale_frame, upsample
    K = np.array([[500.0, 0, 319.5], [0, 500.0, 239.5], [0, 0, 1]])
    depth = np.full((480, 640), 3.0, np.float32)
    depth[100:301, 201:400] = 1.5  # a box whose left and bottom edges cut through 2x2 blocks
    depth[0:10, 0:10] = 0  # no reading
    rgb = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    f = Frame(1.0, rgb, depth, K, key='k')
    w = downscale_frame(f, 2)
    assert w.rgb.shape == (240, 320, 3) and w.depth.shape == (240, 320) and w.key == 'k'
    # the principal point stays on the optical axis: full-res pixel 319.5 = centre of work pixel 159.5
    assert np.allclose(w.K, [[250, 0, 159.5], [0, 250, 119.5], [0, 0, 1]])
    assert np.all(w.depth[:5, :5] == 0)
    # blocks across the box's edges take the box's (nearest) depth, never a mix
    assert set(np.unique(w.depth[40:160, 90:210])) <= {1.5, 3.0}
    assert w.depth[50, 100] == 1.5 and w.depth[150, 150] == 1.5 and w.depth[50, 99] == 3.0
    up = upsample(w.depth, 2, (481, 641), cv2.INTER_NEAREST)
    assert up.shape == (481, 641) and np.array_equal(up[:480, :640][::2, ::2], w.depth)


@pytest.mark.parametrize('s', [2, 3])
def test_downscaled_depth_equals_the_block_statistics_bit_for_bit(s):
    """The work depth (contiguous block positions, in-place sums) is bit-identical to the plain formula over
    strided views: mean of a block's readings on one surface, else the nearest, 0 without any."""
    from dynrecon_ros.work_size import downscale_depth
    rng = np.random.default_rng(s)
    d = rng.uniform(1.995, 2.005, (97, 131)).astype(np.float32)  # one surface per block ...
    d[:, 61:] += np.float32(1.0)  # ... but for a depth step through blocks
    d[40:50] = rng.uniform(0.3, 6.0, (10, 131))  # and rows of scattered readings
    d[rng.random(d.shape) < 0.2] = 0  # no reading (the work frame's cleaned depth)
    d[:s * 3, :s * 3] = 0  # whole blocks without any
    h, w = 97 // s, 131 // s
    views = [d[dy:h * s:s, dx:w * s:s] for dy in range(s) for dx in range(s)]
    cnt = sum((v > 0).astype(np.float32) for v in views)
    mean = sum(views) / np.maximum(cnt, 1)
    near = np.minimum.reduce([np.where(v > 0, v, np.float32(np.inf)) for v in views])
    far = np.maximum.reduce(views)
    ref = np.where(cnt == 0, 0, np.where(far - near <= 0.02 * near + 0.01, mean, near)).astype(np.float32)
    out = downscale_depth(d, s)
    assert out.dtype == np.float32 and out.shape == (h, w)
    np.testing.assert_array_equal(out.view(np.uint32), ref.view(np.uint32))
    assert (out == 0).sum() >= 9 and ((out > 0) & (out != near)).any()  # both kinds of blocks occur


def test_large_frames_are_processed_at_the_work_size_with_outputs_at_input_size():
    big = render_sequence(SyntheticConfig(width=640, height=480, frames=12, seed=0))
    rec, out = run(big)
    assert all(r.status == 'ok' for r in out)
    r = out[6]
    assert r.mask.shape == (480, 640) and r.dynamic_prob.shape == (480, 640) and r.confidence.shape == (480, 640)
    assert r.depth is big.frames[6].depth and np.allclose(r.K, big.K)
    assert rec.window.entries[-1].frame.rgb.shape == (240, 320, 3)  # processed at 320x240
    assert ate_rmse(np.array([r.pose for r in out]), big.poses) < 0.005
    pred = np.array([r.mask > 0 for r in out])
    assert iou(pred[2:], big.masks[2:]) > 0.8
    cfg = ReconConfig()
    cfg.max_work_width = 0  # off: processed at the input size
    rec0, out0 = run(None, cfg, frames=big.frames[:3])
    assert rec0.window.entries[-1].frame.rgb.shape == (480, 640, 3) and out0[2].mask.shape == (480, 640)


@pytest.mark.slow
def test_full_sequence_targets_at_640x480():
    """The issue's 640x480 targets (ATE <= 5 mm, IoU >= 0.85, map) on the default processing size."""
    seq = render_sequence(SyntheticConfig(width=640, height=480, frames=90, seed=0))
    rec, out = run(seq)
    ate = ate_rmse(np.array([r.pose for r in out]), seq.poses)
    assert ate < 0.005, f'ATE {ate * 1000:.1f} mm'
    m_iou = iou(np.array([r.mask > 0 for r in out]), seq.masks)
    assert m_iou > 0.9, f'IoU {m_iou:.3f}'
    far, _ = map_outlier_fraction(rec, seq)
    assert far < 0.02


@pytest.mark.slow
def test_no_drift_blow_up_over_300_frames():
    seq = render_sequence(SyntheticConfig(width=320, height=240, frames=300, seed=1))
    rec, out = run(seq)
    assert all(r.status == 'ok' for r in out)
    est = np.array([r.pose for r in out])
    ate = ate_rmse(est, seq.poses)
    assert ate < 0.01, f'ATE {ate * 1000:.1f} mm over 300 frames'
    # error of the last third no worse than a few times that of the first third (no blow-up)
    gt = np.linalg.inv(seq.poses[0]) @ seq.poses
    err = np.linalg.norm(est[:, :3, 3] - gt[:, :3, 3], axis=1)
    assert err[200:].max() < 0.03


class _LosingTracking:
    """The real pair predictor, except that it finds no pose while ``lost`` (tracking lost)."""

    def __init__(self, inner):
        self.inner, self.lost = inner, False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def relative_pose(self, a, b, flow, static, init=None, **kw):
        if self.lost:
            return None, np.zeros(0, bool), 0
        return self.inner.relative_pose(a, b, flow, static, init=init, **kw)


def test_flow_cache_stays_bounded_while_tracking_is_lost():
    """Skipped frames (tracking lost after their flows were computed) leave no flows behind: the cache
    holds at most the pairs among the window's frames and keyframes, however long tracking stays lost."""
    rng = np.random.default_rng(0)
    h, w = 120, 160
    yy, xx = np.mgrid[0:h, 0:w]
    depth = (2.0 + 0.008 * xx + 0.004 * yy).astype(np.float32)
    K = np.array([[131.0, 0, w / 2], [0, 131.0, h / 2], [0, 0, 1]])
    base = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    rec = Reconstructor()
    rec.step.pred = lost = _LosingTracking(rec.step.pred)
    frame = lambda i: Frame(stamp=i * 0.1, rgb=np.roll(base, i, axis=1), depth=depth.copy(), K=K.copy(), key=f'{i}')
    for i in range(6):
        rec.push(frame(i))
    lost.lost = True
    results = [r for i in range(6, 36) for r in rec.push(frame(i))]
    kept = len(rec.window.all_entries())
    assert len(rec.flows) <= kept * (kept - 1) // 2, (len(rec.flows), kept)
    assert sum(r.status == 'skipped' for r in results + rec.flush()) == 30


def test_flow_is_computed_once_per_pair_and_grey_once_per_frame(seq):
    """Per step: two DIS computations (forward, backward) per pair of the newest frame and nothing for
    the frames already seen: each frame's grey image is made once, however many pairs it is in. The
    forward-backward checks run once each where used: the backward one of every pair (the newest
    frame's evidence), the forward one on the pose's stride grid, and in full only for pairs whose
    older frame the segmentation still updates (not published)."""
    rec = Reconstructor()
    pairs, updated = [], []
    newest = rec.window.pairs_for_newest
    rec.window.pairs_for_newest = lambda: (lambda p: (pairs.append(len(p)), p)[1])(newest())
    segment_newest = rec.segmenter.segment_newest

    def counting(prs, pfs, **kw):
        updated.append(sum(not s for s in kw['skip_frames'][:-1]))
        return segment_newest(prs, pfs, **kw)
    rec.segmenter.segment_newest = counting
    for f in seq.frames[:14]:
        rec.push(f)
    assert sum(pairs) > 13  # keyframe anchors: more pairs than frames
    assert rec.flows.computed == 2 * sum(pairs)
    assert rec.flows.gray_computed == 14
    assert len(updated) == 13 and sum(updated) < sum(pairs)  # published anchors are not updated
    assert rec.flows.grid_checked == sum(pairs)
    assert rec.flows.checked == sum(pairs) + sum(updated)


def test_the_window_step_protocol_is_all_the_reconstructor_calls():
    """Both backends' steps implement WindowStep; a predictor whose step is a bare WindowStep (no
    other predictor method) drives the whole pipeline: poses and depth from the step come out."""
    from dynrecon_ros.monocular import MonocularWindow
    from dynrecon_ros.rgbd_step import RGBDStep
    from dynrecon_ros.window import WindowStep
    rec = Reconstructor()
    assert isinstance(rec.step, RGBDStep) and isinstance(rec.step, WindowStep)
    assert isinstance(MonocularWindow.__new__(MonocularWindow), WindowStep)

    class Step:
        needs_depth, estimates_intrinsics = False, True

        def work_frame(self, frame):
            return frame

        def step(self, window, entry, published, world_pose):
            if entry.frame.key == 'bad':
                return 'planted reason'
            entry.pose = world_pose @ np.diag([1.0, 1.0, 1.0, 1.0])
            entry.pose[0, 3] = entry.index
            entry.frame.depth = np.full(entry.frame.rgb.shape[:2], 2.0, np.float32)
            entry.frame.K = np.array([[30.0, 0, 16], [0, 30.0, 12], [0, 0, 1]])
            return ''

    class OnlyAStep:  # no relative_pose, predict_window, flags...: only window_step
        def window_step(self, cfg, flows, segmenter, times, device):
            return Step()

    rgb = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    rec = Reconstructor(ReconConfig.from_dict({'window': {'output_lag': 1}}), predictor=OnlyAStep())
    out = []
    for i, key in enumerate(['a', 'b', 'bad', 'c']):
        out += rec.push(Frame(stamp=0.1 * i, rgb=rgb, depth=None, K=None, key=key))
    out += rec.flush()
    assert [(r.key, r.status) for r in out] == [('a', 'ok'), ('b', 'ok'), ('bad', 'skipped'), ('c', 'ok')]
    assert out[2].reason == 'planted reason'
    assert [r.pose[0, 3] for r in out if r.status == 'ok'] == [0, 1, 3]  # push indices (the bad one popped)
    assert all((r.depth == 2.0).all() for r in out if r.status == 'ok')


def test_opencv_threads_is_set_for_the_process_when_the_reconstructor_is_built():
    """opencv_threads (default 1) sets OpenCV's worker threads; 0 leaves OpenCV's setting; < 0 is an error."""
    from dynrecon_ros.errors import InputError
    before = cv2.getNumThreads()
    try:
        cv2.setNumThreads(3)
        Reconstructor(ReconConfig())
        assert cv2.getNumThreads() == 1
        cfg = ReconConfig()
        cfg.opencv_threads = 0
        cv2.setNumThreads(3)
        Reconstructor(cfg)
        assert cv2.getNumThreads() == 3
        cfg.opencv_threads = 2
        Reconstructor(cfg)
        assert cv2.getNumThreads() == 2
        cfg.opencv_threads = -1
        with pytest.raises(InputError, match='opencv_threads'):
            Reconstructor(cfg)
    finally:
        cv2.setNumThreads(before)


def test_blas_threads_is_set_for_the_process_when_the_reconstructor_is_built():
    """blas_threads (default 1) sets numpy's BLAS threads; 0 leaves the setting; < 0 is an error."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from dynrecon_ros.errors import InputError

    def blas():
        return {i['num_threads'] for i in threadpool_info() if i['user_api'] == 'blas'}
    with threadpool_limits(limits=3, user_api='blas'):  # restores the BLAS threads afterwards
        Reconstructor(ReconConfig())
        assert blas() == {1}
        cfg = ReconConfig()
        cfg.blas_threads = 0
        threadpool_limits(limits=3, user_api='blas')
        Reconstructor(cfg)
        assert blas() == {3}
        cfg.blas_threads = 2
        Reconstructor(cfg)
        assert blas() == {2}
        cfg.blas_threads = -1
        with pytest.raises(InputError, match='blas_threads'):
            Reconstructor(cfg)


def test_static_map_without_waiting_returns_while_the_map_thread_is_busy(seq):
    """static_map(wait=False) (the node's periodic publishing) gives the map as integrated so far while a
    map-thread job is still running; static_map() waits for it."""
    import threading
    rec = Reconstructor(ReconConfig())
    for f in seq.frames[:8]:
        rec.push(f)
    before = rec.static_map()
    assert len(before) > 0
    release = threading.Event()
    rec._map_run(release.wait)  # the map thread busy (a long integration, say)
    got = []
    reader = threading.Thread(target=lambda: got.append(rec.static_map(wait=False)), daemon=True)
    reader.start()
    reader.join(5.0)
    waiting = threading.Thread(target=lambda: got.append(rec.static_map()), daemon=True)
    waiting.start()
    waiting.join(0.5)
    try:
        assert not reader.is_alive() and len(got) == 1, 'static_map(wait=False) waited for the map thread'
        np.testing.assert_array_equal(got[0], before)
        assert waiting.is_alive(), 'static_map() did not wait for the queued map job'
    finally:
        release.set()
    waiting.join(5.0)
    assert len(got) == 2


def test_stage_a_computes_the_checks_image_figures_and_stage_b_uses_them(seq):
    """prepare (stage A) measures the valid-depth fraction and the grey std once; stage B's checks read
    them from the Prepared frame (not again from the image)."""
    rec = Reconstructor(ReconConfig())
    f0, f1 = seq.frames[0], seq.frames[1]
    p0 = rec.prepare(f0)
    valid = float((f0.depth > 0).mean())
    assert p0.stats is not None and abs(p0.stats[0] - valid) < 1e-12 and p0.stats[1] > 10
    assert [r.status for r in rec.push_prepared(p0)] == []
    p1 = rec.prepare(f1)
    p1.stats = (0.01, p1.stats[1])  # as if stage A had seen almost no depth
    rec.push_prepared(p1)
    out = rec.flush()
    assert [r.status for r in out] == ['ok', 'skipped'] and 'of the depth is valid' in out[1].reason


def test_a_frame_whose_long_pairs_all_fail_gets_a_pair_two_frames_back(seq):
    """RGBDStep._span_pair: when the long-pair gates drop every long pair of the newest frame (a close person over
    the view: close_crossing 1317 / 1335 3.55 / 3.75 -> 1.76 / 2.36 mm), a pair with the frame two back in the
    window joins the alignment, so the adjacent pair is not the frame's only constraint. On a sequence whose long
    pairs hold it never fires."""
    def run_with(drop: bool):
        rec = Reconstructor()
        if drop:  # stand-in for the gates: every long pair dropped
            rec.step._long_pair_moves = lambda pairs, rel: ([rel[0]] + [(None, i, n) for _, i, n in rel[1:]], set())
        added = []
        span = rec.step._span_pair

        def recording(window, entry, pairs, rel):
            before = set(rec.step._constraints)
            span(window, entry, pairs, rel)
            added.extend(b - a for a, b in set(rec.step._constraints) - before)
        rec.step._span_pair = recording
        out = []
        for f in seq.frames[:16]:
            out += rec.push(f)
        out += rec.flush()
        return added, np.array([r.pose for r in out])

    added, _ = run_with(False)
    assert added == []
    added, poses = run_with(True)
    assert added == [2] * len(added) and len(added) >= 12, added  # frames 3..15 (frame 2's two-back is a keyframe)
    assert ate_rmse(poses, np.array(seq.poses[:16])) < 0.003


def test_the_last_frame_is_cleaned_by_the_segmenter_with_its_hold(monkeypatch):
    """The stream's last frame (segmented only as the newest of its call) gets its mask from
    MotionSegmenter.newest_mask, which applies the hold it inherited (its own test:
    test_segmentation.py::test_the_newest_frame_cleaned_at_the_end_of_a_stream_keeps_its_hold), not from its
    probability alone; that mask is the one emitted."""
    from dynrecon_ros.segmentation import MotionSegmenter

    seq = render_sequence(SyntheticConfig(width=160, height=120, frames=8, seed=0))
    made = {}
    real = MotionSegmenter.newest_mask

    def spy(self, key, prob, depth, stamp):
        made[key] = real(self, key, prob, depth, stamp)
        return made[key]

    monkeypatch.setattr(MotionSegmenter, 'newest_mask', spy)
    rec = Reconstructor(ReconConfig(), device='cpu')
    out = [r for f in seq.frames for r in rec.push(f)]
    assert not made  # frames emitted before the end were cleaned as older frames of later calls
    out += rec.flush()
    last = out[-1]
    assert list(made) == [last.key] and made[last.key] is not None and made[last.key].any()
    np.testing.assert_array_equal(last.mask > 0, made[last.key] > 0)
