"""Launch recon_node with a params file, remappings and the usual arguments.

    ros2 launch dynrecon_ros recon.launch.py config:=/path/to/recon.yaml backend:=... checkpoint:=... \
        namespace:=robot1 use_sim_time:=true image:=/camera/color/image_raw depth:=/camera/depth/image_rect_raw \
        camera_info:=/camera/color/camera_info
    # compressed inputs (a remote robot): a config with use_compressed / use_compressed_depth true, and
    #   image_compressed:=/camera/color/image_raw/compressed depth_compressedDepth:=/camera/.../compressedDepth

The node's command line is built by the pure function :func:`node_arguments` (no launch import), so it
is testable where `launch` is not installable; the launch description only wraps it.
"""
from __future__ import annotations

import os
import pathlib
import shutil

PACKAGE = 'dynrecon_ros'
EXECUTABLE = 'recon_node'
NODE_NAME = 'dynrecon'
# Input names the node subscribes (image/compressed with use_compressed, depth/compressedDepth with
# use_compressed_depth); each gets a launch argument, `/` written `_` (image_compressed, depth_compressedDepth).
TOPICS = ('image', 'image/compressed', 'depth', 'depth/compressedDepth', 'camera_info')
# A params file may carry remappings for the node under this pseudo-node name (tum.yaml does): no node
# has this name, so the ROS params parser ignores it; node_arguments turns it into `-r from:=to`.
REMAP_SECTION = 'dynrecon_remappings'


def share_dir() -> pathlib.Path:
    """The package's share directory when installed (colcon), else the source tree."""
    try:
        from ament_index_python.packages import get_package_share_directory
        return pathlib.Path(get_package_share_directory(PACKAGE))
    except Exception:  # noqa: BLE001 - no ament index: running from the source tree
        return pathlib.Path(__file__).resolve().parents[1]


def config_remappings(config: str | os.PathLike) -> list[tuple[str, str]]:
    """Remappings stored in a params file under ``dynrecon_remappings: ros__parameters:``."""
    import yaml
    with open(config) as f:
        doc = yaml.safe_load(f) or {}
    section = (doc.get(REMAP_SECTION) or {}).get('ros__parameters') or {}
    return [(str(k), str(v)) for k, v in section.items()]


def node_arguments(config: str | os.PathLike, backend: str = '', checkpoint: str = '', namespace: str = '',
                   use_sim_time: bool | str = False,
                   remappings: list[tuple[str, str]] | dict | None = None) -> list[str]:
    """The node's arguments: ``--ros-args --params-file CONFIG -r __ns:=NS -r from:=to ... -p name:=value``.

    Remappings come from the config's ``dynrecon_remappings`` section, then ``remappings`` (which win).
    An empty remapping (a launch argument left at its default ``''``) leaves the config's alone, as empty
    ``backend``/``checkpoint``/``namespace`` leave the params file's values alone.
    """
    args = ['--ros-args', '--params-file', str(config)]
    remaps = dict(config_remappings(config))
    given = remappings.items() if isinstance(remappings, dict) else (remappings or [])
    remaps.update({src: dst for src, dst in given if dst})
    if namespace:
        args += ['-r', f"__ns:=/{namespace.strip('/')}"]
    for src, dst in remaps.items():
        args += ['-r', f'{src}:={dst}']
    if backend:
        args += ['-p', f'backend:={backend}']
    if checkpoint:
        args += ['-p', f'checkpoint:={checkpoint}']
    sim = str(use_sim_time).lower() in ('true', '1', 'yes')
    args += ['-p', f'use_sim_time:={"true" if sim else "false"}']
    return args


def executable_path() -> str:
    """recon_node as colcon installs it (lib/dynrecon_ros/recon_node), else from PATH."""
    try:
        from ament_index_python.packages import get_package_prefix
        path = pathlib.Path(get_package_prefix(PACKAGE)) / 'lib' / PACKAGE / EXECUTABLE
        if path.exists():
            return str(path)
    except Exception:  # noqa: BLE001
        pass
    return shutil.which(EXECUTABLE) or EXECUTABLE


def launch_arguments():
    """(name, default, description) of this launch file's arguments."""
    return [
        ('config', str(share_dir() / 'config' / 'recon.yaml'), 'params file for recon_node'),
        ('backend', '', 'pointmap backend (empty: from config)'),
        ('checkpoint', '', 'checkpoint file (empty: from config)'),
        ('namespace', '', 'namespace of the node'),
        ('use_sim_time', 'false', 'use /clock (bag replay with --clock)'),
    ] + [(t.replace('/', '_'), '', f"topic to remap the input `{t}` to (empty: the config's remap, if any)")
         for t in TOPICS]


def node_action(context):
    """The node process for resolved launch arguments (called from an OpaqueFunction)."""
    from launch.actions import ExecuteProcess
    get = lambda name: context.launch_configurations.get(name, '')  # noqa: E731
    remaps = {t: get(t.replace('/', '_')) for t in TOPICS}
    cmd = [executable_path()] + node_arguments(get('config'), get('backend'), get('checkpoint'), get('namespace'),
                                               get('use_sim_time'), remaps)
    return [ExecuteProcess(cmd=cmd, name=NODE_NAME, output='screen', sigterm_timeout='30')]


def generate_launch_description():
    from launch import LaunchDescription
    from launch.actions import DeclareLaunchArgument, OpaqueFunction
    return LaunchDescription(
        [DeclareLaunchArgument(n, default_value=d, description=desc) for n, d, desc in launch_arguments()]
        + [OpaqueFunction(function=node_action)])
