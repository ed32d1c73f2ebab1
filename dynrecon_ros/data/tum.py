"""TUM RGB-D formats: trajectories, association, directory reader, ground-truth masks.

Layout and conventions: see the TUM RGB-D benchmark (rgb.txt / depth.txt ``timestamp filename``,
groundtruth.txt ``timestamp tx ty tz qx qy qz qw`` camera-to-world, depth PNG 16-bit 5000 units/m).
"""
from __future__ import annotations

import pathlib

import numpy as np
from scipy.spatial.transform import Rotation

from dynrecon_ros.errors import InputError


def poses_to_tum_rows(poses: np.ndarray) -> np.ndarray:
    """(N, 4, 4) camera-to-world -> (N, 7) ``tx ty tz qx qy qz qw``."""
    poses = np.asarray(poses, dtype=np.float64)
    quat = Rotation.from_matrix(poses[:, :3, :3]).as_quat()  # scipy order: x y z w (TUM's order)
    return np.concatenate([poses[:, :3, 3], quat], axis=1)


def tum_rows_to_poses(rows: np.ndarray) -> np.ndarray:
    """(N, 7) ``tx ty tz qx qy qz qw`` -> (N, 4, 4) camera-to-world."""
    rows = np.asarray(rows, dtype=np.float64)
    poses = np.tile(np.eye(4), (len(rows), 1, 1))
    if len(rows):
        poses[:, :3, :3] = Rotation.from_quat(rows[:, 3:7]).as_matrix()
        poses[:, :3, 3] = rows[:, :3]
    return poses


def write_trajectory(path, stamps: np.ndarray, poses: np.ndarray, header: str | None = None) -> pathlib.Path:
    """Write a TUM trajectory file: ``timestamp tx ty tz qx qy qz qw`` per line (stamps 6 decimals,
    values 10 significant digits), camera-to-world poses (N, 4, 4)."""
    path = pathlib.Path(path)
    stamps = np.asarray(stamps, dtype=np.float64)
    rows = poses_to_tum_rows(poses)
    lines = [] if header is None else ['# ' + h.lstrip('# ') for h in header.splitlines()]
    lines += [f'{s:.6f} ' + ' '.join(f'{x:.10g}' for x in r) for s, r in zip(stamps, rows)]
    path.write_text('\n'.join(lines) + '\n')
    return path
