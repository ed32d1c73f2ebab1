"""launch/recon.launch.py: the pure command-line helper, and the node started from EXACTLY that command
line (params file, remappings, namespace, -p overrides) processing frames on TUM's topics."""
import importlib.util
import pathlib
import sys

import numpy as np
import pytest
import yaml

pytest.importorskip('rclpy')
from sensor_msgs.msg import CameraInfo, Image  # noqa: E402

from dynrecon_ros.data.synthetic import SyntheticConfig, render_sequence  # noqa: E402
from dynrecon_ros.ros import conversions as conv  # noqa: E402
from dynrecon_ros.ros.qos import OUTPUT_QOS, RELIABLE_INPUT_QOS  # noqa: E402
from dynrecon_ros.ros.testing import ROOT, NodeProcess, RosHarness, domain_id_for  # noqa: E402

DOMAIN = domain_id_for(__name__)


def load(name):
    spec = importlib.util.spec_from_file_location(name.replace('.', '_'), ROOT / 'launch' / name)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


recon_launch = load('recon.launch.py')


def test_node_arguments_is_the_documented_command_line(tmp_path):
    cfg = tmp_path / 'p.yaml'
    cfg.write_text('/**:\n  ros__parameters:\n    queue_size: 3\n')
    args = recon_launch.node_arguments(cfg, backend='rgbd', checkpoint='/w/ck.pt', namespace='/robot1/',
                                       use_sim_time='true', remappings=[('image', '/cam/image_raw'), ('depth', '')])
    assert args == ['--ros-args', '--params-file', str(cfg), '-r', '__ns:=/robot1', '-r', 'image:=/cam/image_raw',
                    '-p', 'backend:=rgbd', '-p', 'checkpoint:=/w/ck.pt', '-p', 'use_sim_time:=true']
    assert recon_launch.node_arguments(cfg) == ['--ros-args', '--params-file', str(cfg), '-p', 'use_sim_time:=false']


def test_tum_yaml_remappings_and_override():
    tum = ROOT / 'config' / 'tum.yaml'
    args = recon_launch.node_arguments(tum, remappings={'depth': '/other/depth'})
    pairs = [args[i + 1] for i, a in enumerate(args) if a == '-r']
    assert pairs == ['image:=/camera/rgb/image_color', 'depth:=/other/depth', 'camera_info:=/camera/rgb/camera_info']
    params = yaml.safe_load(tum.read_text())['/**']['ros__parameters']
    assert params['camera_intrinsics'][:4] == [535.4, 539.2, 320.1, 247.6]  # fr3


def test_empty_launch_arguments_keep_the_config_remappings():
    """What node_action passes when the topic arguments are left at '': the config's remaps stay."""
    tum = ROOT / 'config' / 'tum.yaml'
    args = recon_launch.node_arguments(tum, remappings={t: '' for t in recon_launch.TOPICS})
    pairs = [args[i + 1] for i, a in enumerate(args) if a == '-r']
    assert pairs == [f'{k}:={v}' for k, v in recon_launch.config_remappings(tum)]
    assert len(pairs) == 3


def test_replay_launch_command():
    tum_launch = load('tum_replay.launch.py')
    cmd = tum_launch.replay_command('x.bag', 0.5, loop='true')
    assert cmd[:4] == [sys.executable, '-m', 'dynrecon_ros.cli', 'replay'] and '--clock' in cmd and '--loop' in cmd
    assert '/tf' not in cmd and '/camera/rgb/image_color' in cmd  # the bag's mocap /tf is not replayed
    assert tum_launch.replay_command('d', player='ros2')[:4] == ['ros2', 'bag', 'play', 'd']


def test_replay_launch_passes_a_rendered_bags_sensor_timing_to_the_node(tmp_path):
    from dynrecon_ros.data.bags import write_bag
    from dynrecon_ros.data.synthetic import SyntheticConfig, render_sequence
    tum_launch = load('tum_replay.launch.py')
    seq = render_sequence(SyntheticConfig(width=32, height=24, frames=2, rolling_shutter=0.025, depth_delay=0.01))
    for bag in (write_bag(seq, tmp_path / 's.bag'), write_bag(seq, tmp_path / 's2', ros_version=2)):
        assert tum_launch.sensor_timing_arguments(str(bag)) == [
            '-p', 'pipeline.backend.rolling_shutter_s:=0.025', '-p', 'pipeline.backend.depth_delay_s:=0.01']
    (tmp_path / 's.sensor.yaml').unlink()
    assert tum_launch.sensor_timing_arguments(str(tmp_path / 's.bag')) == []


def test_launch_description_builds_where_launch_imports():
    try:  # the repo's launch/ folder is a namespace package called `launch` too: import the real thing
        from launch import LaunchDescription  # noqa: F401
    except ImportError:
        pytest.skip('ROS launch is not installed here')
    ld = recon_launch.generate_launch_description()
    names = [a.name for a in ld.entities if hasattr(a, 'name') and hasattr(a, 'default_value')]
    assert {'config', 'backend', 'checkpoint', 'namespace', 'use_sim_time', 'image', 'image_compressed', 'depth',
            'depth_compressedDepth', 'camera_info'} <= set(names)


def recon_node_executable() -> list[str]:
    exe = pathlib.Path(sys.executable).parent / 'recon_node'
    return [str(exe)] if exe.exists() else [sys.executable, '-m', 'dynrecon_ros.ros.node']


def test_node_runs_from_the_launch_command_line(tmp_path):
    seq = render_sequence(SyntheticConfig(width=160, height=120, frames=8, movers=1, seed=1))
    args = recon_launch.node_arguments(ROOT / 'config' / 'tum.yaml', namespace='robot1', use_sim_time=False)
    ros = RosHarness(DOMAIN)
    proc = NodeProcess(recon_node_executable() + args, DOMAIN)
    try:
        assert proc.wait_output('ready:', 60), proc.output()
        assert 'queue_size=100' in proc.output() and 'qos=reliable' in proc.output()  # the params file applied
        masks = ros.collect(Image, '/robot1/dynrecon/dynamic_mask', OUTPUT_QOS)
        pub_img = ros.publisher(Image, '/camera/rgb/image_color', RELIABLE_INPUT_QOS)
        pub_depth = ros.publisher(Image, '/camera/depth/image', RELIABLE_INPUT_QOS)
        pub_info = ros.publisher(CameraInfo, '/camera/rgb/camera_info', RELIABLE_INPUT_QOS)
        assert ros.wait_for(lambda: pub_img.get_subscription_count() and pub_depth.get_subscription_count()
                            and ros.node.count_publishers('/robot1/dynrecon/dynamic_mask'), 30), proc.output()
        from std_msgs.msg import Header
        for f in seq.frames:
            h = Header(stamp=conv.sec_to_stamp(f.stamp), frame_id='openni_rgb_optical_frame')
            pub_info.publish(conv.numpy_to_camera_info(f.K, (160, 120), h))
            pub_img.publish(conv.numpy_to_image(f.rgb, 'rgb8', h))
            pub_depth.publish(conv.numpy_to_image(np.where(f.depth > 0, f.depth, np.nan).astype(np.float32), '32FC1', h))
        assert ros.wait_for(lambda: len(masks) >= 1, 60), proc.output()[-3000:]
        m = masks[0]
        assert (m.width, m.height, m.header.frame_id) == (160, 120, 'openni_rgb_optical_frame')
        assert any(abs(conv.stamp_to_sec(m.header.stamp) - f.stamp) < 1e-6 for f in seq.frames)
    finally:
        proc.stop()
        ros.close()


def test_compressed_input_and_undistortion(tmp_path):
    """image/compressed (png) + depth with a distorted camera_info: processed, outputs at the image size."""
    from sensor_msgs.msg import CompressedImage
    from std_msgs.msg import Header
    seq = render_sequence(SyntheticConfig(width=160, height=120, frames=6, movers=1, seed=4))
    ros = RosHarness(DOMAIN)
    proc = NodeProcess(recon_node_executable() + ['--ros-args', '-r', '__node:=dyn2', '-p', 'use_compressed:=true',
                                                  '-p', 'qos_reliable:=true', '-p', 'queue_size:=20',
                                                  '-p', 'idle_flush:=1.0'], DOMAIN)
    try:
        assert proc.wait_output('ready:', 60), proc.output()
        assert 'image=/image/compressed' in proc.output()
        masks = ros.collect(Image, '/dyn2/dynamic_mask', OUTPUT_QOS)
        pub_img = ros.publisher(CompressedImage, '/image/compressed', RELIABLE_INPUT_QOS)
        pub_depth = ros.publisher(Image, '/depth', RELIABLE_INPUT_QOS)
        pub_info = ros.publisher(CameraInfo, '/camera_info', RELIABLE_INPUT_QOS)
        assert ros.wait_for(lambda: pub_img.get_subscription_count() and pub_depth.get_subscription_count()
                            and ros.node.count_publishers('/dyn2/dynamic_mask'), 30), proc.output()
        import time
        time.sleep(1.0)
        for f in seq.frames:
            h = Header(stamp=conv.sec_to_stamp(f.stamp), frame_id='cam')
            pub_info.publish(conv.numpy_to_camera_info(f.K, (160, 120), h, D=np.array([0.01, 0.0, 0.0, 0.0, 0.0])))
            pub_img.publish(conv.rgb_to_compressed(f.rgb, 'png', h))
            pub_depth.publish(conv.numpy_to_image(f.depth, '32FC1', h))
            time.sleep(0.05)
        assert proc.wait_output('input idle: flushed', 120), proc.output()[-3000:]
        assert ros.wait_for(lambda: len(masks) >= 3, 10), proc.output()[-3000:]
        assert all((m.width, m.height, m.header.frame_id) == (160, 120, 'cam') for m in masks)
    finally:
        proc.stop()
        ros.close()
