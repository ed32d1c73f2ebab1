"""Bag replay without `ros2 bag play`: read a ROS 1 bag or ROS 2 bag with rosbags and publish its
messages on their topics with the original timing (optionally /clock, rate, loop).

rosbags deserialises into its own dataclasses; :class:`MessageConverter` turns those into rclpy
messages field by field (a plan per type, cached), copying the large arrays (image data, point data)
as whole buffers. ROS 1 names are mapped to ROS 2 (CameraInfo ``K`` -> ``k``, ``tf/tfMessage`` ->
``tf2_msgs/TFMessage``, leading '/' in frame ids dropped because tf2 rejects it).

``compress``: image topics go out as image_transport publishes them compressed, for testing the node's
compressed inputs end to end and measuring bandwidth: colour on ``<topic>/compressed`` (PNG by
default: lossless, so the pipeline sees the very same pixels; or JPEG, about 3x smaller again but lossy,
which changes the results), depth (16UC1/32FC1) on ``<topic>/compressedDepth`` (lossless for 16UC1,
inverse-depth quantised for 32FC1). Bytes per frame, raw and compressed, are logged at the end.
"""
from __future__ import annotations

import array
import importlib
import pathlib
import time
from typing import Callable

import numpy as np
import rclpy
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage

from dynrecon_ros.compressed_depth import ENCODINGS as DEPTH_ENCODINGS
from dynrecon_ros.errors import InputError
from dynrecon_ros.ros import conversions
from dynrecon_ros.ros.qos import TF_QOS

# ROS 1 type names -> ROS 2 type names where they differ.
TYPE_MAP = {'tf/msg/tfMessage': 'tf2_msgs/msg/TFMessage'}
# rosidl element type -> array typecode for sequence fields.
TYPECODES = {'octet': 'B', 'uint8': 'B', 'int8': 'b', 'uint16': 'H', 'int16': 'h', 'uint32': 'I', 'int32': 'i',
             'uint64': 'Q', 'int64': 'q', 'float': 'f', 'double': 'd', 'char': 'B', 'boolean': 'B'}
REPLAY_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100, reliability=ReliabilityPolicy.RELIABLE,
                        durability=DurabilityPolicy.VOLATILE)
TF_STATIC_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=100, reliability=ReliabilityPolicy.RELIABLE,
                           durability=DurabilityPolicy.TRANSIENT_LOCAL)


def rclpy_type(msgtype: str):
    """'sensor_msgs/msg/Image' (or a ROS 1 name) -> the rclpy message class."""
    msgtype = TYPE_MAP.get(msgtype, msgtype)
    pkg, _, name = msgtype.split('/')
    try:
        return getattr(importlib.import_module(f'{pkg}.msg'), name)
    except (ImportError, AttributeError) as exc:
        raise InputError(f'no ROS 2 message type {msgtype} installed ({exc})') from exc


class MessageConverter:
    """rosbags message object -> rclpy message of the same (ROS 2) type."""

    def __init__(self):
        self._plans: dict[type, list] = {}

    def _plan(self, cls) -> list[tuple[str, str, Callable]]:
        plan = self._plans.get(cls)
        if plan is not None:
            return plan
        plan = []
        for field, ftype in cls.get_fields_and_field_types().items():
            plan.append((field, ftype, self._field_converter(field, ftype)))
        self._plans[cls] = plan
        return plan

    def _field_converter(self, field: str, ftype: str) -> Callable:
        if ftype.startswith('sequence<') or (ftype.endswith(']') and '[' in ftype):
            inner = ftype[len('sequence<'):].split('>')[0].split(',')[0] if ftype.startswith('sequence<') \
                else ftype.split('[')[0]
            if '/' in inner:  # sequence of messages
                sub = rclpy_type(inner.replace('/', '/msg/', 1) if inner.count('/') == 1 else inner)
                return lambda v: [self.convert(x, sub) for x in v]
            if inner.startswith('string'):
                return lambda v: [str(x) for x in v]
            if ftype.startswith('sequence<'):
                tc = TYPECODES[inner]
                def seq(v, tc=tc, dt=np.dtype(tc)):  # noqa: E306 - whole-buffer copy, no per-element loop
                    out = array.array(tc)
                    out.frombytes(np.ascontiguousarray(np.asarray(v, dtype=dt)).tobytes())
                    return out
                return seq
            dt = {'double': np.float64, 'float': np.float32}.get(inner)
            return (lambda v, dt=dt: np.asarray(v, dtype=dt)) if dt else (lambda v: list(v))
        if '/' in ftype:  # nested message
            sub = rclpy_type(ftype.replace('/', '/msg/', 1) if ftype.count('/') == 1 else ftype)
            return lambda v: self.convert(v, sub)
        if ftype.startswith('string'):
            if field in ('frame_id', 'child_frame_id'):
                return lambda v: str(v).lstrip('/')
            return str
        if ftype == 'boolean':
            return bool
        if ftype in ('float', 'double'):
            return float
        return int

    def convert(self, msg, cls=None):
        cls = cls or rclpy_type(msg.__msgtype__)
        out = cls()
        for field, _, fn in self._plan(cls):
            value = getattr(msg, field, None)
            if value is None:
                value = getattr(msg, field.upper(), None)  # ROS 1 CameraInfo: D, K, R, P
            if value is None:
                continue  # ROS 1 has no such field: keep the ROS 2 default
            setattr(out, field, fn(value))
        return out


def open_bag(path: str | pathlib.Path):
    """AnyReader for a ROS 1 ``.bag`` file or a ROS 2 bag directory (InputError when not a bag)."""
    from rosbags.highlevel import AnyReader
    path = pathlib.Path(path)
    if not path.exists():
        raise InputError('no such bag', path)
    try:
        from rosbags.typesys import Stores, get_typestore
        reader = AnyReader([path], default_typestore=get_typestore(Stores.ROS2_KILTED))
        reader.open()
    except Exception as exc:  # noqa: BLE001 - rosbags raises several types for a non-bag
        raise InputError(f'cannot read bag: {exc}', path) from exc
    return reader


COMPRESS_FORMATS = ('png', 'jpeg')


class Compressor:
    """Image message of one bag topic -> (output topic, CompressedImage), counting bytes raw and sent.

    The topic is colour or depth by its first message's encoding (16UC1/32FC1: depth)."""

    def __init__(self, topic: str, first_encoding: str, colour_format: str):
        self.depth = first_encoding in DEPTH_ENCODINGS
        self.kind = 'depth' if self.depth else 'colour'
        self.topic = f"{topic.rstrip('/')}/{'compressedDepth' if self.depth else 'compressed'}"
        self.colour_format = colour_format
        self.frames = self.raw_bytes = self.sent_bytes = 0

    def __call__(self, msg):
        out = (conversions.image_to_compressed_depth(msg) if self.depth
               else conversions.image_to_compressed(msg, self.colour_format))
        self.frames += 1
        self.raw_bytes += len(msg.data)
        self.sent_bytes += len(out.data)
        return out

    def summary(self) -> str:
        n = max(1, self.frames)
        what = 'compressedDepth png' if self.depth else f'compressed {self.colour_format}'
        return (f'{self.kind} {self.topic}: {self.raw_bytes / n:,.0f} B/frame raw, {self.sent_bytes / n:,.0f} B/frame '
                f'{what} ({self.raw_bytes / max(1, self.sent_bytes):.1f}x smaller)')


def bandwidth_summary(compressors: list[Compressor]) -> list[str]:
    """Lines for the log: per topic and in total, bytes per frame raw vs compressed."""
    lines = [c.summary() for c in compressors]
    n = max((c.frames for c in compressors), default=0)
    if n:
        raw = sum(c.raw_bytes / max(1, c.frames) for c in compressors)
        sent = sum(c.sent_bytes / max(1, c.frames) for c in compressors)
        lines.append(f'images per frame: {raw:,.0f} B raw, {sent:,.0f} B compressed ({raw / max(1.0, sent):.1f}x; '
                     f'{raw * 30 / 1e6:.1f} vs {sent * 30 / 1e6:.1f} MB/s at 30 Hz)')
    return lines


def replay_bag(path, rate: float = 1.0, clock: bool = False, loop: bool = False, delay: float = 0.0,
               topics: list[str] | None = None, wait_subscribers: float = 0.0, node: Node | None = None,
               log: Callable[[str], None] = print, compress: str | None = None) -> int:
    """Publish every message of the bag on its topic at ``rate`` times the recorded speed.

    Timing follows the bag's record timestamps. ``clock`` also publishes rosgraph_msgs/Clock on /clock
    (for nodes with use_sim_time). ``wait_subscribers`` waits up to that many seconds for each image topic
    (every topic when the bag has no images) to have a subscriber before starting. ``compress`` ('png' or
    'jpeg'): images go out compressed (see the module docstring). Returns the number of messages published.
    """
    if rate <= 0:
        raise InputError(f'--rate must be > 0, got {rate}')
    if compress is not None and compress not in COMPRESS_FORMATS:
        raise InputError(f"--compress must be one of {', '.join(COMPRESS_FORMATS)}, got '{compress}'")
    reader = open_bag(path)
    own = node is None
    if own:
        rclpy.init()
        node = Node('dynrecon_replay')
    conv = MessageConverter()
    published = 0
    try:
        conns = [c for c in reader.connections if not topics or c.topic in topics]
        if not conns:
            raise InputError(f'no matching topics (bag has {sorted({c.topic for c in reader.connections})})', path)
        pubs, compressors = {}, {}
        for c in conns:
            qos = TF_STATIC_QOS if c.topic == '/tf_static' else TF_QOS if c.topic == '/tf' else REPLAY_QOS
            if compress and c.msgtype.endswith('/Image') and c.msgcount:
                first = next(reader.messages(connections=[c]))[2]
                comp = compressors[c.topic] = Compressor(c.topic, reader.deserialize(first, c.msgtype).encoding,
                                                         compress)
                pubs[c.topic] = node.create_publisher(CompressedImage, comp.topic, qos)
            else:
                pubs[c.topic] = node.create_publisher(rclpy_type(c.msgtype), c.topic, qos)
        clock_pub = None
        if clock:
            from rosgraph_msgs.msg import Clock
            clock_pub = node.create_publisher(Clock, '/clock', QoSProfile(depth=10))
        if wait_subscribers > 0:  # the image topics are the ones a consumer needs from the first message
            waited = {c.topic: pubs[c.topic] for c in conns if c.msgtype.endswith('/Image')} or pubs
            end = time.monotonic() + wait_subscribers
            while time.monotonic() < end and not all(p.get_subscription_count() for p in waited.values()):
                time.sleep(0.05)
            missing = [t for t, p in waited.items() if not p.get_subscription_count()]
            if missing:
                log(f'replay: no subscriber on {missing} after {wait_subscribers:.0f} s; publishing anyway')
        if delay > 0:
            time.sleep(delay)
        log(f'replay: {path} ({sum(c.msgcount for c in conns)} messages on {len(conns)} topics) at {rate}x')
        while True:
            t_wall0, t_bag0 = time.monotonic(), None
            for conn, t_ns, raw in reader.messages(connections=conns):
                if t_bag0 is None:
                    t_bag0 = t_ns
                wait = t_wall0 + (t_ns - t_bag0) * 1e-9 / rate - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if not rclpy.ok(context=node.context):
                    return published
                msg = conv.convert(reader.deserialize(raw, conn.msgtype), rclpy_type(conn.msgtype))
                if conn.topic in compressors:
                    msg = compressors[conn.topic](msg)
                if clock_pub is not None:
                    clock_pub.publish(_clock(t_ns))
                pubs[conn.topic].publish(msg)
                published += 1
            if not loop:
                break
        for p in pubs.values():  # let reliable subscribers receive the tail before we go away
            p.wait_for_all_acked(rclpy.duration.Duration(seconds=5.0))
        log(f'replay: published {published} messages')
        for line in bandwidth_summary(list(compressors.values())):
            log(f'replay: {line}')
        return published
    finally:
        reader.close()
        if own:
            node.destroy_node()
            rclpy.try_shutdown()


def _clock(t_ns: int):
    from builtin_interfaces.msg import Time
    from rosgraph_msgs.msg import Clock
    return Clock(clock=Time(sec=t_ns // 1_000_000_000, nanosec=t_ns % 1_000_000_000))
