"""End to end over DDS: the synthetic TUM-style ROS 1 bag replayed by `dynrecon replay --clock` into
recon_node started with config/tum.yaml (TUM topic remaps, use_sim_time) gives /tf poses whose ATE is
within 10 % of the offline pipeline's on the same frames, one mask per processed image with the
image's stamp and size, and a static map PointCloud2 equal to the offline static map."""
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip('rclpy')
from scipy.spatial import cKDTree  # noqa: E402
from sensor_msgs.msg import Image, PointCloud2  # noqa: E402
from tf2_msgs.msg import TFMessage  # noqa: E402

from dynrecon_ros.config import ReconConfig  # noqa: E402
from dynrecon_ros.data.bags import read_bag, write_bag  # noqa: E402
from dynrecon_ros.data.synthetic import SyntheticConfig, render_sequence  # noqa: E402
from dynrecon_ros.evaluation import trajectory_metrics  # noqa: E402
from dynrecon_ros.reconstructor import Reconstructor  # noqa: E402
from dynrecon_ros.ros import conversions as conv  # noqa: E402
from dynrecon_ros.ros.qos import MAP_QOS, OUTPUT_QOS, TF_QOS  # noqa: E402
from dynrecon_ros.ros.testing import ROOT, NodeProcess, RosHarness, domain_id_for, node_command, node_env  # noqa: E402

DOMAIN = domain_id_for(__name__)


def _recon_launch():
    import importlib.util
    spec = importlib.util.spec_from_file_location('recon_launch', ROOT / 'launch' / 'recon.launch.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


recon_launch = _recon_launch()
W, H, N = 160, 120, 40


@pytest.mark.slow
def test_tum_bag_replay_matches_offline(tmp_path):
    seq = render_sequence(SyntheticConfig(width=W, height=H, frames=N, movers=2, seed=5))
    bag = write_bag(seq, tmp_path / 'synthetic.bag', ros_version=1)

    # offline, on the frames as the bag holds them
    rec = Reconstructor(ReconConfig())
    offline = []
    for f in read_bag(bag):
        offline += rec.push(f)
    offline += rec.flush()
    off_ok = [r for r in offline if r.status == 'ok']
    off_map = rec.static_map()
    assert len(off_ok) >= N // 2 and len(off_map) > 100

    # online: the node from the launch helper's command line, then the replay
    args = recon_launch.node_arguments(ROOT / 'config' / 'tum.yaml', use_sim_time=True)
    args += ['-p', 'publish_map_rate:=0.0', '-p', 'idle_flush:=3.0', '-p', 'queue_size:=1000']
    ros = RosHarness(DOMAIN)
    proc = NodeProcess(node_command(args[1:]), DOMAIN)
    try:
        assert proc.wait_output('ready:', 60), proc.output()
        tfs = ros.collect(TFMessage, '/tf', TF_QOS)
        masks = ros.collect(Image, '/dynrecon/dynamic_mask', OUTPUT_QOS,
                            keep=lambda m: (conv.stamp_to_sec(m.header.stamp), m.width, m.height, m.header.frame_id,
                                            m.encoding))
        clouds = ros.collect(PointCloud2, '/dynrecon/static_map', MAP_QOS)
        assert ros.wait_for(lambda: ros.node.count_publishers('/dynrecon/dynamic_mask'), 30)
        replay = subprocess.run([sys.executable, '-m', 'dynrecon_ros.cli', 'replay', str(bag), '--clock',
                                 '--wait-subscribers', '30', '--delay', '1.0'], env=node_env(DOMAIN), cwd=str(ROOT),
                                capture_output=True, text=True, timeout=120)
        assert replay.returncode == 0, replay.stderr
        assert proc.wait_output('input idle: flushed', 240), proc.output()[-3000:]
        # (the node's log in the message: whether it dropped an input or the mask was lost on the way)
        assert ros.wait_for(lambda: clouds and len(masks) >= len(off_ok), 20), \
            (len(masks), len(off_ok), proc.output()[-1500:])
        assert proc.proc.poll() is None
    finally:
        proc.stop()
        ros.close()
    log = proc.output()
    assert 'dropped 0' in log, log[-2000:]

    # masks: one per processed image, the image's stamp, size and frame
    stamps = np.array([m[0] for m in masks])
    assert len(masks) == len(off_ok)
    assert np.allclose(np.sort(stamps), [r.stamp for r in off_ok], atol=1e-6)
    assert all(m[1:] == (W, H, 'openni_rgb_optical_frame', 'mono8') for m in masks)

    # /tf: map -> the bag's optical frame at the image stamps; ATE within 10 % of offline
    tf_list = [t for msg in tfs for t in msg.transforms]
    assert all((t.header.frame_id, t.child_frame_id) == ('map', 'openni_rgb_optical_frame') for t in tf_list)
    est_stamps = np.array([conv.stamp_to_sec(t.header.stamp) for t in tf_list])
    est_poses = np.stack([conv.transform_to_matrix(t.transform) for t in tf_list])
    online = trajectory_metrics(est_stamps, est_poses, seq.stamps, seq.poses)
    off = trajectory_metrics(np.array([r.stamp for r in off_ok]), np.stack([r.pose for r in off_ok]),
                             seq.stamps, seq.poses)
    print(f"\nATE online {online['ate_rmse_se3']:.4f} m vs offline {off['ate_rmse_se3']:.4f} m over {len(tf_list)} "
          f"poses; static map {clouds[-1].width} points (offline {len(off_map)})")
    assert len(tf_list) == len(off_ok)
    assert online['ate_rmse_se3'] <= 1.1 * off['ate_rmse_se3'] + 1e-4

    # static map: the offline map's points (xyz float32 and colours)
    online_map = conv.cloud_to_xyzrgb(clouds[-1])
    assert clouds[-1].header.frame_id == 'map'
    assert abs(len(online_map) - len(off_map)) <= 0.02 * len(off_map)
    dist, idx = cKDTree(off_map[:, :3]).query(online_map[:, :3])
    assert np.quantile(dist, 0.99) < 0.005
    rgb_off = off_map[idx, 3:6] * (255.0 if off_map[:, 3:6].max() <= 1.0 else 1.0)
    assert np.median(np.abs(online_map[:, 3:6] - rgb_off)) <= 1.0
