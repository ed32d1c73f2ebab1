"""Benchmark of the whole monocular step through the product: frames/s, per-stage ms, memory over a long stream.

Exactly what `dynrecon run --backend dust3r` and the ROS node do: a ``Reconstructor`` with the
``dust3r`` backend built from a released-format checkpoint file (``backend.checkpoint``, read by
``dynrecon_ros.network.load_network``: safe load, strict state dict, the windowed ``PairNetwork`` engine
with its own precision choice: bf16 autocast on CUDA, fp32 on CPU), pushed one frame at a time.
The stream is monocular: no depth; K is given with each frame (as camera_info would) for random
weights, whose pointmaps have no ray structure to estimate a focal from (the estimate fails and every
frame would be skipped: 'cannot estimate the focal length'); with a real ``--checkpoint`` no K is
given (the focal is estimated; ``--k`` chooses). It is a synthetic sequence
(``render_sequence`` with 2 movers) of ``--render`` frames replayed back and forth (0..n-1, n-2..1,
0..: the camera motion stays continuous) with increasing stamps and a new key per pushed frame, so
every cache keyed by frame key sees new keys as in a real stream.

Configs (random weights, written once to a temporary checkpoint file; the random init is PyTorch's,
with each head's last projection scaled down and its z-bias raised, as test/dust3r_tiny.py does, so
the points lie in front of the camera; the cost is that of the real weights):
  - CUDA: 'vitl512dpt' from bench/network.py = the released DUSt3R/MonST3R ViT-L/512 DPT shape,
    images 512x384;
  - CPU: 'small' from bench/network.py (ViT-S-like 384x12 encoder, 192x12 decoders, linear head)
    with the network input at the image size, images 64x48 (on CPU the alignment of the whole
    window at each step, float64, dominates: --size 128x96 takes ~3 s per frame on 2 cores).
Random weights give meaningless geometry: the jump / speed / tracking checks are opened wide (as
LOOSE in test/test_backend_dust3r.py); the keyframe rule's motion thresholds would see meaningless
motion (every frame a keyframe: a dense graph no real stream has), so keyframes come by the frame
gap alone (every ``keyframe_max_gap`` = 8 frames; the rule on the stream's ground-truth poses gives
one every ~6-8 frames, printed); ``--keyframes motion`` uses the full rule. The pair graph actually
used is printed (frames and pairs aligned per step, ordered pairs decoded per step).

Prints per segmentation mode (flow, attention, both): frames/s of the whole push in steady state
(after the first ``--warmup`` frames, default 2 windows), mean ms per stage over the same frames (the
Reconstructor's StageTimes), frames ok / skipped with reasons, and memory every ``--every`` frames:
CUDA memory_allocated / max_memory_allocated / memory_reserved, process RSS (after malloc_trim), and
the sizes of the per-stream caches, plus the Theil-Sen slope of the memory figures over the second
half of the stream (once the 64-frame network-input cache is full). The target line (issue 7: on
an H100 >= 15 frames/s for an 8-frame window at 512x384) is judged on the whole push (network +
alignment + segmentation + flow + output / map hand-off), for the CUDA config only.

Usage: python bench/monocular.py [--device auto|cpu|cuda] [--frames N] [--modes flow,attention,both]
       [--size WxH] [--window 8] [--every N] [--render 60] [--warmup N] [--checkpoint FILE]
       [--k given|none] [--keyframes gap|motion] [--set section.name=value ...]
       [--model auto|vitl512dpt|small] [--max-seconds S[,S2,..]] [--threads T]
Defaults: CUDA when available (--frames 300, all three modes), else CPU (--frames 96, mode flow
only; ~1-2 min on 2 cores).
"""
from __future__ import annotations

import argparse
import collections
import gc
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET_FPS = 15.0  # issue 7, on an H100: whole monocular step, 8-frame window, 512x384
LOOSE_CHECKS = {'max_translation_m': 1000.0, 'max_rotation_deg': 180.0, 'max_speed_m_s': 1e5,
                'max_angular_speed_deg_s': 1e5, 'min_inlier_ratio': 0.0}
MiB = float(1 << 20)


def _network_configs() -> dict:
    """bench/network.py's CONFIGS (the same model shapes)."""
    spec = importlib.util.spec_from_file_location('bench_network', ROOT / 'bench' / 'network.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.CONFIGS


def bench_config(device: str, size: str | None, model: str = 'auto') -> tuple[str, str, int, int]:
    """(name, model config string, image width, image height) for the device; ``size`` 'WxH' overrides
    the image size (CPU: the network input follows it; CUDA: the released 512-pixel input). ``model``
    'vitl512dpt' / 'small' picks the model whatever the device ('auto': CUDA vitl512dpt, CPU small;
    vitl512dpt on CPU rehearses the GPU configuration, slowly)."""
    cfgs = _network_configs()
    if model == 'vitl512dpt' or (model == 'auto' and device == 'cuda'):
        s, (h, w) = cfgs['vitl512dpt']
        if size:
            w, h = (int(v) for v in size.split('x'))
        return 'vitl512dpt (ViT-L/512 DPT, the released shape)', s, w, h
    w, h = (int(v) for v in (size or '64x48').split('x'))
    side = max(w, h)
    s = cfgs['small'][0].replace('img_size=(512, 512)', f'img_size=({side}, {side})')
    return f'small (bench/network.py, {side}-pixel network input)', s, w, h


def write_random_checkpoint(path: Path, config: str, seed: int = 0) -> None:
    """A released-format checkpoint with PyTorch's random init; each head's last projection scaled
    by 0.05 and its z-channel bias raised by 1.5 (points in front of the camera, as dust3r_tiny)."""
    import torch
    from dynrecon_ros.network import build_model, save_checkpoint
    torch.manual_seed(seed)
    model = build_model(config, 'cpu')
    sd = model.state_dict()  # detached views of the parameters: edited in place
    for head in ('downstream_head1', 'downstream_head2'):
        if f'{head}.proj.weight' in sd:  # linear: channels (x, y, z, conf) x patch pixels (pixel shuffle)
            w, b = f'{head}.proj.weight', f'{head}.proj.bias'
            p2 = sd[b].shape[0] // 4
            sd[w] *= 0.05
            sd[b][2 * p2:3 * p2] += 1.5
        else:  # dpt: the last 1x1 conv gives (x, y, z, conf)
            w, b = f'{head}.dpt.head.4.weight', f'{head}.dpt.head.4.bias'
            sd[w] *= 0.05
            sd[b][2] += 1.5
    save_checkpoint(path, sd, config)


def stream(seq, n: int, fps: float, with_K: bool):
    """``n`` Frames replaying ``seq`` back and forth with increasing stamps and distinct keys (no
    depth; K = the sequence's when ``with_K``, as camera_info gives it, else None)."""
    from dynrecon_ros.frames import Frame
    m = len(seq.frames)
    period = max(2 * (m - 1), 1)
    for k in range(n):
        i = k % period
        i = i if i < m else period - i
        stamp = 1000.0 + k / fps
        yield Frame(stamp=stamp, rgb=seq.frames[i].rgb, depth=None, K=seq.K.copy() if with_K else None,
                    key=f'{stamp:.6f}', meta={})


def gt_keyframe_gap(seq, n: int, w) -> float:
    """Mean frames between keyframes of the window's keyframe rule applied to the ground-truth poses of
    the replayed stream (what the rule would do with exact geometry; the stream is metric)."""
    from dynrecon_ros.window import rotation_angle_deg
    m = len(seq.poses)
    period = max(2 * (m - 1), 1)
    idx = [k % period if k % period < m else period - k % period for k in range(n)]
    kf = [0]
    for k in range(1, n):
        rel = np.linalg.inv(seq.poses[idx[kf[-1]]]) @ seq.poses[idx[k]]
        if (np.linalg.norm(rel[:3, 3]) > w.keyframe_translation_m or rotation_angle_deg(rel[:3, :3]) >
                w.keyframe_rotation_deg or k - kf[-1] >= w.keyframe_max_gap):
            kf.append(k)
    return float(np.diff(kf).mean()) if len(kf) > 1 else float(n)


def theil_sen(xs, ys) -> float:
    from scipy.stats import theilslopes
    return float(theilslopes(ys, xs)[0]) if len(xs) > 1 else 0.0


def cache_sizes(rec) -> dict:
    """Sizes of the per-stream containers (test/test_monocular_memory.py asserts their bounds)."""
    p, m = rec.predictor, rec.step
    return {'pairs': len(p._pairs), 'second': len(p._second), 'inputs': len(p._inputs),
            'tokens': len(p.net._cache), 'window': len(rec.window.all_entries()), 'pending': len(rec._pending),
            'seg': len(rec.segmenter), 'estK': len(m._estimated_K)}


def _sample(rec, frames: int, cuda: bool) -> dict:
    """One memory sample after ``frames`` pushed frames (RSS after malloc_trim, cache sizes, CUDA)."""
    from dynrecon_ros.memory import resident_after_trim
    gc.collect()
    s = {'frames': frames, 'rss': resident_after_trim(), **cache_sizes(rec)}
    if cuda:
        import torch
        s.update(alloc=torch.cuda.memory_allocated(), max_alloc=torch.cuda.max_memory_allocated(),
                 reserved=torch.cuda.memory_reserved())
    return s


def run_mode(mode: str, args, ckpt: str, seq, device: str, fps: float) -> dict:
    import torch
    from dynrecon_ros.config import ReconConfig
    from dynrecon_ros.reconstructor import Reconstructor

    cuda = device == 'cuda'
    win = {'size': args.window}
    if args.keyframes == 'gap':  # random geometry: the motion thresholds off, a keyframe every keyframe_max_gap
        win.update(keyframe_translation_m=1e9, keyframe_rotation_deg=1e9)
    cfg = ReconConfig.from_dict({'backend': {'name': 'dust3r', 'checkpoint': ckpt}, 'window': win,
                                 'segmentation': {'mode': mode}, 'checks': LOOSE_CHECKS})
    if args.set:
        bp = importlib.util.spec_from_file_location('bench_pipeline', ROOT / 'bench' / 'pipeline.py')
        mod = importlib.util.module_from_spec(bp)
        bp.loader.exec_module(mod)
        mod.parse_set(cfg, args.set)
    reasons = collections.Counter()
    rec = Reconstructor(cfg, device=device, log=None)  # as commands/run.py does (model from the file)
    net = rec.predictor.net
    decoded = [0]
    plain = net.predict_pairs

    def counting(images, pairs, **kw):  # ordered pairs through the decoder (first and second pass)
        decoded[0] += len(pairs)
        return plain(images, pairs, **kw)

    net.predict_pairs = counting
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    ok = skipped = 0
    push_s, samples, graph = [], [], []
    steady_acc = None
    step_decoded, step_encoded = [], []
    hw = rec.predictor.network_shape(next(stream(seq, 1, fps, False)))
    print(f'  [{mode}] frames: ', end='', flush=True)
    t_all = time.perf_counter()
    n_done = 0
    modes = args.modes.split(',')
    budget = args.max_seconds[min(modes.index(mode), len(args.max_seconds) - 1)] if args.max_seconds else 0
    for k, frame in enumerate(stream(seq, args.frames, fps, args.k == 'given')):
        if (budget and k >= args.warmup + 3 and k < args.frames - 1
                and time.perf_counter() - t_all > budget):
            print(f'(time budget {budget:g} s reached: stopped after {k} frames) ', end='')
            if not samples or samples[-1]['frames'] != k:
                samples.append(_sample(rec, k, cuda))
            break
        n_done = k + 1
        if k == args.warmup:
            steady_acc = {n: list(v) for n, v in rec._times._acc.items()}  # StageTimes so far (subtracted)
        d0, e0 = decoded[0], net.stats['encoded']
        t = time.perf_counter()
        res = rec.push(frame)
        if cuda:
            torch.cuda.synchronize()
        push_s.append(time.perf_counter() - t)
        if k >= args.warmup:
            step_decoded.append(decoded[0] - d0)
            step_encoded.append(net.stats['encoded'] - e0)
        for r in res:
            if r.status == 'ok':
                ok += 1
            else:
                skipped += 1
                reasons[r.reason.split(':')[0][:90]] += 1
        if k >= args.warmup:
            w = rec.window
            graph.append((len(w.entries), len(w.all_entries()), len(w.graph())))
        if (k + 1) % args.every == 0 or k + 1 == args.frames:
            samples.append(_sample(rec, k + 1, cuda))
            print(k + 1, end=' ', flush=True)
    for r in rec.flush():
        if r.status == 'ok':
            ok += 1
        else:
            skipped += 1
            reasons[r.reason.split(':')[0][:90]] += 1
    print(f'({time.perf_counter() - t_all:.0f} s)')
    end_acc = {n: list(v) for n, v in rec._times._acc.items()}
    stages = {}
    for n, (tot, cnt) in end_acc.items():
        t0, c0 = (steady_acc or {}).get(n, (0.0, 0))
        if cnt > c0:
            stages[n] = (tot - t0) / (cnt - c0)
    steady = push_s[args.warmup:]
    res = {'mode': mode, 'frames': n_done, 'ok': ok, 'skipped': skipped, 'reasons': reasons, 'samples': samples, 'stages': stages,
           'fps': len(steady) / sum(steady) if steady else float('nan'),
           'ms_median': 1e3 * float(np.median(steady)) if steady else float('nan'),
           'ms_p90': 1e3 * float(np.percentile(steady, 90)) if steady else float('nan'),
           'graph': np.mean(graph, 0) if graph else None, 'decoded': float(np.mean(step_decoded)) if step_decoded else float('nan'),
           'encoded': float(np.mean(step_encoded)) if step_encoded else float('nan'),
           'amp': str(net.amp_dtype).replace('torch.', '') if net.amp_dtype is not None else 'fp32',
           'engine': (f'{type(net).__name__} on {net.device}, network input {hw[1]}x{hw[0]}, memory budget '
                      f'{net.memory_budget / 2 ** 30:.2f} GiB -> pair batch {net.pair_batch_size(hw)}, token cache '
                      f'{net.cache_frames} frames; predictor pair cache {rec.predictor.cfg.pair_cache}'),
           'cfg': cfg}
    net.predict_pairs = plain
    del rec, net
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return res


def report(r: dict, device: str, args, size: str) -> None:
    cfg = r['cfg']
    w = cfg.window
    print(f'  segmentation.mode {r["mode"]}: network precision {r["amp"]}; {r["engine"]}')
    if r['graph'] is not None:
        n_win, n_all, n_pairs = r['graph']
        rule = (f'{w.keyframe_translation_m} m / {w.keyframe_rotation_deg} deg / ' if args.keyframes == 'motion' else
                'frame gap only: ')
        print(f'    pair graph (window.size {w.size}, neighbours {w.neighbours}, keyframes {w.keyframes} kept outside the '
              f'window, long_stride {w.long_stride}; keyframe rule {rule}every {w.keyframe_max_gap} frames), mean per '
              f'steady step: {n_win:.1f} window frames + keyframes = {n_all:.1f} frames, {n_pairs:.1f} pairs = '
              f'{2 * n_pairs:.1f} ordered pairs aligned; {r["decoded"]:.1f} ordered pairs decoded (first + second '
              f'pass), {r["encoded"]:.2f} frames encoded')
    if r['mode'] != 'flow' and cfg.segmentation.attention_min_contrast > 0 and not args.checkpoint:
        print('    note: random weights: the Easi3R no-motion guard (segmentation.attention_min_contrast) leaves most '
              'attention masks empty, so the second pass re-decodes few pairs; with movers a real model re-decodes '
              'the pairs whose token masks changed (up to all ordered pairs of the window); '
              '--set segmentation.attention_min_contrast=0 runs it on the random masks')
    print(f'    frames: {r["ok"]} ok, {r["skipped"]} skipped' +
          (''.join(f'\n      skipped x{c}: {why}' for why, c in r['reasons'].most_common())))
    print(f'    steady state (frames {args.warmup + 1}..{r["frames"]}): {r["fps"]:.2f} frames/s of the whole push '
          f'(median {r["ms_median"]:.1f} ms, p90 {r["ms_p90"]:.1f} ms)')
    st = r['stages']
    order = ['flow', 'network', 'alignment', 'segmentation', 'map', 'total', 'map_integrate']
    print('    mean ms per stage (steady state): ' +
          ', '.join(f'{n} {st[n]:.1f}' for n in order + sorted(set(st) - set(order)) if n in st) +
          '  (map_integrate runs on the map thread)')
    step = sum(st.get(n, 0.0) for n in ('flow', 'network', 'alignment', 'segmentation'))
    if step:
        print(f'    flow + network + alignment + segmentation: {step:.1f} ms = {1e3 / step:.2f} frames/s')
    cuda = device == 'cuda'
    hdr = f'    {"frames":>6} {"RSS MiB":>8}' + (f' {"alloc MiB":>9} {"max MiB":>8} {"resv MiB":>8}' if cuda else '') + \
          '   cache sizes (pairs second inputs tokens window pending seg estK); RSS after malloc_trim'
    print(hdr)
    for s in r['samples']:
        line = f'    {s["frames"]:>6} {s["rss"] / MiB:>8.0f}'
        if cuda:
            line += f' {s["alloc"] / MiB:>9.0f} {s["max_alloc"] / MiB:>8.0f} {s["reserved"] / MiB:>8.0f}'
        line += '   ' + ' '.join(str(s[k]) for k in ('pairs', 'second', 'inputs', 'tokens', 'window', 'pending',
                                                     'seg', 'estK'))
        print(line)
    # after the caches are full (the network-input cache keeps 64 frames) and over the second half
    half = [s for s in r['samples'] if s['frames'] > max(r['frames'] / 2, 64 + args.window)]
    if len(half) >= 3:
        x = [s['frames'] for s in half]
        parts = [f'RSS {100 * theil_sen(x, [s["rss"] / MiB for s in half]):+.1f}']
        if cuda:
            parts.append(f'CUDA allocated {100 * theil_sen(x, [s["alloc"] / MiB for s in half]):+.1f}')
        print(f'    memory slope from frame {half[0]["frames"]} on (Theil-Sen, MiB per 100 frames): {", ".join(parts)}')
    if cuda:
        import torch
        met = r['fps'] >= TARGET_FPS
        gpu = torch.cuda.get_device_name(0)
        print(f'    TARGET (issue 7): >= {TARGET_FPS:.0f} frames/s, 8-frame window, 512x384, on an H100: measured '
              f'{r["fps"]:.2f} frames/s at window {w.size}, {size} -> {"MET" if met else "NOT met"} on this device '
              f'({gpu}{"" if "H100" in gpu else ": not an H100, the target is stated for an H100"})')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'])
    ap.add_argument('--frames', type=int, default=None, help='frames pushed per mode (default CUDA 300, CPU 48)')
    ap.add_argument('--modes', default=None, help='segmentation modes (default CUDA flow,attention,both; CPU flow)')
    ap.add_argument('--size', default=None, help='image size WxH (default CUDA 512x384, CPU 64x48)')
    ap.add_argument('--window', type=int, default=8, help='window.size')
    ap.add_argument('--every', type=int, default=None, help='memory sample every N frames (default frames/10)')
    ap.add_argument('--render', type=int, default=60, help='synthetic frames rendered (replayed back and forth)')
    ap.add_argument('--warmup', type=int, default=None, help='frames before the steady state (default 2 windows)')
    ap.add_argument('--checkpoint', default=None, help='use this checkpoint file instead of random weights')
    ap.add_argument('--k', choices=['given', 'none'], default=None,
                    help="intrinsics: 'given' (each frame's K, as from camera_info) or 'none' (focal estimated); "
                         "default: given with random weights (their pointmaps have no ray structure, so no focal "
                         "can be estimated from them), none with --checkpoint")
    ap.add_argument('--keyframes', choices=['gap', 'motion'], default=None,
                    help="keyframe rule: 'motion' (the product's: motion or frame gap) or 'gap' (frame gap only); "
                         "default: gap with random weights (their meaningless poses make every frame a keyframe "
                         "under the motion rule: a dense pair graph no real stream has), motion with --checkpoint")
    ap.add_argument('--set', nargs='*', default=[], help='config overrides section.name=value')
    ap.add_argument('--model', choices=['auto', 'vitl512dpt', 'small'], default='auto',
                    help="random-weight model: 'auto' (CUDA vitl512dpt, CPU small) or either by name (vitl512dpt on "
                         "CPU rehearses the GPU configuration; slow: ~1 min per frame on 1 thread)")
    ap.add_argument('--max-seconds', type=lambda v: [float(x) for x in v.split(',')], default=[],
                    help='time budget per mode (s, 0 = none; S or S1,S2,.. one per mode, the last repeated): stop '
                         'pushing frames once it is spent (after at least warmup + 3 frames) and report the frames '
                         'pushed so far')
    ap.add_argument('--threads', type=int, default=0, help='torch CPU threads (0: leave as is)')
    args = ap.parse_args()

    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ('cuda' if torch.cuda.is_available() else 'cpu') if args.device == 'auto' else args.device
    if device == 'cuda' and not torch.cuda.is_available():
        sys.exit('CUDA not available')
    cuda = device == 'cuda'
    args.frames = args.frames or (300 if cuda else 96)
    args.modes = args.modes or ('flow,attention,both' if cuda else 'flow')
    args.k = args.k or ('none' if args.checkpoint else 'given')
    args.keyframes = args.keyframes or ('motion' if args.checkpoint else 'gap')
    args.every = args.every or max(1, args.frames // 10)
    args.warmup = args.warmup if args.warmup is not None else 2 * args.window
    name, config, W, H = bench_config(device, args.size, args.model)
    print(f'torch {torch.__version__}, device {device}' +
          (f' ({torch.cuda.get_device_name(0)})' if cuda else f', {os.cpu_count()} CPUs visible') +
          f', load average {os.getloadavg()[0]:.1f} at start')
    from dynrecon_ros.data.synthetic import SyntheticConfig, render_sequence
    fps = 30.0
    seq = render_sequence(SyntheticConfig(width=W, height=H, frames=args.render, fps=fps, movers=2, seed=0))
    from dynrecon_ros.config import WindowConfig
    print(f'keyframes: the product rule ({WindowConfig.keyframe_translation_m} m / {WindowConfig.keyframe_rotation_deg} '
          f'deg / every {WindowConfig.keyframe_max_gap} frames) on this stream\'s ground-truth poses marks one every '
          f'{gt_keyframe_gap(seq, args.frames, WindowConfig()):.1f} frames; used here: '
          + ('motion rule on the estimated poses' if args.keyframes == 'motion' else
             f'frame gap only (one every {WindowConfig.keyframe_max_gap} frames)'))
    print(f'stream: {args.frames} frames per mode at {W}x{H}, monocular (no depth), synthetic sequence of '
          f'{args.render} frames (2 movers) replayed back and forth with new stamps and keys; '
          + ('K given with each frame (as camera_info)' if args.k == 'given' else 'no K (focal estimated)'))
    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint:
            ckpt = args.checkpoint
            print(f'model: checkpoint {ckpt}')
        else:
            ckpt = str(Path(tmp) / 'random.pth')
            t = time.perf_counter()
            write_random_checkpoint(Path(ckpt), config)
            print(f'model: {name}, RANDOM weights (written to a released-format checkpoint in '
                  f'{time.perf_counter() - t:.0f} s, loaded by load_network like a real one): geometry is '
                  f'meaningless, jump/speed/tracking checks opened wide')
        for m in args.modes.split(','):  # each mode's report as soon as it is done (a time limit keeps those)
            r = run_mode(m, args, ckpt, seq, device, fps)
            print(f'== results ({device}, {W}x{H}, load average {os.getloadavg()[0]:.1f})')
            report(r, device, args, f'{W}x{H}')
    if not cuda:
        print(f'TARGET (issue 7): >= {TARGET_FPS:.0f} frames/s on an H100 at ViT-L/512 DPT, 8-frame window, 512x384: '
              'not measurable here (no CUDA device); run `python bench/monocular.py` on a GPU machine')


if __name__ == '__main__':
    main()
