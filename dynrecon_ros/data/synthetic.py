"""Synthetic dynamic RGB-D sequences with exact ground truth (the embedded default data).

A textured static room (walls, floor, ceiling) with static boxes, people-sized vertical cylinders
walking on the floor (textured with the same procedural texture as the background, so appearance
alone cannot separate them) and a smooth hand-held camera path with small shake.

The scene and its ray casting are in scene.py; articulated people in people.py; sensor effects
(Kinect depth, blur, exposure, noise, shutter, jitter) in sensor_model.py; named condition presets in
scenarios.py. This module renders sequences from a SyntheticConfig and writes them.

Conventions:
    world: z up, floor at z = 0, the room spans ``ROOM_LO``..``ROOM_HI`` metres.
    poses: camera-to-world (4, 4) of the colour camera optical frame (x right, y down, z forward).
    depth: z-depth along the optical axis in metres, 0 = no reading.
    texture: view-independent (Lambertian shading with a fixed light), so a static surface point has
        the same colour in every frame up to sampling.
"""
from __future__ import annotations

import math
import pathlib
from dataclasses import dataclass, field

import cv2
import numpy as np
from scipy.spatial.transform import Rotation

from dynrecon_ros.data import people, sensor_model
from dynrecon_ros.data.scene import (LIGHT, MOVER_HEIGHT, MOVER_RADIUS, ROOM_HI, ROOM_LO,  # noqa: F401 (re-exported)
                                     STATIC_BOXES, _cast, _screen_cull, _Texture, static_surface_distance)
from dynrecon_ros.data.bags import write_bag  # noqa: F401  (re-exported: synthetic.write_bag)
from dynrecon_ros.data.tum import write_depth_png, write_masks, write_sensor_timing, write_trajectory
from dynrecon_ros.frames import Frame
from dynrecon_ros.geometry import transform_points, unproject

BASE_STAMP = 1700000000.0

# Stream ids for the per-seed random generators (keeps each random draw independent of the others).
_TEXTURE, _CAMERA, _MOVERS, _NOISE, _STAMPS, _COLOUR, _KINECT = range(7)


@dataclass
class SyntheticConfig:
    """Options of a synthetic sequence.

    depth_noise: std of additive Gaussian depth noise at 1 m in metres; grows with depth^2 like a
        structured-light sensor (sigma = depth_noise * z^2).
    depth_holes: fraction of pixels without depth reading (0 in the depth image), in smooth blobs.
    depth_stamp_jitter: colour and depth stamps differ by up to this many seconds (like TUM), so
        readers must associate them; the depth image content is rendered at the colour instant
        (plus ``depth_delay``).

    Conditions (all off by default; the default sequence does not change; see data/scenarios.py for
    named presets, data/people.py and data/sensor_model.py for the models):
        people: articulated walking people (body-attached texture, clothing colours); stop_and_go: they
            stop ~1.5 s and walk on; close_crossing: one more person crossing 0.85 m in front of the
            camera; toward_camera: one more walking straight toward the camera.
        camouflage: '' (textured movers), 'uniform' (one flat grey-brown colour) or 'background' (a
            background-like texture fixed in the world, so it does not move with the movers).
        kinect: Kinect v1 axial noise sigma(z) = 0.0012 + 0.0019 (z - 0.4)^2 and 1/8 px disparity
            quantisation; silhouette_holes: no depth in the projector's shadow and on depth
            discontinuities; max_range: no depth beyond this many metres (0 = none). depth_holes adds
            random blobs.
        motion_blur: exposure time s (sub-frame averaging); exposure_flicker: relative auto-exposure gain
            changes; colour_noise: std in 8-bit levels; depth_delay: the depth image is taken this many
            s after the colour image (its stamp says so); rolling_shutter: readout time s, top to
            bottom, of colour and depth alike; jitter: hand-held jitter amplitude (1 = RMS 0.15 deg, 1 mm).
    Ground truth: poses and masks are those of the colour image at its stamp (the middle row under a
    rolling shutter, the middle of the exposure under motion blur: a pixel is in the mask iff the
    middle sub-frame saw a mover there); depth_gt is that sub-frame's noise-free depth.
    """

    width: int = 320
    height: int = 240
    frames: int = 90
    fps: float = 30.0
    movers: int = 2
    seed: int = 0
    depth_noise: float = 0.0
    depth_holes: float = 0.0
    depth_stamp_jitter: float = 0.008
    mover_speed: float = 1.0  # scales the walking speed (1.0 ~ 1.2 m/s peak)
    camera_motion: float = 1.0  # scales the hand-held camera motion amplitude
    people: int = 0
    stop_and_go: bool = False
    close_crossing: bool = False
    toward_camera: bool = False
    camouflage: str = ''
    kinect: bool = False
    silhouette_holes: bool = False
    max_range: float = 0.0
    motion_blur: float = 0.0
    exposure_flicker: float = 0.0
    colour_noise: float = 0.0
    depth_delay: float = 0.0
    rolling_shutter: float = 0.0
    jitter: float = 0.0

    def intrinsics(self) -> np.ndarray:
        """(3, 3) K: the TUM fr3 colour camera scaled to width x height."""
        sx, sy = self.width / 640.0, self.height / 480.0
        return np.array([[535.4 * sx, 0.0, 320.1 * sx], [0.0, 539.2 * sy, 247.6 * sy], [0.0, 0.0, 1.0]])


@dataclass
class SyntheticSequence:
    """A rendered sequence with its ground truth.

    Attributes:
        frames: N Frames (rgb (H,W,3) uint8, depth (H,W) float32 m with noise/holes, K, key).
        poses: (N, 4, 4) float64 camera-to-world of the colour optical frame.
        masks: (N, H, W) bool, True where a moving object is seen.
        depth_gt: (N, H, W) float32 noise-free depth in metres (every pixel hits a surface).
        K: (3, 3) float64 intrinsics.
        stamps: (N,) float64 colour stamps (seconds); ``frames[i].key`` is ``f'{stamps[i]:.6f}'``.
        depth_stamps: (N,) float64 depth stamps as written to depth.txt (a few ms off the colour).
        mover_centers: (N, M, 2) float64 xy of each (cylinder) mover's axis on the floor.
        config: the SyntheticConfig used.
        depth_masks: (N, H, W) bool, True where the depth image saw a mover (``masks`` itself unless
            depth_delay makes the depth image's instant differ from the colour's).
    """

    frames: list[Frame]
    poses: np.ndarray
    masks: np.ndarray
    depth_gt: np.ndarray
    K: np.ndarray
    stamps: np.ndarray
    depth_stamps: np.ndarray
    mover_centers: np.ndarray
    config: SyntheticConfig = field(default_factory=SyntheticConfig)
    depth_masks: np.ndarray | None = None

    @property
    def keys(self) -> list[str]:
        return [f.key for f in self.frames]

    def static_surface_distance(self, points: np.ndarray) -> np.ndarray:
        """(M, 3) world points -> (M,) metres to the nearest static surface (room or static box)."""
        return static_surface_distance(points)

    def world_points(self, i: int, pixels_mask: np.ndarray | None = None) -> np.ndarray:
        """(M, 3) world points of frame i's ground-truth depth (all pixels, or where mask is True)."""
        return backproject(self.depth_gt[i], self.K, self.poses[i], pixels_mask)


def backproject(depth: np.ndarray, K: np.ndarray, pose: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """(H, W) depth, (3, 3) K, (4, 4) camera-to-world -> (M, 3) world points of valid (masked) pixels."""
    sel = depth > 0 if mask is None else (depth > 0) & mask
    return transform_points(np.asarray(pose, np.float64), unproject(depth, K)[sel])


# ---------------------------------------------------------------------------------------------
# Scene motion


def _smooth_noise_1d(rng: np.random.Generator, t: np.ndarray, freqs: tuple, amp: float) -> np.ndarray:
    """(N,) sum of sinusoids with random phases: smooth, deterministic per rng."""
    phases = rng.uniform(0, 2 * np.pi, size=len(freqs))
    return amp * sum(np.sin(2 * np.pi * f * t + p) for f, p in zip(freqs, phases)) / len(freqs)


def camera_poses(cfg: SyntheticConfig, t: np.ndarray) -> np.ndarray:
    """(N,) seconds -> (N, 4, 4) camera-to-world: a hand-held look-at path with small shake."""
    rng = np.random.default_rng([cfg.seed, _CAMERA])
    a = cfg.camera_motion
    pos = np.stack([
        _smooth_noise_1d(rng, t, (0.11, 0.23), 0.45 * a),
        -2.3 + _smooth_noise_1d(rng, t, (0.13, 0.19), 0.25 * a),
        1.35 + _smooth_noise_1d(rng, t, (0.17, 0.29), 0.12 * a),
    ], axis=1)
    pos += np.stack([_smooth_noise_1d(rng, t, (3.1, 4.7, 6.3), 0.006 * a) for _ in range(3)], axis=1)
    target = np.stack([
        _smooth_noise_1d(rng, t, (0.09, 0.21), 1.6 * a),
        np.full_like(t, 2.0),
        1.0 + _smooth_noise_1d(rng, t, (0.15, 0.27), 0.3 * a),
    ], axis=1)
    fwd = target - pos
    fwd /= np.linalg.norm(fwd, axis=1, keepdims=True)
    right = np.cross(fwd, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right, axis=1, keepdims=True)
    down = np.cross(fwd, right)
    roll = np.deg2rad(_smooth_noise_1d(rng, t, (0.2, 0.37), 4.0 * a) + _smooth_noise_1d(rng, t, (3.7, 5.3), 0.3 * a))
    c, s = np.cos(roll)[:, None], np.sin(roll)[:, None]
    right, down = c * right + s * down, -s * right + c * down
    poses = np.tile(np.eye(4), (len(t), 1, 1))
    poses[:, :3, 0], poses[:, :3, 1], poses[:, :3, 2], poses[:, :3, 3] = right, down, fwd, pos
    return sensor_model.jitter_poses(poses, t, cfg.seed, cfg.jitter) if cfg.jitter > 0 else poses


def _mover_centres(cfg: SyntheticConfig, t: np.ndarray) -> np.ndarray:
    """(N,) seconds -> (N, M, 2) xy of the movers' axes."""
    rng = np.random.default_rng([cfg.seed, _MOVERS])
    centres = np.zeros((len(t), cfg.movers, 2))
    for k in range(cfg.movers):
        period = rng.uniform(8.0, 11.0) / max(cfg.mover_speed, 1e-6)
        phase = 2 * np.pi * (k / max(cfg.movers, 1) + rng.uniform(-0.08, 0.08)) + 0.3
        y0 = -0.3 + 1.4 * (k % 3) / 2 + rng.uniform(-0.2, 0.2)
        w = 2 * np.pi / period
        centres[:, k, 0] = 1.75 * np.sin(w * t + phase)
        centres[:, k, 1] = y0 + 0.35 * np.sin(1.7 * w * t + rng.uniform(0, 2 * np.pi))
    return centres


def in_frame_motion(cfg: SyntheticConfig, t: np.ndarray, order: int = 2, span: float = 0.015) -> np.ndarray:
    """The camera's exact motion within each frame, as the RGB-D pose step models it (ground truth for it).

    t: (N,) frame instants, s from the first frame (the renderer's clock: ``stamps - stamps[0]``) -> (N, 6 order)
    [c_1, ..., c_order] (c_1 the body twist [v m/s, omega rad/s] in the camera's axes, c_m its (m-1)-th
    derivative; :func:`dynrecon_ros.rolling_shutter.motion_offsets`): the least-squares polynomial
    sum_m s^m / m! c_m through the displacements (translation, rotation vector) of :func:`camera_poses` at 13
    offsets s in [-span, span] s from each frame's instant."""
    s = np.linspace(-span, span, 13)
    a = np.stack([s ** m / math.factorial(m) for m in range(1, order + 1)], 1)  # (13, order)
    t = np.asarray(t, dtype=np.float64)
    cams = camera_poses(cfg, (t[:, None] + np.concatenate([[0.0], s])[None]).ravel()).reshape(len(t), 14, 4, 4)
    rel = np.linalg.inv(cams[:, :1]) @ cams[:, 1:]  # (N, 13, 4, 4) the cameras of the offsets in the frame's
    disp = np.concatenate([rel[..., :3, 3], Rotation.from_matrix(rel[..., :3, :3].reshape(-1, 3, 3)).as_rotvec()
                           .reshape(len(t), 13, 3)], -1)  # (N, 13, 6)
    coef = np.linalg.pinv(a) @ disp  # (N, order, 6): the least-squares fit of every frame at once
    return coef.reshape(len(t), 6 * order)


def mover_paths(cfg: SyntheticConfig, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N,) seconds -> centres (N, M, 2) xy and headings (N, M) rad of the walking movers.

    Each mover walks back and forth across the room in front of the camera on a smooth Lissajous-like
    path; different movers start at different phases so they cross each other and the view. The
    heading follows the walking direction, so the movers also turn.
    """
    t = np.asarray(t, dtype=np.float64)
    centres = _mover_centres(cfg, t)
    vel = _mover_centres(cfg, t + 1e-3) - _mover_centres(cfg, t - 1e-3)
    return centres, np.arctan2(vel[..., 1], vel[..., 0])


def _holes(rng: np.random.Generator, h: int, w: int, fraction: float) -> np.ndarray:
    """(H, W) bool, True for `fraction` of the pixels, in smooth blobs."""
    coarse = rng.random((max(h // 12, 2), max(w // 12, 2))).astype(np.float32)
    field_ = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    return field_ > np.quantile(field_, 1.0 - fraction)


def _check_config(cfg: SyntheticConfig) -> None:
    if cfg.width < 8 or cfg.height < 8 or cfg.frames < 1 or cfg.fps <= 0 or cfg.movers < 0 or cfg.people < 0:
        raise ValueError(f'invalid synthetic config: {cfg}')
    if cfg.camouflage not in ('', 'uniform', 'background'):
        raise ValueError(f"camouflage must be '', 'uniform' or 'background', got {cfg.camouflage!r}")
    if cfg.kinect and cfg.depth_noise > 0:
        raise ValueError('kinect replaces depth_noise: set one of them')
    if min(cfg.max_range, cfg.motion_blur, cfg.exposure_flicker, cfg.colour_noise, cfg.depth_delay,
           cfg.rolling_shutter, cfg.jitter) < 0:
        raise ValueError(f'negative sensor effect in {cfg}')


def make_crowd(cfg: SyntheticConfig) -> people.Crowd | None:
    """The articulated people of a config (None without people): ``make_crowd(cfg).state(t)`` gives their
    body parts at times t (seconds from the first frame), as rendered."""
    if not (cfg.people or cfg.close_crossing or cfg.toward_camera):
        return None
    return people.Crowd(cfg.people, stop_and_go=cfg.stop_and_go, close_crossing=cfg.close_crossing,
                        toward_camera=cfg.toward_camera, camera=lambda tt: camera_poses(cfg, tt),
                        duration=cfg.frames / cfg.fps, seed=cfg.seed, speed=cfg.mover_speed)


class _Renderer:
    """Renders rays of one frame at one instant: static scene, cylinder movers, people, camouflage."""

    def __init__(self, cfg, K, tex, cams, centres, headings, people_state):
        self.cfg, self.K, self.tex = cfg, K, tex
        self.cams, self.centres, self.headings, self.people = cams, centres, headings, people_state
        h, w = cfg.height, cfg.width
        self.rays_cam = unproject(np.ones((h, w)), K).reshape(-1, 3).T  # (3, P) rays at depth 1

    def rows(self, i: int, bands: list[tuple[int, int, int]], shade: bool = True):
        """Frame i, bands [(row0, row1, instant q)] covering the image -> colour (P, 3) float 0..255 before
        quantisation (None without shade), depth (P,), dynamic (P,) bool."""
        cfg, w = self.cfg, self.cfg.width
        parts = []
        for r0, r1, q in bands:
            one = len(bands) == 1
            rays = self.rays_cam if one else self.rays_cam[:, r0 * w:r1 * w]
            K = self.K if one else self.K - np.array([[0, 0, 0], [0, 0, r0], [0, 0, 0]])
            pose = self.cams[i, q]
            R, o = pose[:3, :3], pose[:3, 3]
            d = R @ rays
            cull = _screen_cull(pose, K, w, r1 - r0)
            tt, cos_light, tu, tv, dyn = _cast(o, d, self.centres[i, q], self.headings[i, q], cull=cull)
            hit = np.zeros(0, np.int64)
            if self.people is not None:
                hit, part, normal, local = people.cast_people(o, d, tt, self.people, i * self.cams.shape[1] + q,
                                                              pose, K, w, r1 - r0)
                cos_light[hit] = np.abs(normal @ LIGHT)
                tu[hit] = np.arctan2(local[:, 1], local[:, 0]) * self.people.radius[part] + (300 + part) * 13.7
                tv[hit] = local[:, 2] + (300 + part) * 29.3
                dyn[hit] = True
            col = None
            if shade:
                if cfg.camouflage == 'background':  # texture fixed in the world, not on the mover
                    hx, hy, hz = (o[a] + tt[dyn] * d[a, dyn] for a in range(3))
                    tu[dyn], tv[dyn] = hx + 0.7 * hy + 977.0, hz + 0.7 * hy + 1291.0
                albedo = self.tex.colour(tu, tv)
                if len(hit) and cfg.camouflage != 'background':
                    albedo[hit] = 0.5 * albedo[hit] + 0.5 * self.people.albedo[part]
                if cfg.camouflage == 'uniform':
                    albedo[dyn] = (0.46, 0.43, 0.40)
                col = albedo * ((0.6 + 0.4 * cos_light) * 255.0)[:, None]
            parts.append((col, tt, dyn))
        if len(parts) == 1:
            return parts[0]
        return (None if not shade else np.concatenate([p[0] for p in parts]),
                np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts]))


def render_sequence(cfg: SyntheticConfig | None = None) -> SyntheticSequence:
    """Render a sequence. Deterministic: the same config gives bitwise-equal arrays."""
    cfg = cfg or SyntheticConfig()
    _check_config(cfg)
    n, h, w = cfg.frames, cfg.height, cfg.width
    K = cfg.intrinsics()
    stamps = np.array([float(f'{BASE_STAMP + i / cfg.fps:.6f}') for i in range(n)])
    t = stamps - BASE_STAMP
    srng = np.random.default_rng([cfg.seed, _STAMPS])
    jit = min(cfg.depth_stamp_jitter, 0.25 / cfg.fps)  # stays well inside the association window
    jitter = srng.uniform(-jit, jit, size=n)
    base = stamps + cfg.depth_delay if cfg.depth_delay else stamps
    depth_stamps = np.array([float(f'{s + j:.6f}') for s, j in zip(base, jitter)])
    # The instants (offsets from the colour stamp) a frame is rendered at; offset 0 (index 0) gives the GT pose.
    offsets = [0.0]

    def slot(x: float) -> int:
        if x not in offsets:
            offsets.append(x)
        return offsets.index(x)
    bands = sensor_model.shutter_bands(h, cfg.rolling_shutter)
    blur = sensor_model.blur_offsets(cfg.motion_blur)
    colour_plan = [[(r0, r1, slot(float(e) + off)) for r0, r1, off in bands] for e in blur]
    # The depth sensor reads its rows like the colour one (both rolling shutters on a Kinect v1), depth_delay later.
    own_depth = cfg.depth_delay != 0  # else the depth is the middle colour sub-frame's
    depth_plan = [(r0, r1, slot(cfg.depth_delay + off)) for r0, r1, off in bands]
    q_count = len(offsets)
    times = (t[:, None] + np.asarray(offsets)[None]).ravel()  # (N * Q,)
    cams = camera_poses(cfg, times).reshape(n, q_count, 4, 4)
    poses = cams[:, 0].copy()
    centres, headings = mover_paths(cfg, times)
    centres, headings = centres.reshape(n, q_count, -1, 2), headings.reshape(n, q_count, -1)
    crowd = make_crowd(cfg)
    state = crowd.state(times) if crowd is not None else None
    renderer = _Renderer(cfg, K, _Texture(cfg.seed), cams, centres, headings, state)
    gains = sensor_model.exposure_gains(t, cfg.seed, cfg.exposure_flicker) if cfg.exposure_flicker else None
    kinect = cfg.kinect or cfg.silhouette_holes or cfg.max_range > 0

    frames, masks, depth_gt = [], np.zeros((n, h, w), bool), np.zeros((n, h, w), np.float32)
    depth_masks = np.zeros((n, h, w), bool) if own_depth else masks
    for i in range(n):
        acc = None
        for k, plan in enumerate(colour_plan):
            col, tt, dyn = renderer.rows(i, plan)
            acc = col if acc is None else acc + col
            if k == len(colour_plan) // 2:
                depth_gt[i] = tt.reshape(h, w).astype(np.float32)
                masks[i] = dyn.reshape(h, w)
        if len(colour_plan) > 1:
            acc /= len(colour_plan)
        if gains is not None:
            acc *= gains[i]
        if cfg.colour_noise > 0:
            acc = sensor_model.add_colour_noise(acc, np.random.default_rng([cfg.seed, _COLOUR, i]), cfg.colour_noise)
        rgb = np.clip(acc + 0.5, 0, 255).astype(np.uint8)
        clean = depth_gt[i]
        if own_depth:
            _, tt, dyn = renderer.rows(i, depth_plan, shade=False)
            clean = tt.reshape(h, w).astype(np.float32)
            depth_masks[i] = dyn.reshape(h, w)
        depth = clean.copy()
        nrng = np.random.default_rng([cfg.seed, _NOISE, i])
        if cfg.depth_noise > 0:
            depth += (nrng.standard_normal((h, w)) * cfg.depth_noise * clean ** 2).astype(np.float32)
            depth = np.maximum(depth, 0.0)
        if kinect:
            depth = sensor_model.kinect_depth(clean, np.random.default_rng([cfg.seed, _KINECT, i]), K[0, 0], w,
                                              noise=cfg.kinect, quantise=cfg.kinect,
                                              silhouettes=cfg.silhouette_holes, max_range=cfg.max_range)
        if cfg.depth_holes > 0:
            depth[_holes(nrng, h, w, cfg.depth_holes)] = 0.0
        key = f'{stamps[i]:.6f}'
        frames.append(Frame(stamp=stamps[i], rgb=rgb.reshape(h, w, 3), depth=depth, K=K.copy(), key=key,
                            meta={'depth_stamp': float(depth_stamps[i]), 'source': 'synthetic'}))
    return SyntheticSequence(frames=frames, poses=poses, masks=masks, depth_gt=depth_gt, K=K, stamps=stamps,
                             depth_stamps=depth_stamps, mover_centers=centres[:, 0], config=cfg,
                             depth_masks=depth_masks)


# ---------------------------------------------------------------------------------------------
# Writers


def write_tum(seq: SyntheticSequence, directory) -> pathlib.Path:
    """Write the sequence in the TUM RGB-D layout under ``directory`` and return its path.

    Files: rgb/<ts>.png (8-bit colour), depth/<depth_ts>.png (16-bit, 5000 units/m, 0 = no reading),
    rgb.txt, depth.txt, groundtruth.txt (camera-to-world at the colour stamps), masks_gt/<ts>.png
    (mono8, 255 = dynamic, named by the colour stamp), calibration.txt (one line
    ``fx fy cx cy`` of the colour camera; TUM's readers use it when present) and sensor.yaml (the
    rolling shutter's readout and the depth delay rendered, which `dynrecon run` uses as the sensor's timing).
    """
    root = pathlib.Path(directory)
    for sub in ('rgb', 'depth'):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rgb_lines, depth_lines = [], []
    for f, ds in zip(seq.frames, seq.depth_stamps):
        dkey = f'{ds:.6f}'
        cv2.imwrite(str(root / 'rgb' / f'{f.key}.png'), cv2.cvtColor(f.rgb, cv2.COLOR_RGB2BGR))
        write_depth_png(root / 'depth' / f'{dkey}.png', f.depth)
        rgb_lines.append(f'{f.key} rgb/{f.key}.png')
        depth_lines.append(f'{dkey} depth/{dkey}.png')
    write_masks(root / 'masks_gt', dict(zip(seq.keys, seq.masks)))
    name = f'dynrecon synthetic seed {seq.config.seed}'
    (root / 'rgb.txt').write_text(f'# color images\n# file: \'{name}\'\n# timestamp filename\n'
                                  + '\n'.join(rgb_lines) + '\n')
    (root / 'depth.txt').write_text(f'# depth maps\n# file: \'{name}\'\n# timestamp filename\n'
                                    + '\n'.join(depth_lines) + '\n')
    write_trajectory(root / 'groundtruth.txt', seq.stamps, seq.poses,
                     header=f'ground truth trajectory\n# file: \'{name}\'\n# timestamp tx ty tz qx qy qz qw')
    K = seq.K
    (root / 'calibration.txt').write_text(f'{K[0, 0]:.9g} {K[1, 1]:.9g} {K[0, 2]:.9g} {K[1, 2]:.9g}\n')
    write_sensor_timing(root / 'sensor.yaml', seq.config.rolling_shutter, seq.config.depth_delay)
    return root
