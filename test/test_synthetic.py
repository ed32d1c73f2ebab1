"""Synthetic renderer: determinism, and agreement of depth, poses, masks and colour."""
import numpy as np
import pytest

from dynrecon_ros.data.synthetic import (MOVER_HEIGHT, MOVER_RADIUS, SyntheticConfig, backproject,
                                         render_sequence, static_surface_distance)


@pytest.fixture(scope='module')
def seq():
    # 320x240 so the finest texture octave is ~2 px wide and bilinear colour comparisons are meaningful.
    return render_sequence(SyntheticConfig(width=320, height=240, frames=9, seed=3))


def test_deterministic_per_seed_and_seed_matters():
    cfg = SyntheticConfig(width=64, height=48, frames=4, seed=7, depth_noise=0.01, depth_holes=0.1)
    a, b = render_sequence(cfg), render_sequence(cfg)
    for fa, fb in zip(a.frames, b.frames):
        assert fa.key == fb.key
        assert np.array_equal(fa.rgb, fb.rgb) and np.array_equal(fa.depth, fb.depth)
    assert np.array_equal(a.poses, b.poses) and np.array_equal(a.masks, b.masks)
    assert np.array_equal(a.depth_gt, b.depth_gt) and np.array_equal(a.depth_stamps, b.depth_stamps)
    c = render_sequence(SyntheticConfig(width=64, height=48, frames=4, seed=8))
    assert not np.array_equal(a.frames[0].rgb, c.frames[0].rgb)
    assert not np.allclose(a.poses, c.poses)


def test_shapes_stamps_and_frame_fields(seq):
    n, h, w = 9, 240, 320
    assert len(seq.frames) == n and seq.poses.shape == (n, 4, 4) and seq.masks.shape == (n, h, w)
    assert seq.depth_gt.shape == (n, h, w) and seq.depth_gt.dtype == np.float32
    assert np.all(np.diff(seq.stamps) > 0)
    assert np.allclose(np.diff(seq.stamps), 1 / 30.0, atol=2e-6)
    assert 0 < np.abs(seq.depth_stamps - seq.stamps).max() <= 0.0081
    for i, f in enumerate(seq.frames):
        assert f.key == f'{seq.stamps[i]:.6f}' and float(f.key) == f.stamp
        assert f.rgb.shape == (h, w, 3) and f.rgb.dtype == np.uint8
        assert np.array_equal(f.K, seq.K)
    # poses are rigid transforms
    R = seq.poses[:, :3, :3]
    assert np.allclose(R @ R.transpose(0, 2, 1), np.eye(3), atol=1e-9)
    assert np.allclose(np.linalg.det(R), 1.0)


def test_movers_cover_a_meaningful_part_of_the_view():
    s = render_sequence(SyntheticConfig(width=80, height=60, frames=90, seed=0))
    frac = s.masks.mean(axis=(1, 2))
    assert np.median(frac) > 0.08 and frac.max() < 0.6
    assert (frac > 0.05).mean() > 0.5
    assert not render_sequence(SyntheticConfig(width=80, height=60, frames=3, movers=0)).masks.any()


def test_depth_poses_and_masks_agree_with_the_scene(seq):
    for i in (0, 4, 8):
        static = backproject(seq.depth_gt[i], seq.K, seq.poses[i], ~seq.masks[i])
        assert np.abs(static_surface_distance(static)).max() < 1e-4  # on the room / box surfaces
        dyn = backproject(seq.depth_gt[i], seq.K, seq.poses[i], seq.masks[i])
        if len(dyn):
            r = np.linalg.norm(dyn[:, None, :2] - seq.mover_centers[i][None], axis=2).min(axis=1)
            on_side = np.abs(r - MOVER_RADIUS) < 1e-4
            on_cap = (np.abs(dyn[:, 2] - MOVER_HEIGHT) < 1e-4) & (r <= MOVER_RADIUS + 1e-4)
            assert np.all(on_side | on_cap)
            assert np.median(static_surface_distance(dyn)) > 0.2  # movers are off the static surfaces


def _bilinear(img, u, v):
    """(H, W, C) image sampled at float pixel coordinates (M,) -> (M, C)."""
    u0, v0 = np.floor(u).astype(int), np.floor(v).astype(int)
    fu, fv = (u - u0)[:, None], (v - v0)[:, None]
    return ((img[v0, u0] * (1 - fu) + img[v0, u0 + 1] * fu) * (1 - fv)
            + (img[v0 + 1, u0] * (1 - fu) + img[v0 + 1, u0 + 1] * fu) * fv)


def _reproject(seq, i, j, sel):
    """Project pixels `sel` of frame i into frame j with GT depth and poses.
    Returns, for the selected pixels: depth consistent and in view; in view and landing on a static
    pixel of frame j (not occluded by a mover there); mean abs colour error."""
    h, w = seq.masks.shape[1:]
    pts = backproject(seq.depth_gt[i], seq.K, seq.poses[i], sel)
    T_jw = np.linalg.inv(seq.poses[j])
    pc = pts @ T_jw[:3, :3].T + T_jw[:3, 3]
    z = pc[:, 2]
    u = seq.K[0, 0] * pc[:, 0] / z + seq.K[0, 2]
    v = seq.K[1, 1] * pc[:, 1] / z + seq.K[1, 2]
    inside = (z > 0.1) & (u >= 1) & (u <= w - 2) & (v >= 1) & (v <= h - 2)
    ui, vi = np.clip(np.round(u).astype(int), 0, w - 1), np.clip(np.round(v).astype(int), 0, h - 1)
    dj = seq.depth_gt[j][vi, ui]
    visible = inside & (np.abs(dj - z) < 0.01 * z)
    col_j = _bilinear(seq.frames[j].rgb.astype(float), np.clip(u, 0, w - 1.001), np.clip(v, 0, h - 1.001))
    col_i = seq.frames[i].rgb[sel].astype(float)
    return visible, inside & ~seq.masks[j][vi, ui], np.abs(col_j - col_i).mean(axis=1)


def test_reprojection_is_consistent_on_static_pixels_and_not_on_movers(seq):
    i, j = 0, 8
    assert seq.masks[i].mean() > 0.03
    visible, inside, err = _reproject(seq, i, j, ~seq.masks[i])
    assert inside.mean() > 0.5
    assert visible[inside].mean() > 0.95  # static pixels are seen again in j, at the predicted depth
    e = err[visible & inside]
    assert np.median(e) < 5.0 and np.percentile(e, 90) < 15.0, (np.median(e), np.percentile(e, 90))
    consistent_s = (visible & (err < 15.0))[inside].mean()
    # The movers' pixels, reprojected as if they were static, land on something else (masks matter).
    vis_d, ins_d, err_d = _reproject(seq, i, j, seq.masks[i])
    assert ins_d.sum() > 1000
    consistent_d = (vis_d & (err_d < 15.0))[ins_d].mean()
    assert consistent_s > 0.85 and consistent_d < 0.1, (consistent_s, consistent_d)


def test_depth_noise_and_holes():
    cfg = SyntheticConfig(width=64, height=48, frames=2, seed=1, depth_noise=0.01, depth_holes=0.2)
    s = render_sequence(cfg)
    d, g = s.frames[1].depth, s.depth_gt[1]
    holes = d == 0
    assert abs(holes.mean() - 0.2) < 0.03
    rel = (d[~holes] - g[~holes]) / (0.01 * g[~holes] ** 2)
    assert 0.8 < rel.std() < 1.2 and abs(rel.mean()) < 0.2
    clean = render_sequence(SyntheticConfig(width=64, height=48, frames=2, seed=1))
    assert np.array_equal(clean.frames[1].depth, clean.depth_gt[1])


def test_ray_culling_is_only_an_optimisation(monkeypatch):
    import dynrecon_ros.data.synthetic as synthetic
    cfg = SyntheticConfig(width=80, height=60, frames=12, seed=9)
    a = render_sequence(cfg)
    monkeypatch.setattr(synthetic, '_screen_cull', lambda *args: None)
    b = render_sequence(cfg)
    assert all(np.array_equal(x.rgb, y.rgb) for x, y in zip(a.frames, b.frames))
    assert np.array_equal(a.depth_gt, b.depth_gt) and np.array_equal(a.masks, b.masks)


def test_texture_supports_dense_optical_flow(seq):
    """OpenCV DIS flow on the static background matches the flow implied by GT depth and poses."""
    import cv2
    i, j = 0, 2
    gray = [cv2.cvtColor(seq.frames[k].rgb, cv2.COLOR_RGB2GRAY) for k in (i, j)]
    flow = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM).calc(gray[0], gray[1], None)
    h, w = seq.masks.shape[1:]
    pts = backproject(seq.depth_gt[i], seq.K, seq.poses[i])
    T = np.linalg.inv(seq.poses[j])
    pc = pts @ T[:3, :3].T + T[:3, 3]
    v, u = np.mgrid[0:h, 0:w]
    gt = np.stack([seq.K[0, 0] * pc[:, 0] / pc[:, 2] + seq.K[0, 2] - u.ravel(),
                   seq.K[1, 1] * pc[:, 1] / pc[:, 2] + seq.K[1, 2] - v.ravel()], axis=1).reshape(h, w, 2)
    static = ~seq.masks[i] & ~seq.masks[j]
    epe = np.linalg.norm(flow - gt, axis=2)[static]
    assert np.median(np.linalg.norm(gt, axis=2)[static]) > 1.0  # the camera really moves
    assert np.median(epe) < 0.3 and np.percentile(epe, 80) < 1.0, (np.median(epe), np.percentile(epe, 80))
