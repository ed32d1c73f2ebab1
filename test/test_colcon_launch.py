"""The README's steps for ROS 2 users, run for real across processes: `colcon build` of this package into a
workspace, `source install/setup.bash`, `ros2 pkg executables`, `ros2 launch dynrecon_ros recon.launch.py`
(read back with `ros2 node info` / `ros2 param get|dump`), and `tum_replay.launch.py` on a rendered bag (with its sensor timing)
(/tf poses scored against the offline `dynrecon run`). Needs the launch stack `make setup` installs from
../shared/ros; skipped, with the reason, without it."""
import json
import pathlib
import re
import subprocess

import numpy as np
import pytest
import yaml

import ros_stack
from dynrecon_ros.ros.parameters import flatten
from dynrecon_ros.ros.testing import domain_id_for

pytestmark = pytest.mark.skipif(ros_stack.missing() is not None, reason=str(ros_stack.missing()))

README_ARGS = {'image': '/camera/color/image_raw', 'depth': '/camera/aligned_depth_to_color/image_raw',
               'camera_info': '/camera/color/camera_info'}
INPUT_TYPES = {'image': 'sensor_msgs/msg/Image', 'depth': 'sensor_msgs/msg/Image',
               'camera_info': 'sensor_msgs/msg/CameraInfo'}


@pytest.fixture(scope='module')
def ws(tmp_path_factory):
    """A colcon workspace with this package built (once per module) and a ROS_HOME for its logs."""
    ws = tmp_path_factory.mktemp('ros2_ws')
    p = ros_stack.colcon_build(ws, ros_stack.env(domain_id_for('colcon'), ws / 'ros_home'))
    assert p.returncode == 0, p.stdout + p.stderr
    return ws


def shell_env(ws, test_name):
    return ros_stack.env(domain_id_for(f'{__name__}.{test_name}'), ws / 'ros_home')


def share(ws) -> pathlib.Path:
    return ws / 'install' / 'dynrecon_ros' / 'share' / 'dynrecon_ros'


def test_colcon_build_installs_the_executables_and_launch_files(ws):
    env = shell_env(ws, 'executables')
    out = ros_stack.ros2(ws, env, 'pkg', 'executables', 'dynrecon_ros')
    assert sorted(out.split('\n')[:-1]) == ['dynrecon_ros dynrecon', 'dynrecon_ros recon_node'], out
    assert ros_stack.ros2(ws, env, 'pkg', 'prefix', 'dynrecon_ros').strip() == str(ws / 'install' / 'dynrecon_ros')
    installed = {p.name for p in (share(ws) / 'launch').iterdir()}
    assert installed == {p.name for p in (ros_stack.ROOT / 'launch').glob('*.launch.py')}
    assert (share(ws) / 'config' / 'tum.yaml').is_file() and (share(ws) / 'package.xml').is_file()


def launched_node(ws, env, args, log, name='/dynrecon'):
    """Start `ros2 launch dynrecon_ros ARGS`, wait for the node, return (Launch, parsed `ros2 node info`)."""
    launch = ros_stack.Launch(ws, ['dynrecon_ros', *args], env, log)
    assert launch.wait_output('ready:', 90), launch.output()
    for _ in range(3):  # discovery within --spin-time may be incomplete on a loaded machine: ask again
        p = ros_stack.run(ros_stack.sourced(ws, ['ros2', 'node', 'info', name, *ros_stack.NO_DAEMON]), env, ws)
        info = ros_stack.node_info(p.stdout)
        if p.returncode == 0 and info.get('Subscribers') and info.get('Publishers'):
            break
    return launch, info


def stop_cleanly(launch):
    """Ctrl-C (SIGINT to the group) ends launch and the node, which exits cleanly (no orphan)."""
    children = launch.child_pids()
    code = launch.stop()
    out = launch.output()
    assert code == 0, out[-3000:]
    assert children and not any(ros_stack.alive(p) for p in children), out[-3000:]
    assert 'process has finished cleanly' in out, out[-3000:]


@pytest.mark.slow
def test_recon_launch_with_the_readme_arguments(ws, tmp_path):
    env = shell_env(ws, 'readme')
    launch, info = launched_node(ws, env, ['recon.launch.py'] + [f'{k}:={v}' for k, v in README_ARGS.items()],
                                 tmp_path / 'launch.log')
    try:
        assert info['Subscribers'] == {README_ARGS[k]: INPUT_TYPES[k] for k in README_ARGS}, info
        pubs = info['Publishers']
        assert pubs['/tf'] == 'tf2_msgs/msg/TFMessage'
        assert pubs['/dynrecon/static_map'] == 'sensor_msgs/msg/PointCloud2'
        assert {'/dynrecon/dynamic_mask', '/dynrecon/depth', '/dynrecon/camera_info', '/dynrecon/pose',
                '/dynrecon/path', '/dynrecon/odom'} <= set(pubs), pubs
        assert '/dynrecon/save_map' in info['Service Servers']

        # every parameter of the default params file, read back from the running node
        dumped = yaml.safe_load(ros_stack.ros2(ws, env, 'param', 'dump', '/dynrecon', *ros_stack.NO_DAEMON))
        live = flatten(dumped['/dynrecon']['ros__parameters'])
        want = flatten(yaml.safe_load((share(ws) / 'config' / 'recon.yaml').read_text())['/**']['ros__parameters'])
        assert len(want) > 100 and {k: live.get(k) for k in want} == want
        get = ros_stack.ros2(ws, env, 'param', 'get', '/dynrecon', 'queue_size', *ros_stack.NO_DAEMON)
        assert get.strip() == f"Integer value is: {want['queue_size']}"
    finally:
        stop_cleanly(launch)


@pytest.mark.slow
def test_recon_launch_with_tum_config_subscribes_to_tums_topics(ws, tmp_path):
    """Launch arguments left empty leave the config's `dynrecon_remappings` alone (they used to drop them)."""
    env = shell_env(ws, 'tum')
    tum = share(ws) / 'config' / 'tum.yaml'
    remaps = yaml.safe_load(tum.read_text())['dynrecon_remappings']['ros__parameters']
    launch, info = launched_node(ws, env, ['recon.launch.py', f'config:={tum}', 'namespace:=robot1'],
                                 tmp_path / 'launch.log', name='/robot1/dynrecon')
    try:
        assert info['Subscribers'] == {remaps[k]: INPUT_TYPES[k] for k in remaps}, info
        assert '/robot1/dynrecon/dynamic_mask' in info['Publishers']
        get = ros_stack.ros2(ws, env, 'param', 'get', '/robot1/dynrecon', 'camera_intrinsics', *ros_stack.NO_DAEMON)
        want = yaml.safe_load(tum.read_text())['/**']['ros__parameters']['camera_intrinsics']
        assert [float(v) for v in get.split('[', 1)[1].rstrip().rstrip(']').split(',')] == want, get
    finally:
        stop_cleanly(launch)


@pytest.mark.slow
def test_recon_launch_with_compressed_inputs_as_docs_ros_md_says(ws, tmp_path):
    """docs/ROS.md's remote-GPU recipe: a config turning on both compressed inputs, their launch arguments."""
    env = shell_env(ws, 'compressed')
    cfg = tmp_path / 'remote.yaml'
    cfg.write_text('/**:\n  ros__parameters:\n    use_compressed: true\n    use_compressed_depth: true\n')
    topics = {'image_compressed': '/camera/color/image_raw/compressed',
              'depth_compressedDepth': '/camera/aligned_depth_to_color/image_raw/compressedDepth',
              'camera_info': '/camera/color/camera_info'}
    args = ['recon.launch.py', f'config:={cfg}'] + [f'{k}:={v}' for k, v in topics.items()]
    launch, info = launched_node(ws, env, args, tmp_path / 'launch.log')
    try:
        compressed = 'sensor_msgs/msg/CompressedImage'
        assert info['Subscribers'] == {topics['image_compressed']: compressed,
                                       topics['depth_compressedDepth']: compressed,
                                       topics['camera_info']: INPUT_TYPES['camera_info']}, info
    finally:
        stop_cleanly(launch)


def ate(traj: pathlib.Path, gt: pathlib.Path, env, cwd) -> dict:
    p = ros_stack.run(['dynrecon', 'eval', '--traj', str(traj), '--gt', str(gt), '--json'], env, cwd)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)['trajectory']


@pytest.mark.slow
def test_tum_replay_launch_on_a_rendered_bag_matches_offline(ws, tmp_path):
    from tf2_msgs.msg import TFMessage

    from dynrecon_ros.data.tum import write_trajectory
    from dynrecon_ros.ros import conversions as conv
    from dynrecon_ros.ros.qos import TF_QOS
    from dynrecon_ros.ros.testing import RosHarness

    env = shell_env(ws, 'replay')
    seq, bag = tmp_path / 'seq', tmp_path / 'bag2'
    # a rolling shutter and late depth: the bag's sensor file reaches the offline run and, through the launch file,
    # the node (the same pairs and the same pose model, so the same trajectory)
    subprocess.run(['dynrecon', 'render', '--output', str(seq), '--width', '160', '--height', '120',
                    '--frames', '30', '--rolling-shutter', '0.02', '--depth-delay', '0.01', '--bag2', str(bag)],
                   env=env, check=True, capture_output=True)
    offline = ros_stack.run(['dynrecon', 'run', '--input', str(bag), '--output', str(tmp_path / 'off')], env, tmp_path,
                            timeout=300)
    assert offline.returncode == 0, offline.stderr
    assert 'rolling shutter readout 20 ms, depth 10 ms after colour' in offline.stderr, offline.stderr

    ros = RosHarness(int(env['ROS_DOMAIN_ID']))
    tfs = ros.collect(TFMessage, '/tf', TF_QOS, keep=lambda m: list(m.transforms))
    # delay: the /tf subscription above must match the node's publisher before the first pose (volatile, as
    # tf2_ros); 2 s was once too short on the loaded 2-core CI machine (the first 5 of 30 poses missed)
    launch = ros_stack.Launch(ws, ['dynrecon_ros', 'tum_replay.launch.py', f'bag:={bag}', 'delay:=8.0'], env,
                              tmp_path / 'launch.log')
    try:
        assert launch.wait_output('input idle: flushed', 240), launch.output()[-3000:]
    finally:
        stop_cleanly(launch)
        ros.close()
    out = launch.output()
    assert 'dropped 0' in out, out[-3000:]
    assert 'rolling_shutter_s=0.02' in out and 'depth_delay_s=0.01' in out, out[:3000]
    # the latency breakdown's transport is measured on the node's clock (sim time here: the bag's stamps are
    # years old, so wall time minus stamp would read ~1e11 ms)
    transport = re.search(r'latency breakdown .*?transport (-?\d+) / (-?\d+)', out)
    assert transport and abs(float(transport.group(2))) < 5000, out[-3000:]
    transforms = [t for msg in tfs for t in msg]
    frames = {(t.header.frame_id, t.child_frame_id) for t in transforms}
    assert frames == {('map', 'openni_rgb_optical_frame')}, frames  # the bag's optical frame (tum.yaml)
    stamps = np.array([conv.stamp_to_sec(t.header.stamp) for t in transforms])
    poses = np.stack([conv.transform_to_matrix(t.transform) for t in transforms])
    write_trajectory(tmp_path / 'online.tum', stamps, poses)

    off_stamps = np.loadtxt(tmp_path / 'off' / 'trajectory.tum', ndmin=2)[:, 0]
    assert len(stamps) == len(off_stamps) and np.allclose(np.sort(stamps), off_stamps, atol=1e-6)
    online = ate(tmp_path / 'online.tum', seq / 'groundtruth.txt', env, tmp_path)
    off = ate(tmp_path / 'off' / 'trajectory.tum', seq / 'groundtruth.txt', env, tmp_path)
    print(f"\nATE online {online['ate_rmse_se3'] * 1e3:.3f} mm vs offline {off['ate_rmse_se3'] * 1e3:.3f} mm "
          f"over {len(stamps)} poses")
    assert online['ate_rmse_se3'] == pytest.approx(off['ate_rmse_se3'], rel=1e-3, abs=1e-5)
