"""recon_node on a TUM RGB-D bag (ROS 1 .bag or ROS 2 bag directory), replayed with /clock.

    ros2 launch dynrecon_ros tum_replay.launch.py bag:=rgbd_dataset_freiburg3_walking_xyz.bag rate:=0.5

Uses config/tum.yaml (TUM topic remappings, fr3 intrinsics) and `dynrecon replay --clock` (or
`ros2 bag play --clock` with player:=ros2, for ROS 2 bags), the node with use_sim_time. A bag written by
`dynrecon render` carries its sensor timing (rolling shutter, depth delay) in a file beside it, which is
passed on to the node (:func:`sensor_timing_arguments`).
"""
from __future__ import annotations

import importlib.util
import pathlib
import sys

_HERE = pathlib.Path(__file__).resolve().parent


def _recon_launch():
    spec = importlib.util.spec_from_file_location('dynrecon_recon_launch', _HERE / 'recon.launch.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# The camera topics only: TUM's bags also carry /tf (the motion-capture rig: world -> kinect), which would
# clash with the node's own /tf; it is ground truth, not input.
TUM_TOPICS = ['/camera/rgb/image_color', '/camera/depth/image', '/camera/rgb/camera_info', '/camera/depth/camera_info']


def replay_command(bag: str, rate: float | str = 1.0, player: str = 'dynrecon', loop: bool | str = False,
                   delay: float | str = 2.0) -> list[str]:
    """The bag player's command line (pure; tested without launch)."""
    loop = str(loop).lower() in ('true', '1', 'yes')
    if player == 'ros2':
        cmd = ['ros2', 'bag', 'play', str(bag), '--clock', '--rate', str(rate), '--delay', str(delay),
               '--topics', *TUM_TOPICS]
        return cmd + (['--loop'] if loop else [])
    cmd = [sys.executable, '-m', 'dynrecon_ros.cli', 'replay', str(bag), '--clock', '--rate', str(rate),
           '--delay', str(delay), '--wait-subscribers', '30', '--topics', *TUM_TOPICS]
    return cmd + (['--loop'] if loop else [])


def sensor_timing_arguments(bag: str) -> list[str]:
    """``-p`` arguments giving the node the sensor timing stored with a bag (`dynrecon render` writes it:
    ``sensor.yaml`` inside a ROS 2 bag directory, ``NAME.sensor.yaml`` beside ``NAME.bag``); [] without one
    (a bag has no field for it; a real sensor's timing goes in the config). The file is found and checked as
    `dynrecon run` does it (dynrecon_ros.data.bags / tum). Pure; tested without launch."""
    from dynrecon_ros.data.bags import sensor_timing_path
    from dynrecon_ros.data.tum import optional_sensor_timing
    _, timing = optional_sensor_timing(sensor_timing_path(bag))
    return [a for key, value in (timing or {}).items() for a in ('-p', f'pipeline.backend.{key}:={value!r}')]


def generate_launch_description():
    from launch import LaunchDescription
    from launch.actions import DeclareLaunchArgument, ExecuteProcess, OpaqueFunction
    recon = _recon_launch()

    def actions(context):
        get = context.launch_configurations.get
        cmd = [recon.executable_path()] + recon.node_arguments(get('config'), get('backend', ''),
                                                               get('checkpoint', ''), get('namespace', ''), True)
        cmd += sensor_timing_arguments(get('bag'))
        return [ExecuteProcess(cmd=cmd, name=recon.NODE_NAME, output='screen', sigterm_timeout='30'),
                ExecuteProcess(cmd=replay_command(get('bag'), get('rate', '1.0'), get('player', 'dynrecon'),
                                                  get('loop', 'false'), get('delay', '2.0')),
                               name='replay', output='screen')]
    return LaunchDescription([
        DeclareLaunchArgument('bag', description='TUM bag: ROS 1 .bag file or ROS 2 bag directory'),
        DeclareLaunchArgument('rate', default_value='1.0', description='playback rate'),
        DeclareLaunchArgument('loop', default_value='false', description='loop the bag'),
        DeclareLaunchArgument('player', default_value='dynrecon', description="'dynrecon' or 'ros2' (ros2 bag play)"),
        DeclareLaunchArgument('delay', default_value='2.0',
                              description='seconds the player waits before the first message (after the node '
                                          'subscribes, with the dynrecon player): time for other nodes, a /tf '
                                          'listener or a recorder, to match the node\'s outputs'),
        DeclareLaunchArgument('config', default_value=str(recon.share_dir() / 'config' / 'tum.yaml')),
        DeclareLaunchArgument('backend', default_value=''),
        DeclareLaunchArgument('checkpoint', default_value=''),
        DeclareLaunchArgument('namespace', default_value=''),
        OpaqueFunction(function=actions),
    ])
