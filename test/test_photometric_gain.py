"""The RGB-D predictor's direct photometric refinement under an exposure change between the frames."""
import cv2
import numpy as np

from dynrecon_ros.data.synthetic import SyntheticConfig, render_sequence
from dynrecon_ros.predictors.rgbd import photometric_refine, unproject


def test_photometric_refinement_is_blind_to_an_exposure_change():
    seq = render_sequence(SyntheticConfig(width=160, height=120, frames=3, movers=0, seed=7))
    fi, fj = seq.frames[0], seq.frames[2]
    T_true = np.linalg.inv(seq.poses[0]) @ seq.poses[2]  # pose of j in i
    gi = cv2.cvtColor(fi.rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    gj = cv2.cvtColor(fj.rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    pts = unproject(fi.depth, seq.K).reshape(-1, 3)
    grad = np.hypot(cv2.Sobel(gi, cv2.CV_32F, 1, 0), cv2.Sobel(gi, cv2.CV_32F, 0, 1)).ravel()
    sel = np.flatnonzero((grad > 20) & (fi.depth.ravel() > 0))[::3]
    T0 = T_true.copy()
    T0[:3, 3] += [0.004, -0.003, 0.002]  # a few millimetres off, as the flow fit leaves it

    def err(gain):
        T = photometric_refine(gi.ravel()[sel], pts[sel], np.clip(gj * gain, 0, 255), fj.depth, seq.K, T0, 10)
        return np.linalg.norm(T[:3, 3] - T_true[:3, 3])

    same, brighter = err(1.0), err(1.12)  # 12 % auto-exposure step
    assert same < 1e-3, same
    assert brighter < 1.5 * same + 2e-4, (same, brighter)
