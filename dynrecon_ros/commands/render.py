"""`dynrecon render`: write a synthetic dynamic RGB-D sequence in the TUM layout (optionally as bags)."""
from __future__ import annotations

import pathlib
import shutil
import time

from dynrecon_ros.errors import InputError


def add_arguments(parser) -> None:
    parser.add_argument('--output', '-o', required=True, help='output TUM directory')
    parser.add_argument('--width', type=int, default=320)
    parser.add_argument('--height', type=int, default=240)
    parser.add_argument('--frames', type=int, default=90)
    parser.add_argument('--fps', type=float, default=30.0)
    parser.add_argument('--movers', type=int, default=2, help='number of walking people-sized objects')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--depth-noise', type=float, default=0.0, help='depth noise std at 1 m (m), grows with z^2')
    parser.add_argument('--depth-holes', type=float, default=0.0, help='fraction of pixels without depth (blobs)')
    parser.add_argument('--bag1', metavar='PATH.bag', help='also write a ROS 1 bag with TUM topics')
    parser.add_argument('--bag2', metavar='DIR', help='also write a ROS 2 bag directory with TUM topics')
    parser.add_argument('--bag2-storage', choices=('sqlite3', 'mcap'), default='sqlite3')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing output directory/bags')


def _check(args) -> None:
    if args.width < 16 or args.height < 16:
        raise InputError(f'--width/--height must be at least 16, got {args.width}x{args.height}')
    if args.frames < 1 or args.fps <= 0 or args.movers < 0:
        raise InputError('--frames must be >= 1, --fps > 0 and --movers >= 0')
    if args.depth_noise < 0 or not 0 <= args.depth_holes < 1:
        raise InputError('--depth-noise must be >= 0 and --depth-holes in [0, 1)')
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
    from dynrecon_ros.data.synthetic import SyntheticConfig, render_sequence, write_bag, write_tum

    _check(args)
    cfg = SyntheticConfig(width=args.width, height=args.height, frames=args.frames, fps=args.fps,
                          movers=args.movers, seed=args.seed, depth_noise=args.depth_noise,
                          depth_holes=args.depth_holes)
    t0 = time.perf_counter()
    seq = render_sequence(cfg)
    t_render = time.perf_counter() - t0
    out = write_tum(seq, args.output)
    print(f'rendered {cfg.frames} frames {cfg.width}x{cfg.height}, {cfg.movers} movers, seed {cfg.seed} '
          f'in {t_render:.1f} s; dynamic pixels {100 * seq.masks.mean():.1f} %')
    print(f'TUM directory: {out}')
    if args.bag1:
        print(f'ROS 1 bag: {write_bag(seq, args.bag1, ros_version=1)}')
    if args.bag2:
        print(f'ROS 2 bag: {write_bag(seq, args.bag2, ros_version=2, storage=args.bag2_storage)}')
    return 0
