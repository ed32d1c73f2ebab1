"""Stage 1, frames: the unit of input every other stage consumes.

A :class:`Frame` is one colour image with optional metric depth and intrinsics, stamped in seconds.
Sources (TUM directories, bags, the ROS node, synthetic sequences) all produce Frames.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dynrecon_ros.errors import InputError


@dataclass
class Frame:
    """One input frame.

    Attributes:
        stamp: time in seconds (float64).
        rgb: (H, W, 3) uint8 colour image, RGB order.
        depth: (H, W) float32 metres, 0 or NaN = no reading; None for monocular input.
        K: (3, 3) float64 pinhole intrinsics of ``rgb``; None when unknown.
        key: the stamp as written by the source (e.g. the rgb.txt timestamp string); output files
            such as ``masks/<key>.png`` use it so they match the input names exactly.
    """

    stamp: float
    rgb: np.ndarray
    depth: np.ndarray | None = None
    K: np.ndarray | None = None
    key: str = ''
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.stamp = float(self.stamp)
        if not np.isfinite(self.stamp):
            raise InputError(f'frame stamp is not finite: {self.stamp}')
        if not self.key:
            self.key = f'{self.stamp:.6f}'
        rgb = np.asarray(self.rgb)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise InputError(f'frame {self.key}: rgb must be (H,W,3) uint8, got {rgb.shape} {rgb.dtype}')
        if rgb.shape[0] == 0 or rgb.shape[1] == 0:
            raise InputError(f'frame {self.key}: rgb image is empty ({rgb.shape})')
        self.rgb = rgb
        if self.depth is not None:
            depth = np.asarray(self.depth, dtype=np.float32)
            if depth.shape != rgb.shape[:2]:
                raise InputError(f'frame {self.key}: depth size {depth.shape[::-1]} differs from rgb size '
                                 f'{rgb.shape[1::-1]} (W,H)')
            self.depth = depth
        if self.K is not None:
            K = np.asarray(self.K, dtype=np.float64)
            if K.shape != (3, 3) or not np.all(np.isfinite(K)) or K[0, 0] <= 0 or K[1, 1] <= 0:
                raise InputError(f'frame {self.key}: intrinsics K must be a finite (3,3) matrix with '
                                 f'positive focal lengths, got {K.tolist()}')
            self.K = K

    @property
    def size(self) -> tuple[int, int]:
        """(W, H) of the image."""
        return self.rgb.shape[1], self.rgb.shape[0]
