"""recon_node's parameter table, importable without rclpy (params_file.py, tests, docs).

Node-level parameters are ``NODE_PARAMETERS``; every leaf of :class:`dynrecon_ros.config.ReconConfig`
is a parameter ``pipeline.<section>.<name>`` (``pipeline_defaults``), except the two in
``CONFIG_AT_NODE_LEVEL``. ``ros_value`` / ``from_ros`` convert between config values and what a ROS
parameter can hold.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

# Node-level parameters: name -> (default, description). Pipeline settings are added from ReconConfig.
NODE_PARAMETERS: dict[str, tuple[object, str]] = {
    'queue_size': (2, 'Frames waiting for the worker; when full the oldest is dropped (and counted).'),
    'track_when_behind': (True, 'When the worker falls behind (another frame waits in its queue when it takes one, '
                          'or one was dropped since the last), that frame is tracked instead of taking the window '
                          'step (RGB-D: its pose from a few pairs, the mask of the frame before carried along the '
                          'flow; not integrated into the map), at most max(1, pipeline.window.step_every - 1) in a '
                          'row, so that fewer frames are dropped. false: only the fixed rhythm of '
                          'pipeline.window.step_every.'),
    'qos_reliable': (False, 'Subscribe to inputs with reliable QoS (false: sensor-data QoS, best effort).'),
    'backend': ('', "Pair predictor backend, pipeline backend.name ('auto', 'rgbd', 'dust3r'; empty: the "
                "pipeline's default)."),
    'checkpoint': ('', 'Checkpoint file of the network backend, pipeline backend.checkpoint (empty: default).'),
    'device': ('cpu', "Torch device for the pipeline ('cpu', 'cuda', 'cuda:1')."),
    'use_compressed': (False, 'Subscribe to image/compressed (jpeg/png) instead of image.'),
    'use_compressed_depth': (False, 'Subscribe to depth/compressedDepth (image_transport compressedDepth: PNG of '
                             '16UC1 mm or of inverse-depth quantised 32FC1) instead of depth.'),
    'use_depth': (True, 'Pair each image with a depth image (false: monocular).'),
    'wait_for_camera_info': (True, 'Hold images until a camera_info arrives: the latest one waits for it, older '
                             'ones are dropped with a warning (false: intrinsics unknown).'),
    'camera_intrinsics': ([0.0] * 6, 'Override camera_info: [fx, fy, cx, cy, width, height] of the '
                          'calibration (scaled to the image size); all zero: use camera_info.'),
    'camera_distortion': ([0.0] * 5, 'Distortion (plumb_bob k1 k2 p1 p2 k3) used with camera_intrinsics.'),
    'undistort': (True, 'Undistort image and depth when camera_info D is non-zero.'),
    'rgbd_slop': (0.02, 'Max |stamp(image) - stamp(depth)| in seconds to pair them.'),
    'map_frame': ('map', 'Fixed frame of the reconstruction (standalone tf parent, static_map frame).'),
    'odom_frame': ('odom', 'Odometry frame (navigation mode tf parent, ~/odom header).'),
    'base_frame': ('base_link', 'Robot base frame (navigation mode tf child, ~/odom child).'),
    'camera_frame': ('', "Camera frame name (empty: the image's header.frame_id)."),
    'publish_tf_mode': ('standalone', "'standalone': map_frame -> camera; 'navigation': odom_frame -> "
                        'base_frame using base_to_camera (REP-105). Anything else disables /tf.'),
    'publish_tf': (True, 'Publish /tf at all.'),
    'base_to_camera': ([0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                       'base_frame -> camera_frame extrinsic [x y z roll pitch yaw] (m, rad), used in '
                       'navigation mode when tf2_ros is unavailable or the tf tree lacks it.'),
    'odom_pose_variance': ([0.01, 0.01, 0.01, 0.005, 0.005, 0.005],
                           'Diagonal of ~/odom pose covariance (x y z roll pitch yaw).'),
    'odom_twist_variance': ([0.05, 0.05, 0.05, 0.02, 0.02, 0.02],
                            'Diagonal of ~/odom twist covariance.'),
    'save_map_path': ('', 'Write the static map here (PLY) on shutdown and on ~/save_map (empty: no file '
                      'on shutdown; the service then writes static_map.ply).'),
    'publish_map_rate': (1.0, 'Static map publish rate in Hz (0: only on shutdown/flush).'),
    'max_path_length': (10000, 'Poses kept in ~/path; the oldest are dropped beyond it (bounded memory, about '
                        '0.6 KB per pose).'),
    'publish_path_rate': (2.0, '~/path publish rate in Hz: the whole path is re-sent each time, which costs CPU '
                          'in proportion to its length (~0.2 s at 10,000 poses on a 2-core CPU), so not with '
                          'every pose (0: with every pose). Always published at a flush and on shutdown.'),
    'time_jump_reset': (1.0, 'A backwards stamp jump larger than this (s) resets the reconstruction '
                        '(bag loop); smaller backwards steps are rejected.'),
    'idle_flush': (2.0, 'Flush the pipeline (publish the results of frames still in its window, and the map) '
                   'after this many seconds without input, e.g. at the end of a bag (0: only on shutdown).'),
    'warn_throttle': (5.0, 'Seconds between repeats of the same warning.'),
    'stats_period': (10.0, 'Every this many seconds log the input and published rates, the frames dropped in the '
                     'queue and the latency from image stamp to mask and pose published (p50/p95, output_lag '
                     'included) since the last such line; silent while no input comes (0: never).'),
    'executor': ('events', "rclpy executor of the node's callbacks: 'events' (rclpy.experimental.EventsExecutor, "
                 "its wait loop in C++: 2.3 instead of 5.8 ms of CPU per received 640x480 RGB-D frame at 30 Hz "
                 "on 2 cores) or 'single' (rclpy's SingleThreadedExecutor, the Python one). Read at start."),
    'trim_memory_period': (5.0, 'Every this many seconds the worker hands freed heap memory back to the OS '
                           '(glibc malloc_trim; no effect elsewhere), so resident memory follows what is in '
                           'use (0: never).'),
}


# Pipeline settings are parameters `pipeline.<section>.<name>`; these two are node-level names instead.
PIPELINE_PREFIX = 'pipeline.'
CONFIG_AT_NODE_LEVEL = {'backend.name': 'backend', 'backend.checkpoint': 'checkpoint'}


def flatten(d: dict, prefix: str = '') -> dict[str, object]:
    """{'a': {'b': 1}} -> {'a.b': 1} (ROS parameter names for nested YAML)."""
    out = {}
    for k, v in d.items():
        name = f'{prefix}{k}'
        if isinstance(v, dict):
            out.update(flatten(v, name + '.'))
        else:
            out[name] = v
    return out


def unflatten(flat: dict[str, object]) -> dict:
    out: dict = {}
    for name, v in flat.items():
        *parents, leaf = name.split('.')
        d = out
        for p in parents:
            d = d.setdefault(p, {})
        d[leaf] = v
    return out


def ros_value(v: object) -> object:
    """Python config value -> a value a ROS parameter can hold (None -> '', tuples -> lists)."""
    if v is None:
        return ''
    if isinstance(v, tuple):
        return list(v)
    return v


def from_ros(value: object, default: object) -> object:
    """ROS parameter value -> the config field's Python type (int for float fields, '' for None)."""
    if default is None:
        return None if value in ('', None) else value
    if isinstance(default, bool):
        return bool(value)
    if isinstance(default, float) and isinstance(value, int):
        return float(value)
    if isinstance(default, tuple):
        return tuple(value)
    if isinstance(default, list) and default and isinstance(default[0], float):
        return [float(x) for x in value]
    return value


def pipeline_defaults() -> dict[str, tuple[object, str]]:
    """``{'window.size': (default, description)}`` for every leaf of ReconConfig.

    The description is the field's type and default plus the first sentence of its section's docstring
    (the config documents its fields per section)."""
    from dynrecon_ros.config import ReconConfig
    out = {}

    def walk(obj, prefix):
        doc = ' '.join((type(obj).__doc__ or '').split())
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f'{prefix}{f.name}.')
                continue
            section = prefix.rstrip('.') or 'ReconConfig'
            out[prefix + f.name] = (value, f'pipeline setting {prefix}{f.name} (default {value!r}; '
                                           f'{section}: {doc})')
    walk(ReconConfig(), '')
    return out


def pipeline_config(param: Callable[[str], object]):
    """The :class:`~dynrecon_ros.config.ReconConfig` that the node's parameters give: ``param(name)``
    returns a declared parameter's value (``pipeline.<section>.<name>``, and ``backend`` /
    ``checkpoint`` for the two in ``CONFIG_AT_NODE_LEVEL``, empty = the config's default).
    Bad values: an InputError naming the parameter."""
    from dynrecon_ros.config import ReconConfig
    flat = {}
    for key, (default, _) in pipeline_defaults().items():
        if key in CONFIG_AT_NODE_LEVEL:
            value = param(CONFIG_AT_NODE_LEVEL[key])
            flat[key] = value if value else default
        else:
            flat[key] = from_ros(param(PIPELINE_PREFIX + key), default)
    return ReconConfig.from_dict(unflatten(flat), where='parameters')
