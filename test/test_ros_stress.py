"""Stress: 640x480 rgb8 + 32FC1 depth at 30 Hz into recon_node (sensor-data QoS) for
DYNRECON_STRESS_SECONDS (default 60). The worker is slower than 30 Hz here, so frames must be dropped
(oldest first) and counted, the queue must stay within queue_size, and the node's resident memory must
stop growing. Prints the figures."""
import os
import re
import time

import numpy as np
import pytest

pytest.importorskip('rclpy')
from sensor_msgs.msg import CameraInfo, Image  # noqa: E402
from std_msgs.msg import Header  # noqa: E402

from dynrecon_ros.ros import conversions as conv  # noqa: E402
from dynrecon_ros.ros.node import default_fastdds_profile  # noqa: E402
from dynrecon_ros.ros.qos import OUTPUT_QOS, SENSOR_QOS  # noqa: E402
from dynrecon_ros.ros.testing import NodeProcess, RosHarness, domain_id_for, node_command  # noqa: E402

DOMAIN = domain_id_for(__name__)
SECONDS = float(os.environ.get('DYNRECON_STRESS_SECONDS', '60'))
QUEUE = 3


@pytest.mark.slow
def test_stress_30hz_vga_bounded_queue_and_memory():
    os.environ.setdefault('FASTDDS_DEFAULT_PROFILES_FILE', str(default_fastdds_profile()))
    ros = RosHarness(DOMAIN)
    proc = NodeProcess(node_command(['-p', f'queue_size:={QUEUE}', '-p', 'warn_throttle:=5.0',
                                     '-p', 'publish_map_rate:=0.5']), DOMAIN)
    try:
        assert proc.wait_output('ready:', 60), proc.output()
        masks = ros.collect(Image, '/dynrecon/dynamic_mask', OUTPUT_QOS, keep=lambda m: m.header.stamp.sec)
        pub_img = ros.publisher(Image, '/image', SENSOR_QOS)
        pub_depth = ros.publisher(Image, '/depth', SENSOR_QOS)
        pub_info = ros.publisher(CameraInfo, '/camera_info', SENSOR_QOS)
        assert ros.wait_for(lambda: pub_img.get_subscription_count() and pub_depth.get_subscription_count()
                            and pub_info.get_subscription_count(), 30)
        rng = np.random.default_rng(0)
        base = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
        yy, xx = np.mgrid[0:480, 0:640]
        depth = (2.0 + 0.002 * xx + 0.001 * yy).astype(np.float32)
        K = np.array([[525.0, 0, 319.5], [0, 525.0, 239.5], [0, 0, 1]])
        rss, sent = [], 0
        t0 = time.monotonic()
        next_t = t0
        while time.monotonic() - t0 < SECONDS:
            stamp = 1000.0 + sent / 30.0
            h = Header(stamp=conv.sec_to_stamp(stamp), frame_id='camera')
            rgb = np.roll(base, sent * 3, axis=1)  # a camera panning over a texture
            pub_info.publish(conv.numpy_to_camera_info(K, (640, 480), h))
            pub_img.publish(conv.numpy_to_image(rgb, 'rgb8', h))
            pub_depth.publish(conv.numpy_to_image(depth, '32FC1', h))
            sent += 1
            if sent % 30 == 0:
                rss.append((time.monotonic() - t0, proc.rss_kib()))
            next_t += 1 / 30.0
            time.sleep(max(0.0, next_t - time.monotonic()))
        elapsed = time.monotonic() - t0
        time.sleep(1.0)
        assert proc.proc.poll() is None, proc.output()[-3000:]
    finally:
        proc.stop()
        ros.close()
    log = proc.output()
    m = re.search(r'frames received (\d+), processed (\d+), dropped (\d+), queue high water (\d+)', log)
    assert m, log[-3000:]
    received, processed, dropped, high = map(int, m.groups())
    drop_warnings = [ln for ln in log.splitlines() if 'worker behind: dropped' in ln]
    third = [kib for t, kib in rss if t >= elapsed / 3]
    growth_mib = (max(third) - third[0]) / 1024 if third else float('nan')
    print(f'\nstress {elapsed:.0f} s: sent {sent} frames ({sent / elapsed:.1f} Hz 640x480 rgb8+32FC1), node received '
          f'{received} (paired), processed {processed}, dropped {dropped} ({100 * dropped / max(received, 1):.0f} %), '
          f'queue high water {high}/{QUEUE}, masks out {len(masks)}, drop-rate warnings {len(drop_warnings)}, '
          f'RSS {rss[0][1] / 1024:.0f} -> {rss[-1][1] / 1024:.0f} MiB (max {max(k for _, k in rss) / 1024:.0f}), '
          f'growth over the last 2/3: {growth_mib:.0f} MiB')
    assert high <= QUEUE
    assert received >= 0.5 * sent, 'most frames should arrive with the SHM profile'
    assert processed >= 1 and len(masks) >= 1
    assert 0 <= received - processed - dropped <= QUEUE + 1  # every frame processed, dropped or still queued
    if processed / elapsed < 25:  # the worker could not keep up: the backlog must have been dropped, and said so
        assert dropped > 0 and drop_warnings
    # unbounded buffering would grow by ~60 MiB/s (2.1 MiB per frame pair at 30 Hz)
    assert growth_mib < 250, rss
