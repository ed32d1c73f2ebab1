"""Renderer conditions of issue 16: people, Kinect depth, sensor effects, camouflage, presets.

Small sizes; each test checks the rendered arrays against the scene or sensor model they come from.
"""
import hashlib

import numpy as np
import pytest

from dynrecon_ros.data import people, sensor_model
from dynrecon_ros.data.scenarios import SCENARIOS, parse_overrides, scenario_config
from dynrecon_ros.data.synthetic import (SyntheticConfig, backproject, camera_poses, make_crowd, mover_paths,
                                         render_sequence, static_surface_distance)


def _rounded_hash(seq):
    """sha256 of a sequence's arrays, depth at 0.1 mm and poses at 1e-9 (robust to 1-ulp float differences)."""
    m = hashlib.sha256()
    for f in seq.frames:
        m.update(f.rgb.tobytes())
        m.update(np.round(f.depth.astype(np.float64) * 1e4).astype(np.int64).tobytes())
        m.update(f.key.encode())
    m.update(seq.masks.tobytes())
    m.update(np.round(seq.depth_gt.astype(np.float64) * 1e4).astype(np.int64).tobytes())
    m.update(np.round(seq.poses * 1e9).astype(np.int64).tobytes())
    m.update(np.round(seq.depth_stamps * 1e6).astype(np.int64).tobytes())
    return m.hexdigest()


def test_render_overrides_are_typed_like_the_fields_and_name_a_wrong_item():
    """bench/segmentation.py --render: the presets at other settings."""
    over = parse_overrides(['width=640', 'fps=15', 'kinect=true', 'camouflage=uniform', 'rolling_shutter=0'])
    assert over == {'width': 640, 'fps': 15.0, 'kinect': True, 'camouflage': 'uniform', 'rolling_shutter': 0.0}
    assert isinstance(over['width'], int) and isinstance(over['fps'], float)
    cfg = scenario_config('every_effect', **over)
    assert (cfg.width, cfg.fps, cfg.rolling_shutter, cfg.people) == (640, 15.0, 0.0, 2)  # the rest of the preset kept
    for bad, says in (('widht=640', 'widht=640'), ('width', "'width'"), ('width=6.5', 'must be of type int'),
                      ('kinect=maybe', 'takes true or false')):
        with pytest.raises(ValueError, match=says):
            parse_overrides([bad])


def test_default_sequence_is_unchanged():
    # Hashes of the renderer before the conditions existed (main at 40768c3), same configs.
    a = render_sequence(SyntheticConfig(width=64, height=48, frames=6, seed=4))
    b = render_sequence(SyntheticConfig(width=64, height=48, frames=4, seed=7, depth_noise=0.01, depth_holes=0.1))
    assert _rounded_hash(a) == 'a4e65648bffe0476c3262b1c4957ae70dfe22e98a4aea07ba1e25aad5360bb65'
    assert _rounded_hash(b) == '7f7b5de6a9e2bebb53dc956af91ed3bb06717cc5e4ef361a2e9de5f29217e44d'
    assert _rounded_hash(render_sequence(scenario_config('default', width=64, height=48, frames=6, seed=4))) \
        == _rounded_hash(a)


def _capsule_distance(pts, a, b):
    """(M, 3) points, (Q, 3) segment ends -> (M, Q) distances to the segments."""
    ab = b - a
    w = pts[:, None] - a[None]
    y = np.clip(np.einsum('mqi,qi->mq', w, ab) / np.maximum(np.einsum('qi,qi->q', ab, ab), 1e-12), 0, 1)
    return np.linalg.norm(w - y[..., None] * ab[None], axis=2)


@pytest.fixture(scope='module')
def crowd_seq():
    cfg = SyntheticConfig(width=96, height=72, frames=30, movers=0, people=2, close_crossing=True, toward_camera=True,
                          seed=5)
    return render_sequence(cfg)


def test_masks_are_exactly_the_people(crowd_seq):
    s = crowd_seq
    state = make_crowd(s.config).state(s.stamps - s.stamps[0])
    assert s.masks.mean() > 0.05
    for i in (0, 12, 29):
        dyn = backproject(s.depth_gt[i], s.K, s.poses[i], s.masks[i])
        dist = _capsule_distance(dyn, state.a[i], state.b[i]) - state.radius[None]
        assert np.abs(dist).min(axis=1).max() < 1e-4  # every masked pixel is on a body part's surface
        static = backproject(s.depth_gt[i], s.K, s.poses[i], ~s.masks[i])
        assert static_surface_distance(static).max() < 1e-4  # every other pixel on the room / boxes
        assert _capsule_distance(static, state.a[i], state.b[i]).min(axis=1).min() > state.radius.min() - 1e-4


def _track_colour(seq, i, j, world_at_j):
    """Colour error of pixels of frame i moved to frame j by ``world_at_j`` ((M, 3) points of i -> (M, 3) of j),
    over those visible in j (depth agrees); returns the median absolute difference in 8-bit levels."""
    h, w = seq.masks.shape[1:]
    sel = seq.masks[i]
    pts = backproject(seq.depth_gt[i], seq.K, seq.poses[i], sel)
    pj = world_at_j(pts)
    T = np.linalg.inv(seq.poses[j])
    pc = pj @ T[:3, :3].T + T[:3, 3]
    u = np.round(seq.K[0, 0] * pc[:, 0] / pc[:, 2] + seq.K[0, 2]).astype(int)
    v = np.round(seq.K[1, 1] * pc[:, 1] / pc[:, 2] + seq.K[1, 2]).astype(int)
    ok = (pc[:, 2] > 0.1) & (u >= 0) & (u < w) & (v >= 0) & (v < h)
    ok[ok] &= np.abs(seq.depth_gt[j][v[ok], u[ok]] - pc[ok, 2]) < 0.01
    assert ok.sum() > 50
    return np.median(np.abs(seq.frames[j].rgb[v[ok], u[ok]].astype(float) - seq.frames[i].rgb[sel][ok]))


def test_body_attached_texture_moves_with_the_limbs(crowd_seq):
    s = crowd_seq
    state = make_crowd(s.config).state(s.stamps - s.stamps[0])
    i, j = 10, 13

    def follow(pts):  # body point -> its nearest part's frame at i -> world at j
        q = np.argmin(np.abs(_capsule_distance(pts, state.a[i], state.b[i]) - state.radius[None]), axis=1)
        local = np.einsum('kji,kj->ki', state.frames[i, q], pts - state.a[i, q])
        return state.a[j, q] + np.einsum('kij,kj->ki', state.frames[j, q], local)
    assert _track_colour(s, i, j, follow) < 4  # (a texture fixed in the world instead: 10)
    assert _track_colour(s, i, j, lambda p: p) > 10  # the same world points show other things: people move


def _cylinder_follow(seq, i, j):
    c, hd = mover_paths(seq.config, seq.stamps[[i, j]] - seq.stamps[0])

    def follow(pts):
        k = np.argmin(np.linalg.norm(pts[:, None, :2] - c[0][None], axis=2), axis=1)
        rel = pts[:, :2] - c[0][k]
        ang = hd[1][k] - hd[0][k]
        co, si = np.cos(ang), np.sin(ang)
        xy = c[1][k] + np.stack([co * rel[:, 0] - si * rel[:, 1], si * rel[:, 0] + co * rel[:, 1]], 1)
        return np.concatenate([xy, pts[:, 2:]], 1)
    return follow


def test_camouflage_background_texture_does_not_move_with_the_mover():
    base = dict(width=160, height=120, frames=7, seed=2)
    plain, camo = (render_sequence(SyntheticConfig(camouflage=c, **base)) for c in ('', 'background'))
    assert np.array_equal(plain.masks, camo.masks)  # same geometry
    assert _track_colour(plain, 2, 6, _cylinder_follow(plain, 2, 6)) < 6  # default: texture on the body
    assert _track_colour(camo, 2, 6, _cylinder_follow(camo, 2, 6)) > 12
    assert _track_colour(camo, 2, 6, lambda p: p) < 6  # camouflage: texture fixed in the world
    uni = render_sequence(SyntheticConfig(camouflage='uniform', **base))
    rgb = uni.frames[3].rgb[uni.masks[3]].astype(float)
    hue = rgb / np.maximum(rgb.sum(axis=1, keepdims=True), 1)
    assert hue.std(axis=0).max() < 0.01  # one colour, only the shading varies
    assert np.array_equal(plain.frames[3].rgb[~plain.masks[3]], uni.frames[3].rgb[~uni.masks[3]])


def test_kinect_noise_follows_the_z2_model():
    z = np.repeat(np.linspace(0.6, 5.0, 12), 4000).reshape(12, 4000).astype(np.float32)
    rng = np.random.default_rng(0)
    d = sensor_model.kinect_depth(z, rng, 300.0, 320, quantise=False, silhouettes=False)
    nguyen = 0.0012 + 0.0019 * (z[:, 0].astype(np.float64) - 0.4) ** 2  # Nguyen et al. 2012, metres
    rel_std = (d - z).std(axis=1) / nguyen
    assert np.all(np.abs(rel_std - 1) < 0.06), rel_std
    assert abs((d - z).mean(axis=1) / nguyen).max() < 0.06
    # quantised: on the 1/8 px disparity grid of the native sensor
    q = sensor_model.kinect_depth(z, rng, 300.0, 320, silhouettes=False)
    disp = sensor_model.KINECT_FOCAL_NATIVE * sensor_model.KINECT_BASELINE / q[q > 0].astype(np.float64) * 8
    assert np.abs(disp - np.round(disp)).max() < 2e-3


def test_rendered_kinect_depth_noise_and_holes():
    cfg = SyntheticConfig(width=96, height=72, frames=3, seed=1, kinect=True, silhouette_holes=True, max_range=4.5)
    s = render_sequence(cfg)
    for i in range(3):
        d, g = s.frames[i].depth, s.depth_gt[i]
        valid = d > 0
        assert not valid[g > 4.5].any() and valid.mean() > 0.3
        step = g[valid] ** 2 / (sensor_model.KINECT_FOCAL_NATIVE * sensor_model.KINECT_BASELINE * 8)
        expected = np.sqrt((0.0012 + 0.0019 * (g[valid] - 0.4) ** 2) ** 2 + step ** 2 / 12)
        r = (d[valid] - g[valid]) / expected
        assert 0.85 < r.std() < 1.15 and abs(r.mean()) < 0.1
        model = (sensor_model.projector_shadow(g, s.K[0, 0]) | sensor_model.discontinuity_band(g, 1)
                 | (g > 4.5) | (g < 0.4))
        assert np.array_equal(~valid, model)
        assert model[s.masks[i] ^ np.roll(s.masks[i], 1, axis=1)].all()  # silhouettes' left/right edges


def test_projector_shadow_width_on_a_step():
    z = np.full((4, 200), 3.0, np.float32)
    z[:, 100:140] = 1.0  # a near object in front of a wall
    sh = sensor_model.projector_shadow(z, 500.0)
    width = 500.0 * sensor_model.KINECT_BASELINE * (1 / 1.0 - 1 / 3.0)  # 25 px, left of the object
    cols = np.flatnonzero(sh[0])
    assert abs(len(cols) - width) <= 1.5 and cols.max() == 99 and not sh[:, 100:].any()
    band = sensor_model.discontinuity_band(z, 2)
    assert band[0, 98:102].all() and band[0, 138:142].all() and not band[0, 105:135].any()


def test_holes_and_range_do_not_touch_rows_of_a_flat_wall():
    z = np.full((30, 40), 2.0, np.float32)
    d = sensor_model.kinect_depth(z, np.random.default_rng(1), 300.0, 320, max_range=3.0)
    assert (d > 0).all()
    assert (sensor_model.kinect_depth(z, None, 300.0, 320, max_range=1.5) == 0).all()


def test_depth_delay_and_rolling_shutter_instants():
    base = dict(width=96, height=72, frames=3, seed=6, movers=0)
    s = render_sequence(SyntheticConfig(depth_delay=0.01, depth_stamp_jitter=0.0, **base))
    assert np.allclose(s.depth_stamps - s.stamps, 0.01, atol=2e-6)
    t = s.stamps - s.stamps[0]
    late = camera_poses(s.config, t + 0.01)
    for i in range(3):
        off_now = static_surface_distance(backproject(s.frames[i].depth, s.K, s.poses[i]))
        off_late = static_surface_distance(backproject(s.frames[i].depth, s.K, late[i]))
        assert off_late.max() < 1e-4 < np.median(off_now)  # the depth image is the one of t + 10 ms
    r = render_sequence(SyntheticConfig(rolling_shutter=0.03, **base))
    bands = sensor_model.shutter_bands(72, 0.03)
    r0, r1, off = bands[0]
    top = np.zeros((72, 96), bool)
    top[r0:r1] = True
    at = camera_poses(r.config, np.array([t[1] + off]))[0]
    assert static_surface_distance(backproject(r.depth_gt[1], r.K, at, top)).max() < 1e-4
    assert np.median(static_surface_distance(backproject(r.depth_gt[1], r.K, r.poses[1], top))) > 1e-4


def test_jitter_flicker_blur_and_noise():
    base = dict(width=96, height=72, frames=6, seed=3)
    plain = render_sequence(SyntheticConfig(**base))
    j = render_sequence(SyntheticConfig(jitter=1.0, **base))
    rel = np.einsum('nji,njk->nik', plain.poses[:, :3, :3], j.poses[:, :3, :3])
    ang = np.degrees(np.arccos(np.clip((np.trace(rel, axis1=1, axis2=2) - 1) / 2, -1, 1)))
    assert 0.15 < np.sqrt((ang ** 2).mean()) < 0.4  # 0.15 deg RMS per axis
    f = render_sequence(SyntheticConfig(exposure_flicker=0.1, **base))
    gains = sensor_model.exposure_gains(plain.stamps - plain.stamps[0], 3, 0.1)
    for i in range(6):
        a, b = plain.frames[i].rgb.astype(float), f.frames[i].rgb.astype(float)
        ok = (a > 10) & (a < 200) & (b < 254)
        assert abs(np.median(b[ok] / a[ok]) - gains[i]) < 0.02
    assert gains.std() > 0.03
    blur = render_sequence(SyntheticConfig(motion_blur=0.02, **base))
    assert np.array_equal(blur.masks, plain.masks) and np.array_equal(blur.depth_gt, plain.depth_gt)

    def grad(img):
        return np.abs(np.diff(img.astype(float), axis=1)).mean()
    assert np.mean([grad(x.rgb) for x in blur.frames]) < 0.95 * np.mean([grad(x.rgb) for x in plain.frames])
    n = render_sequence(SyntheticConfig(colour_noise=4.0, **base))
    diff = n.frames[2].rgb.astype(float) - plain.frames[2].rgb.astype(float)
    inner = (plain.frames[2].rgb > 20) & (plain.frames[2].rgb < 235)
    assert 3.6 < diff[inner].std() < 4.4


def test_stop_and_go_people_stand_still_then_walk_on():
    cfg = SyntheticConfig(movers=0, people=3, stop_and_go=True, frames=150)
    t = np.arange(0, 5.0, 1 / 30)
    st = make_crowd(cfg).state(t)
    for k in range(3):
        parts = st.a[:, k * people.PARTS:(k + 1) * people.PARTS]  # (T, PARTS, 3)
        speed = np.linalg.norm(np.diff(parts[:, 0, :2], axis=0), axis=1) * 30
        still = np.linalg.norm(np.diff(parts, axis=0), axis=2).max(axis=1) < 1e-6  # every part still
        runs = np.diff(np.flatnonzero(np.diff(np.r_[0, still.astype(int), 0])).reshape(-1, 2), axis=1).ravel()
        assert len(runs) >= 1 and 1.3 < runs.max() / 30 < 1.7
        first = np.argmax(still)
        assert speed[:max(first - 8, 1)].min() > 0.8 and speed[first + int(runs.max()) + 8:].min() > 0.8
    walk = make_crowd(SyntheticConfig(movers=0, people=3)).state(t)
    assert np.linalg.norm(np.diff(walk.a[:, 0, :2], axis=0), axis=1).min() * 30 > 0.8


def test_close_crossing_and_toward_camera_people():
    cfg = SyntheticConfig(width=80, height=60, movers=0, close_crossing=True)
    s = render_sequence(cfg)
    frac = s.masks.mean(axis=(1, 2))
    i = int(np.argmax(frac))
    assert 0.3 < frac[i] < 0.75
    assert 0.7 < np.median(s.depth_gt[i][s.masks[i]]) < 1.4
    t = render_sequence(SyntheticConfig(width=80, height=60, movers=0, toward_camera=True))
    near = [np.median(t.depth_gt[k][t.masks[k]]) for k in (0, 89)]
    assert 3.3 < near[0] < 4.3 and 0.6 < near[1] < 1.3
    assert t.masks.mean(axis=(1, 2)).min() > 0.01  # in view all the way


def test_every_option_changes_the_output_and_presets_resolve():
    base = dict(width=32, height=24, frames=3, seed=2)
    ref = render_sequence(SyntheticConfig(**base))

    def arrays(s):
        return [np.stack([f.rgb for f in s.frames]), np.stack([f.depth for f in s.frames]), s.masks, s.poses,
                s.depth_stamps]
    options = dict(people=3, stop_and_go=True, close_crossing=True, toward_camera=True, camouflage='uniform',
                   kinect=True, silhouette_holes=True, max_range=4.0, motion_blur=0.02, exposure_flicker=0.1,
                   colour_noise=2.0, depth_delay=0.01, rolling_shutter=0.03, jitter=1.0)
    for name, value in options.items():
        extra = {'people': 3} if name == 'stop_and_go' else {}
        s = render_sequence(SyntheticConfig(**{name: value, **extra, **base}))
        ref_s = render_sequence(SyntheticConfig(**extra, **base)) if extra else ref
        assert any(not np.array_equal(a, b) for a, b in zip(arrays(s), arrays(ref_s))), name
    for name in SCENARIOS:
        assert isinstance(scenario_config(name, frames=2), SyntheticConfig)
    with pytest.raises(ValueError, match='unknown scenario'):
        scenario_config('nope')
    with pytest.raises(ValueError, match='kinect replaces'):
        render_sequence(SyntheticConfig(kinect=True, depth_noise=0.01, **base))


def test_render_cli_scenario_and_flags(tmp_path, capsys):
    from dynrecon_ros.cli import main
    from dynrecon_ros.data.tum import read_masks, read_tum_directory
    assert main(['render', '--list-scenarios']) == 0
    assert 'close_crossing' in capsys.readouterr().out
    rc = main(['render', '-o', str(tmp_path / 'a'), '--scenario', 'people_holes', '--width', '40', '--height', '30',
               '--frames', '3', '--no-close-crossing', '--people', '1', '--kinect'])
    assert rc == 0
    d = read_tum_directory(tmp_path / 'a')
    s = render_sequence(scenario_config('people_holes', width=40, height=30, frames=3, close_crossing=False, people=1,
                                        kinect=True))
    assert np.array_equal(d[1].rgb, s.frames[1].rgb)
    assert np.allclose(d[1].depth, s.frames[1].depth, atol=2e-4)
    gt = read_masks(tmp_path / 'a' / 'masks_gt')
    assert np.array_equal(gt[s.keys[2]], s.masks[2])
    assert main(['render', '-o', str(tmp_path / 'b'), '--scenario', 'nope']) == 2
    assert main(['render', '-o', str(tmp_path / 'b'), '--kinect', '--depth-noise', '0.01']) == 2
