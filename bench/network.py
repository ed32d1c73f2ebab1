"""Benchmark of the windowed pair engine vs a naive per-pair forward (same model, same machine).

Window: 8 frames, each paired with the next 3 in both directions (36 ordered pairs).
- naive: the reference's way: every pair encodes both of its images, fp32, pairs batched by 16;
- engine: dynrecon_ros.network.PairNetwork (each frame encoded once, tokens reused; on CUDA bf16
  autocast for encoder/decoders, fp32 heads; pair batch from the memory budget);
- online step: one new frame enters a window whose other frames are cached: one encode + its 6
  ordered pairs (with the 3 previous frames) decoded.
Timings alternate the three methods rep by rep and keep the best (the machine may be shared);
memory: CUDA torch.cuda.max_memory_allocated per method, CPU the process's peak RSS.
Configs: CPU 'small' = ViT-S-like encoder (384 wide, 12 deep) + 192-wide 12-deep decoders, linear
head, 224x224 (encoder/decoder cost ratio close to ViT-L/Base); CPU 'parity-small' = the parity
references' decoder-heavy shape (192x4 encoder, 128x12 decoders, linear); CUDA: ViT-L/512 dpt at
512x384 (the released DUSt3R/MonST3R shape), random weights.

Usage: python bench/network.py [--reps N] [--threads T] [--configs small,parity-small] [--gpu-reps N]
  --configs '' skips the CPU configs (the GPU run of bench/gpu.sh); --gpu-reps sets the CUDA reps
  (default max(reps, 5)); --no-cuda skips the CUDA config.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIGS = {
    'small': ("AsymmetricCroCo3DStereo(pos_embed='RoPE100', patch_embed_cls='ManyAR_PatchEmbed', img_size=(512, 512), "
              "head_type='linear', output_mode='pts3d', depth_mode=('exp', -float('inf'), float('inf')), "
              "conf_mode=('exp', 1, float('inf')), enc_embed_dim=384, enc_depth=12, enc_num_heads=6, "
              "dec_embed_dim=192, dec_depth=12, dec_num_heads=6)", (224, 224)),
    'parity-small': ("AsymmetricCroCo3DStereo(pos_embed='RoPE100', patch_embed_cls='ManyAR_PatchEmbed', "
                     "img_size=(512, 512), head_type='linear', output_mode='pts3d', depth_mode=('exp', -float('inf'), "
                     "float('inf')), conf_mode=('exp', 1, float('inf')), enc_embed_dim=192, enc_depth=4, "
                     "enc_num_heads=3, dec_embed_dim=128, dec_depth=12, dec_num_heads=4)", (224, 224)),
    'vitl512dpt': ("AsymmetricCroCo3DStereo(pos_embed='RoPE100', patch_embed_cls='ManyAR_PatchEmbed', "
                   "img_size=(512, 512), head_type='dpt', output_mode='pts3d', depth_mode=('exp', -float('inf'), "
                   "float('inf')), conf_mode=('exp', 1, float('inf')), enc_embed_dim=1024, enc_depth=24, "
                   "enc_num_heads=16, dec_embed_dim=768, dec_depth=12, dec_num_heads=12)", (384, 512)),
}


def window_pairs(n=8, k=3):
    return [(i, j) for i in range(n) for j in range(i + 1, min(i + k + 1, n))
            for (i, j) in ((i, j), (j, i))]


def measure(config: str, device: str, reps: int, profile_n: int = 0) -> dict:
    """Time naive / engine / online step, alternating them rep by rep (min over reps: robust to
    other jobs on a shared machine). Returns seconds and peak memory per method."""
    import numpy as np
    import torch
    from dynrecon_ros.network import build_model, normalize
    from dynrecon_ros.network.engine import PairNetwork

    torch.backends.cuda.matmul.allow_tf32 = True   # as the reference croco code sets at import
    torch.backends.cudnn.allow_tf32 = True
    cfg_str, (H, W) = CONFIGS[config]
    torch.manual_seed(0)
    model = build_model(cfg_str, device).eval().requires_grad_(False)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (9, H, W, 3), dtype=np.uint8)
    pairs = window_pairs()
    cuda = device == 'cuda'

    def naive():
        with torch.inference_mode():
            for s in range(0, len(pairs), 16):
                chunk = pairs[s:s + 16]
                x1 = normalize(images[[i for i, _ in chunk]]).to(device)
                x2 = normalize(images[[j for _, j in chunk]]).to(device)
                r1, r2 = model(x1, x2)
                for r in (r1, r2):
                    for v in r.values():
                        v.cpu()

    net = PairNetwork(model, device=device)

    def engine():
        net.clear_cache()
        net.predict_pairs(images[:8], pairs)

    online_net = PairNetwork(model, device=device)
    online_net.predict_pairs(images[:8], pairs, frame_ids=list(range(8)))
    counter = iter(range(10 ** 6))

    def online():
        new = ('new', next(counter))
        step = [(3, 0), (0, 3), (3, 1), (1, 3), (3, 2), (2, 3)]
        before = online_net.stats['encoded']
        online_net.predict_pairs(images[5:9], step, frame_ids=[5, 6, 7, new])
        assert online_net.stats['encoded'] - before == 1

    fns = {'naive': naive, 'engine': engine, 'online': online}
    times = {k: [] for k in fns}
    peak = {}
    for name, fn in fns.items():   # warm-up, and the peak memory of one run of each
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        fn()
        if cuda:
            torch.cuda.synchronize()
            peak[name] = torch.cuda.max_memory_allocated()
    for _ in range(reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
    if profile_n:
        from torch_profile import profile
        profile(online, profile_n, cuda, title=f'{config} online step (1 encode + 6 pairs), {device}')
        profile(engine, max(1, profile_n // 4), cuda, title=f'{config} engine window (36 pairs), {device}')
    if not cuda:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak = {k: rss for k in fns}
    return {k: {'sec': min(v), 'peak_bytes': peak[k]} for k, v in times.items()}


def report(config, device, reps, profile_n=0):
    cfg_str, (H, W) = CONFIGS[config]
    r = measure(config, device, reps, profile_n)
    naive, eng, onl = r['naive'], r['engine'], r['online']
    npps, epps = 36 / naive['sec'], 36 / eng['sec']
    gib = 1 << 30
    mem = (lambda m: f'GPU max allocated {m["peak_bytes"] / gib:.2f} GiB') if device == 'cuda' else (lambda m: '')
    print(f'[{device}] {config} {W}x{H}, window 8 frames, 36 ordered pairs (best of {reps})')
    print(f'  naive per-pair (fp32, batch 16) : {npps:8.2f} pairs/s  ({naive["sec"]:.3f} s/window)  {mem(naive)}')
    print(f'  engine                          : {epps:8.2f} pairs/s  ({eng["sec"]:.3f} s/window)  {mem(eng)}')
    print(f'  speed-up engine / naive         : {epps / npps:.2f}x')
    print(f'  online step (1 encode + 6 pairs): {onl["sec"] * 1000:.1f} ms  ({1 / onl["sec"]:.1f} frames/s)  {mem(onl)}')
    if device == 'cpu':
        print(f'  peak RSS of the process (weights + all three runs): {naive["peak_bytes"] / gib:.2f} GiB')
    else:
        import torch
        gpu = torch.cuda.get_device_name(0)
        mem = max(eng['peak_bytes'], onl['peak_bytes']) / gib
        ok = (epps / npps >= 3, onl['sec'] <= 0.033, mem <= 8)
        print(f'  TARGET (issue 6, on an H100, ViT-L/512): engine >= 3x naive pairs/s: {epps / npps:.2f}x '
              f'{"MET" if ok[0] else "NOT met"}; online step <= 33 ms: {onl["sec"] * 1000:.1f} ms '
              f'{"MET" if ok[1] else "NOT met"}; memory <= 8 GiB (engine and online, GPU max allocated incl. '
              f'the fp32 weights): {mem:.2f} GiB {"MET" if ok[2] else "NOT met"} -- on {gpu}'
              f'{"" if "H100" in gpu else " (not an H100: the targets are stated for an H100)"}')


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--reps', type=int, default=3)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--configs', default='small,parity-small', help="CPU configs to run ('' for none)")
    ap.add_argument('--gpu-reps', type=int, default=None, help='reps of the CUDA config (default max(reps, 5))')
    ap.add_argument('--profile', type=int, default=0, metavar='N',
                    help='also run the online step N times (the engine window N/4 times) under torch.profiler '
                         'and print where the time goes (bench/torch_profile.py)')
    ap.add_argument('--no-cuda', action='store_true', help='skip the CUDA config even when CUDA is available')
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    print(f'torch {torch.__version__}, CPU threads {args.threads}, reps {args.reps} (best of)')
    for config in filter(None, args.configs.split(',')):
        if config not in CONFIGS:
            ap.error(f'unknown config {config!r} (known: {", ".join(CONFIGS)})')
        report(config, 'cpu', args.reps, args.profile)
    if args.no_cuda:
        print('CUDA config skipped (--no-cuda)')
    elif torch.cuda.is_available():
        print(f'CUDA device: {torch.cuda.get_device_name(0)}, torch CUDA {torch.version.cuda}')
        report('vitl512dpt', 'cuda', args.gpu_reps or max(args.reps, 5), args.profile)
    else:
        print('CUDA not available: ViT-L/512 dpt GPU figures skipped')


if __name__ == '__main__':
    main()
