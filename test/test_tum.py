"""TUM RGB-D directory: write/read round trip, association, trajectories, intrinsics, bad input."""
import numpy as np
import pytest

from dynrecon_ros.data.synthetic import SyntheticConfig, render_sequence, write_tum
from dynrecon_ros.data.tum import (INTRINSICS, associate, read_masks, read_trajectory, read_tum_directory,
                                   write_trajectory)
from dynrecon_ros.errors import InputError


@pytest.fixture(scope='module')
def seq():
    return render_sequence(SyntheticConfig(width=64, height=48, frames=6, seed=2, depth_noise=0.01,
                                           depth_holes=0.1))


@pytest.fixture()
def tum_dir(seq, tmp_path):
    return write_tum(seq, tmp_path / 'seq')


def test_layout_is_tum(tum_dir, seq):
    rgb_lines = (tum_dir / 'rgb.txt').read_text().splitlines()
    assert [line.startswith('#') for line in rgb_lines[:3]] == [True] * 3
    assert rgb_lines[3] == f'{seq.frames[0].key} rgb/{seq.frames[0].key}.png'
    depth_lines = (tum_dir / 'depth.txt').read_text().splitlines()[3:]
    assert len(depth_lines) == 6 and all((tum_dir / line.split()[1]).is_file() for line in depth_lines)
    gt = (tum_dir / 'groundtruth.txt').read_text().splitlines()
    assert gt[2] == '# timestamp tx ty tz qx qy qz qw' and len(gt[3].split()) == 8
    import cv2
    d = cv2.imread(str(tum_dir / depth_lines[0].split()[1]), cv2.IMREAD_UNCHANGED)
    assert d.dtype == np.uint16 and d.shape == (48, 64) and (d == 0).any()
    m = cv2.imread(str(tum_dir / 'masks_gt' / f'{seq.frames[0].key}.png'), cv2.IMREAD_UNCHANGED)
    assert m.dtype == np.uint8 and set(np.unique(m)) <= {0, 255}


def test_round_trip(tum_dir, seq):
    d = read_tum_directory(tum_dir)
    assert len(d) == len(seq.frames) and d.keys == seq.keys
    assert np.allclose(d.K, seq.K)  # from calibration.txt
    for f, g in zip(d, seq.frames):
        assert f.key == g.key and f.stamp == g.stamp
        assert np.array_equal(f.rgb, g.rgb)
        assert np.array_equal(f.depth == 0, g.depth == 0)
        assert np.abs(f.depth - g.depth).max() <= 0.5 / 5000 + 1e-6
        assert 0 < abs(f.meta['depth_stamp'] - f.stamp) < 0.02
    stamps, poses = read_trajectory(tum_dir / 'groundtruth.txt')
    assert np.array_equal(stamps, seq.stamps)
    assert np.abs(poses - seq.poses).max() < 1e-8
    masks = read_masks(tum_dir / 'masks_gt')
    assert sorted(masks) == seq.keys
    assert all(np.array_equal(masks[k], seq.masks[i]) for i, k in enumerate(seq.keys))


def test_intrinsics_choices(tum_dir):
    fr3 = read_tum_directory(tum_dir, intrinsics='fr3')
    assert fr3.K[0, 0] == pytest.approx(535.4 * 64 / 640) and fr3.K[1, 2] == pytest.approx(247.6 * 48 / 480)
    K = np.array([[50.0, 0, 30], [0, 51, 22], [0, 0, 1]])
    assert np.array_equal(read_tum_directory(tum_dir, intrinsics=K)[0].K, K)
    (tum_dir / 'calibration.txt').unlink()
    assert np.allclose(read_tum_directory(tum_dir).K, fr3.K)  # auto without calibration = fr3
    fr1 = read_tum_directory(tum_dir, intrinsics='fr1')  # distorted: undistorted to a new pinhole K
    assert fr1[0].rgb.shape == (48, 64, 3) and not np.allclose(fr1.K, INTRINSICS['fr1'].scaled(64, 48).K)
    assert INTRINSICS['fr2'].dist[0] == pytest.approx(0.2312) and INTRINSICS['ros'].K[0, 2] == 319.5
    with pytest.raises(InputError, match='unknown intrinsics'):
        read_tum_directory(tum_dir, intrinsics='fr9')


def test_associate_like_tum():
    a = [1.00, 1.10, 1.20, 1.30]
    b = [1.005, 1.012, 1.19, 1.50]
    # 1.00 takes its nearest (1.005); 1.012 is then unused but too far from 1.10; 1.20 -> 1.19; 1.30 none
    assert associate(a, b, max_dt=0.02) == [(0, 0), (2, 2)]
    # each used once: two candidates compete for one partner, the closer wins
    assert associate([1.0, 1.01], [1.008], max_dt=0.02) == [(1, 0)]
    assert associate([], [1.0]) == []


def test_trajectory_round_trip_precision(tmp_path):
    rng = np.random.default_rng(1)
    from scipy.spatial.transform import Rotation
    poses = np.tile(np.eye(4), (5, 1, 1))
    poses[:, :3, :3] = Rotation.random(5, random_state=3).as_matrix()
    poses[:, :3, 3] = rng.normal(size=(5, 3)) * 10
    stamps = 1305031102.175304 + np.arange(5) * 0.033
    path = write_trajectory(tmp_path / 't.txt', stamps, poses)
    s2, p2 = read_trajectory(path)
    assert np.abs(s2 - stamps).max() < 1e-6 and np.abs(p2 - poses).max() < 1e-8


@pytest.mark.parametrize('content, line, message', [
    ('1.0 0 0 0 0 0 0 1\n1.1 0 0 0 0 0 1\n', 2, 'expected 8 values'),
    ('# header\n1.0 0 0 0 0 0 0 1\n1.1 0 0 x 0 0 0 1\n', 3, 'not a number'),
    ('1.0 0 0 0 0 0 0 1\n0.9 0 0 0 0 0 0 1\n', 2, 'goes backwards'),
    ('1.0 0 0 0 0 0 0 0\n', 1, 'zero quaternion'),
])
def test_malformed_trajectory_names_file_and_line(tmp_path, content, line, message):
    path = tmp_path / 'groundtruth.txt'
    path.write_text(content)
    with pytest.raises(InputError, match=message) as exc:
        read_trajectory(path)
    assert str(exc.value).startswith(f'{path}:{line}: ')


def test_bad_directories(tum_dir, tmp_path):
    import cv2
    with pytest.raises(InputError, match='not found'):
        read_tum_directory(tmp_path / 'missing')
    # depth stamps far from every colour stamp: empty association
    depth_txt = tum_dir / 'depth.txt'
    good = depth_txt.read_text()
    depth_txt.write_text('\n'.join(f'{float(line.split()[0]) + 5:.6f} {line.split()[1]}'
                                   for line in good.splitlines()[3:]) + '\n')
    with pytest.raises(InputError, match='association is empty'):
        read_tum_directory(tum_dir)
    depth_txt.write_text(good)
    # rgb/depth size mismatch, named by file
    first_depth = tum_dir / good.splitlines()[3].split()[1]
    cv2.imwrite(str(first_depth), np.zeros((24, 32), np.uint16))
    d = read_tum_directory(tum_dir)
    with pytest.raises(InputError, match='differs from colour size') as exc:
        d[0]
    assert str(first_depth) in str(exc.value)
    # unreadable image
    (tum_dir / 'rgb' / f'{d.keys[1]}.png').write_bytes(b'not a png')
    with pytest.raises(InputError, match='cannot read colour image'):
        d[1]
    # rgb.txt going backwards
    lines = (tum_dir / 'rgb.txt').read_text().splitlines()
    lines[4], lines[5] = lines[5], lines[4]
    (tum_dir / 'rgb.txt').write_text('\n'.join(lines) + '\n')
    with pytest.raises(InputError, match='goes backwards') as exc:
        read_tum_directory(tum_dir)
    assert 'rgb.txt:6:' in str(exc.value)


def test_a_late_depth_image_is_matched_with_its_own_colour_image(tmp_path):
    # Colour at 30 Hz, depth 12 ms late and stamped 6 ms later still (stamp jitter): the nearest-stamp match
    # pairs each colour image with the depth image before it (15 ms off, against 18), the first gets none;
    # told the delay, every pair is right.
    colour = np.arange(4) / 30.0
    depth = colour + 0.012 + 0.006
    assert associate(colour, depth) == [(1, 0), (2, 1), (3, 2)]
    assert associate(colour, depth, offset=-0.012) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    seq = render_sequence(SyntheticConfig(width=32, height=24, frames=60, seed=4, depth_delay=0.012))
    d = write_tum(seq, tmp_path / 'late')
    read = read_tum_directory(d)
    assert read.sensor_timing == {'rolling_shutter_s': 0.0, 'depth_delay_s': 0.012}
    assert len(read) == 60 and all(abs(f.meta['depth_stamp'] - f.stamp - 0.012) < 0.0085 for f in read)
    (d / 'sensor.yaml').unlink()  # a reader that does not know the delay mismatches some of them
    plain = read_tum_directory(d)
    assert plain.sensor_timing is None
    assert len(plain) < 60 or any(abs(f.meta['depth_stamp'] - f.stamp - 0.012) > 0.0085 for f in plain)


def test_an_unreadable_sensor_timing_file_is_an_error_naming_it(tmp_path):
    """A sensor.yaml that exists but cannot be read (here a directory of that name) is one InputError naming it,
    not an OSError from deep in the reader, and not silently ignored (the run would use the wrong timing)."""
    seq = render_sequence(SyntheticConfig(width=32, height=24, frames=4, seed=4))
    d = write_tum(seq, tmp_path / 'seq')
    (d / 'sensor.yaml').unlink()
    (d / 'sensor.yaml').mkdir()
    with pytest.raises(InputError, match='cannot read the sensor timing file') as exc:
        read_tum_directory(d)
    assert 'sensor.yaml' in str(exc.value)
