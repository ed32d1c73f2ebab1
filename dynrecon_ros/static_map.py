"""Stage 7, static map: a coloured voxel map in the world frame that keeps only static structure.

Each frame adds its static, confident depth points (one observation per voxel per frame: weight +=
mean confidence, running mean of position and colour). Before adding, every stored voxel is
projected into the frame: if it lies clearly in front of the observed depth (the camera sees
through it: free space) or at the depth of a pixel labelled dynamic, it loses weight, and voxels
whose weight falls to zero are removed. A person who walked through therefore leaves no trail even
when segmentation missed them in some frames. Voxels are keyed by one int64 per voxel index
(21 bits per axis) kept sorted, so all updates are vectorised numpy (searchsorted / bincount).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from dynrecon_ros.errors import InputError

_BITS = 21
_OFF = 1 << (_BITS - 1)
_MASK = (1 << _BITS) - 1

PLY_DTYPE = np.dtype([('x', '<f4'), ('y', '<f4'), ('z', '<f4'), ('red', 'u1'), ('green', 'u1'), ('blue', 'u1')])


@dataclass
class MapConfig:
    """Parameters of the static voxel map (they become ROS parameters, same names).

    Attributes:
        voxel_size: voxel edge in metres.
        min_depth, max_depth: depth readings outside [min_depth, max_depth] metres are ignored.
        min_confidence: pixels whose confidence is below it are not integrated.
        min_weight: voxels are published by :meth:`VoxelMap.points` from this weight on (about the
            number of frames that observed them, times their mean confidence).
        max_weight: weight cap, so that a long-observed voxel can still be carved away in bounded time.
        free_weight: weight a voxel loses each time a frame sees through it or sees it as dynamic.
        carve_margin: a voxel is seen through when it lies more than
            ``carve_margin + carve_margin_rel * depth`` metres in front of the observed depth.
        carve_margin_rel: depth-proportional part of the carving margin (depth noise, pose error).
        max_voxels: bound on stored voxels; the weakest (then oldest) are dropped beyond it.
        pixel_stride: integrate every n-th pixel in both directions (1 = all).
    """

    voxel_size: float = 0.02
    min_depth: float = 0.1
    max_depth: float = 6.0
    min_confidence: float = 0.0
    min_weight: float = 2.0
    max_weight: float = 20.0
    free_weight: float = 1.0
    carve_margin: float = 0.05
    carve_margin_rel: float = 0.02
    max_voxels: int = 2_000_000
    pixel_stride: int = 1

    def __post_init__(self) -> None:
        if not self.voxel_size > 0:
            raise InputError(f'map voxel_size must be > 0, got {self.voxel_size}')
        if not 0 <= self.min_depth < self.max_depth:
            raise InputError(f'map depth range [{self.min_depth}, {self.max_depth}] is empty')
        if self.max_voxels < 1 or self.pixel_stride < 1:
            raise InputError('map max_voxels and pixel_stride must be >= 1')
        if self.free_weight < 0 or self.carve_margin < 0 or self.carve_margin_rel < 0:
            raise InputError('map free_weight, carve_margin and carve_margin_rel must be >= 0')


def _keys(idx: np.ndarray) -> np.ndarray:
    """(M, 3) int64 voxel indices -> (M,) int64 keys (21 bits per axis)."""
    i = (idx + _OFF) & _MASK
    return (i[:, 0] << (2 * _BITS)) | (i[:, 1] << _BITS) | i[:, 2]


class VoxelMap:
    """Coloured, carved voxel map; see the module docstring.

    Stored per voxel (arrays sorted by key): key, weight, mean xyz, mean rgb, last frame seen.
    """

    def __init__(self, cfg: MapConfig | None = None):
        self.cfg = cfg or MapConfig()
        self._key = np.zeros(0, np.int64)
        self._w = np.zeros(0, np.float32)
        self._xyz = np.zeros((0, 3), np.float32)
        self._rgb = np.zeros((0, 3), np.float32)
        self._seen = np.zeros(0, np.int64)
        self._frame = 0

    def __len__(self) -> int:
        """Number of stored voxels (published or not)."""
        return int(self._key.size)

    def integrate(self, depth: np.ndarray, rgb: np.ndarray, K: np.ndarray, pose: np.ndarray,
                  static: np.ndarray | None = None, confidence: np.ndarray | None = None) -> None:
        """Carve with one frame, then add its static, confident points.

        Args:
            depth: (H, W) float32 metres (0/NaN = invalid).
            rgb: (H, W, 3) uint8.
            K: (3, 3) intrinsics.
            pose: (4, 4) camera-to-world.
            static: (H, W) bool, True = static pixel; None = all static.
            confidence: (H, W) float32 per-pixel confidence, or None (all 1).
        """
        depth = np.asarray(depth, dtype=np.float32)
        h, w = depth.shape
        if rgb.shape[:2] != (h, w) or (static is not None and static.shape != (h, w)) or \
                (confidence is not None and confidence.shape != (h, w)):
            raise InputError(f'map integrate: depth {depth.shape}, rgb {rgb.shape}, static/confidence sizes differ')
        K = np.asarray(K, dtype=np.float64)
        pose = np.asarray(pose, dtype=np.float64)
        cfg = self.cfg
        self._frame += 1
        good = np.isfinite(depth) & (depth >= cfg.min_depth) & (depth <= cfg.max_depth)
        static = np.ones((h, w), bool) if static is None else np.asarray(static, dtype=bool)
        self._carve(depth, good, static, K, pose)

        use = good & static
        if confidence is not None:
            conf = np.asarray(confidence, dtype=np.float32)
            use &= np.isfinite(conf) & (conf >= cfg.min_confidence)
        else:
            conf = None
        s = cfg.pixel_stride
        if s > 1:
            sub = np.zeros_like(use)
            sub[::s, ::s] = True
            use &= sub
        v, u = np.nonzero(use)
        if v.size == 0:
            return
        z = depth[v, u].astype(np.float64)
        pc = np.stack([(u - K[0, 2]) / K[0, 0] * z, (v - K[1, 2]) / K[1, 1] * z, z], axis=1)
        pw = pc @ pose[:3, :3].T + pose[:3, 3]
        col = rgb[v, u].astype(np.float64)
        wpx = np.ones(v.size) if conf is None else np.maximum(conf[v, u].astype(np.float64), 1e-3)
        key = _keys(np.floor(pw / cfg.voxel_size).astype(np.int64))
        ukey, inv = np.unique(key, return_inverse=True)
        # per-voxel aggregates of this frame (confidence-weighted means)
        cnt = np.bincount(inv, weights=wpx)
        nvox = ukey.size
        fxyz = np.stack([np.bincount(inv, weights=wpx * pw[:, k], minlength=nvox) for k in range(3)], 1) / cnt[:, None]
        frgb = np.stack([np.bincount(inv, weights=wpx * col[:, k], minlength=nvox) for k in range(3)], 1) / cnt[:, None]
        npx = np.bincount(inv, minlength=nvox)
        fw = cnt / npx  # one observation per voxel per frame, weighted by its mean confidence
        self._merge(ukey, fw.astype(np.float32), fxyz.astype(np.float32), frgb.astype(np.float32))
        self._bound()

    def _carve(self, depth: np.ndarray, good: np.ndarray, static: np.ndarray, K: np.ndarray, pose: np.ndarray) -> None:
        """Lower the weight of voxels this frame sees through or sees as dynamic; drop empty ones."""
        if self._key.size == 0 or self.cfg.free_weight == 0:
            return
        cfg = self.cfg
        h, w = depth.shape
        world_to_cam = np.linalg.inv(pose)
        pc = self._xyz.astype(np.float64) @ world_to_cam[:3, :3].T + world_to_cam[:3, 3]
        z = pc[:, 2]
        front = z > cfg.min_depth
        with np.errstate(divide='ignore', invalid='ignore'):
            u = np.rint(K[0, 0] * pc[:, 0] / z + K[0, 2])
            v = np.rint(K[1, 1] * pc[:, 1] / z + K[1, 2])
        inside = front & (u >= 0) & (u < w) & (v >= 0) & (v < h)
        idx = np.flatnonzero(inside)
        if idx.size == 0:
            return
        ui = u[idx].astype(np.int64)
        vi = v[idx].astype(np.int64)
        # seen through only if the whole 3x3 neighbourhood is farther (silhouette edges and invalid
        # readings then never carve: invalid counts as depth 0)
        near = cv2.erode(np.where(good, depth, 0.0).astype(np.float32), np.ones((3, 3), np.uint8))
        d = depth[vi, ui]
        dn = near[vi, ui]
        ok = good[vi, ui]
        zi = z[idx]
        margin = cfg.carve_margin + cfg.carve_margin_rel * zi
        free = ok & (zi < dn - margin)
        dynamic = ok & ~static[vi, ui] & (np.abs(zi - d) <= margin)
        hit = idx[free | dynamic]
        if hit.size == 0:
            return
        self._w[hit] -= cfg.free_weight
        keep = self._w > 0
        if not keep.all():
            self._select(keep)

    def _select(self, keep: np.ndarray) -> None:
        self._key = self._key[keep]
        self._w = self._w[keep]
        self._xyz = self._xyz[keep]
        self._rgb = self._rgb[keep]
        self._seen = self._seen[keep]

    def _merge(self, ukey: np.ndarray, fw: np.ndarray, fxyz: np.ndarray, frgb: np.ndarray) -> None:
        """Add one frame's per-voxel observations (``ukey`` sorted unique) into the sorted arrays."""
        pos = np.searchsorted(self._key, ukey)
        if self._key.size:
            pos_c = np.minimum(pos, self._key.size - 1)
            old = self._key[pos_c] == ukey
        else:
            pos_c, old = pos, np.zeros(ukey.size, bool)
        if old.any():
            i = pos_c[old]
            w0 = self._w[i]
            w1 = fw[old]
            tot = w0 + w1
            self._xyz[i] = (self._xyz[i] * w0[:, None] + fxyz[old] * w1[:, None]) / tot[:, None]
            self._rgb[i] = (self._rgb[i] * w0[:, None] + frgb[old] * w1[:, None]) / tot[:, None]
            self._w[i] = np.minimum(tot, self.cfg.max_weight)
            self._seen[i] = self._frame
        new = ~old
        if new.any():
            at = pos[new]
            self._key = np.insert(self._key, at, ukey[new])
            self._w = np.insert(self._w, at, fw[new])
            self._xyz = np.insert(self._xyz, at, fxyz[new], axis=0)
            self._rgb = np.insert(self._rgb, at, frgb[new], axis=0)
            self._seen = np.insert(self._seen, at, np.full(int(new.sum()), self._frame))

    def _bound(self) -> None:
        """Keep at most ``max_voxels``: drop the lowest weight, the least recently seen first among equals."""
        extra = self._key.size - self.cfg.max_voxels
        if extra <= 0:
            return
        order = np.lexsort((self._seen, self._w))  # by weight, then by last seen
        keep = np.ones(self._key.size, bool)
        keep[order[:extra]] = False
        self._select(keep)

    def points(self) -> np.ndarray:
        """(M, 6) float32: x y z (world, metres) and r g b (0..255) of voxels with weight >= min_weight."""
        sel = self._w >= self.cfg.min_weight
        return np.concatenate([self._xyz[sel], np.clip(np.rint(self._rgb[sel]), 0, 255)], axis=1).astype(np.float32)

    def save_ply(self, path) -> int:
        """Write :meth:`points` as binary little-endian PLY (x y z float, red green blue uchar).

        Returns the number of points written.
        """
        return write_ply(path, self.points())


def write_ply(path, points: np.ndarray) -> int:
    """Write (M, 6) xyz + rgb points as binary little-endian PLY; returns M."""
    pts = np.asarray(points)
    if pts.ndim != 2 or pts.shape[1] != 6:
        raise InputError(f'PLY points must be (M, 6), got {pts.shape}')
    rec = np.empty(pts.shape[0], PLY_DTYPE)
    rec['x'], rec['y'], rec['z'] = pts[:, 0], pts[:, 1], pts[:, 2]
    rgb = np.clip(np.rint(pts[:, 3:6]), 0, 255).astype(np.uint8)
    rec['red'], rec['green'], rec['blue'] = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    header = ('ply\nformat binary_little_endian 1.0\ncomment dynrecon_ros static map\n'
              f'element vertex {pts.shape[0]}\n'
              'property float x\nproperty float y\nproperty float z\n'
              'property uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n')
    with open(path, 'wb') as f:
        f.write(header.encode('ascii'))
        f.write(rec.tobytes())
    return int(pts.shape[0])


def read_ply(path) -> np.ndarray:
    """Read a PLY written by :func:`write_ply`; (M, 6) float32."""
    with open(path, 'rb') as f:
        data = f.read()
    end = data.find(b'end_header\n')
    if not data.startswith(b'ply\n') or end < 0:
        raise InputError('not a PLY file (no ply/end_header)', path)
    header = data[:end].decode('ascii', 'replace').splitlines()
    if 'format binary_little_endian 1.0' not in header:
        raise InputError('only binary_little_endian PLY is supported', path)
    count = next((int(line.split()[2]) for line in header if line.startswith('element vertex')), None)
    if count is None:
        raise InputError('PLY has no vertex element', path)
    rec = np.frombuffer(data, PLY_DTYPE, count=count, offset=end + len(b'end_header\n'))
    return np.stack([rec['x'], rec['y'], rec['z'], rec['red'], rec['green'], rec['blue']], 1).astype(np.float32)
