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
