"""`recon_node`: the ROS 2 node, a thin adapter over :class:`dynrecon_ros.reconstructor.Reconstructor`.

Inputs (relative names, remap them): ``image`` (or ``image/compressed``), ``depth`` (or
``depth/compressedDepth``), ``camera_info``. Outputs (:mod:`dynrecon_ros.ros.publishers`, which states
their QoS): ``/tf``, ``~/dynamic_mask``, ``~/depth``, ``~/camera_info``, ``~/pose``, ``~/path``,
``~/odom``, ``~/static_map``; service ``~/save_map``. Callbacks only validate, convert and enqueue; one
worker thread runs the pipeline (see :mod:`dynrecon_ros.ros.worker`), with ``pipeline.overlap`` over two
threads (:class:`dynrecon_ros.pipelining.FramePipeline`: the worker prepares frame t+1 while a stage
thread finishes frame t; an output thread publishes). Every ``stats_period`` s the node logs the input,
published and dropped rates and the latency from an image's stamp to its mask and pose being
published (p50/p95, output_lag included).
"""
from __future__ import annotations

import collections
import os
import re
import signal
import sys
import threading
import time

import numpy as np
import rclpy
import rclpy.duration
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.exceptions import ParameterException
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import Header
from std_srvs.srv import Trigger

from dynrecon_ros.errors import InputError
from dynrecon_ros.frames import Frame
from dynrecon_ros.memory import MALLOC_TRIM, resident_mib, trim_heap
from dynrecon_ros.pipelining import FramePipeline
from dynrecon_ros.ros import conversions as conv
from dynrecon_ros.ros.inputs import InputFrame, StampPairer
from dynrecon_ros.ros.parameters import (CONFIG_AT_NODE_LEVEL, NODE_PARAMETERS, PIPELINE_PREFIX, flatten,
                                        pipeline_config, pipeline_defaults, ros_value)
from dynrecon_ros.ros.publishers import (FrameImagePublisher, MapPublisher, OdometryPublisher, PathPublisher,
                                        PosePublisher)
from dynrecon_ros.ros.qos import input_qos, use_large_shm_segment
from dynrecon_ros.ros.tf import MODES, ExtrinsicSource, TransformBroadcaster, navigation_pose, stamped
from dynrecon_ros.ros.worker import DropOldestQueue, LatencyStats, Worker

NODE_NAME = 'dynrecon'
class ReconNode(Node):
    """The reconstruction node. ``reconstructor_factory(config, backend, checkpoint, device, log)``
    builds the pipeline (the default builds :class:`Reconstructor`)."""

    def __init__(self, name: str = NODE_NAME, reconstructor_factory=None, **kwargs):
        super().__init__(name, **kwargs)
        self._factory = reconstructor_factory or self._default_factory
        self._declare_parameters()
        p = self._param
        self.map_frame, self.odom_frame, self.base_frame = p('map_frame'), p('odom_frame'), p('base_frame')
        self.camera_frame = p('camera_frame')
        self.tf_mode = p('publish_tf_mode') if p('publish_tf') else 'none'
        if self.tf_mode not in MODES:
            self.get_logger().warning(f"publish_tf_mode '{self.tf_mode}' is not one of {MODES}: /tf disabled")
        self.rgbd_slop = float(p('rgbd_slop'))
        self._override_info = None
        fx, fy, cx, cy, cw, ch = (float(v) for v in p('camera_intrinsics'))
        if fx > 0 and fy > 0:
            K = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])
            self._override_info = (K, np.asarray(p('camera_distortion'), dtype=np.float64), (int(cw), int(ch)))
        self._warned: dict[tuple, float] = {}
        self._lock = threading.Lock()  # guards the reconstructor (stage thread vs worker vs save_map service)
        self._rec = self._make_reconstructor()
        self._pipe = FramePipeline(self._rec, self._on_results, self._on_worker_error,
                                   overlap=self._config.overlap, lock=self._lock)
        changed = {k: v for k, v in flatten(self._config.to_dict()).items()
                   if v != self._config_defaults.get(k, (v,))[0]}
        self.get_logger().info('pipeline settings changed from the defaults: '
                               + (', '.join(f'{k}={v!r}' for k, v in changed.items()) or 'none'))

        # state touched by callbacks (single-threaded executor) and read by the worker
        self._last_info: tuple[np.ndarray, np.ndarray, tuple[int, int]] | None = None
        self._before_info: tuple | None = None  # (header, rgb, depth) of the latest frame before any camera_info
        self._last_stamp: dict[str, float] = {}
        self._pairs = StampPairer(self.rgbd_slop, depth_delay=self._config.backend.depth_delay_s)
        self._first_image_time: float | None = None
        self._last_pair_time: float | None = None  # monotonic time of the last image paired with a depth
        self._undistorter: conv.Undistorter | None = None
        self._headers: collections.OrderedDict = collections.OrderedDict()  # key -> (header, (W, H), info)
        self._headers_lock = threading.Lock()  # worker adds, the output thread takes
        self._latency = LatencyStats()
        self._drop_report = (time.monotonic(), 0, 0)
        self._last_map_pub = 0.0
        self._map_dirty = False
        self._last_trim = time.monotonic()
        self._nav_origin: np.ndarray | None = None
        self.extrinsic = ExtrinsicSource(self, p('base_to_camera'))

        # outputs
        self.tf = TransformBroadcaster(self)
        self.images = FrameImagePublisher(self)
        self.pose = PosePublisher(self)
        self.path = PathPublisher(self, p)
        self.odom = OdometryPublisher(self, p)
        self.map = MapPublisher(self)
        self.srv_save = self.create_service(Trigger, '~/save_map', self._on_save_map)
        # ~/path, ~/static_map and the heap trim cost in proportion to the path and the map: a thread of
        # their own, so that they never hold up a frame's mask and pose
        self._periodic_lock = threading.Lock()
        self._periodic_stop = threading.Event()
        self._periodic = threading.Thread(target=self._run_periodic, name='dynrecon-periodic', daemon=True)
        self._periodic.start()

        # inputs
        qos = input_qos(p('qos_reliable'), p('queue_size'))
        if p('use_compressed'):
            self.sub_image = self.create_subscription(CompressedImage, 'image/compressed', self._on_compressed, qos)
        else:
            self.sub_image = self.create_subscription(Image, 'image', self._on_image, qos)
        self.sub_info = self.create_subscription(CameraInfo, 'camera_info', self._on_info, qos)
        self.sub_depth = None
        if p('use_depth') and p('use_compressed_depth'):
            self.sub_depth = self.create_subscription(CompressedImage, 'depth/compressedDepth',
                                                      self._on_compressed_depth, qos)
        elif p('use_depth'):
            self.sub_depth = self.create_subscription(Image, 'depth', self._on_depth, qos)

        self.queue = DropOldestQueue(p('queue_size'))
        self._dropped_seen = 0  # the queue's drops when the worker took its last frame (track_when_behind)
        self._tracked = 0  # frames published that were tracked between window steps
        self.worker = Worker(self.queue, self._process, self._on_worker_error, on_idle=self._flush,
                             idle_after=float(p('idle_flush')), ready=lambda t: self._pipe.wait_ready(t))
        self.worker.start()
        period = float(p('stats_period'))
        self._stats_at = (time.monotonic(), 0, 0, 0)  # (time, received, published, dropped)
        if period > 0:
            self._stats_timer = self.create_timer(period, self._log_stats)
        self.get_logger().info(
            f'ready: image={self._topic(self.sub_image)} depth='
            f'{self._topic(self.sub_depth) if self.sub_depth else "(off)"} '
            f'camera_info={self._topic(self.sub_info)} tf_mode={self.tf_mode} queue_size={p("queue_size")} '
            f'qos={"reliable" if p("qos_reliable") else "sensor_data"} '
            f'overlap={"on (two threads)" if self._config.overlap else "off"}')

    # ------------------------------------------------------------ parameters
    def _param(self, name: str):
        return self.get_parameter(name).value

    def _declare_parameters(self) -> None:
        for name, (default, desc) in NODE_PARAMETERS.items():
            self.declare_parameter(name, default, ParameterDescriptor(description=desc))
        self._config_defaults = pipeline_defaults()
        for key, (default, desc) in self._config_defaults.items():
            if key in CONFIG_AT_NODE_LEVEL:
                continue
            self.declare_parameter(PIPELINE_PREFIX + key, ros_value(default),
                                   ParameterDescriptor(description=desc, dynamic_typing=True))

    def pipeline_config(self):
        """ReconConfig built from the declared ``pipeline.*`` parameters (and ``backend``/``checkpoint``)."""
        return pipeline_config(self._param)

    def _default_factory(self, config, backend: str, checkpoint: str, device: str, log):
        from dynrecon_ros.reconstructor import Reconstructor
        return Reconstructor(config, device=device, log=log)

    def _output_lag(self) -> int:
        """Frames a result is held for the window: the reconstructor's (a rolling shutter raises it), else the config's."""
        return getattr(self._rec, 'cfg', self._config).window.output_lag

    def _make_reconstructor(self):
        self._config = self.pipeline_config()
        return self._factory(self._config, self._param('backend'), self._param('checkpoint'),
                             self._param('device'), lambda msg: self.get_logger().info(str(msg)))

    # ------------------------------------------------------------ warnings
    @staticmethod
    def _topic(sub) -> str:
        return sub.topic_name if sub is not None else ''

    def warn(self, topic: str, problem: str) -> None:
        """Warning naming the topic and the problem, throttled per (topic, kind of problem)."""
        key = (topic, re.sub(r'[-+0-9.e]+', '#', problem))
        now = time.monotonic()
        if now - self._warned.get(key, -1e9) >= float(self._param('warn_throttle')):
            self._warned[key] = now
            self.get_logger().warning(f'{topic}: {problem}; message dropped')

    def _check_stamp(self, topic: str, header: Header) -> bool:
        """False (with a warning) when the stamp goes backwards on ``topic``; a big jump back is a reset."""
        t = conv.stamp_to_sec(header.stamp)
        last = self._last_stamp.get(topic)
        if last is not None and t < last:
            if last - t > float(self._param('time_jump_reset')):
                self.get_logger().warning(f'{topic}: time jumped back {last - t:.3f} s (bag loop?): '
                                          'resetting the reconstruction')
                self._reset_inputs()
                self._last_stamp = {topic: t}
                return True
            self.warn(topic, f'stamp going backwards ({t:.6f} < previous {last:.6f})')
            return False
        self._last_stamp[topic] = t
        return True

    def _reset_inputs(self) -> None:
        self._pairs.clear()
        self.queue.put(InputFrame(Header(), np.zeros((1, 1, 3), np.uint8), None, None, None, reset=True))

    # ------------------------------------------------------------ callbacks (no inference here)
    def _convert(self, topic: str, convert, msg):
        """``convert(msg)``, or None after a throttled warning naming the topic and the problem."""
        try:
            return convert(msg)
        except InputError as exc:
            self.warn(topic, str(exc))
            return None

    def _on_info(self, msg: CameraInfo) -> None:
        info = self._convert(self._topic(self.sub_info), conv.camera_info_to_numpy, msg)
        if info is not None:
            self._last_info = info
            if self._before_info is not None:  # the frame that came before the first camera_info
                pending, self._before_info = self._before_info, None
                self._enqueue(*pending)

    def _on_image(self, msg: Image) -> None:
        topic = self._topic(self.sub_image)
        rgb = self._convert(topic, conv.image_to_rgb, msg)
        if rgb is not None:
            self._accept_rgb(topic, msg.header, rgb)

    def _on_compressed(self, msg: CompressedImage) -> None:
        topic = self._topic(self.sub_image)
        rgb = self._convert(topic, conv.compressed_to_rgb, msg)
        if rgb is not None:
            self._accept_rgb(topic, msg.header, rgb)

    def _on_depth(self, msg: Image) -> None:
        self._accept_depth(msg.header, self._convert(self._topic(self.sub_depth), conv.image_to_depth, msg))

    def _on_compressed_depth(self, msg: CompressedImage) -> None:
        self._accept_depth(msg.header, self._convert(self._topic(self.sub_depth), conv.compressed_depth_to_depth,
                                                     msg))

    def _accept_depth(self, header: Header, depth: np.ndarray | None) -> None:
        topic = self._topic(self.sub_depth)
        if depth is None:
            return
        if not self._check_stamp(topic, header):
            return
        match = self._pairs.add_depth(conv.stamp_to_sec(header.stamp), depth)
        if match is not None:
            self._pair(*match, depth, topic)

    def _accept_rgb(self, topic: str, header: Header, rgb: np.ndarray) -> None:
        if not self._check_stamp(topic, header):
            return
        if self._first_image_time is None:
            self._first_image_time = time.monotonic()
        if self.sub_depth is None:
            self._enqueue(header, rgb, None)
            return
        depth = self._pairs.add_rgb(conv.stamp_to_sec(header.stamp), (header, rgb))
        if depth is None:
            now = time.monotonic()
            if now - max(self._first_image_time, self._last_pair_time or 0.0) > 3.0:  # nothing paired for 3 s
                self.warn(self._topic(self.sub_depth), 'no depth image paired with the images '
                          '(set use_depth:=false for monocular input or check rgbd_slop)')
            return
        self._pair(header, rgb, depth, self._topic(self.sub_depth))

    def _pair(self, header: Header, rgb: np.ndarray, depth: np.ndarray, depth_topic: str) -> None:
        if depth.shape != rgb.shape[:2]:
            self.warn(depth_topic, f'depth of size {depth.shape[1]}x{depth.shape[0]} differs from the image '
                      f'size {rgb.shape[1]}x{rgb.shape[0]}')
            return
        self._last_pair_time = time.monotonic()
        self._enqueue(header, rgb, depth)

    def _enqueue(self, header: Header, rgb: np.ndarray, depth: np.ndarray | None) -> None:
        K = D = None
        info = self._override_info or self._last_info
        if info is not None:
            K, D, size = info
            w, h = rgb.shape[1], rgb.shape[0]
            if size != (w, h) and size[0] > 0 and size[1] > 0:  # camera_info for another resolution
                K = K.copy()
                K[0] *= w / size[0]
                K[1] *= h / size[1]
        elif self._param('wait_for_camera_info'):
            # a driver's camera_info and image travel on separate topics, so the first image can come a
            # moment before the first camera_info: the latest such frame waits for it, older ones are dropped
            if self._before_info is not None:
                self.warn(self._topic(self.sub_info), 'no camera_info received yet (waiting; set '
                          'wait_for_camera_info:=false to run without intrinsics)')
            self._before_info = (header, rgb, depth)
            return
        # the node's clock, as the stamp's: under use_sim_time both are bag time (wall time minus a bag
        # stamp is the recording's age, ~1e8 s, not a transport delay); no /clock yet (0): not measured
        now_ns = self.get_clock().now().nanoseconds
        transport = now_ns * 1e-9 - conv.stamp_to_sec(header.stamp) if now_ns > 0 else None
        dropped = self.queue.put(InputFrame(header, rgb, depth, K, D, received=time.monotonic(), transport=transport))
        if dropped:
            self._report_drops()

    def _report_drops(self) -> None:
        t0, recv0, drop0 = self._drop_report
        now = time.monotonic()
        if now - t0 >= float(self._param('warn_throttle')):
            q = self.queue
            rate = (q.dropped - drop0) / max(1, q.received - recv0)
            self.get_logger().warning(
                f'worker behind: dropped {q.dropped - drop0} of {q.received - recv0} frames in the last '
                f'{now - t0:.1f} s ({100 * rate:.0f} %), {q.dropped} in total (queue_size {q.maxsize})')
            self._drop_report = (now, q.received, q.dropped)

    # ------------------------------------------------------------ worker thread
    def _on_worker_error(self, item, exc: BaseException) -> None:
        """Worker, stage and output threads: a frame's error (``item`` an InputFrame, a Frame or None)."""
        if isinstance(item, InputFrame):
            stamp = conv.stamp_to_sec(item.header.stamp)
        else:
            stamp = float(getattr(item, 'stamp', float('nan')))
            key = getattr(item, 'key', None)
            if key is not None:
                with self._headers_lock:
                    self._headers.pop(key, None)
        if isinstance(exc, InputError):
            self.warn(self._topic(self.sub_image), f'frame {stamp:.6f} rejected: {exc}')
        else:
            import traceback
            self.get_logger().error(f'pipeline failed on frame {stamp:.6f}: {exc!r}\n'
                                    + ''.join(traceback.format_exception(exc)))

    def _process(self, item: InputFrame) -> None:
        if item.reset:
            self._pipe.drain()  # the old stream's frames through (and published) first
            with self._lock:
                self._rec = self._pipe.rec = self._make_reconstructor()
            self._nav_origin = None
            self.odom.reset()
            with self._headers_lock:
                self._headers.clear()
            self.path.reset()
            return
        rgb, depth, K = item.rgb, item.depth, item.K
        if K is not None and item.D is not None and self._param('undistort') and np.any(item.D):
            size = (rgb.shape[1], rgb.shape[0])
            if self._undistorter is None or self._undistorter.key != (K.tobytes(), item.D.tobytes(), size):
                self._undistorter = conv.Undistorter(K, item.D, size)
            rgb = self._undistorter(rgb)
            depth = self._undistorter(depth, nearest=True) if depth is not None else None
        stamp = conv.stamp_to_sec(item.header.stamp)
        frame = Frame(stamp=stamp, rgb=rgb, depth=depth, K=K, key=f'{stamp:.9f}')
        with self._headers_lock:
            self._headers[frame.key] = (item.header, (rgb.shape[1], rgb.shape[0]), K)
            while len(self._headers) > 256:  # results normally come back within a window: bound the memory
                self._headers.popitem(last=False)
        if item.received is not None:
            self._pipe.trace.mark(frame.key, 'received', item.received)
            if item.transport is not None:
                self._pipe.trace.mark(frame.key, 'transport', item.transport)
        behind = None  # (the fixed rhythm of pipeline.window.step_every)
        if self._param('track_when_behind'):  # behind: a frame dropped since the last one taken, or one waiting
            dropped = self.queue.dropped
            behind = True if dropped > self._dropped_seen or len(self.queue) else None
            self._dropped_seen = dropped
        self._pipe.submit(frame, behind=behind)  # results to _on_results (output thread; with overlap off, first)

    def _on_results(self, results) -> None:
        """Output thread (worker thread with overlap off): publish one frame's final results."""
        self._publish_results(results)
        if results:
            self._map_dirty = True  # (the periodic thread sends the map only after new frames)

    def _run_periodic(self) -> None:
        """Periodic thread: ~/path at publish_path_rate, ~/static_map at publish_map_rate, heap trim."""
        while not self._periodic_stop.wait(0.02):
            try:
                with self._periodic_lock:
                    self.path.maybe_publish()
                    self._maybe_publish_map()
                    self._maybe_trim_memory()
            except Exception as exc:  # noqa: BLE001 - reported (throttled), the node keeps running
                self.warn('~/static_map and ~/path', f'periodic publishing failed: {exc!r}')

    def _maybe_trim_memory(self) -> None:
        """Periodic thread (and flushes): return freed heap memory to the OS every ``trim_memory_period`` s."""
        period = float(self._param('trim_memory_period'))
        now = time.monotonic()
        if MALLOC_TRIM is None or period <= 0 or now - self._last_trim < period:
            return
        self._last_trim = now
        trim_heap()
        self.get_logger().debug(f'memory: resident {resident_mib():.1f} MiB after malloc_trim')

    def _flush(self) -> None:
        """Worker thread, input idle: publish what the pipeline still holds, then the map."""
        results = self._pipe.flush()
        self._publish_results(results)
        with self._periodic_lock:
            self.path.maybe_publish(force=True)
            self.publish_map()
            self._maybe_trim_memory()
        q = self.queue
        self.get_logger().info(f'input idle: flushed {len(results)} results; frames received {q.received}, '
                               f'processed {self.worker.processed}, dropped {q.dropped}')

    def _publish_results(self, results) -> None:
        for r in results:
            with self._headers_lock:
                entry = self._headers.pop(r.key, None)
            if entry is None:
                continue
            header, size, K_in = entry
            if r.status != 'ok' or r.pose is None:
                self.get_logger().debug(f'frame {r.key} skipped: {r.reason}')
                continue
            self._publish_frame(r, header, size, K_in)
            self._tracked += r.tracked

    def _publish_frame(self, r, header: Header, size: tuple[int, int], K_in) -> None:
        T_w_c = np.asarray(r.pose, dtype=np.float64)
        if not np.all(np.isfinite(T_w_c)):
            self.get_logger().warning(f'frame {r.key}: non-finite pose from the pipeline; not published')
            return
        camera = self.camera_frame or header.frame_id or 'camera'
        self.images.publish(header, size, r.mask, r.depth, r.K, K_in)
        if self.tf_mode == 'navigation':
            T_b_c = self.extrinsic.lookup(self.base_frame, camera)
            if self._nav_origin is None:
                self._nav_origin = T_w_c
            T_o_b = navigation_pose(self._nav_origin, T_w_c, T_b_c)
            odom_header = Header(stamp=header.stamp, frame_id=self.odom_frame)
            self.tf.send_transform(stamped(T_o_b, odom_header, self.base_frame))
            self.odom.publish(odom_header, T_o_b, self.base_frame)
            pose_header, T_pose = odom_header, T_o_b @ T_b_c
        else:
            pose_header = Header(stamp=header.stamp, frame_id=self.map_frame)
            T_pose = T_w_c
            if self.tf_mode == 'standalone':
                self.tf.send_transform(stamped(T_w_c, pose_header, camera))
            self.odom.publish(pose_header, T_w_c, camera)
        self.path.append(self.pose.publish(pose_header, T_pose))
        self._pipe.trace.mark(r.key, 'published')
        self._latency.add(self.get_clock().now().nanoseconds * 1e-9 - conv.stamp_to_sec(header.stamp))

    def _log_stats(self) -> None:
        """Timer: rates, drops and the stamp-to-publish latency since the last stats line."""
        t0, recv0, pub0, drop0 = self._stats_at
        now, q = time.monotonic(), self.queue
        pub = self._latency.count
        self._stats_at = (now, q.received, pub, q.dropped)
        dt = max(now - t0, 1e-6)
        if q.received == recv0 and pub == pub0:
            return  # nothing came: stay quiet
        self.get_logger().info(
            f'stats: last {dt:.1f} s: received {(q.received - recv0) / dt:.1f} frames/s, published '
            f'{(pub - pub0) / dt:.1f}/s, dropped {q.dropped - drop0} of {q.received - recv0} in the queue; '
            + self._latency.line(self._output_lag()))

    def _maybe_publish_map(self, force: bool = False) -> None:
        rate = float(self._param('publish_map_rate'))
        now = time.monotonic()
        if not force and (rate <= 0 or not self._map_dirty or now - self._last_map_pub < 1.0 / rate):
            return
        self._last_map_pub = now
        self._map_dirty = False
        self.publish_map(wait=force)

    def publish_map(self, wait: bool = True) -> None:
        """~/static_map; ``wait``: with the frames queued on the map thread (holds the pipeline's lock while
        they are integrated); False (the periodic publishing): the map as integrated so far, without
        holding up stage B."""
        if wait:
            with self._lock:
                points = self._rec.static_map()
        else:
            points = self._rec.static_map(wait=False)
        header = Header(stamp=self._last_output_stamp(), frame_id=self.map_frame)
        self.map.publish(points, header)

    def _last_output_stamp(self):
        return self.path.last_stamp() or self.get_clock().now().to_msg()

    def _on_save_map(self, request, response):
        path = self._param('save_map_path') or 'static_map.ply'
        try:
            with self._lock:
                self._rec.save_map(path)
            response.success, response.message = True, f'static map written to {os.path.abspath(path)}'
        except Exception as exc:  # noqa: BLE001 - reported to the caller, the node keeps running
            response.success, response.message = False, f'cannot write {path}: {exc}'
        return response

    # ------------------------------------------------------------ shutdown
    def finish(self, publish: bool = True) -> None:
        """Stop the worker, flush the pipeline, publish the last results/map, save the map if asked."""
        self.worker.stop()
        self._periodic_stop.set()
        self._periodic.join(10.0)
        try:
            results = self._pipe.flush()
        except Exception as exc:  # noqa: BLE001
            self.get_logger().error(f'flush failed: {exc!r}')
            results = []
        self._pipe.close()
        if publish:
            try:
                self._publish_results(results)
                self.path.maybe_publish(force=True)
                self.publish_map()
                for pub in (self.map.pub, self.images.mask, self.tf.pub):  # let reliable subscribers get the tail
                    pub.wait_for_all_acked(rclpy.duration.Duration(seconds=2.0))
            except Exception as exc:  # noqa: BLE001 - shutting down: report, still save the map
                print(f'[{self.get_name()}] final publish failed: {exc!r}', file=sys.stderr, flush=True)
        path = self._param('save_map_path')
        if path:
            with self._lock:
                self._rec.save_map(path)
            print(f'[{self.get_name()}] static map written to {path}', file=sys.stderr, flush=True)
        q = self.queue
        voxels = getattr(getattr(self._rec, 'map', None), '__len__', None)
        print(f'[{self.get_name()}] frames received {q.received}, processed {self.worker.processed}, '
              f'dropped {q.dropped}, queue high water {q.high_water}, tracked {self._tracked}'
              + (f', static map {voxels()} voxels' if voxels is not None else '')
              + f'; published {self._latency.count}, ' + self._latency.line(self._output_lag(), total=True),
              file=sys.stderr, flush=True)
        print(f'[{self.get_name()}] {self._pipe.trace.line()}', file=sys.stderr, flush=True)


EXECUTORS = ('events', 'single')


def make_executor(name: str):
    """The rclpy executor named by the ``executor`` parameter: 'events' (rclpy.experimental.EventsExecutor,
    whose wait loop is C++) or 'single' (rclpy.executors.SingleThreadedExecutor). InputError for others."""
    if name not in EXECUTORS:
        raise InputError(f"executor must be one of {', '.join(repr(e) for e in EXECUTORS)}, got {name!r}")
    if name == 'events':
        from rclpy.experimental import EventsExecutor
        return EventsExecutor()
    from rclpy.executors import SingleThreadedExecutor
    return SingleThreadedExecutor()


def main(args: list[str] | None = None) -> int:
    """Console script ``recon_node``.

    Ctrl-C and SIGTERM only set a flag: the DDS context stays valid while the node stops the worker,
    flushes the pipeline, publishes the last results and map and writes ``save_map_path``.
    """
    use_large_shm_segment()  # before this process's first DDS participant
    from rclpy.signals import SignalHandlerOptions
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    node = None
    try:
        try:
            node = ReconNode()
            executor = make_executor(node.get_parameter('executor').value)
        except (InputError, ValueError, ParameterException) as exc:  # a bad parameter: one line, exit 2 (as the CLI)
            print(f'recon_node: error: {exc}', file=sys.stderr, flush=True)
            return 2
        executor.add_node(node)
        while rclpy.ok() and not stop.is_set():
            executor.spin_once(timeout_sec=0.1)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.finish(publish=rclpy.ok())
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == '__main__':
    sys.exit(main())
