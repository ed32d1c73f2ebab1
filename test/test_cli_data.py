"""`dynrecon render` and `dynrecon eval` through the CLI: outputs, metrics, one-line errors with exit 2."""
import json
import subprocess
import sys

import numpy as np
import pytest

from dynrecon_ros.cli import main
from dynrecon_ros.data.tum import read_trajectory, read_tum_directory, write_masks, write_trajectory


@pytest.fixture(scope='module')
def rendered(tmp_path_factory):
    root = tmp_path_factory.mktemp('cli')
    rc = main(['render', '--output', str(root / 'seq'), '--width', '48', '--height', '36', '--frames', '12',
               '--seed', '5', '--depth-holes', '0.1', '--bag1', str(root / 'seq.bag'), '--bag2', str(root / 'seq2')])
    assert rc == 0
    return root


def test_render_writes_tum_directory_and_bags(rendered):
    d = read_tum_directory(rendered / 'seq')
    assert len(d) == 12 and d[0].rgb.shape == (36, 48, 3)
    assert (rendered / 'seq.bag').is_file() and (rendered / 'seq2' / 'metadata.yaml').is_file()
    assert len(list((rendered / 'seq' / 'masks_gt').glob('*.png'))) == 12


def test_eval_known_perturbation_json(rendered, tmp_path, capsys):
    stamps, poses = read_trajectory(rendered / 'seq' / 'groundtruth.txt')
    est = poses.copy()
    est[:, 2, 3] += 0.05  # a rigid offset: removed by alignment
    write_trajectory(tmp_path / 'est.txt', stamps, est)
    gt_masks = {k.stem: np.zeros((36, 48), bool) for k in (rendered / 'seq' / 'masks_gt').glob('*.png')}
    write_masks(tmp_path / 'masks', gt_masks)  # all-empty prediction: recall 0
    capsys.readouterr()
    rc = main(['eval', '--traj', str(tmp_path / 'est.txt'), '--gt', str(rendered / 'seq'), '--masks',
               str(tmp_path / 'masks'), '--json'])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out['trajectory']['n_matched'] == 12
    assert out['trajectory']['ate_rmse_se3'] < 1e-6
    assert out['masks']['recall'] == 0.0 and out['masks']['n'] == 12 and out['masks']['precision'] is None
    assert (tmp_path / 'est_traj.png').stat().st_size > 5000  # default plot next to EST


def test_eval_human_readable(rendered, tmp_path, capsys):
    gt = rendered / 'seq' / 'groundtruth.txt'
    rc = main(['eval', '--traj', str(gt), '--gt', str(gt), '--plot', str(tmp_path / 'p.png')])
    out = capsys.readouterr().out
    assert rc == 0 and 'ATE RMSE (SE(3))   0.0000 m' in out and str(tmp_path / 'p.png') in out
    assert (tmp_path / 'p.png').is_file()


def _run_cli(*args):
    """The installed entry point's behaviour: a subprocess, to check stderr and the exit code."""
    return subprocess.run([sys.executable, '-m', 'dynrecon_ros.cli', *args], capture_output=True, text=True,
                          timeout=120)


def test_bad_input_is_one_line_and_exit_2(rendered, tmp_path):
    bad_gt = tmp_path / 'groundtruth.txt'
    bad_gt.write_text('# header\n1.0 0 0 0 0 0 0 1\n1.5 0 0 0 0 0 1\n')
    r = _run_cli('eval', '--traj', str(bad_gt), '--gt', str(bad_gt))
    assert r.returncode == 2 and r.stdout == ''
    expected = f'{bad_gt}:3: expected 8 values "timestamp tx ty tz qx qy qz qw", got 7'
    assert r.stderr.strip() == f'dynrecon eval: error: {expected}'
    backwards = tmp_path / 'back.txt'
    backwards.write_text('2.0 0 0 0 0 0 0 1\n1.0 0 0 0 0 0 0 1\n')
    r = _run_cli('eval', '--traj', str(backwards), '--gt', str(rendered / 'seq'))
    assert r.returncode == 2 and f'{backwards}:2: timestamp 1.000000 goes backwards' in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and 'Traceback' not in r.stderr
    r = _run_cli('eval', '--traj', str(tmp_path / 'missing.txt'), '--gt', str(rendered / 'seq'))
    assert r.returncode == 2 and r.stderr.strip() == f'dynrecon eval: error: {tmp_path / "missing.txt"}: file not found'


def test_bad_input_through_main(rendered, tmp_path, capsys):
    # far-off stamps: nothing to associate
    stamps, poses = read_trajectory(rendered / 'seq' / 'groundtruth.txt')
    write_trajectory(tmp_path / 'late.txt', stamps + 100, poses)
    assert main(['eval', '--traj', str(tmp_path / 'late.txt'), '--gt', str(rendered / 'seq')]) == 2
    assert 'no estimated pose matches' in capsys.readouterr().err
    # mask size mismatch names the mask
    key = read_tum_directory(rendered / 'seq').keys[0]
    write_masks(tmp_path / 'm', {key: np.zeros((10, 10), bool)})
    assert main(['eval', '--masks', str(tmp_path / 'm'), '--gt', str(rendered / 'seq')]) == 2
    assert f'mask {key}: predicted size 10x10 differs' in capsys.readouterr().err
    # render refuses to clobber a non-empty directory
    assert main(['render', '--output', str(rendered / 'seq'), '--frames', '2']) == 2
    assert 'use --overwrite' in capsys.readouterr().err
    assert main(['render', '--output', str(tmp_path / 'x'), '--depth-holes', '1.5']) == 2
    assert '--depth-holes' in capsys.readouterr().err
