"""Helpers for tests and benchmarks that talk to a real `recon_node` process over DDS (no mocks).

:class:`RosHarness` owns an rclpy context on a chosen ROS_DOMAIN_ID, spun in a background thread, with
publishers and collecting subscribers; :func:`start_node` runs the node as a subprocess on the same
domain.
"""
from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable

import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node

ROOT = pathlib.Path(__file__).resolve().parents[2]


class RosHarness:
    """A test-side ROS participant on ``domain_id``: publish, collect, wait."""

    def __init__(self, domain_id: int, name: str = 'dynrecon_test'):
        from dynrecon_ros.ros.qos import use_large_shm_segment
        use_large_shm_segment()  # its publishers send whole frames (as the node's profile: no loss under load)
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = Node(f'{name}_{os.getpid()}', context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        while self.context.ok():
            try:
                self.executor.spin_once(timeout_sec=0.05)
            except Exception:  # noqa: BLE001 - shutdown races
                if not self.context.ok():
                    return

    def publisher(self, msg_type, topic: str, qos):
        return self.node.create_publisher(msg_type, topic, qos)

    def collect(self, msg_type, topic: str, qos, keep: Callable | None = None) -> list:
        """Subscribe and return the (growing) list of received messages (or ``keep(msg)`` of each)."""
        out: list = []

        def cb(msg):
            with self._lock:
                out.append(keep(msg) if keep else msg)
        sub = self.node.create_subscription(msg_type, topic, cb, qos)
        out_sub = getattr(self, '_subs', [])
        out_sub.append(sub)
        self._subs = out_sub
        return out

    def client(self, srv_type, name: str):
        return self.node.create_client(srv_type, name)

    def call(self, client, request, timeout: float = 10.0, resend_after: float = 3.0):
        """The service's response to ``request``. A request without a reply after ``resend_after`` s is sent again
        (the first reply of a client can be lost while its reply reader is still being matched after
        ``wait_for_service`` returned: seen once in a fresh-clone CI run, the node ready, list_parameters available,
        no reply in 10 s; the same test passed on three reruns); the services the tests call are idempotent."""
        if not client.wait_for_service(timeout_sec=timeout):
            raise TimeoutError(f'service {client.srv_name} not available')
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            fut = client.call_async(request)
            again = min(end, time.monotonic() + resend_after)
            while not fut.done() and time.monotonic() < again:
                time.sleep(0.02)
            if fut.done():
                return fut.result()
        raise TimeoutError(f'service {client.srv_name} did not answer in {timeout:g} s')

    @staticmethod
    def wait_for(pred: Callable[[], bool], timeout: float, poll: float = 0.02) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if pred():
                return True
            time.sleep(poll)
        return bool(pred())

    def close(self) -> None:
        try:
            self.executor.shutdown(timeout_sec=1.0)
            self.node.destroy_node()
        finally:
            if self.context.ok():
                rclpy.shutdown(context=self.context)
        self._thread.join(2.0)


class StreamProbe:
    """Sends RGB-D frames to a node through ``harness`` and times its answers (tests and bench/pipeline.py).

    Each frame (rgb8 + 32FC1 + camera_info on ``image``, ``depth``, ``camera_info``) is stamped with the
    wall time at which it is sent, as a camera driver stamps its images; for every ``/<node>/dynamic_mask``
    and ``/<node>/pose`` that comes back the arrival time is recorded by stamp. Latency of a frame = the
    later of its mask's and its pose's arrival minus its stamp (output_lag and transport included).
    """

    def __init__(self, harness: RosHarness, node_name: str = 'dynrecon', reliable: bool = False):
        from geometry_msgs.msg import PoseStamped
        from sensor_msgs.msg import CameraInfo, Image

        from dynrecon_ros.ros.qos import OUTPUT_QOS, RELIABLE_INPUT_QOS, SENSOR_QOS
        qos = RELIABLE_INPUT_QOS if reliable else SENSOR_QOS
        self.pubs = [harness.publisher(t, n, qos) for t, n in
                     ((Image, 'image'), (Image, 'depth'), (CameraInfo, 'camera_info'))]
        self.sent: list[int] = []  # stamps (ns) in send order

        def arrival(msg):
            return msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec, time.time_ns()
        self.masks = harness.collect(Image, f'/{node_name}/dynamic_mask', OUTPUT_QOS, keep=arrival)
        self.poses = harness.collect(PoseStamped, f'/{node_name}/pose', OUTPUT_QOS, keep=arrival)
        self.subs = harness._subs[-2:]  # the two output subscriptions just made

    def wait_matched(self, timeout: float = 30.0) -> bool:
        """True once the node subscribes to all three inputs and its mask and pose publishers match
        this probe's subscriptions, then 0.5 s more: a reliable reader counted as matched may not have
        finished the handshake, and a frame published in that gap can be missed."""
        ok = RosHarness.wait_for(lambda: all(p.get_subscription_count() for p in self.pubs)
                                 and all(s.get_publisher_count() for s in self.subs), timeout)
        if ok:
            time.sleep(0.5)
        return ok

    def send(self, rgb, depth, K) -> int:
        """Publish one frame stamped now; returns its stamp in ns."""
        from std_msgs.msg import Header

        from dynrecon_ros.ros import conversions as conv
        t = time.time_ns()
        h = Header(frame_id='camera')
        h.stamp.sec, h.stamp.nanosec = divmod(t, 1_000_000_000)
        self.pubs[2].publish(conv.numpy_to_camera_info(K, (rgb.shape[1], rgb.shape[0]), h))
        self.pubs[0].publish(conv.numpy_to_image(rgb, 'rgb8', h))
        self.pubs[1].publish(conv.numpy_to_image(depth, '32FC1', h))
        self.sent.append(t)
        return t

    def play(self, frames, rate: float) -> None:
        """Send ``frames`` (objects with rgb, depth, K) at ``rate`` Hz, on schedule (late sends catch up)."""
        t0 = time.monotonic()
        for i, f in enumerate(frames):
            time.sleep(max(0.0, t0 + i / rate - time.monotonic()))
            self.send(f.rgb, f.depth, f.K)

    def report(self, exclude_last: int = 0) -> dict:
        """Counts (every stamp's mask and pose, duplicates) and latency p50/p95 in ms over the frames sent,
        leaving out the last ``exclude_last`` (held for the window until the node's idle flush)."""
        import numpy as np
        masks, poses = dict(list(self.masks)), dict(list(self.poses))
        sent = set(self.sent)
        got = [t for t in self.sent if t in masks and t in poses]
        timed = [t for t in self.sent[:len(self.sent) - exclude_last] if t in masks and t in poses]
        lat = np.array([(max(masks[t], poses[t]) - t) * 1e-6 for t in timed])
        return {'sent': len(self.sent), 'complete': len(got),
                'masks': sum(1 for t, _ in list(self.masks) if t in sent),
                'poses': sum(1 for t, _ in list(self.poses) if t in sent),
                'dropped': len(self.sent) - len(got), 'drop_rate': 1 - len(got) / max(1, len(self.sent)),
                'latency_p50_ms': float(np.percentile(lat, 50)) if len(lat) else float('nan'),
                'latency_p95_ms': float(np.percentile(lat, 95)) if len(lat) else float('nan')}


def node_env(domain_id: int, extra: dict | None = None) -> dict:
    """Environment for a node subprocess: this interpreter's, the worktree first on sys.path."""
    env = dict(os.environ)
    env['ROS_DOMAIN_ID'] = str(domain_id)
    env['PYTHONPATH'] = os.pathsep.join([str(ROOT)] + [p for p in env.get('PYTHONPATH', '').split(os.pathsep) if p])
    env['PYTHONUNBUFFERED'] = '1'
    env.setdefault('RCUTILS_COLORIZED_OUTPUT', '0')
    env.update(extra or {})
    return env


class NodeProcess:
    """A running node subprocess; its merged stdout/stderr goes to a temp file (no pipe to fill up)."""

    def __init__(self, cmd: list[str], domain_id: int, env: dict | None = None, cwd: str | None = None):
        self.cmd = cmd
        self.log = tempfile.NamedTemporaryFile('w+', prefix='recon_node_', suffix='.log', delete=False)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=cwd or str(ROOT),
                                     env=node_env(domain_id, env))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return pathlib.Path(self.log.name).read_text(errors='replace')

    def wait_output(self, text: str, timeout: float) -> bool:
        return RosHarness.wait_for(lambda: text in self.output() or self.proc.poll() is not None and text in self.output(),
                                   timeout, poll=0.05)

    def rss_kib(self) -> int:
        """Resident memory of the node process (KiB) from /proc."""
        for line in pathlib.Path(f'/proc/{self.proc.pid}/status').read_text().splitlines():
            if line.startswith('VmRSS:'):
                return int(line.split()[1])
        return 0

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.flush()
        return self.proc.returncode


def node_command(ros_args: list[str]) -> list[str]:
    """`python -m dynrecon_ros.ros.node --ros-args ...` with this interpreter (same as `recon_node`)."""
    return [sys.executable, '-m', 'dynrecon_ros.ros.node', '--ros-args', *ros_args]


def domain_id_for(name: str) -> int:
    """A ROS_DOMAIN_ID per test module: DYNRECON_TEST_DOMAIN or a hash of name and pid in 1..100."""
    if os.environ.get('DYNRECON_TEST_DOMAIN'):
        return int(os.environ['DYNRECON_TEST_DOMAIN'])
    import zlib
    return 1 + zlib.crc32(f'{name}:{os.getpid()}:{time.time_ns()}'.encode()) % 100


def stream(seconds: float, rate: float = 30.0, width: int = 640, height: int = 480, reliable: bool = False) -> int:
    """Publish a synthetic rgb8 + 32FC1 + camera_info stream on image/depth/camera_info at ``rate`` Hz.

    Run in its own process (``python -m dynrecon_ros.ros.testing stream SECONDS``) so that its DDS
    participant is created with FASTDDS_DEFAULT_PROFILES_FILE: Fast DDS's shared-memory transport
    writes samples into the *sender's* segment, so the publisher needs the large segment too.
    Prints ``sent N`` at the end; returns N.
    """
    import numpy as np
    from sensor_msgs.msg import CameraInfo, Image
    from std_msgs.msg import Header

    from dynrecon_ros.ros import conversions as conv
    from dynrecon_ros.ros.qos import RELIABLE_INPUT_QOS, SENSOR_QOS
    rclpy.init()
    node = Node('dynrecon_stream')
    qos = RELIABLE_INPUT_QOS if reliable else SENSOR_QOS
    pubs = [node.create_publisher(t, n, qos) for t, n in ((Image, 'image'), (Image, 'depth'), (CameraInfo, 'camera_info'))]
    end = time.monotonic() + 30
    while time.monotonic() < end and not all(p.get_subscription_count() for p in pubs):
        time.sleep(0.05)
    time.sleep(1.0)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    depth = (2.0 + 0.002 * xx + 0.001 * yy).astype(np.float32)
    K = np.array([[525.0 * width / 640, 0, width / 2 - 0.5], [0, 525.0 * height / 480, height / 2 - 0.5], [0, 0, 1]])
    sent, t0 = 0, time.monotonic()
    next_t = t0
    print('streaming', flush=True)
    while time.monotonic() - t0 < seconds:
        h = Header(stamp=conv.sec_to_stamp(1000.0 + sent / rate), frame_id='camera')
        pubs[2].publish(conv.numpy_to_camera_info(K, (width, height), h))
        pubs[0].publish(conv.numpy_to_image(np.roll(base, sent * 3, axis=1), 'rgb8', h))  # a panning camera
        pubs[1].publish(conv.numpy_to_image(depth, '32FC1', h))
        sent += 1
        next_t += 1.0 / rate
        time.sleep(max(0.0, next_t - time.monotonic()))
    print(f'sent {sent} in {time.monotonic() - t0:.1f} s', flush=True)
    node.destroy_node()
    rclpy.try_shutdown()
    return sent


if __name__ == '__main__':
    if len(sys.argv) >= 3 and sys.argv[1] == 'stream':
        stream(float(sys.argv[2]))
    else:
        print('usage: python -m dynrecon_ros.ros.testing stream SECONDS', file=sys.stderr)
        sys.exit(2)
