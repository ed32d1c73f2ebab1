import numpy as np

from dynrecon_ros.config import FlowConfig
from dynrecon_ros.flow import FlowCache, fb_consistency, warp


def _texture(h=120, w=160, seed=0):
    import cv2
    rng = np.random.default_rng(seed)
    img = rng.uniform(0, 255, (h // 4, w // 4)).astype(np.float32)
    img = cv2.resize(img, (w, h), interpolation=cv2.INTER_CUBIC)
    return np.repeat(np.clip(img, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def test_dis_recovers_a_translation_and_fb_check_flags_occlusion():
    a = _texture()
    b = np.roll(a, (1, 2), axis=(0, 1))  # content moves +2 px in x, +1 px in y
    cache = FlowCache(FlowConfig())
    pf = cache.get('a', a, 'b', b)
    inner = (slice(10, -10), slice(10, -10))
    assert np.median(np.abs(pf.fwd[inner][..., 0] - 2.0)) < 0.2
    assert np.median(np.abs(pf.fwd[inner][..., 1] - 1.0)) < 0.2
    assert pf.valid_fwd[inner].mean() > 0.9
    # cached, and the reverse pair reuses it swapped
    assert cache.get('a', a, 'b', b) is pf
    rev = cache.get('b', b, 'a', a)
    assert rev.fwd is pf.bwd and cache.computed == 2
    cache.keep_only({'a'})
    assert len(cache) == 0


def test_fb_consistency_detects_disagreement():
    h, w = 20, 30
    fwd = np.zeros((h, w, 2), np.float32)
    fwd[..., 0] = 3.0
    bwd = np.zeros((h, w, 2), np.float32)
    bwd[..., 0] = -3.0
    ok = fb_consistency(fwd, bwd)
    assert ok[:, :w - 3].all()  # consistent where the end point is inside
    assert not ok[:, -2:].any()  # end point outside the image
    bwd[5:10, :] = 0.0  # backward flow disagrees in a band
    ok = fb_consistency(fwd, bwd)
    assert not ok[5:10, :w - 3].any() and ok[12:, :w - 3].all()


def test_warp_samples_at_flow_end():
    img = np.arange(50, dtype=np.float32).reshape(5, 10)
    flow = np.zeros((5, 10, 2), np.float32)
    flow[..., 0] = 1.0
    out = warp(img, flow)
    assert np.allclose(out[:, :-1], img[:, 1:])
    assert np.isnan(out[:, -1]).all()


def _smooth_flow(h, w, seed, amp):
    import cv2
    rng = np.random.default_rng(seed)
    coarse = rng.normal(0, amp, (h // 8, w // 8, 2)).astype(np.float32)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)


def test_fb_consistency_matches_a_bilinear_reference_both_ways():
    """The planar check (two one-channel remaps) against the definition, with scipy's bilinear sampling."""
    from scipy.ndimage import map_coordinates

    from dynrecon_ros.flow import fb_consistency_both
    h, w = 48, 64
    fwd = _smooth_flow(h, w, 1, 3.0)
    bwd = -fwd + _smooth_flow(h, w, 2, 0.8)  # mostly consistent, with disagreeing patches

    def reference(f, b, thr=1.0, rel=0.05):
        v, u = np.mgrid[0:h, 0:w].astype(np.float64)
        eu, ev = u + f[..., 0], v + f[..., 1]
        back = np.stack([map_coordinates(b[..., c].astype(np.float64), [ev, eu], order=1, mode='nearest')
                         for c in range(2)], -1)
        err = np.linalg.norm(f + back, axis=-1)
        inside = (eu >= 0) & (eu <= w - 1) & (ev >= 0) & (ev <= h - 1)
        return (err < thr + rel * np.linalg.norm(f, axis=-1)) & inside

    vf, vb = fb_consistency_both(fwd, bwd)
    for got, ref in ((vf, reference(fwd, bwd)), (vb, reference(bwd, fwd))):
        assert 0.2 < ref.mean() < 0.95  # both outcomes occur
        assert (got != ref).mean() < 0.01  # OpenCV's remap rounds positions to 1/32 px
    assert np.array_equal(vf, fb_consistency(fwd, bwd)) and np.array_equal(vb, fb_consistency(bwd, fwd))


def test_flow_cache_converts_each_frame_to_grey_once():
    imgs = {k: _texture(seed=s) for s, k in enumerate('abcd')}
    cache = FlowCache(FlowConfig())
    for a, b in [('a', 'b'), ('a', 'c'), ('b', 'c'), ('c', 'd'), ('a', 'd'), ('b', 'd')]:
        cache.get(a, imgs[a], b, imgs[b])
    assert cache.computed == 12 and cache.gray_computed == 4
    cache.keep_only(set())
    cache.get('a', imgs['a'], 'b', imgs['b'])  # pairs forgotten, grey images kept
    assert cache.computed == 14 and cache.gray_computed == 4
    new_a = imgs['a'].copy()
    cache.get('a', new_a, 'c', imgs['c'])  # another image under a known key is converted again
    assert cache.gray_computed == 5
    for k in range(FlowCache.gray_frames + 2):  # bounded: the oldest keys go
        cache.gray(f'x{k}', imgs['d'])
    assert len(cache._gray) == FlowCache.gray_frames


def test_pair_checks_run_on_first_use_and_the_pose_grid_alone_checks_only_its_pixels():
    h, w = 50, 70
    fwd = _smooth_flow(h, w, 4, 3.0)
    bwd = -fwd + _smooth_flow(h, w, 5, 0.8)
    a, b = _texture(h, w, 0), _texture(h, w, 1)

    class Given:  # an estimator returning these flows
        def compute(self, x, y):
            return fwd if x is ga else bwd
    cache = FlowCache(FlowConfig(), estimator=Given())
    ga = cache.gray('a', a)
    pf = cache.get('a', a, 'b', b)
    assert cache.checked == 0 and cache.grid_checked == 0
    ref_f, ref_b = fb_consistency(fwd, bwd), fb_consistency(bwd, fwd)
    for st in (1, 3, 4):
        assert np.array_equal(pf.valid_fwd_on_grid(st), ref_f[::st, ::st])
    assert cache.grid_checked == 3 and cache.checked == 0
    rev = cache.get('b', b, 'a', a)  # the reversed view shares the checks
    assert np.array_equal(rev.valid_fwd, ref_b) and cache.checked == 1
    assert pf.valid_bwd is rev.valid_fwd and cache.checked == 1
    assert np.array_equal(pf.valid_fwd, ref_f) and cache.checked == 2
    assert np.array_equal(pf.valid_fwd_on_grid(3), ref_f[::3, ::3]) and cache.grid_checked == 3
    assert pf.valid_fwd is rev.valid_bwd and cache.checked == 2
    # built directly, the validity is the given one (None: none)
    from dynrecon_ros.flow import PairFlow
    given = PairFlow(fwd, bwd, None, ref_b)
    assert given.valid_fwd is None and given.valid_fwd_on_grid(2) is None and given.reversed().valid_fwd is ref_b


def test_guided_flow_reaches_a_displacement_beyond_dis():
    """A 36 px shift (a far anchor seen again after the camera turned): DIS alone loses it, the flow around a prior
    4 px off finds it, and its validity says where."""
    import cv2
    a = _texture(seed=3)
    M = np.float32([[1, 0, 36], [0, 1, 5]])  # content moves +36 px in x, +5 in y
    b = cv2.warpAffine(a, M, (a.shape[1], a.shape[0]), borderMode=cv2.BORDER_REFLECT)
    cache = FlowCache(FlowConfig())
    inner = (slice(15, -15), slice(15, -60))  # pixels whose match stays in view
    plain = cache.get('a', a, 'b', b)
    plain_ok = plain.valid_fwd[inner] & (np.abs(plain.fwd[inner][..., 0] - 36) < 1)
    prior = np.zeros(a.shape[:2] + (2,), np.float32)
    prior[..., 0], prior[..., 1] = 32.0, 6.0
    g = cache.guided('a', a, 'b', b, prior)
    assert g.bwd is None and g.valid_fwd.dtype == bool
    err = np.abs(g.fwd[inner] - np.float32([36, 5]))
    assert np.median(err) < 0.2
    assert g.valid_fwd[inner].mean() > 0.8 and plain_ok.mean() < 0.5
    assert not g.valid_fwd[:, -20:].any()  # their match leaves frame b
    assert (err[g.valid_fwd[inner]] < 1).mean() > 0.97
