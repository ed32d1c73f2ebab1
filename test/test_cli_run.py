"""`dynrecon run` on a rendered TUM directory: the output contract."""
import json

import cv2
import numpy as np
import pytest

from dynrecon_ros.cli import main
from dynrecon_ros.data.synthetic import SyntheticConfig, render_sequence, write_tum
from dynrecon_ros.data.tum import read_trajectory


@pytest.fixture(scope='module')
def tum_dir(tmp_path_factory):
    seq = render_sequence(SyntheticConfig(width=160, height=120, frames=14, seed=2))
    d = tmp_path_factory.mktemp('seq') / 'data'
    write_tum(seq, d)
    return d, seq


def test_run_writes_every_output(tum_dir, tmp_path, capsys):
    d, seq = tum_dir
    out = tmp_path / 'out'
    assert main(['run', '--input', str(d), '--output', str(out), '--max-frames', '12']) == 0
    stamps, poses = read_trajectory(out / 'trajectory.tum')
    assert len(stamps) == 12 and poses.shape == (12, 4, 4)
    assert np.allclose(poses[0], np.eye(4), atol=1e-6)
    keys = (d / 'rgb.txt').read_text().split('\n')
    keys = [line.split()[0] for line in keys if line and not line.startswith('#')][:12]
    for k in keys:
        m = cv2.imread(str(out / 'masks' / f'{k}.png'), cv2.IMREAD_UNCHANGED)
        assert m.dtype == np.uint8 and m.shape == (120, 160) and set(np.unique(m)) <= {0, 255}
        dep = cv2.imread(str(out / 'depth' / f'{k}.png'), cv2.IMREAD_UNCHANGED)
        assert dep.dtype == np.uint16 and dep.shape == (120, 160)
    k0 = keys[0]
    dep = cv2.imread(str(out / 'depth' / f'{k0}.png'), cv2.IMREAD_UNCHANGED) / 5000.0
    assert np.abs(dep - seq.frames[0].depth).max() < 1e-3
    ply = (out / 'static_map.ply').read_bytes()
    assert ply.startswith(b'ply\nformat binary_little_endian 1.0')
    assert b'property uchar red' in ply
    s = json.loads((out / 'summary.json').read_text())
    assert s['frames'] == 12 and s['input_frames'] == 12 and s['skipped'] == []
    assert s['frames_per_second'] > 0 and 'alignment' in s['timings_ms']
    assert (out / 'preview.png').stat().st_size > 1000
    assert '12 of 12 frames' in capsys.readouterr().out


def test_run_bad_input_and_backend(tum_dir, tmp_path, capsys):
    d, _ = tum_dir
    assert main(['run', '--input', str(tmp_path / 'missing'), '--output', str(tmp_path / 'o')]) == 2
    assert 'not found' in capsys.readouterr().err
    cfg = tmp_path / 'bad.yaml'
    cfg.write_text('window:\n  sise: 3\n')
    assert main(['run', '--input', str(d), '--output', str(tmp_path / 'o'), '--config', str(cfg)]) == 2
    assert "unknown key 'sise'" in capsys.readouterr().err
    try:
        import dynrecon_ros.predictors.dust3r  # noqa: F401
    except ImportError:
        assert main(['run', '--input', str(d), '--output', str(tmp_path / 'o'), '--backend', 'dust3r']) == 2
        assert 'dust3r' in capsys.readouterr().err


def test_run_with_config_file(tum_dir, tmp_path):
    d, _ = tum_dir
    cfg = tmp_path / 'c.yaml'
    cfg.write_text('window:\n  size: 3\n  output_lag: 1\nalignment:\n  iterations: 1\n')
    out = tmp_path / 'o2'
    assert main(['run', '--input', str(d), '--output', str(out), '--config', str(cfg), '--max-frames', '6']) == 0
    s = json.loads((out / 'summary.json').read_text())
    assert s['config']['window']['size'] == 3 and s['frames'] == 6


def test_config_dict_round_trip_and_partial_sections():
    from dynrecon_ros.config import ReconConfig
    from dynrecon_ros.errors import InputError
    c = ReconConfig()
    assert ReconConfig.from_dict(c.to_dict()) == c
    # a partial section keeps the product defaults of the fields it does not name
    p = ReconConfig.from_dict({'map': {'voxel_size': 0.03}, 'window': {'size': 6}})
    assert p.map.voxel_size == 0.03 and p.map.pixel_stride == c.map.pixel_stride
    assert p.window.size == 6 and p.window.keyframes == c.window.keyframes
    with pytest.raises(InputError, match="'nope'"):
        ReconConfig.from_dict({'nope': 1})
    with pytest.raises(InputError, match='integer'):
        ReconConfig.from_dict({'window': {'size': 'big'}})


def test_demo_runs_and_reports_accurate_figures(tmp_path, capsys):
    """`dynrecon demo` (the README's main command, here on 20 frames): renders, reconstructs, evaluates."""
    import re
    assert main(['demo', '--frames', '20', '--output', str(tmp_path)]) == 0
    text = capsys.readouterr().out
    ate = float(re.search(r'ATE RMSE \(SE3\): ([\d.]+) mm', text).group(1))
    iou = float(re.search(r'dynamic mask IoU: ([\d.]+)', text).group(1))
    assert ate < 5.0 and iou > 0.8, text  # measured: 0.7 mm, 0.94
    for name in ('trajectory.tum', 'static_map.ply', 'summary.json', 'preview.png'):
        assert (tmp_path / 'run' / name).is_file(), name
    assert main(['demo', '--frames', '3']) == 2  # too few frames: one line, exit 2


def test_run_takes_the_sensor_timing_of_the_input_unless_the_config_gives_one(tmp_path, capsys):
    seq = render_sequence(SyntheticConfig(width=96, height=72, frames=5, seed=3, rolling_shutter=0.02,
                                          depth_delay=0.004))
    d = write_tum(seq, tmp_path / 'data')
    assert 'rolling_shutter_s: 0.02' in (d / 'sensor.yaml').read_text()
    assert main(['run', '--input', str(d), '--output', str(tmp_path / 'a')]) == 0
    backend = json.loads((tmp_path / 'a' / 'summary.json').read_text())['config']['backend']
    assert (backend['rolling_shutter_s'], backend['depth_delay_s']) == (0.02, 0.004)
    assert 'rolling shutter readout 20 ms, depth 4 ms after colour' in capsys.readouterr().err
    cfg = tmp_path / 'timing.yaml'
    cfg.write_text('backend:\n  rolling_shutter_s: 0.03\n')  # the user's own value wins, with a log line
    assert main(['run', '--input', str(d), '--output', str(tmp_path / 'b'), '--config', str(cfg)]) == 0
    backend = json.loads((tmp_path / 'b' / 'summary.json').read_text())['config']['backend']
    assert (backend['rolling_shutter_s'], backend['depth_delay_s']) == (0.03, 0.0)
    assert 'sensor.yaml says 20 / 4 ms' in capsys.readouterr().err
    (d / 'sensor.yaml').write_text('rolling_shutter_s: fast\n')
    assert main(['run', '--input', str(d), '--output', str(tmp_path / 'c')]) == 2
    err = capsys.readouterr().err
    assert 'rolling_shutter_s must be a number of seconds' in err and 'sensor.yaml' in err
    (d / 'sensor.yaml').write_text('readout: 0.02\n')
    assert main(['run', '--input', str(d), '--output', str(tmp_path / 'c')]) == 2
    assert 'unknown key(s) readout' in capsys.readouterr().err


def test_run_says_when_depth_is_stamped_late_and_no_timing_is_known(tmp_path, capsys):
    seq = render_sequence(SyntheticConfig(width=96, height=72, frames=5, seed=3, depth_delay=0.012))
    d = write_tum(seq, tmp_path / 'data')
    (d / 'sensor.yaml').unlink()  # a recording that does not say its timing
    assert main(['run', '--input', str(d), '--output', str(tmp_path / 'a')]) == 0
    err = capsys.readouterr().err
    assert 'the depth images are stamped +' in err and 'backend.depth_delay_s' in err
    cfg = tmp_path / 'timing.yaml'
    cfg.write_text('backend:\n  depth_delay_s: 0.012\n')  # told: no such line
    assert main(['run', '--input', str(d), '--output', str(tmp_path / 'b'), '--config', str(cfg)]) == 0
    assert 'stamped' not in capsys.readouterr().err
    plain = write_tum(render_sequence(SyntheticConfig(width=96, height=72, frames=5, seed=3)), tmp_path / 'p')
    assert main(['run', '--input', str(plain), '--output', str(tmp_path / 'c')]) == 0
    assert 'stamped' not in capsys.readouterr().err  # stamps jittered around the colour ones: nothing to say
