"""The `dynrecon` command line: a thin argparse layer over the library.

Each subcommand lives in ``dynrecon_ros.commands.<name>`` and provides ``add_arguments(parser)`` and
``run(args) -> int``; it is imported only when used, so ``dynrecon eval`` never loads torch.
User mistakes raise :class:`dynrecon_ros.errors.InputError` and end as one line on stderr, exit 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from dynrecon_ros.errors import InputError

SUBCOMMANDS = {
    'render': 'Write a synthetic dynamic RGB-D sequence (TUM layout, optional bags).',
    'run': 'Reconstruct a sequence offline: trajectory, masks, depth, static map, preview.',
    'eval': 'Trajectory (ATE/RPE) and mask (IoU/precision/recall) metrics against ground truth.',
    'demo': 'Render the embedded default sequence, reconstruct it and print the metrics.',
    'replay': 'Publish a TUM-style bag (ROS 1 or ROS 2) on its topics with the original timing.',
}


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, object | None]:
    parser = argparse.ArgumentParser(prog='dynrecon', description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    wanted = next((a for a in argv if not a.startswith('-')), None)
    module = None
    for name, helptext in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=helptext, description=helptext)
        if name == wanted:  # import only the module of the subcommand in use
            module = importlib.import_module(f'dynrecon_ros.commands.{name}')
            module.add_arguments(p)
    return parser, module


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, module = build_parser(argv)
    args = parser.parse_args(argv)
    if module is None:
        parser.print_help()
        return 2
    try:
        return int(module.run(args) or 0)
    except InputError as exc:
        print(f'dynrecon {args.command}: error: {exc}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f'dynrecon {args.command}: interrupted', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
