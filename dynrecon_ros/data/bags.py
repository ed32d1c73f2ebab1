"""TUM-style RGB-D rosbags (ROS 1 ``.bag`` files and ROS 2 bag directories) via ``rosbags``.

Topic layout (TUM's): ``/camera/rgb/image_color`` sensor_msgs/Image rgb8, ``/camera/depth/image``
sensor_msgs/Image 32FC1 metres (NaN = no reading), ``/camera/rgb/camera_info`` and
``/camera/depth/camera_info``. Frame ids are TUM's ``/openni_rgb_optical_frame`` /
``/openni_depth_optical_frame`` in ROS 1, without the leading slash in ROS 2 (tf2 rejects it).
Written depth is registered to the colour image (same pixel grid), as TUM's depth PNGs are.
"""
from __future__ import annotations

import contextlib
import pathlib
from decimal import Decimal

import numpy as np

from dynrecon_ros import image_encodings as encodings
from dynrecon_ros.data.tum import associate, optional_sensor_timing, write_sensor_timing
from dynrecon_ros.errors import InputError
from dynrecon_ros.frames import Frame

RGB_TOPIC = '/camera/rgb/image_color'
DEPTH_TOPIC = '/camera/depth/image'
RGB_INFO_TOPIC = '/camera/rgb/camera_info'
DEPTH_INFO_TOPIC = '/camera/depth/camera_info'
RGB_FRAME_ID = '/openni_rgb_optical_frame'
DEPTH_FRAME_ID = '/openni_depth_optical_frame'
IMAGE = 'sensor_msgs/msg/Image'
CAMERA_INFO = 'sensor_msgs/msg/CameraInfo'

def stamp_to_ns(stamp: float, key: str = '') -> int:
    """Seconds -> integer nanoseconds, exact for a decimal stamp string such as a TUM key."""
    try:
        return int(Decimal(key) * 1_000_000_000) if key else int(round(stamp * 1e9))
    except ArithmeticError:  # key is not a decimal number: fall back to the float stamp
        return int(round(stamp * 1e9))


def image_to_array(msg, where: str = '') -> np.ndarray:
    """sensor_msgs/Image -> (H, W) or (H, W, C) array in the message's dtype (row padding removed)."""
    enc = msg.encoding
    if enc not in encodings.ENCODINGS:
        raise InputError(f'unsupported image encoding "{enc}" ({", ".join(encodings.ENCODINGS)} are supported)',
                         where or None)
    dtype, ch = encodings.ENCODINGS[enc]
    dt = np.dtype(dtype).newbyteorder('>' if msg.is_bigendian else '<')
    row_bytes = msg.width * ch * dt.itemsize
    data = np.asarray(msg.data, dtype=np.uint8)
    if msg.step < row_bytes or len(data) < msg.step * msg.height:
        raise InputError(f'image data too short for {msg.width}x{msg.height} {enc} (step {msg.step}, '
                         f'{len(data)} bytes)', where or None)
    rows = data[:msg.step * msg.height].reshape(msg.height, msg.step)[:, :row_bytes]
    arr = np.ascontiguousarray(rows).view(dt).astype(dt.newbyteorder('='))
    return arr.reshape(msg.height, msg.width, ch) if ch > 1 else arr.reshape(msg.height, msg.width)


def _as_depth(arr: np.ndarray, enc: str) -> np.ndarray:
    """Depth image array -> (H, W) float32 metres, 0 = no reading (see image_encodings.to_depth)."""
    if enc not in encodings.DEPTH_SCALE:
        raise InputError(f'depth image has encoding {enc}; expected 32FC1 (metres) or 16UC1 (millimetres)')
    return encodings.to_depth(arr, enc)


# ---------------------------------------------------------------------------------------------
# Writing


def _typestore(ros_version: int):
    from rosbags.typesys import Stores, get_typestore
    return get_typestore(Stores.ROS1_NOETIC if ros_version == 1 else Stores.ROS2_KILTED)


def _header(ts, ros_version: int, ns: int, frame_id: str, seq: int):
    Header, Time = ts.types['std_msgs/msg/Header'], ts.types['builtin_interfaces/msg/Time']
    stamp = Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)
    if ros_version == 1:
        return Header(seq=seq, stamp=stamp, frame_id=frame_id)
    return Header(stamp=stamp, frame_id=frame_id.lstrip('/'))


def _image_msg(ts, header, arr: np.ndarray, enc: str):
    arr = np.ascontiguousarray(arr)
    h, w = arr.shape[:2]
    return ts.types[IMAGE](header=header, height=h, width=w, encoding=enc, is_bigendian=0,
                           step=arr.strides[0], data=arr.reshape(-1).view(np.uint8))


def _info_msg(ts, ros_version: int, header, K: np.ndarray, w: int, h: int):
    P = np.zeros((3, 4))
    P[:, :3] = K
    fields = dict(header=header, height=h, width=w, distortion_model='plumb_bob', binning_x=0, binning_y=0,
                  roi=ts.types['sensor_msgs/msg/RegionOfInterest'](x_offset=0, y_offset=0, height=0, width=0,
                                                                   do_rectify=False))
    arrays = dict(D=np.zeros(5), K=K.reshape(-1).astype(np.float64), R=np.eye(3).reshape(-1), P=P.reshape(-1))
    fields.update({(k if ros_version == 1 else k.lower()): v for k, v in arrays.items()})
    return ts.types[CAMERA_INFO](**fields)


def write_frames_bag(frames, path, ros_version: int = 1, storage: str = 'sqlite3') -> pathlib.Path:
    """Write RGB-D frames as a TUM-style bag: ROS 1 ``.bag`` file or ROS 2 bag directory (rosbag2 format
    version 9, ``storage`` 'sqlite3' (rosbags' default) or 'mcap').

    Colour is written as rgb8, depth as 32FC1 metres with NaN for no reading, camera_info for both with
    the frame's K. The depth message carries ``frame.meta['depth_stamp']`` when present (like TUM, colour
    and depth stamps may differ by a few ms), else the colour stamp. Bag record time = header stamp.
    """
    if ros_version not in (1, 2):
        raise ValueError(f'ros_version must be 1 or 2, got {ros_version}')
    path = pathlib.Path(path)
    ts = _typestore(ros_version)
    if path.exists():
        raise InputError('output bag already exists', path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if ros_version == 1:
        from rosbags.rosbag1 import Writer
        writer = Writer(path)
        serialize = ts.serialize_ros1
    else:
        from rosbags.rosbag2 import StoragePlugin, Writer
        plugin = {'sqlite3': StoragePlugin.SQLITE3, 'mcap': StoragePlugin.MCAP}[storage]
        writer = Writer(path, version=9, storage_plugin=plugin)
        serialize = ts.serialize_cdr
    with writer:
        conns = {t: writer.add_connection(t, typ, typestore=ts) for t, typ in (
            (RGB_TOPIC, IMAGE), (DEPTH_TOPIC, IMAGE), (RGB_INFO_TOPIC, CAMERA_INFO), (DEPTH_INFO_TOPIC, CAMERA_INFO))}
        for seq, f in enumerate(frames):
            ns = stamp_to_ns(f.stamp, f.key)
            h, w = f.rgb.shape[:2]
            hdr = _header(ts, ros_version, ns, RGB_FRAME_ID, seq)
            msgs = [(RGB_TOPIC, ns, _image_msg(ts, hdr, f.rgb, 'rgb8'))]
            if f.K is not None:
                msgs.append((RGB_INFO_TOPIC, ns, _info_msg(ts, ros_version, hdr, f.K, w, h)))
            if f.depth is not None:
                ds = f.meta.get('depth_stamp')
                dns = stamp_to_ns(ds, f'{ds:.6f}') if ds is not None else ns
                dhdr = _header(ts, ros_version, dns, DEPTH_FRAME_ID, seq)
                depth = np.where(f.depth > 0, f.depth, np.nan).astype(np.float32)
                msgs.append((DEPTH_TOPIC, dns, _image_msg(ts, dhdr, depth, '32FC1')))
                if f.K is not None:
                    msgs.append((DEPTH_INFO_TOPIC, dns, _info_msg(ts, ros_version, dhdr, f.K, w, h)))
            for topic, t_ns, msg in sorted(msgs, key=lambda m: m[1]):
                writer.write(conns[topic], t_ns, serialize(msg, msg.__msgtype__))
    return path


def sensor_timing_path(path) -> pathlib.Path:
    """Where a bag's sensor timing file (tum.read_sensor_timing) lives: ``sensor.yaml`` inside a ROS 2 bag
    directory, ``NAME.sensor.yaml`` beside a ROS 1 ``NAME.bag`` (a bag has no field for it)."""
    path = pathlib.Path(path)
    return path.with_name(path.stem + '.sensor.yaml') if path.suffix == '.bag' else path / 'sensor.yaml'


def write_bag(seq, path, ros_version: int = 1, storage: str = 'sqlite3') -> pathlib.Path:
    """Write a SyntheticSequence (or anything with ``.frames``) as a TUM-style bag; see write_frames_bag.
    A SyntheticSequence's sensor timing (rolling shutter, depth delay) goes in :func:`sensor_timing_path`."""
    out = write_frames_bag(seq.frames, path, ros_version=ros_version, storage=storage)
    cfg = getattr(seq, 'config', None)
    if cfg is not None and hasattr(cfg, 'rolling_shutter'):
        write_sensor_timing(sensor_timing_path(out), cfg.rolling_shutter, cfg.depth_delay)
    return out


# ---------------------------------------------------------------------------------------------
# Reading


def is_bag(path) -> bool:
    """A ROS 1 ``.bag`` file or a ROS 2 bag directory (with metadata.yaml)."""
    path = pathlib.Path(path)
    return (path.is_file() and path.suffix == '.bag') or (path.is_dir() and (path / 'metadata.yaml').is_file())


def _ns_to_s(ns: int) -> float:
    """Integer nanoseconds -> seconds, correctly rounded (ns * 1e-9 is not, for stamps around 1e9 s)."""
    ns = int(ns)
    return float(f'{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}')


def _header_ns(msg) -> int:
    return int(msg.header.stamp.sec) * 1_000_000_000 + int(msg.header.stamp.nanosec)


class BagFrames:
    """RGB-D frames of a TUM-style bag, streamed (``len`` known after one pass over the stamps).

    Colour and depth messages are paired by header stamp like TUM's associate tool (nearest within
    ``max_dt``, each used once); K comes from the colour camera_info (first message), or ``K`` if given.
    A bag without the depth topic gives monocular frames (depth None). A sensor timing file
    (:func:`sensor_timing_path`) gives ``sensor_timing`` (else None), and its depth delay is taken off the
    depth stamps before pairing; ``depth_offsets`` (N,): each frame's depth stamp - colour stamp (NaN without
    depth). Frame keys are the colour
    header stamps as ``sec.micro`` strings with 6 decimals (TUM's style). ``K`` may be reassigned before
    iterating; ``size`` is the (W, H) of the first colour image.
    """

    def __init__(self, path, max_dt: float = 0.02, rgb_topic: str = RGB_TOPIC, depth_topic: str = DEPTH_TOPIC,
                 info_topic: str = RGB_INFO_TOPIC, K=None):
        self.path = path = pathlib.Path(path)
        if not path.exists():
            raise InputError('bag not found', path)
        if not is_bag(path):
            raise InputError('not a ROS 1 .bag file or a ROS 2 bag directory (metadata.yaml)', path)
        self.topics = (rgb_topic, depth_topic, info_topic)
        self.K = None if K is None else np.asarray(K, dtype=np.float64)
        rgb_ns, depth_ns = [], []
        self.size = None  # (W, H) of the first colour image
        with self._reader() as reader:
            names = {c.topic for c in reader.connections}
            if rgb_topic not in names:
                raise InputError(f'no colour topic {rgb_topic} in bag (topics: {", ".join(sorted(names))})', path)
            conns = [c for c in reader.connections if c.topic in self.topics]
            for conn, _, raw in reader.messages(connections=conns):
                msg = self._deserialize(reader, raw, conn)
                if conn.topic == rgb_topic:
                    rgb_ns.append(_header_ns(msg))
                    self.size = self.size or (int(msg.width), int(msg.height))
                elif conn.topic == depth_topic:
                    depth_ns.append(_header_ns(msg))
                elif self.K is None:
                    k = np.asarray(msg.K if hasattr(msg, 'K') else msg.k, dtype=np.float64)  # ROS 1 K, ROS 2 k
                    if k.size == 9 and k[0] > 0:
                        self.K = k.reshape(3, 3)
        if not rgb_ns:
            raise InputError(f'no messages on {rgb_topic}', path)
        self._rgb_ns, self._depth_ns = np.array(rgb_ns, np.int64), np.array(depth_ns, np.int64)
        self.has_depth = bool(depth_ns)
        self.sensor_timing_path, self.sensor_timing = optional_sensor_timing(sensor_timing_path(path))
        if self.has_depth:
            delay = self.sensor_timing['depth_delay_s'] if self.sensor_timing else 0.0
            pairs = associate(self._rgb_ns * 1e-9, self._depth_ns * 1e-9, max_dt, offset=-delay)
            if not pairs:
                raise InputError(f'no colour/depth pair within {max_dt * 1000:.0f} ms: association is empty '
                                 f'({len(rgb_ns)} colour, {len(depth_ns)} depth messages)', path)
        else:
            pairs = [(i, None) for i in range(len(rgb_ns))]
        self._pairs = pairs
        self.stamps = np.array([_ns_to_s(self._rgb_ns[a]) for a, _ in pairs])
        self.keys = [self._key(self._rgb_ns[a]) for a, _ in pairs]
        # (N,) depth stamp - colour stamp of each frame (NaN: monocular)
        self.depth_offsets = np.array([np.nan if b is None else (int(self._depth_ns[b]) - int(self._rgb_ns[a])) * 1e-9
                                       for a, b in pairs])

    @staticmethod
    def _key(ns: int) -> str:
        return f'{ns // 1_000_000_000}.{(ns % 1_000_000_000) // 1000:06d}'

    @contextlib.contextmanager
    def _reader(self):
        from rosbags.highlevel import AnyReader
        try:
            # ROS 2 bags from older recorders carry no message definitions: fall back to the standard ones.
            reader = AnyReader([self.path], default_typestore=_typestore(2))
            reader.open()
        except Exception as exc:  # rosbags raises several reader error types for corrupt bags
            raise InputError(f'cannot open bag: {exc}', self.path) from None
        try:
            yield reader
        finally:
            reader.close()

    def _deserialize(self, reader, raw, conn):
        try:
            return reader.deserialize(raw, conn.msgtype)
        except Exception as exc:  # corrupt message payloads: name the topic instead of a traceback
            raise InputError(f'cannot decode a {conn.msgtype} message on {conn.topic}: {exc}', self.path) from None

    def __len__(self) -> int:
        return len(self._pairs)

    def __iter__(self):
        """Yield Frames in colour-stamp order; only frames waiting for their partner are buffered."""
        rgb_topic, depth_topic, _ = self.topics
        rgb_index = {a: k for k, (a, _) in enumerate(self._pairs)}
        depth_index = {b: k for k, (_, b) in enumerate(self._pairs) if b is not None}
        pending: dict[int, dict] = {}
        next_k = 0
        n_rgb = n_depth = 0
        with self._reader() as reader:
            conns = [c for c in reader.connections if c.topic in (rgb_topic, depth_topic)]
            for conn, _, raw in reader.messages(connections=conns):
                if conn.topic == rgb_topic:
                    k, n_rgb = rgb_index.get(n_rgb), n_rgb + 1
                    slot = 'rgb'
                else:
                    k, n_depth = depth_index.get(n_depth), n_depth + 1
                    slot = 'depth'
                if k is None:
                    continue
                msg = self._deserialize(reader, raw, conn)
                where = f'{self.path} {conn.topic} at {self._key(_header_ns(msg))}'
                arr = image_to_array(msg, where)
                try:
                    convert = encodings.to_rgb if slot == 'rgb' else _as_depth
                    pending.setdefault(k, {})[slot] = convert(arr, msg.encoding)
                except InputError as exc:
                    raise InputError(f'{exc} ({conn.topic})', self.path) from None
                while next_k in pending and ('depth' in pending[next_k] or not self.has_depth) \
                        and 'rgb' in pending[next_k]:
                    yield self._frame(next_k, pending.pop(next_k))
                    next_k += 1

    def _frame(self, k: int, parts: dict) -> Frame:
        a, b = self._pairs[k]
        rgb, depth = parts['rgb'], parts.get('depth')
        if depth is not None and depth.shape != rgb.shape[:2]:
            raise InputError(f'depth size {depth.shape[1]}x{depth.shape[0]} differs from colour size '
                             f'{rgb.shape[1]}x{rgb.shape[0]} at stamp {self.keys[k]}', self.path)
        meta = {'source': str(self.path)}
        if b is not None:
            meta['depth_stamp'] = _ns_to_s(self._depth_ns[b])
        return Frame(stamp=self.stamps[k], rgb=rgb, depth=depth, K=self.K, key=self.keys[k], meta=meta)


def read_bag(path, max_dt: float = 0.02, K=None, **topics) -> BagFrames:
    """Open a TUM-style ROS 1 ``.bag`` or ROS 2 bag directory as a stream of Frames (see :class:`BagFrames`)."""
    return BagFrames(path, max_dt=max_dt, K=K, **topics)
