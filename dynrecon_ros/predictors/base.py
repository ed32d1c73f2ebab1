"""The pair predictor interface shared by the RGB-D predictor and the DUSt3R/MonST3R network."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np


@dataclass
class PairPrediction:
    """DUSt3R outputs for an ordered pair (i, j), everything in camera i's frame.

    Attributes:
        pts_i: (H, W, 3) float32 points of view i in i's camera frame (NaN where unknown).
        pts_j_in_i: (H, W, 3) float32 points of view j expressed in i's camera frame.
        conf_i, conf_j: (H, W) float32 confidences >= 1 (1 = no information), DUSt3R convention.
        T_i_j: (4, 4) float64 pose of camera j in camera i (X_i = T_i_j @ X_j) when the predictor
            knows it (RGB-D), else None.
        inliers_i: (H, W) bool pixels of i whose correspondence in j fits the rigid motion (RGB-D:
            verified on a pixel grid, see RGBDPredictorConfig.stride), else None.
        attention: optional dict of attention maps (networks only).
    """

    pts_i: np.ndarray
    pts_j_in_i: np.ndarray
    conf_i: np.ndarray
    conf_j: np.ndarray
    T_i_j: np.ndarray | None = None
    inliers_i: np.ndarray | None = None
    attention: dict | None = None
    metric: bool = False  # True when the points are in metres (RGB-D)


class PairPredictor(ABC):
    """A pair predictor and the window step that runs it.

    The pipeline calls :meth:`window_step` once and then only the step
    (:class:`dynrecon_ros.window.WindowStep`), which uses its predictor's own methods (RGB-D:
    ``relative_pose``; networks: ``predict_window``, ``reweighted``). :meth:`predict` gives the
    DUSt3R-style outputs of one pair (tools, tests): ``flow`` is a :class:`dynrecon_ros.flow.PairFlow`
    from i to j; ``static_i`` an optional (H, W) bool prior of pixels believed static.
    """

    metric: bool = False
    needs_depth: bool = False

    @abstractmethod
    def window_step(self, cfg, flows, segmenter, times, device: str):
        """The :class:`dynrecon_ros.window.WindowStep` running this predictor for the Reconstructor
        (cfg: the ReconConfig; flows, segmenter, times: the Reconstructor's flow cache, motion
        segmenter and stage timer)."""

    @abstractmethod
    def predict(self, frame_i, frame_j, flow, static_i: np.ndarray | None = None) -> PairPrediction:
        ...
