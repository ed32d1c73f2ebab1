"""dynrecon_ros.geometry: one test per function, each on a case small enough to check by hand."""
import numpy as np
import pytest
import torch

from dynrecon_ros import geometry as g
from dynrecon_ros.errors import InputError

RZ90 = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # 90 deg about z: x -> y, y -> -x


def test_pixel_grid_is_column_then_row_and_read_only():
    grid = g.pixel_grid(2, 3)
    assert grid.shape == (2, 3, 2) and grid.dtype == np.float32
    assert grid[1, 2].tolist() == [2.0, 1.0]  # (u, v) = (column, row)
    assert grid[..., 0].tolist() == [[0, 1, 2], [0, 1, 2]] and grid[..., 1].tolist() == [[0, 0, 0], [1, 1, 1]]
    with pytest.raises(ValueError):
        grid[0, 0, 0] = 5


def test_intrinsics_matrix():
    assert g.intrinsics_matrix(10.0, (3.0, 2.0)).tolist() == [[10, 0, 3], [0, 10, 2], [0, 0, 1]]


def test_unproject_pixel_centres_and_invalid_depth():
    K = np.array([[2.0, 0, 1.0], [0, 4.0, 0.5], [0, 0, 1]])
    depth = np.array([[2.0, 0.0], [np.nan, 4.0]], np.float32)
    pts = g.unproject(depth, K)
    assert pts.shape == (2, 2, 3) and pts.dtype == np.float64
    assert pts[0, 0].tolist() == [(0 - 1) / 2 * 2, (0 - 0.5) / 4 * 2, 2]  # [-1, -0.25, 2]
    assert pts[1, 1].tolist() == [(1 - 1) / 2 * 4, (1 - 0.5) / 4 * 4, 4]  # [0, 0.5, 4]
    assert np.isnan(pts[0, 1]).all() and np.isnan(pts[1, 0]).all()  # no reading: NaN, not a point at 0
    # one K per image of a batch
    both = g.unproject(np.stack([depth, depth]), np.stack([K, 2 * K + np.diag([0, 0, -1])]))
    assert both[1, 0, 0].tolist() == [(0 - 2) / 4 * 2, (0 - 1) / 8 * 2, 2]


def test_unproject_pixels_is_unproject_at_a_list_of_pixels():
    K = np.array([[300.0, 0, 160.0], [0, 310.0, 120.0], [0, 0, 1]])
    depth = np.random.default_rng(1).uniform(0.5, 5.0, (24, 32)).astype(np.float32)
    v, u = np.array([0, 5, 23]), np.array([31, 7, 0])
    pts = g.unproject_pixels(u, v, depth[v, u], K)
    assert pts.shape == (3, 3) and pts.dtype == np.float64
    np.testing.assert_array_equal(pts, g.unproject(depth, K)[v, u])
    np.testing.assert_allclose(np.stack(g.project(pts, K), -1), np.stack([u, v], -1), atol=1e-9)


def test_project_inverts_unproject_and_takes_a_callers_divisor():
    K = np.array([[300.0, 0, 160.0], [0, 310.0, 120.0], [0, 0, 1]])
    depth = np.random.default_rng(0).uniform(0.5, 5.0, (24, 32))
    u, v = g.project(g.unproject(depth, K), K)
    np.testing.assert_allclose(np.stack([u, v], -1), g.pixel_grid(24, 32), atol=1e-9)
    u, v = g.project(np.array([[1.0, -2.0, 0.0]]), K, z=np.array([2.0]))  # (a point at z 0, clamped by the caller)
    assert (u[0], v[0]) == (300.0 * 1.0 / 2.0 + 160.0, 310.0 * -2.0 / 2.0 + 120.0)


def test_transform_points_and_to_matrix():
    T = g.to_matrix(RZ90, [1.0, 2.0, 3.0])
    assert T[3].tolist() == [0, 0, 0, 1]
    assert g.transform_points(T, np.array([[1.0, 0, 0], [0, 1.0, 0]])).tolist() == [[1, 3, 3], [0, 2, 3]]
    S = g.to_matrix(RZ90, [0.0, 0, 0], 2.0)
    assert g.transform_points(S, np.array([1.0, 0, 0])).tolist() == [0, 2, 0]
    assert g.transform_points(T, np.zeros((1, 3), np.float32)).dtype == np.float32


def test_hat_is_the_cross_product():
    w, v = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([-1.0, 0.5, 2.0])
    assert torch.equal(g.hat(w) @ v, torch.linalg.cross(w, v))
    assert torch.equal(g.hat(w), -g.hat(w).T)
    assert g.hat(torch.zeros(4, 5, 3)).shape == (4, 5, 3, 3)


def test_so3_exp_quarter_turn_and_batch():
    assert np.allclose(g.so3_exp([0, 0, np.pi / 2]), RZ90, atol=1e-15)
    assert np.allclose(g.so3_exp(np.zeros(3)), np.eye(3))
    batch = g.so3_exp(np.array([[np.pi, 0, 0], [0, 0, np.pi / 2]]))
    assert batch.shape == (2, 3, 3) and np.allclose(batch[0], np.diag([1, -1, -1])) and np.allclose(batch[1], RZ90)


def test_se3_increment_rotation_by_rodrigues_translation_as_given():
    T = g.se3_increment(np.array([1.0, 2.0, 3.0, 0.0, 0.0, np.pi / 2]))
    assert np.allclose(T[:3, :3], RZ90) and T[:3, 3].tolist() == [1, 2, 3] and T[3].tolist() == [0, 0, 0, 1]


def test_poses_from_tum_rows():
    s = np.sqrt(0.5)
    row = [1.0, 2.0, 3.0, 0.0, 0.0, s, s]  # 90 deg about z (x y z w)
    T = g.poses_from_tum(row)
    assert T.shape == (4, 4) and np.allclose(T[:3, :3], RZ90) and T[:3, 3].tolist() == [1, 2, 3]
    rows = np.array([row, [0, 0, 0, 0, 0, 0, 2.0]])  # quaternions normalised
    Ts = g.poses_from_tum(rows)
    assert Ts.shape == (2, 4, 4) and np.allclose(Ts[1], np.eye(4))
    assert g.poses_from_tum(np.zeros((0, 7))).shape == (0, 4, 4)
    with pytest.raises(InputError, match='tx, ty, tz, qx, qy, qz, qw'):
        g.poses_from_tum([1, 2, 3])


@pytest.mark.parametrize('kind', ['numpy', 'torch'])
def test_svd_rotation_never_reflects(kind):
    # cov = diag(1, 2, -3): the best orthogonal matrix, diag(1, 1, -1) (tr = 6), is a reflection; the
    # best rotation turns the smallest singular direction (x) instead: R = diag(-1, 1, -1), tr = 4
    cov = np.diag([1.0, 2.0, -3.0])[None]
    if kind == 'torch':
        cov = torch.as_tensor(cov)
    R, sd = g.svd_rotation(cov)
    R, sd = np.asarray(R), np.asarray(sd)
    assert np.allclose(R[0], np.diag([-1.0, 1.0, -1.0])) and np.isclose(np.linalg.det(R[0]), 1)
    assert np.isclose(sd[0], 3 + 2 - 1)  # trace(R^T cov)
    R2, sd2 = g.svd_rotation(np.diag([1.0, 2.0, 3.0]))  # a rotation is best: the identity
    assert np.allclose(R2, np.eye(3)) and np.isclose(sd2, 6)


def test_fit_similarity_weighted_batched_and_rigid():
    src = np.array([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    dst = 2.0 * src @ RZ90.T + [1.0, 2.0, 3.0]
    s, R, t = g.fit_similarity(src, dst)
    assert np.isclose(s, 2.0) and np.allclose(R, RZ90) and np.allclose(t, [1, 2, 3])
    # a wild point with zero weight changes nothing; with weight it does
    src5, dst5 = np.vstack([src, [[1.0, 1, 1]]]), np.vstack([dst, [[50.0, 0, 0]]])
    s0, R0, t0 = g.fit_similarity(src5, dst5, np.array([1, 1, 1, 1, 0.0]))
    assert np.isclose(s0, 2.0) and np.allclose(R0, RZ90) and np.allclose(t0, [1, 2, 3])
    assert not np.isclose(g.fit_similarity(src5, dst5, np.ones(5))[0], 2.0)
    # batched: each fit on its own
    sb, Rb, tb = g.fit_similarity(np.stack([src, src]), np.stack([dst, src + 1]))
    assert np.allclose(sb, [2, 1]) and np.allclose(Rb[1], np.eye(3)) and np.allclose(tb, [[1, 2, 3], [1, 1, 1]])
    # rigid: no scale (s = 1), the rotation still exact
    s1, R1, _ = g.fit_similarity(src, dst, scale=False)
    assert s1 == 1.0 and np.allclose(R1, RZ90)


def test_fit_rigid_matrix():
    src = np.array([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    T = g.fit_rigid(src, src @ RZ90.T + [1.0, 2.0, 3.0])
    assert np.allclose(T, g.to_matrix(RZ90, [1.0, 2.0, 3.0]))
    # twice as large: still a rotation (no scale), the centroids matched: t = md - R ms
    T2 = g.fit_rigid(src, 2 * src @ RZ90.T)
    assert np.allclose(T2[:3, :3], RZ90) and np.allclose(T2[:3, 3], 2 * RZ90 @ src.mean(0) - RZ90 @ src.mean(0))


def _scene(mover_fraction, n=2000, seed=3):
    rng = np.random.default_rng(seed)
    src = np.c_[rng.uniform(-2, 2, (n, 2)), rng.uniform(3, 6, n)]
    dst = 1.5 * src @ RZ90.T + [0.1, 0.2, 0.3]
    mover = np.arange(n) < int(mover_fraction * n)
    dst[mover] += [1.0, 0.0, 0.0]  # a coherent block moved 1 m
    return src, dst, np.ones(n)


def test_consensus_similarity_picks_the_majority():
    src, dst, w = _scene(0.45)  # the mover: 45 % of the points, exactly consistent among themselves too
    (s, R, t), sigma = g.consensus_similarity(src, dst, w, quantile=0.3)
    assert np.isclose(s, 1.5) and np.allclose(R, RZ90) and np.allclose(t, [0.1, 0.2, 0.3]) and sigma < 1e-9
    assert g.consensus_similarity(src[:9], dst[:9], w[:9], 0.3) is None  # too few points


def test_robust_similarity_drops_the_moved_points():
    src, dst, w = _scene(0.2)
    s, R, t = g.robust_similarity(src, dst, w)
    assert np.isclose(s, 1.5) and np.allclose(R, RZ90) and np.allclose(t, [0.1, 0.2, 0.3])
    s0 = g.fit_similarity(src, dst, w)[0]  # a plain fit is pulled off by the block
    assert not np.isclose(s0, 1.5, rtol=1e-3)
    # without the consensus seed the median-trimmed refits alone drop the block
    s1, R1, t1 = g.robust_similarity(src, dst, w, quantile=None)
    assert np.isclose(s1, 1.5) and np.allclose(R1, RZ90) and np.allclose(t1, [0.1, 0.2, 0.3])


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_fit_similarity_torch_weighted_batch_and_moments(dtype):
    src = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]], dtype=dtype)
    Rz = torch.as_tensor(RZ90, dtype=dtype)
    dst = 2.0 * src @ Rz.T + torch.tensor([1.0, 2.0, 3.0], dtype=dtype)
    dst_bad = dst.clone()
    dst_bad[4] = 50.0
    w = torch.tensor([[1, 1, 1, 1, 0.0], [1, 1, 1, 1, 1]], dtype=dtype)
    s, R, t, ms, md, var = g.fit_similarity_torch(torch.stack([src, src]), torch.stack([dst_bad, src + 1]), w)
    tol = dict(atol=1e-5) if dtype == torch.float32 else {}
    assert torch.allclose(s, torch.tensor([2.0, 1.0], dtype=dtype), **tol)
    assert torch.allclose(R[0], Rz, **tol) and torch.allclose(R[1], torch.eye(3, dtype=dtype), **tol)
    assert torch.allclose(t[0], torch.tensor([1.0, 2.0, 3.0], dtype=dtype), **tol)
    assert torch.allclose(ms[0], torch.tensor([0.25, 0.25, 0.25], dtype=dtype))  # weighted mean of src
    assert torch.allclose(var[0], torch.tensor(0.75 - 3 / 16, dtype=dtype), **tol)  # E|x|^2 - |E x|^2


def test_fit_rigid_from_moments():
    x = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)
    y = x @ torch.as_tensor(RZ90).T + torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    wts = torch.tensor([1.0, 2.0, 1.0, 3.0], dtype=torch.float64)
    sw, sx, sy = wts.sum()[None], (wts[:, None] * x).sum(0)[None], (wts[:, None] * y).sum(0)[None]
    sxy = torch.einsum('m,mi,mj->ij', wts, y, x)[None]
    R, t = g.fit_rigid_from_moments(sw, sx, sy, sxy)
    assert torch.allclose(R[0], torch.as_tensor(RZ90)) and torch.allclose(t[0], torch.tensor([1.0, 2.0, 3.0],
                                                                                          dtype=torch.float64))


def _products_case(device):
    gen = torch.Generator().manual_seed(3)
    R = torch.as_tensor(np.stack([RZ90, np.eye(3)[[2, 0, 1]], RZ90.T]), dtype=torch.float64)
    X, Y = (torch.randn(3, 7, 3, generator=gen, dtype=torch.float64) for _ in range(2))
    w = torch.rand(3, 7, generator=gen, dtype=torch.float64)
    return [t.to(device) for t in (R, X, Y, w)]


def test_batched_products_match_their_definitions_and_the_cuda_forms():
    """batched_* on CPU (bmm / einsum) against the plain definitions, and the elementwise forms CUDA takes
    (called here on CPU tensors) against the same: one formula wrong in either path fails."""
    R, X, Y, w = _products_case('cpu')
    ref = {'rotate': X @ R.transpose(1, 2), 'rotate_inv': X @ R, 'wsum': (w[..., None] * X).sum(1),
           'moment': torch.stack([sum(torch.outer(X[b, m], Y[b, m]) for m in range(7)) for b in range(3)]),
           'dot': torch.tensor([[float(X[b, m] @ Y[b, m]) for m in range(7)] for b in range(3)], dtype=X.dtype),
           'total': torch.tensor([sum(float(w[b, m] * X[b, m, 0]) for m in range(7)) for b in range(3)], dtype=X.dtype)}
    got = {'rotate': g.batched_rotate(R, X), 'rotate_inv': g.batched_rotate_inv(R, X), 'wsum': g.batched_wsum(w, X),
           'moment': g.batched_moment(X, Y), 'dot': g.batched_dot(X, Y), 'total': g.batched_total(w, X[..., 0])}
    cuda_forms = {'rotate': g._rotate_elementwise(R, X), 'rotate_inv': g._rotate_elementwise(R.transpose(1, 2), X),
                  'wsum': g._wsum_elementwise(w, X), 'moment': g._moment_elementwise(X, Y), 'dot': (X * Y).sum(-1),
                  'total': (w * X[..., 0]).sum(1)}
    for k, v in ref.items():
        assert torch.allclose(got[k], v, atol=1e-12), k
        assert torch.allclose(cuda_forms[k], v, atol=1e-12), k


@pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device (checked on the lent GPU machine)')
def test_batched_products_on_cuda_equal_cpu():
    cpu, dev = _products_case('cpu'), _products_case('cuda')
    for f, args in ((g.batched_rotate, (0, 1)), (g.batched_rotate_inv, (0, 1)), (g.batched_wsum, (3, 1)),
                    (g.batched_moment, (1, 2)), (g.batched_dot, (1, 2)), (g.batched_total, (3, 3))):
        assert torch.allclose(f(*[dev[i] for i in args]).cpu(), f(*[cpu[i] for i in args]), atol=1e-12), f.__name__
