"""`dynrecon render`: write a synthetic dynamic RGB-D sequence in the TUM layout (optionally as bags).

``--scenario NAME`` picks a named condition preset (dynrecon_ros.data.scenarios; ``--list-scenarios``
prints them); every other option given overrides the preset. Without either, the default sequence.
"""
from __future__ import annotations

import argparse
import pathlib
import shutil
import time

from dynrecon_ros.errors import InputError


def add_arguments(parser) -> None:
    parser.add_argument('--output', '-o', help='output TUM directory (required unless --list-scenarios)')
    parser.add_argument('--scenario', default='default', help='named condition preset (see --list-scenarios)')
    parser.add_argument('--list-scenarios', action='store_true', help='print the presets and exit')
    parser.add_argument('--width', type=int, help='default 320 (or the preset\'s)')
    parser.add_argument('--height', type=int, help='default 240 (or the preset\'s)')
    parser.add_argument('--frames', type=int, help='default 90 (or the preset\'s)')
    parser.add_argument('--fps', type=float, help='default 30')
    parser.add_argument('--movers', type=int, help='number of walking people-sized cylinders (default 2)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--depth-noise', type=float, help='depth noise std at 1 m (m), grows with z^2')
    parser.add_argument('--depth-holes', type=float, help='fraction of pixels without depth (blobs)')
    g = parser.add_argument_group('conditions (off by default; see dynrecon_ros.data.synthetic.SyntheticConfig)')
    flag = argparse.BooleanOptionalAction
    g.add_argument('--people', type=int, help='articulated walking people with body-attached texture')
    g.add_argument('--stop-and-go', action=flag, help='the people stop ~1.5 s and walk on')
    g.add_argument('--close-crossing', action=flag, help='a person crossing ~1 m in front of the camera')
    g.add_argument('--toward-camera', action=flag, help='a person walking straight toward the camera')
    g.add_argument('--camouflage', choices=('none', 'uniform', 'background'),
                   help='movers of one flat colour, or with a background-like texture fixed in the world')
    g.add_argument('--kinect', action=flag, help='Kinect v1 depth noise (0.0012 + 0.0019 (z - 0.4)^2 m) and '
                   'disparity quantisation (replaces --depth-noise)')
    g.add_argument('--silhouette-holes', action=flag, help='no depth in projector shadows and on depth edges')
    g.add_argument('--max-range', type=float, help='no depth beyond this many metres (0 = none)')
    g.add_argument('--motion-blur', type=float, metavar='S', help='exposure time (sub-frame averaging)')
    g.add_argument('--exposure-flicker', type=float, help='relative auto-exposure gain changes (0.1 = 10 %%)')
    g.add_argument('--colour-noise', type=float, help='colour noise std in 8-bit levels')
    g.add_argument('--depth-delay', type=float, metavar='S', help='depth taken this long after colour')
    g.add_argument('--rolling-shutter', type=float, metavar='S', help='row readout time, top to bottom')
    g.add_argument('--jitter', type=float, help='hand-held jitter amplitude (1 = RMS 0.15 deg, 1 mm)')
    parser.add_argument('--bag1', metavar='PATH.bag', help='also write a ROS 1 bag with TUM topics')
    parser.add_argument('--bag2', metavar='DIR', help='also write a ROS 2 bag directory with TUM topics')
    parser.add_argument('--bag2-storage', choices=('sqlite3', 'mcap'), default='sqlite3')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing output directory/bags')


_FIELDS = ('width', 'height', 'frames', 'fps', 'movers', 'seed', 'depth_noise', 'depth_holes', 'people',
           'stop_and_go', 'close_crossing', 'toward_camera', 'camouflage', 'kinect', 'silhouette_holes',
           'max_range', 'motion_blur', 'exposure_flicker', 'colour_noise', 'depth_delay', 'rolling_shutter',
           'jitter')


def config_from_args(args):
    """The SyntheticConfig of the preset with the options given on the command line (InputError if invalid)."""
    from dynrecon_ros.data.scenarios import scenario_config
    over = {k: getattr(args, k) for k in _FIELDS if getattr(args, k) is not None}
    if over.get('camouflage') == 'none':
        over['camouflage'] = ''
    try:
        return scenario_config(args.scenario, **over)
    except ValueError as exc:
        raise InputError(f'--scenario: {exc}') from None


def _check(args, cfg) -> None:
    if args.output is None:
        raise InputError('--output is required')
    if cfg.width < 16 or cfg.height < 16:
        raise InputError(f'--width/--height must be at least 16, got {cfg.width}x{cfg.height}')
    if cfg.frames < 1 or cfg.fps <= 0 or cfg.movers < 0 or cfg.people < 0:
        raise InputError('--frames must be >= 1, --fps > 0, --movers and --people >= 0')
    if cfg.depth_noise < 0 or not 0 <= cfg.depth_holes < 1:
        raise InputError('--depth-noise must be >= 0 and --depth-holes in [0, 1)')
    if cfg.kinect and cfg.depth_noise > 0:
        raise InputError('--kinect replaces --depth-noise: give one of them')
    for name in ('max_range', 'motion_blur', 'exposure_flicker', 'colour_noise', 'depth_delay', 'rolling_shutter',
                 'jitter'):
        if getattr(cfg, name) < 0:
            raise InputError(f'--{name.replace("_", "-")} must be >= 0, got {getattr(cfg, name)}')
    if cfg.motion_blur >= 1 / cfg.fps or cfg.rolling_shutter >= 1 / cfg.fps:
        raise InputError('--motion-blur and --rolling-shutter must be shorter than a frame')
    if cfg.depth_delay + min(cfg.depth_stamp_jitter, 0.25 / cfg.fps) >= 0.02:
        raise InputError(f'--depth-delay {cfg.depth_delay} s: with the stamps\' jitter the depth would be 20 ms or '
                         'more from its colour image, outside the TUM association window')
    out = pathlib.Path(args.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not args.overwrite:
            raise InputError('output exists and is not an empty directory (use --overwrite)', out)
        if not (out / 'rgb.txt').exists():
            raise InputError('refusing to overwrite: not a TUM directory (no rgb.txt)', out)
        shutil.rmtree(out)
    for bag in (args.bag1, args.bag2):
        if bag and pathlib.Path(bag).exists():
            if not args.overwrite:
                raise InputError('bag exists (use --overwrite)', bag)
            shutil.rmtree(bag) if pathlib.Path(bag).is_dir() else pathlib.Path(bag).unlink()


def run(args) -> int:
    from dynrecon_ros.data.scenarios import SCENARIOS
    from dynrecon_ros.data.synthetic import render_sequence, write_bag, write_tum

    if args.list_scenarios:
        for name, (text, _) in SCENARIOS.items():
            print(f'{name:20s} {text}')
        return 0
    cfg = config_from_args(args)
    _check(args, cfg)
    t0 = time.perf_counter()
    seq = render_sequence(cfg)
    t_render = time.perf_counter() - t0
    out = write_tum(seq, args.output)
    print(f'rendered {args.scenario}: {cfg.frames} frames {cfg.width}x{cfg.height}, {cfg.movers} movers, '
          f'{cfg.people} people, seed {cfg.seed} '
          f'in {t_render:.1f} s; dynamic pixels {100 * seq.masks.mean():.1f} %')
    print(f'TUM directory: {out}')
    if args.bag1:
        print(f'ROS 1 bag: {write_bag(seq, args.bag1, ros_version=1)}')
    if args.bag2:
        print(f'ROS 2 bag: {write_bag(seq, args.bag2, ros_version=2, storage=args.bag2_storage)}')
    return 0
