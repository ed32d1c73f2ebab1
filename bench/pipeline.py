"""Pipeline benchmark: frames/s, per-stage ms and accuracy on the synthetic sequences (2 movers).

Usage: python bench/pipeline.py [--sizes 320x240,640x480] [--frames 90] [--device cpu]
       [--segmentation-off] [--no-sequential] [--no-node] [--rate 30] [--set section.name=value ...]
Prints one block per size: frames/s over the whole stream (rendering excluded), driven as the node and
`dynrecon run` drive it (dynrecon_ros/pipelining.py; with ``overlap``, the default, two frames at once on
two threads), mean ms per stage (flow_ahead = optical flow computed in stage A on the caller's thread, ahead;
flow = the pairs stage B still had to compute; pose = pair predictor incl. RANSAC + direct refinement,
alignment, segmentation, total = stage B; map = outputs at the input size and map_integrate, both on
the map thread with overlap),
ATE/RPE (evo), dynamic-mask IoU and the static-map outlier fraction (> 5 cm from static surfaces).
Frames wider than max_work_width (default 320) are processed at a reduced size (see ReconConfig).
Then, unless --no-sequential, the same stream on one thread (overlap off), back to back: the speed-up
and whether poses and masks are identical. Then, unless --no-node, the node: recon_node in its own
process (default parameters: sensor-data QoS, queue_size 2) fed the same frames at --rate Hz by this
process (real rclpy, stamped when sent, as a camera driver does): the fraction of frames without a mask
and pose back, and the latency from stamp to mask and pose received, p50/p95 (output_lag included; the
last output_lag frames, which wait for the idle flush, left out of it), and the node process's CPU time per
processed frame (its callbacks, pipeline threads and publishing; /proc), and where the latency goes
(the node's own trace, dynrecon_ros.pipelining.FrameTrace: mean / p95 ms per phase).
"""
from __future__ import annotations

import argparse
import copy
import os
import time

import cv2
import numpy as np
import torch


def parse_set(cfg, items):
    """Apply 'section.name=value' or 'name=value' (top-level) overrides, typed like the default."""
    from dynrecon_ros.config import typed_like
    for it in items:
        key, value = it.split('=', 1)
        *path, name = key.split('.')
        sub = cfg
        for part in path:
            sub = getattr(sub, part)
        setattr(sub, name, typed_like(getattr(sub, name), value, it))  # (a wrong bool is an error, not False)


def run(rec, seq):
    """The stream through ``rec`` as the node drives it: (rec, results, wall s, CPU s, pipeline)."""
    out = []
    pipe = rec.pipeline(out.extend)
    t0 = time.perf_counter()
    c0 = time.process_time()
    for f in seq.frames:
        pipe.submit(f)
    out += pipe.flush()
    rec.static_map()  # the map thread's last integration included
    dt = time.perf_counter() - t0
    cpu = time.process_time() - c0
    pipe.close()
    return rec, out, dt, cpu, pipe


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (all its threads), from /proc."""
    fields = open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def node_replay(seq, rate: float, lag: int, sets, node_params=()) -> None:
    """recon_node in its own process, fed ``seq`` at ``rate`` Hz from this one; prints its lines.
    ``node_params``: 'name=value' node parameters (e.g. queue_size=1) besides the pipeline's ``sets``."""
    from dynrecon_ros.ros.qos import use_large_shm_segment
    use_large_shm_segment()  # the sender needs it too
    from dynrecon_ros.ros.testing import NodeProcess, RosHarness, StreamProbe, domain_id_for, node_command
    domain = domain_id_for('bench_pipeline')
    params = ['-p', 'idle_flush:=1.0', '-p', 'stats_period:=0.0']
    for it in sets:
        params += ['-p', f'pipeline.{it.split("=", 1)[0]}:={it.split("=", 1)[1]}']
    for it in node_params:
        params += ['-p', f'{it.split("=", 1)[0]}:={it.split("=", 1)[1]}']
    proc = NodeProcess(node_command(params), domain)
    ros = RosHarness(domain, name='bench_pipeline')
    try:
        if not proc.wait_output('ready:', 120):
            print(f'  node: did not start:\n{proc.output()}')
            return
        probe = StreamProbe(ros)
        if not probe.wait_matched(60):
            print('  node: inputs not matched in 60 s')
            return
        time.sleep(1.0)
        load0 = os.getloadavg()[0]
        cpu0, sender0 = process_cpu(proc.pid), time.process_time()
        probe.play(seq.frames, rate)
        sender = time.process_time() - sender0
        ros.wait_for(lambda: probe.report()['complete'] == len(seq.frames), 30.0)
        proc.wait_output('input idle: flushed', 10.0)
        cpu = process_cpu(proc.pid) - cpu0
        rep = probe.report(exclude_last=lag)
    finally:
        proc.stop()
        ros.close()
    import re
    m = re.search(r'frames received (\d+), processed (\d+), dropped (\d+)', proc.output())
    queue = f'{m.group(3)} of {m.group(1)} received dropped in its queue' if m else 'no totals line'
    t = re.search(r'queue high water \d+, tracked (\d+)', proc.output())
    queue += f', {t.group(1)} published tracked between window steps' if t else ''
    processed = int(m.group(2)) if m else 0
    print(f'  node at {rate:.0f} Hz (recon_node process, {", ".join(node_params) or "default parameters"}, best effort): {rep["sent"]} frames sent, '
          f'mask + pose back for {rep["complete"]}: drop rate {100 * rep["drop_rate"]:.1f} % ({queue}); latency '
          f'stamp -> mask + pose received p50 {rep["latency_p50_ms"]:.0f} ms, p95 {rep["latency_p95_ms"]:.0f} ms '
          f'(output_lag {lag} frames = {1e3 * lag / rate:.0f} ms included); load average {load0:.1f} -> '
          f'{os.getloadavg()[0]:.1f}')
    print(f'  node process CPU {1e3 * cpu / max(processed, 1):.1f} ms per processed frame ({cpu:.2f} s, {processed} '
          f'processed, callbacks of {len(seq.frames)} received included); the sender (this process) '
          f'{1e3 * sender / len(seq.frames):.1f} ms CPU per frame sent')
    m = re.search(r'latency breakdown .*', proc.output())
    print(f'  node {m.group(0) if m else "latency breakdown: no line"} (node clock; transport = stamp to callback, '
          'queue = in the node\'s queue, to_b = prepared, waiting for stage B, lag = output_lag, outputs = map thread)')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--sizes', default='320x240,640x480')
    ap.add_argument('--frames', type=int, default=90)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--segmentation-off', action='store_true')
    ap.add_argument('--set', nargs='*', default=[])
    ap.add_argument('--no-sequential', action='store_true', help='skip the one-thread run')
    ap.add_argument('--no-node', action='store_true', help='skip the node replay')
    ap.add_argument('--rate', type=float, default=30.0, help='node replay rate (Hz)')
    ap.add_argument('--node-param', nargs='*', default=[], help="node parameters 'name=value' (e.g. queue_size=1)")
    args = ap.parse_args()

    from dynrecon_ros.config import ReconConfig
    from dynrecon_ros.data.synthetic import SyntheticConfig, render_sequence
    from dynrecon_ros.evaluation import mask_metrics, trajectory_metrics
    from dynrecon_ros.reconstructor import Reconstructor

    print(f'machine: {os.cpu_count()} CPUs visible, load average {os.getloadavg()[0]:.1f} at start; device {args.device}')
    for size in args.sizes.split(','):
        w, h = (int(v) for v in size.split('x'))
        seq = render_sequence(SyntheticConfig(width=w, height=h, frames=args.frames, seed=args.seed))
        cfg = ReconConfig()
        cfg.segmentation.enabled = not args.segmentation_off
        parse_set(cfg, args.set)
        rec, out, dt, cpu, pipe = run(Reconstructor(cfg, device=args.device), seq)
        ok = [r for r in out if r.status == 'ok']
        tm = trajectory_metrics(np.array([r.stamp for r in ok]), np.array([r.pose for r in ok]), seq.stamps, seq.poses)
        mm = mask_metrics({r.key: r.mask > 0 for r in ok}, dict(zip(seq.keys, seq.masks)))
        pts = rec.static_map()
        P0 = seq.poses[seq.keys.index(ok[0].key)]
        d = seq.static_surface_distance(pts[:, :3] @ P0[:3, :3].T + P0[:3, 3])
        t = rec.timings
        print(f'== {w}x{h}, {len(seq.frames)} frames, {seq.masks.mean() * 100:.0f}% dynamic pixels'
              f'{" (segmentation off)" if args.segmentation_off else ""}')
        print(f'  frames/s: {len(seq.frames) / dt:.2f} wall ({dt:.1f} s, {len(ok)} ok); CPU time {cpu:.1f} s = '
              f'{len(seq.frames) / cpu:.2f} frames per CPU-second (load-independent-ish on a shared box); '
              f'load average {os.getloadavg()[0]:.1f}')
        print('  ms/frame: ' + '  '.join(f'{k} {t[k]:.1f}' for k in
                                         ['flow_ahead', 'flow', 'pose', 'alignment', 'segmentation', 'map', 'total', 'map_integrate']
                                         if k in t))
        print(f'  threads: overlap {"on" if cfg.overlap else "off"}: stage A (caller) prepare '
              f'{t.get("prepare", 0):.1f} + flow_ahead {t.get("flow_ahead", 0):.1f} ms/frame, waited for stage B '
              f'{1e3 * pipe.wait_seconds / len(seq.frames):.1f} ms/frame; OpenCV {cv2.getNumThreads()}, torch '
              f'{torch.get_num_threads()} (alignment.threads {cfg.alignment.threads}), segmentation.threads '
              f'{cfg.segmentation.threads}')
        print(f'  ATE RMSE SE3: {tm["ate_rmse_se3"] * 1000:.2f} mm   RPE: {tm["rpe_trans_rmse"] * 1000:.2f} mm, '
              f'{tm["rpe_rot_rmse"]:.3f} deg per frame')
        print(f'  mask IoU: {mm["iou"]:.3f} (precision {mm["precision"]:.3f}, recall {mm["recall"]:.3f})')
        print(f'  static map: {len(pts)} points, {100 * (d > 0.05).mean():.2f}% > 5 cm from static surfaces')
        if not args.no_sequential:
            cfg1 = copy.deepcopy(cfg)
            cfg1.overlap = not cfg.overlap
            _, out1, dt1, cpu1, _ = run(Reconstructor(cfg1, device=args.device), seq)
            same = len(out1) == len(out) and all(
                a.key == b.key and a.status == b.status and (a.pose is None or (np.array_equal(a.pose, b.pose)
                                                                                and np.array_equal(a.mask, b.mask)))
                for a, b in zip(out, out1))
            label = 'off (one thread)' if cfg.overlap else 'on (two threads)'
            print(f'  overlap {label}: {len(seq.frames) / dt1:.2f} frames/s wall ({dt1:.1f} s), CPU {cpu1:.1f} s; '
                  f'with / without overlap: {(dt1 / dt if cfg.overlap else dt / dt1):.2f}x frames/s; poses and masks '
                  f'{"identical" if same else "DIFFER"}; load average {os.getloadavg()[0]:.1f}')
        if not args.no_node:
            node_replay(seq, args.rate, cfg.window.output_lag,
                        args.set + (['segmentation.enabled=false'] if args.segmentation_off else []), args.node_param)


if __name__ == '__main__':
    main()
