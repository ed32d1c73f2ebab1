"""Two-core ceiling of the RGB-D pipeline: one stream on one thread, against two streams in two processes at once.

Usage: python bench/two_streams.py [--size 640x480] [--frames 150] [--set section.name=value ...]

Issue 19 asks for 30 frames/s on two cores. Today's pipeline overlaps two frames on two threads of one process
(dynrecon_ros/pipelining.py), and the interpreter's lock lets it gain little from the second core. This bench
measures what the same work could reach without that lock, as an upper bound for a split of one stream over two
processes: the synthetic sequence through a Reconstructor with ``push`` (stage A and B on the caller's thread,
the map on its thread; ``segmentation.threads`` 1), first alone, then as two independent copies in two
processes started together. It prints frames/s and CPU ms per frame of each, and the two copies' combined
frames/s: that is what a perfectly balanced two-process split of one stream would give (a real split also pays
for moving frames, flows and masks between the processes, and for its balance). Rendering is excluded.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def one_stream(size: tuple[int, int], frames: int, sets: list[str], ready, start, out) -> None:
    """Render, say so on ``ready``, wait for ``start`` (an Event), run the stream; put (frames/s, CPU ms per frame,
    frames ok) on ``out``."""
    from pipeline import parse_set

    from dynrecon_ros.config import ReconConfig
    from dynrecon_ros.data.synthetic import SyntheticConfig, render_sequence
    from dynrecon_ros.reconstructor import Reconstructor

    seq = render_sequence(SyntheticConfig(width=size[0], height=size[1], frames=frames, seed=3))
    cfg = ReconConfig()
    cfg.segmentation.threads = 1
    parse_set(cfg, sets)
    rec = Reconstructor(cfg)
    ready.put(True)
    start.wait()
    c0, t0 = time.process_time(), time.perf_counter()
    n = 0
    for f in seq.frames:
        n += sum(r.status == 'ok' for r in rec.push(f))
    n += sum(r.status == 'ok' for r in rec.flush())
    rec.static_map()  # the map thread's last integration included
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    out.put((len(seq.frames) / wall, 1000 * cpu / len(seq.frames), n))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--size', default='640x480')
    ap.add_argument('--frames', type=int, default=150)
    ap.add_argument('--set', nargs='*', default=[], help="ReconConfig overrides 'section.name=value'")
    args = ap.parse_args()
    size = tuple(int(v) for v in args.size.split('x'))
    ctx = mp.get_context('spawn')  # fresh interpreters: no state shared with this one
    print(f'machine: {os.cpu_count()} CPUs visible, load average {os.getloadavg()[0]:.1f} at start; '
          f'{args.size}, {args.frames} frames, one thread per stream (segmentation.threads 1), rendering excluded',
          flush=True)

    def streams(k: int) -> list[tuple[float, float, int]]:
        """k copies in k processes, started together once all have rendered their sequence."""
        ready, start, out = ctx.Queue(), ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=one_stream, args=(size, args.frames, args.set, ready, start, out))
                 for _ in range(k)]
        for p in procs:
            p.start()
        for _ in procs:
            ready.get(timeout=600)
        start.set()
        res = [out.get(timeout=600) for _ in procs]
        for p in procs:
            p.join()
        return res

    alone = streams(1)[0]
    print(f'one stream alone:        {alone[0]:6.2f} frames/s, {alone[1]:5.1f} ms CPU per frame ({alone[2]} ok)',
          flush=True)
    two = streams(2)
    for k, r in enumerate(two):
        print(f'two at once, stream {k + 1}:   {r[0]:6.2f} frames/s, {r[1]:5.1f} ms CPU per frame ({r[2]} ok)')
    total = sum(r[0] for r in two)
    print(f'two at once, combined:   {total:6.2f} frames/s ({total / alone[0]:.2f}x one stream alone): the ceiling of '
          f'a balanced two-process split of one stream; load average {os.getloadavg()[0]:.1f} at the end')


if __name__ == '__main__':
    main()
