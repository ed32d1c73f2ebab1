"""The direct refinement's depth rows take the surface's slopes from the readings smoothed in inverse depth
(backend.refine_slope_sigmas, dynrecon_ros.predictors.direct_refinement.slope_depth); the pairs' gain from it is
test_rolling_shutter's test_adjacent_pairs_under_kinect_depth_come_closer_with_the_smoothed_slopes."""
import cv2
import numpy as np
import pytest

from dynrecon_ros.config import BackendConfig
from dynrecon_ros.data.sensor_model import kinect_sigma, quantise_disparity
from dynrecon_ros.predictors.direct_refinement import slope_depth
from dynrecon_ros.predictors.rgbd import RGBDPredictor, RGBDPredictorConfig

KINECT_B = 0.0019  # the z^2 term of the default noise model (segmentation.depth_sigma_b)


def _slope_x(d):
    return cv2.Sobel(np.asarray(d, np.float32), cv2.CV_32F, 1, 0, ksize=3) / 8.0


def test_slopes_follow_the_surface_not_the_disparity_steps_and_keep_depth_edges():
    """Kinect readings of a wall slanting from 3 to 5 m (noise and 1/8 px disparity steps: 2.6-7 cm) with a
    box 2 m away in front of it and a hole: the smoothed readings' slopes are off the true slope by under 1/2.5
    of the raw readings' error, the box's edge stays as steep, the hole stays a hole."""
    rng = np.random.default_rng(0)
    h, w = 120, 160
    z = np.repeat((3.0 + 2.0 * np.arange(w) / w)[None].astype(np.float32), h, 0)
    z[40:80, 60:100] = 2.0
    read = quantise_disparity(z + (rng.normal(0, 1, z.shape) * kinect_sigma(z)).astype(np.float32))
    read[5:15, 5:25] = 0.0  # no reading
    smooth = slope_depth(read, 3 * KINECT_B)
    wall = np.zeros_like(z, bool)
    wall[18:117, 3:-3] = True
    wall[36:84, 56:104] = False  # the wall, away from the box's edges and the hole
    true = _slope_x(z)
    raw_err = np.sqrt(np.mean((_slope_x(read) - true)[wall] ** 2))
    smooth_err = np.sqrt(np.mean((_slope_x(smooth) - true)[wall] ** 2))
    assert raw_err > 0.8 * true[wall].mean(), raw_err  # the case is meaningful: raw slopes as large as the surface's
    assert smooth_err < raw_err / 2.5, (smooth_err, raw_err)  # 0.0048 vs 0.0132
    edge = np.s_[45:75, 59:61]  # the box's left edge (3 m of depth within a pixel or two)
    assert np.abs(_slope_x(smooth)[edge]).min() > 0.9 * np.abs(_slope_x(read)[edge]).min()
    assert np.abs(smooth[45:75, 63:97] - 2.0).max() < 0.02  # the box is not pulled towards the wall
    assert (smooth[5:15, 5:25] == 0).all() and (smooth[read > 0] > 0).all()


def test_the_smoothing_runs_under_a_rolling_shutter_only_and_rejects_a_negative_range():
    from dynrecon_ros.errors import InputError
    kinect = RGBDPredictorConfig.from_backend(BackendConfig(rolling_shutter_s=0.025))
    assert RGBDPredictor(kinect)._slope_sigma == pytest.approx(3 * KINECT_B)
    assert RGBDPredictor(RGBDPredictorConfig.from_backend(BackendConfig()))._slope_sigma == 0.0
    with pytest.raises(InputError, match='refine_slope_sigmas'):
        BackendConfig(refine_slope_sigmas=-1.0)
