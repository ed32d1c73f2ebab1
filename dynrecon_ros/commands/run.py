"""`dynrecon run`: reconstruct a recorded sequence offline.

Writes into --output: trajectory.tum (one line per accepted frame, camera-to-world, optical frame),
masks/<key>.png (mono8, 255 = dynamic), depth/<key>.png (16-bit, 5000 per metre), static_map.ply,
summary.json (frames, seconds, frames/s, per-stage timings, skipped frames with reasons) and
preview.png.
"""
from __future__ import annotations

import json
import pathlib
import sys
import time

import cv2
import numpy as np

from dynrecon_ros.errors import InputError


def add_arguments(parser) -> None:
    parser.add_argument('--input', required=True, help='TUM RGB-D directory, TUM-style bag, video or image folder')
    parser.add_argument('--output', required=True, help='output directory (created)')
    parser.add_argument('--config', help='YAML file with pipeline parameters (see dynrecon_ros/config.py)')
    parser.add_argument('--backend', choices=['rgbd', 'dust3r'],
                        help='pair predictor (default: rgbd when the input has depth)')
    parser.add_argument('--checkpoint', help='network weights for --backend dust3r')
    parser.add_argument('--max-frames', type=int, default=None, help='process at most N frames')
    parser.add_argument('--device', default='cpu', help="torch device for alignment/network ('cpu', 'cuda')")


def open_input(path):
    """A sequence of Frames (supports len() when known) from a TUM directory, bag, video or images."""
    p = pathlib.Path(path)
    if not p.exists():
        raise InputError('input not found', p)
    from dynrecon_ros.data.sources import open_source
    return open_source(str(p))


def reconstruct(frames, output, config=None, backend: str | None = None, checkpoint: str | None = None,
                max_frames: int | None = None, device: str = 'cpu', progress: bool | None = None,
                log=None) -> dict:
    """Run the pipeline over ``frames`` and write every output; returns the summary dict."""
    from dynrecon_ros.config import ReconConfig
    from dynrecon_ros.data.tum import write_depth_png, write_trajectory
    from dynrecon_ros.preview import make_preview
    from dynrecon_ros.reconstructor import Reconstructor

    cfg = config or ReconConfig()
    out = pathlib.Path(output)
    (out / 'masks').mkdir(parents=True, exist_ok=True)
    (out / 'depth').mkdir(parents=True, exist_ok=True)
    it = iter(frames)
    try:
        first = next(it)
    except StopIteration:
        raise InputError('input has no frames') from None
    if backend is None:
        backend = cfg.backend.name if cfg.backend.name != 'auto' else None
    if backend is None:
        if first.depth is None:
            raise InputError('input has no depth: the rgbd backend needs depth; use --backend dust3r '
                             '(monocular) with --checkpoint')
        backend = 'rgbd'
    if checkpoint:
        cfg.backend.checkpoint = checkpoint
    cfg.backend.name = backend
    messages: list[str] = []

    def _log(msg: str) -> None:
        messages.append(msg)
        if log is not None:
            log(msg)

    _take_sensor_timing(cfg, frames, _log)

    rec = Reconstructor(cfg, device=device, log=_log)
    total = None
    try:
        total = len(frames)
    except TypeError:
        pass
    if max_frames is not None:
        total = max_frames if total is None else min(total, max_frames)
    if progress is None:
        progress = sys.stderr.isatty()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, unit='frame', desc='reconstructing')
    results = []
    stamps, poses, skipped = [], [], []
    last_ok = None
    rgbs: dict[str, np.ndarray] = {}  # colour of frames whose result is pending (for the preview)
    last_rgb = None

    def consume(rs):
        nonlocal last_ok, last_rgb
        for r in rs:
            results.append(r.status)
            rgb = rgbs.pop(r.key, None)
            if r.status != 'ok':
                skipped.append({'key': r.key, 'stamp': r.stamp, 'reason': r.reason})
                continue
            stamps.append(r.stamp)
            poses.append(r.pose)
            cv2.imwrite(str(out / 'masks' / f'{r.key}.png'), r.mask)
            if r.depth is not None:
                write_depth_png(out / 'depth' / f'{r.key}.png', r.depth)
            last_ok, last_rgb = r, rgb

    t0 = time.perf_counter()
    n = 0
    pipe = rec.pipeline(consume)  # results written on the output thread while the next frames run

    def frames_iter():
        yield first
        yield from it

    for frame in frames_iter():
        if max_frames is not None and n >= max_frames:
            break
        n += 1
        rgbs[frame.key] = frame.rgb
        pipe.submit(frame)
        if bar is not None:
            bar.update(1)
    consume(pipe.flush())
    pipe.close()
    seconds = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    write_trajectory(out / 'trajectory.tum', np.array(stamps), np.array(poses).reshape(-1, 4, 4),
                     header='dynrecon trajectory: timestamp tx ty tz qx qy qz qw (camera-to-world, optical frame)')
    rec.save_map(out / 'static_map.ply')
    map_points = rec.static_map()
    if last_ok is not None:
        make_preview(last_rgb, last_ok.depth, last_ok.mask, map_points, np.array(poses), out / 'preview.png')
    summary = {
        'input_frames': n,
        'frames': len(stamps),
        'skipped': skipped,
        'seconds': round(seconds, 3),
        'frames_per_second': round(n / seconds, 3) if seconds > 0 else None,
        'timings_ms': {k: round(v, 2) for k, v in rec.timings.items()},
        'backend': backend,
        'map_points': int(len(map_points)),
        'config': cfg.to_dict(),
    }
    (out / 'summary.json').write_text(json.dumps(summary, indent=2, default=str) + '\n')
    return summary


LATE_DEPTH_S = 0.004  # a median stamp offset beyond this is worth a log line (TUM's own sequences: about 0)


def _take_sensor_timing(cfg, frames, log) -> None:
    """The input's sensor timing (a TUM directory's sensor.yaml) fills the config's when the config gives none
    (backend.rolling_shutter_s and backend.depth_delay_s both 0, the defaults); a config that gives one wins.
    Either way a log line says which timing the pose step uses. Without a timing file and with no depth delay
    configured, depth stamped consistently apart from colour (median beyond LATE_DEPTH_S) gets a log line."""
    b = cfg.backend
    timing = getattr(frames, 'sensor_timing', None)
    if not timing:
        offsets = getattr(frames, 'depth_offsets', None)
        if offsets is not None and np.isfinite(offsets).any() and b.depth_delay_s == 0:
            late = float(np.nanmedian(offsets))
            if abs(late) > LATE_DEPTH_S:
                log(f'the depth images are stamped {1000 * late:+.1f} ms from their colour images (median); the pose '
                    f'step assumes they were taken at the same instant: if the sensor takes depth later, set '
                    f'backend.depth_delay_s (and backend.rolling_shutter_s for a rolling shutter) in --config')
        return
    given = (b.rolling_shutter_s, b.depth_delay_s)
    said = (timing['rolling_shutter_s'], timing['depth_delay_s'])
    where = getattr(frames, 'sensor_timing_path', None) or 'the input'
    if given == (0.0, 0.0):
        b.rolling_shutter_s, b.depth_delay_s = said
        if said != (0.0, 0.0):
            log(f'sensor timing from {where}: rolling shutter readout {1000 * said[0]:g} ms, depth '
                f'{1000 * said[1]:g} ms after colour')
    elif given != said:
        log(f'sensor timing from the config (rolling shutter readout {1000 * given[0]:g} ms, depth '
            f'{1000 * given[1]:g} ms after colour); {where} says {1000 * said[0]:g} / {1000 * said[1]:g} ms')


def run(args) -> int:
    from dynrecon_ros.config import ReconConfig
    cfg = ReconConfig.from_yaml(args.config) if args.config else ReconConfig()
    if args.max_frames is not None and args.max_frames < 1:
        raise InputError(f'--max-frames must be >= 1, got {args.max_frames}')
    frames = open_input(args.input)
    summary = reconstruct(frames, args.output, cfg, args.backend, args.checkpoint, args.max_frames,
                          args.device, log=lambda m: print(f'dynrecon run: {m}', file=sys.stderr))
    print(f'{summary["frames"]} of {summary["input_frames"]} frames reconstructed in {summary["seconds"]:.1f} s '
          f'({summary["frames_per_second"]:.1f} frames/s), {len(summary["skipped"])} skipped; '
          f'outputs in {args.output}')
    return 0
