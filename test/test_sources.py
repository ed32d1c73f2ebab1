"""open_source: TUM directory, bags, video files and image folders all give Frames."""
import cv2
import numpy as np
import pytest

from dynrecon_ros.data.sources import open_source
from dynrecon_ros.data.synthetic import SyntheticConfig, render_sequence, write_bag, write_tum
from dynrecon_ros.errors import InputError


@pytest.fixture(scope='module')
def seq():
    return render_sequence(SyntheticConfig(width=64, height=48, frames=4, seed=6))


def test_tum_directory_and_bags(seq, tmp_path):
    for path in (write_tum(seq, tmp_path / 'tum'), write_bag(seq, tmp_path / 'a.bag', 1),
                 write_bag(seq, tmp_path / 'b2', 2)):
        src = open_source(path)
        frames = list(src)
        assert len(src) == 4 and [f.key for f in frames] == seq.keys
        assert all(np.array_equal(f.rgb, g.rgb) and f.depth is not None for f, g in zip(frames, seq.frames))
        assert np.allclose(frames[0].K, seq.K)
    bag = list(open_source(tmp_path / 'a.bag', intrinsics='fr3'))
    assert bag[0].K[0, 0] == pytest.approx(535.4 * 64 / 640)


def test_image_folder(seq, tmp_path):
    folder = tmp_path / 'imgs'
    folder.mkdir()
    for f in seq.frames[::-1]:  # numeric names are ordered by stamp, not by creation
        cv2.imwrite(str(folder / f'{f.key}.png'), cv2.cvtColor(f.rgb, cv2.COLOR_RGB2BGR))
    src = open_source(folder)
    frames = list(src)
    assert [f.key for f in frames] == seq.keys and [f.stamp for f in frames] == list(seq.stamps)
    assert all(f.depth is None and f.K is None for f in frames)
    assert np.array_equal(frames[2].rgb, seq.frames[2].rgb)
    K = np.array([[40.0, 0, 32], [0, 40, 24], [0, 0, 1]])
    assert np.array_equal(open_source(folder, intrinsics=K)[0].K, K)
    named = tmp_path / 'named'
    named.mkdir()
    for i, f in enumerate(seq.frames):
        cv2.imwrite(str(named / f'img_{i:03d}.jpg'), f.rgb)
    src = open_source(named)
    assert [f.key for f in src] == ['img_000', 'img_001', 'img_002', 'img_003']
    assert src[3].stamp == pytest.approx(3 / 30.0)


def test_video_file(seq, tmp_path):
    path = tmp_path / 'v.avi'
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*'MJPG'), 10.0, (64, 48))
    if not writer.isOpened():
        pytest.fail('OpenCV cannot write MJPG video here')
    for f in seq.frames:
        writer.write(cv2.cvtColor(f.rgb, cv2.COLOR_RGB2BGR))
    writer.release()
    src = open_source(path)
    frames = list(src)
    assert len(frames) == 4 and frames[1].stamp == pytest.approx(0.1) and frames[0].depth is None
    assert np.abs(frames[2].rgb.astype(int) - seq.frames[2].rgb).mean() < 12  # lossy codec


def test_bad_sources(tmp_path):
    with pytest.raises(InputError, match='input not found'):
        open_source(tmp_path / 'nothing')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(InputError, match='no images'):
        open_source(tmp_path / 'empty')
    (tmp_path / 'x.txt').write_text('hello')
    with pytest.raises(InputError, match='unknown input'):
        open_source(tmp_path / 'x.txt')
    (tmp_path / 'broken.mp4').write_bytes(b'\x00' * 100)
    with pytest.raises(InputError, match='video'):
        open_source(tmp_path / 'broken.mp4')
