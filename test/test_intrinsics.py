import numpy as np
import pytest

from dynrecon_ros.errors import InputError
from dynrecon_ros.geometry import pixel_grid
from dynrecon_ros.intrinsics import estimate_focal, estimate_focals, resolve_focals


def _pointmap(f, h, w, rng, pp=None):
    pp = np.array([w / 2, h / 2]) if pp is None else pp
    depth = 1.5 + rng.random((h, w)) * 3.0
    uv = pixel_grid(h, w) - pp
    return np.dstack([uv[..., 0] * depth / f, uv[..., 1] * depth / f, depth])


@pytest.mark.parametrize('f', [60.0, 250.0, 800.0])
def test_focal_recovered_with_noise_and_outliers(f):
    rng = np.random.default_rng(1)
    h, w = 48, 64
    pts = _pointmap(f, h, w, rng)
    pts *= 1 + 0.003 * rng.standard_normal(pts.shape)  # relative noise
    out = rng.random((h, w)) < 0.1  # 10 % gross outliers
    pts[out, :2] *= rng.uniform(0.3, 2.0, (out.sum(), 1))  # wrong rays (e.g. flying pixels at edges)
    est = estimate_focal(pts)
    assert abs(est - f) / f < 0.01
    # the plain least-squares start is worse than the robust fit on this data (the robust loop matters)
    est0 = estimate_focal(pts, iterations=0)
    assert abs(est0 - f) > abs(est - f)


def test_conf_masks_outliers_and_pp():
    rng = np.random.default_rng(2)
    h, w = 40, 50
    pp = np.array([26.0, 19.0])
    pts = _pointmap(100.0, h, w, rng, pp)
    conf = np.ones((h, w)) * 3
    bad = rng.random((h, w)) < 0.4
    pts[bad, :2] *= 2.0
    conf[bad] = 1.0
    assert abs(estimate_focal(pts, conf, pp, min_conf=1.5) - 100.0) < 0.01
    f = estimate_focals(np.stack([pts, pts]), np.stack([conf, conf]), pp)
    assert f.shape == (2,) and np.allclose(f, f[0])


def test_resolve_focals_fixed_k_wins():
    K = np.array([[500.0, 0, 320], [0, 502.0, 240], [0, 0, 1]])
    f, fixed = resolve_focals(3, K, estimated=np.array([1.0, 2.0, 3.0]))
    assert fixed and np.allclose(f, 501.0)
    f, fixed = resolve_focals(3, None, estimated=np.array([1.0, 2.0, 3.0]))
    assert not fixed and np.allclose(f, [1, 2, 3])
    with pytest.raises(InputError):
        resolve_focals(3, np.eye(2))
    with pytest.raises(InputError):
        estimate_focal(np.zeros((4, 4, 3)))
