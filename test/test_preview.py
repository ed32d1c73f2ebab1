"""Preview montage: a readable PNG of the expected size with each panel showing its content."""
import cv2
import numpy as np

from dynrecon_ros.preview import make_preview


def _traj(n=10):
    T = np.tile(np.eye(4), (n, 1, 1))
    T[:, 0, 3] = np.linspace(0, 1, n)
    T[:, 2, 3] = np.linspace(0, 0.5, n)
    return T


def test_preview_writes_montage_png(tmp_path):
    h, w = 120, 160
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[..., 1] = 80
    depth = np.tile(np.linspace(0.5, 4, w, dtype=np.float32), (h, 1))
    mask = np.zeros((h, w), np.uint8)
    mask[40:80, 60:100] = 255
    rng = np.random.default_rng(0)
    pts = np.concatenate([rng.uniform(-1, 2, (2000, 3)), np.tile([0, 0, 255], (2000, 1))], 1).astype(np.float32)
    path = tmp_path / 'out' / 'preview.png'
    make_preview(rgb, depth, mask, pts, _traj(), path, gt_trajectory=_traj())
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)  # BGR
    assert img is not None and img.shape == (2 * h, 2 * w, 3)
    overlay = img[h:, :w]
    assert overlay[60, 80, 2] > 120 and overlay[60, 80, 2] > overlay[60, 80, 1] + 50  # red inside the mask
    assert overlay[100, 20, 1] == 80 and overlay[100, 20, 2] == 0  # untouched outside
    depth_panel = img[:h, w:]
    assert not np.array_equal(depth_panel[60, 30], depth_panel[60, 130])  # colour varies with depth
    top = img[h:, w:]
    assert (np.all(top == [255, 0, 0], axis=-1)).sum() > 200  # blue map points drawn
    assert (np.all(top == [0, 255, 0], axis=-1)).sum() > 10  # green trajectory


def test_preview_scales_wide_input_and_handles_empty_map(tmp_path):
    rgb = np.full((480, 800, 3), 128, np.uint8)
    path = tmp_path / 'p.png'
    montage = make_preview(rgb, np.zeros((480, 800), np.float32), np.zeros((480, 800), np.uint8),
                           np.zeros((0, 6), np.float32), _traj(1), path)
    img = cv2.imread(str(path))
    assert img.shape == montage.shape == (2 * 384, 2 * 640, 3)
