"""The batched small products of the aligner (dynrecon_ros.geometry.batched_*) at the monocular step's shapes:
bmm / einsum (the CPU forms) against the elementwise forms the CUDA path takes, ms per call.

Usage: python bench/cuda_products.py [--device cuda] [--batches 16 48] [--points 196608] [--reps 50]

Prints one line per product and batch count: each form's time per call (CUDA events on a GPU, the wall clock
on CPU) and the ratio. On CPU the bmm forms are the faster (why the CPU path keeps them); the GPU figures are
in the README ("GPU figures").
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout this script is in

import torch  # noqa: E402

from dynrecon_ros import geometry as g  # noqa: E402


def timed(fn, reps: int, device: str) -> float:
    """ms per call of fn() (after 3 warm-up calls)."""
    for _ in range(3):
        fn()
    if device == 'cuda':
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            fn()
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) * 1e3 / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    ap.add_argument('--batches', type=int, nargs='+', default=[16, 48])
    ap.add_argument('--points', type=int, default=512 * 384)
    ap.add_argument('--reps', type=int, default=50)
    args = ap.parse_args()
    dev = args.device
    print(f'device {torch.cuda.get_device_name() if dev == "cuda" else "cpu"}, float32, M = {args.points} points')
    for B in args.batches:
        X, Y = (torch.randn(B, args.points, 3, device=dev) for _ in range(2))
        w = torch.rand(B, args.points, device=dev)
        R = torch.linalg.qr(torch.randn(B, 3, 3, device=dev))[0]
        forms = {
            'wsum': (lambda: torch.bmm(w[:, None], X)[:, 0], lambda: g._wsum_elementwise(w, X)),
            'moment': (lambda: torch.bmm(X.transpose(1, 2), Y), lambda: g._moment_elementwise(X, Y)),
            'rotate': (lambda: torch.bmm(X, R.transpose(1, 2)), lambda: g._rotate_elementwise(R, X)),
            'dot': (lambda: torch.einsum('...i,...i->...', X, Y), lambda: (X * Y).sum(-1)),
        }
        for name, (cpu_form, cuda_form) in forms.items():
            assert torch.allclose(cpu_form(), cuda_form(), rtol=1e-4, atol=1e-2 * (args.points ** 0.5)), name
            a, b = timed(cpu_form, args.reps, dev), timed(cuda_form, args.reps, dev)
            print(f'  B={B:3d} {name:7s} bmm/einsum {a:8.3f} ms   elementwise {b:8.3f} ms   ratio {a / b:6.2f}x')


if __name__ == '__main__':
    main()
