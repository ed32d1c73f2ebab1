"""torch.profiler over a few calls of a step, printed as the tables that say where its time goes.

Used by bench/network.py and bench/monocular_host.py (`--profile N`): on CUDA the question is whether the
GPU is busy (kernel time close to the wall time) or waits on the host (many small kernels, syncs, copies).
"""
from __future__ import annotations

import time
from typing import Callable


def profile(fn: Callable[[], object], n: int, cuda: bool, rows: int = 20, title: str = '',
            python: bool = True) -> None:
    """Run `fn` n times under torch.profiler and print wall ms per call, GPU kernel ms per call, the kernel
    launches per call and the top `rows` ops by self device time (CUDA) and by self CPU time; with `python`,
    then n more calls under cProfile (host-side Python by own time: what the torch tables do not show)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    with torch.profiler.profile(activities=acts) as prof:
        t = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        wall = (time.perf_counter() - t) * 1e3 / n
    events = prof.key_averages()
    dev = [e for e in events if getattr(e, 'device_type', None) == DeviceType.CUDA]
    gpu_ms = sum(getattr(e, 'self_device_time_total', 0.0) for e in dev) / 1e3 / n
    launches = sum(e.count for e in dev) / n
    print(f'== profile {title}: {n} calls, wall {wall:.1f} ms per call (profiler overhead included)'
          + (f', GPU kernels {gpu_ms:.1f} ms per call ({100 * gpu_ms / max(wall, 1e-9):.0f} % busy), '
             f'{launches:.0f} kernels per call' if cuda else ''))
    if cuda:
        print(events.table(sort_by='self_device_time_total', row_limit=rows, max_name_column_width=60))
    print(events.table(sort_by='self_cpu_time_total', row_limit=rows, max_name_column_width=60))
    if python:
        import cProfile
        import pstats
        sync()
        with cProfile.Profile() as pr:
            for _ in range(n):
                fn()
            sync()
        print(f'== cProfile {title}: the same {n} calls, Python functions by own time')
        pstats.Stats(pr).sort_stats('tottime').print_stats(rows)
