"""Stress: 640x480 rgb8 + 32FC1 depth at 30 Hz into recon_node (sensor-data QoS) for
DYNRECON_STRESS_SECONDS (default 90), publisher and node in separate processes, both with the Fast DDS
profile. The worker is slower than 30 Hz here, so frames must be dropped (oldest first) and counted,
the queue must stay within queue_size, and the node's resident memory must reach a plateau.

Memory criterion: the node logs (debug) its resident memory right after each ``trim_memory_period``
malloc_trim, i.e. at the end of a frame with freed heap handed back; after a warm-up (the first half of
the run) the Theil-Sen slope of those figures must stay below MAX_SLOPE_MIB_S. Sampled there, the RSS
is free of the per-frame temporaries (pair flows, segmentation, map publishing: +-70 MiB when sampled
at random instants), so a leak shows at its rate. And the transient peaks stay bounded: after the
warm-up the externally sampled RSS never exceeds the median post-trim figure by more than MAX_PEAK_MIB
(a frame's working set is ~150-190 MiB over it here). The node runs with its default memory bounds
except one: the static map is capped at MAP_VOXELS so that it reaches its bound within the run (this
stream's poses drift, so the map keeps adding voxels; with the 2,000,000 default it held 1.27 M voxels,
still growing at 40 B each plus integration temporaries, after 60 s at ~10 processed frames/s). Also set
here: queue_size, the map publish rate, the warning throttle and trim_memory_period 1 s for more
samples. The externally sampled RSS timeline is printed too. DYNRECON_STRESS_RSS_CSV=FILE writes both
series.

The synthetic stream (a panning random texture over a fixed depth ramp) mostly loses tracking when the
worker sees every ~20th frame, so it also exercises the skipped-frame path."""
import os
import re
import sys
import time

import pytest

pytest.importorskip('rclpy')
from nav_msgs.msg import Path  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from dynrecon_ros.ros.qos import OUTPUT_QOS, default_fastdds_profile  # noqa: E402
from dynrecon_ros.ros.testing import NodeProcess, RosHarness, domain_id_for, node_command  # noqa: E402

DOMAIN = domain_id_for(__name__)
# 90 s: the post-trim figures settle slowly (the heap's fragmentation, the caches filling): slope 0.66 MiB/s
# (95 % interval 0.23-1.22) between 30 and 60 s, 0.30 (0.12-0.49) between 60 and 120 s, 0.11 after 100 s in a 200 s
# run on the 2-core box (2026-12-06), so a 60 s run judged 30-60 s and failed once at 1.03 without a leak
SECONDS = float(os.environ.get('DYNRECON_STRESS_SECONDS', '90'))
QUEUE = 3
PATH_RATE = 0.5  # publish_path_rate here: far below the processed frames/s, so a path per pose would show
MAP_VOXELS = 300_000  # the static map's bound in this test (pipeline.map.max_voxels), see the docstring
SAMPLE_S = 0.5  # external RSS sampling period
# Keeping one 640x480 rgb+depth pair (2.1 MiB) per processed frame leaks ~3 MiB/s at 1.4 processed
# frames/s (one per received frame: ~60 MiB/s). Without a leak the slope after the warm-up is within
# -0.2 .. +0.7 MiB/s here (see SECONDS).
MAX_SLOPE_MIB_S = 1.0
# Peak over the plateau: 140-190 MiB measured here; the pipeline bug that kept the pair flows of every
# frame skipped while tracking was lost (freed at the next tracked frame) reached +440 MiB.
MAX_PEAK_MIB = 300.0
MEMORY_LINE = re.compile(r'\[(\d+\.\d+)\] \[dynrecon\]: memory: resident ([\d.]+) MiB after malloc_trim')


def slope(points):
    """Theil-Sen slope of [(t, y)] (y per second): the median of the pairwise slopes, so a steady leak
    shows at its rate while a few outliers do not."""
    from scipy.stats import theilslopes
    return float(theilslopes([y for _, y in points], [t for t, _ in points])[0]) if len(points) > 1 else 0.0


def timeline(points, step):
    """'t:MiB' medians of [(t, MiB)] in consecutive ``step``-second bins."""
    out, b = [], 0.0
    while points and b <= points[-1][0]:
        vals = sorted(k for t, k in points if b <= t < b + step)
        if vals:
            out.append(f'{b:.0f}s:{vals[len(vals) // 2]:.0f}')
        b += step
    return ' '.join(out)


@pytest.mark.slow
def test_stress_30hz_vga_bounded_queue_and_memory():
    profile = {'FASTDDS_DEFAULT_PROFILES_FILE': str(default_fastdds_profile())}
    ros = RosHarness(DOMAIN)
    proc = NodeProcess(node_command(['-p', f'queue_size:={QUEUE}', '-p', 'warn_throttle:=5.0',
                                     '-p', 'publish_map_rate:=0.5', '-p', 'trim_memory_period:=1.0',
                                     '-p', f'pipeline.map.max_voxels:={MAP_VOXELS}',
                                     '-p', f'publish_path_rate:={PATH_RATE}',
                                     '--log-level', 'dynrecon:=debug']), DOMAIN, env=profile)
    pub = None
    try:
        assert proc.wait_output('ready:', 60), proc.output()
        masks = ros.collect(Image, '/dynrecon/dynamic_mask', OUTPUT_QOS, keep=lambda m: m.header.stamp.sec)
        paths = ros.collect(Path, '/dynrecon/path', OUTPUT_QOS, keep=lambda m: len(m.poses))
        pub = NodeProcess([sys.executable, '-m', 'dynrecon_ros.ros.testing', 'stream', str(SECONDS)], DOMAIN,
                          env=profile)
        assert pub.wait_output('streaming', 60), pub.output()
        rss, t0, wall0 = [], time.monotonic(), time.time()
        while pub.proc.poll() is None and time.monotonic() - t0 < SECONDS + 60:
            rss.append((time.monotonic() - t0, proc.rss_kib() / 1024))
            time.sleep(SAMPLE_S)
        elapsed = time.monotonic() - t0
        time.sleep(1.0)
        assert proc.proc.poll() is None, proc.output()[-3000:]
    finally:
        if pub is not None:
            pub.stop()
        proc.stop()
        ros.close()
    log = proc.output()
    sent = int(re.search(r'sent (\d+)', pub.output()).group(1))
    m = re.search(r'frames received (\d+), processed (\d+), dropped (\d+), queue high water (\d+)', log)
    assert m, log[-3000:]
    received, processed, dropped, high = map(int, m.groups())
    voxels = re.search(r'static map (\d+) voxels', log)
    drop_warnings = [ln for ln in log.splitlines() if 'worker behind: dropped' in ln]
    # the node's own figures while the stream ran (not the idle flush after it)
    trimmed = [(float(t) - wall0, float(mib)) for t, mib in MEMORY_LINE.findall(log)]
    trimmed = [(t, mib) for t, mib in trimmed if 0 <= t <= elapsed]
    after_warmup = [(t, mib) for t, mib in trimmed if t >= elapsed / 2]
    growth = slope(after_warmup)
    plateau = sorted(mib for _, mib in after_warmup)[len(after_warmup) // 2] if after_warmup else float('nan')
    peak = max((k for t, k in rss if t >= elapsed / 2), default=float('nan'))
    if os.environ.get('DYNRECON_STRESS_RSS_CSV'):
        with open(os.environ['DYNRECON_STRESS_RSS_CSV'], 'w') as f:
            f.write('series,t_s,rss_mib\n')
            f.writelines(f'sampled,{t:.2f},{k:.1f}\n' for t, k in rss)
            f.writelines(f'after_trim,{t:.2f},{k:.1f}\n' for t, k in trimmed)
    step = max(5, round(elapsed / 12))
    print(f'\nstress {elapsed:.0f} s: sent {sent} frames ({sent / elapsed:.1f} Hz 640x480 rgb8+32FC1), node received '
          f'{received} (paired), processed {processed}, dropped {dropped} ({100 * dropped / max(received, 1):.0f} %), '
          f'queue high water {high}/{QUEUE}, masks out {len(masks)}, paths out {len(paths)}, '
          f'drop-rate warnings {len(drop_warnings)}, '
          f'static map {voxels.group(1) if voxels else "?"} voxels (bound {MAP_VOXELS})\n'
          f'RSS sampled every {SAMPLE_S} s: {rss[0][1]:.0f} -> {rss[-1][1]:.0f} MiB '
          f'(max {max(k for _, k in rss):.0f}), '
          f'median per {step} s: {timeline(rss, step)}\n'
          f'RSS after malloc_trim ({len(trimmed)} figures), median per {step} s: {timeline(trimmed, step)}; '
          f'slope after the {elapsed / 2:.0f} s warm-up {growth:+.2f} MiB/s (limit {MAX_SLOPE_MIB_S}); '
          f'sampled peak {peak:.0f} MiB = plateau {plateau:.0f} {peak - plateau:+.0f} MiB (limit +{MAX_PEAK_MIB:.0f})')
    assert high <= QUEUE
    assert received >= 0.8 * sent, 'frames lost in transport (is the Fast DDS SHM profile in use?)'
    assert processed >= 1 and len(masks) >= 1
    # ~/path (re-sent whole) goes out at publish_path_rate, not with every pose (one per mask)
    assert 1 <= len(paths) <= PATH_RATE * elapsed + 5 < len(masks), (len(paths), len(masks))
    assert 0 <= received - processed - dropped <= QUEUE + 1  # every frame processed, dropped or still queued
    if processed / elapsed < 25:  # the worker could not keep up: the backlog must have been dropped, and said so
        assert dropped > 0 and drop_warnings
    assert len(after_warmup) >= 5, f'too few memory figures from the node: {trimmed}'
    assert growth < MAX_SLOPE_MIB_S, f'resident memory still growing after the warm-up: {timeline(trimmed, 5)}'
    assert peak - plateau < MAX_PEAK_MIB, f'transient memory peak {peak:.0f} MiB over a plateau of {plateau:.0f} MiB'
