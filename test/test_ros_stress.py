"""Stress: 640x480 rgb8 + 32FC1 depth at 30 Hz into recon_node (sensor-data QoS) for
DYNRECON_STRESS_SECONDS (default 60), publisher and node in separate processes, both with the Fast DDS
profile. The worker is slower than 30 Hz here, so frames must be dropped (oldest first) and counted,
the queue must stay within queue_size, and the node's resident memory must stop growing. Prints the
figures."""
import os
import re
import sys
import time

import pytest

pytest.importorskip('rclpy')
from sensor_msgs.msg import Image  # noqa: E402

from dynrecon_ros.ros.node import default_fastdds_profile  # noqa: E402
from dynrecon_ros.ros.qos import OUTPUT_QOS  # noqa: E402
from dynrecon_ros.ros.testing import NodeProcess, RosHarness, domain_id_for, node_command  # noqa: E402

DOMAIN = domain_id_for(__name__)
SECONDS = float(os.environ.get('DYNRECON_STRESS_SECONDS', '60'))
QUEUE = 3


@pytest.mark.slow
def test_stress_30hz_vga_bounded_queue_and_memory():
    profile = {'FASTDDS_DEFAULT_PROFILES_FILE': str(default_fastdds_profile())}
    ros = RosHarness(DOMAIN)
    proc = NodeProcess(node_command(['-p', f'queue_size:={QUEUE}', '-p', 'warn_throttle:=5.0',
                                     '-p', 'publish_map_rate:=0.5']), DOMAIN, env=profile)
    pub = None
    try:
        assert proc.wait_output('ready:', 60), proc.output()
        masks = ros.collect(Image, '/dynrecon/dynamic_mask', OUTPUT_QOS, keep=lambda m: m.header.stamp.sec)
        pub = NodeProcess([sys.executable, '-m', 'dynrecon_ros.ros.testing', 'stream', str(SECONDS)], DOMAIN,
                          env=profile)
        assert pub.wait_output('streaming', 60), pub.output()
        rss, t0 = [], time.monotonic()
        while pub.proc.poll() is None and time.monotonic() - t0 < SECONDS + 60:
            rss.append((time.monotonic() - t0, proc.rss_kib()))
            time.sleep(1.0)
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
    drop_warnings = [ln for ln in log.splitlines() if 'worker behind: dropped' in ln]
    half = [(t, kib) for t, kib in rss if t >= elapsed / 2]
    growth_mib = (max(k for _, k in half) - half[0][1]) / 1024
    slope = growth_mib / max(half[-1][0] - half[0][0], 1.0)
    print(f'\nstress {elapsed:.0f} s: sent {sent} frames ({sent / elapsed:.1f} Hz 640x480 rgb8+32FC1), node received '
          f'{received} (paired), processed {processed}, dropped {dropped} ({100 * dropped / max(received, 1):.0f} %), '
          f'queue high water {high}/{QUEUE}, masks out {len(masks)}, drop-rate warnings {len(drop_warnings)}, '
          f'RSS {rss[0][1] / 1024:.0f} -> {rss[-1][1] / 1024:.0f} MiB (max {max(k for _, k in rss) / 1024:.0f}), '
          f'growth over the second half: {growth_mib:.0f} MiB ({slope:.1f} MiB/s)')
    assert high <= QUEUE
    assert received >= 0.8 * sent, 'frames lost in transport (is the Fast DDS SHM profile in use?)'
    assert processed >= 1 and len(masks) >= 1
    assert 0 <= received - processed - dropped <= QUEUE + 1  # every frame processed, dropped or still queued
    if processed / elapsed < 25:  # the worker could not keep up: the backlog must have been dropped, and said so
        assert dropped > 0 and drop_warnings
    # unbounded buffering would grow by ~60 MiB/s (2.1 MiB per frame pair at 30 Hz); the pipeline's own
    # static map may still grow a little (it is bounded by pipeline.map.max_voxels)
    assert slope < 10.0, rss
