"""TUM RGB-D formats: intrinsics, trajectories, association, directory reader, ground-truth masks.

Directory layout (the benchmark's): ``rgb/<ts>.png`` 8-bit colour, ``depth/<ts>.png`` 16-bit with
5000 units per metre (0 = no reading), ``rgb.txt`` / ``depth.txt`` lines ``timestamp filename``
(``#`` comments), ``groundtruth.txt`` lines ``timestamp tx ty tz qx qy qz qw`` (colour camera optical
frame in world). Our additions, all optional: ``calibration.txt`` (one line
``fx fy cx cy [k1 k2 p1 p2 k3]`` for the colour images as stored; ``#`` comments),
``sensor.yaml`` (the sensor's timing, :func:`read_sensor_timing`: ``rolling_shutter_s``, the row readout
time, and ``depth_delay_s``, how long after the colour image the depth image is taken) and
``masks_gt/<rgb ts>.png`` (mono8, 255 = dynamic pixel).
"""
from __future__ import annotations

import pathlib
from dataclasses import dataclass

import cv2
import numpy as np
from scipy.spatial.transform import Rotation

from dynrecon_ros.errors import InputError
from dynrecon_ros.frames import Frame
from dynrecon_ros.geometry import poses_from_tum

DEPTH_SCALE = 5000.0  # TUM depth PNG units per metre


@dataclass(frozen=True)
class Intrinsics:
    """Pinhole intrinsics of a 640x480 TUM colour camera with OpenCV distortion (k1 k2 p1 p2 k3)."""

    fx: float
    fy: float
    cx: float
    cy: float
    dist: tuple = (0.0, 0.0, 0.0, 0.0, 0.0)
    width: int = 640
    height: int = 480

    @property
    def K(self) -> np.ndarray:
        """(3, 3) float64."""
        return np.array([[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]])

    def scaled(self, width: int, height: int) -> 'Intrinsics':
        """The same camera at another image size (pixel-centre convention kept simple: linear scale)."""
        sx, sy = width / self.width, height / self.height
        return Intrinsics(self.fx * sx, self.fy * sy, self.cx * sx, self.cy * sy, self.dist, width, height)


INTRINSICS = {
    'fr1': Intrinsics(517.3, 516.5, 318.6, 255.3, (0.2624, -0.9531, -0.0054, 0.0026, 1.1633)),
    'fr2': Intrinsics(520.9, 521.0, 325.1, 249.7, (0.2312, -0.7849, -0.0033, -0.0001, 0.9172)),
    'fr3': Intrinsics(535.4, 539.2, 320.1, 247.6),  # fr3 images are already undistorted
    'ros': Intrinsics(525.0, 525.0, 319.5, 239.5),  # ROS default, what the bags' camera_info carry
}


# ---------------------------------------------------------------------------------------------
# Trajectories


def poses_to_tum_rows(poses: np.ndarray) -> np.ndarray:
    """(N, 4, 4) camera-to-world -> (N, 7) ``tx ty tz qx qy qz qw``."""
    poses = np.asarray(poses, dtype=np.float64).reshape(-1, 4, 4)
    quat = Rotation.from_matrix(poses[:, :3, :3]).as_quat() if len(poses) else np.zeros((0, 4))
    return np.concatenate([poses[:, :3, 3], quat], axis=1)  # scipy quaternion order x y z w = TUM's


def write_trajectory(path, stamps: np.ndarray, poses: np.ndarray, header: str | None = None) -> pathlib.Path:
    """Write a TUM trajectory: ``timestamp tx ty tz qx qy qz qw`` per line, camera-to-world.

    stamps (N,) seconds (6 decimals, as TUM), poses (N, 4, 4); values with 10 significant digits.
    ``header`` lines are written as ``#`` comments.
    """
    path = pathlib.Path(path)
    stamps = np.asarray(stamps, dtype=np.float64).reshape(-1)
    poses = np.asarray(poses, dtype=np.float64).reshape(-1, 4, 4)
    if len(stamps) != len(poses):
        raise ValueError(f'{len(stamps)} stamps for {len(poses)} poses')
    rows = poses_to_tum_rows(poses)
    lines = [] if header is None else ['# ' + h.lstrip('#').strip() for h in header.splitlines()]
    lines += [f'{s:.6f} ' + ' '.join(f'{x:.10g}' for x in r) for s, r in zip(stamps, rows)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('\n'.join(lines) + '\n')
    return path


def _data_lines(path: pathlib.Path):
    """Yield (line number, fields) of the non-comment, non-empty lines of a TUM text file."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise InputError('file not found' if not path.exists() else 'not a regular file', path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f'cannot read: {exc}', path) from None
    for no, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if line and not line.startswith('#'):
            yield no, line.replace(',', ' ').replace('\t', ' ').split()


def _check_increasing(path, stamps: list, lines: list) -> None:
    for k in range(1, len(stamps)):
        if stamps[k] < stamps[k - 1]:
            raise InputError(f'timestamp {stamps[k]:.6f} goes backwards (previous line has {stamps[k - 1]:.6f})',
                             path, lines[k])


def read_trajectory(path) -> tuple[np.ndarray, np.ndarray]:
    """Read a TUM trajectory file -> stamps (N,) float64, poses (N, 4, 4) camera-to-world.

    Raises InputError naming the file and line for malformed lines, non-finite values, zero quaternions,
    timestamps going backwards, or a file without poses.
    """
    stamps, rows, lines = [], [], []
    for no, fields in _data_lines(path):
        if len(fields) != 8:
            raise InputError(f'expected 8 values "timestamp tx ty tz qx qy qz qw", got {len(fields)}', path, no)
        try:
            values = [float(x) for x in fields]
        except ValueError:
            raise InputError(f'not a number in "{" ".join(fields)}"', path, no) from None
        if not np.all(np.isfinite(values)):
            raise InputError('non-finite value', path, no)
        if np.linalg.norm(values[4:8]) < 1e-9:
            raise InputError('zero quaternion', path, no)
        stamps.append(values[0])
        rows.append(values[1:])
        lines.append(no)
    if not stamps:
        raise InputError('no poses in trajectory file', path)
    _check_increasing(path, stamps, lines)
    return np.array(stamps), poses_from_tum(np.array(rows))


def read_file_list(path) -> list[tuple[str, float, str, int]]:
    """Read rgb.txt / depth.txt -> [(stamp string, stamp, filename, line number)] in file order."""
    entries = []
    for no, fields in _data_lines(path):
        if len(fields) < 2:
            raise InputError('expected "timestamp filename"', path, no)
        try:
            stamp = float(fields[0])
        except ValueError:
            raise InputError(f'timestamp "{fields[0]}" is not a number', path, no) from None
        if not np.isfinite(stamp):
            raise InputError('non-finite timestamp', path, no)
        entries.append((fields[0], stamp, fields[1], no))
    _check_increasing(path, [e[1] for e in entries], [e[3] for e in entries])
    return entries


# ---------------------------------------------------------------------------------------------
# Association


def associate(stamps_a, stamps_b, max_dt: float = 0.02, offset: float = 0.0) -> list[tuple[int, int]]:
    """Match two stamp lists like TUM's associate.py: candidate pairs closer than ``max_dt`` seconds,
    taken greedily in order of increasing time difference, each entry used at most once; ``offset`` s is
    added to the second list's stamps first (associate.py's ``--offset``: a depth image known to be taken
    d s after its colour one matches with offset -d).

    Returns [(index into a, index into b)] sorted by the index into a. Hand-written: the benchmark's
    tool is a script, not an importable library, and evo's association allows reuse differently.
    """
    a = np.asarray(stamps_a, dtype=np.float64).reshape(-1)
    b = np.asarray(stamps_b, dtype=np.float64).reshape(-1) + offset
    if not len(a) or not len(b):
        return []
    order = np.argsort(b, kind='stable')
    bs = b[order]
    lo = np.searchsorted(bs, a - max_dt, side='left')
    hi = np.searchsorted(bs, a + max_dt, side='right')
    counts = hi - lo
    ia = np.repeat(np.arange(len(a)), counts)
    ib_sorted = np.concatenate([np.arange(l, h) for l, h in zip(lo, hi)]) if counts.sum() else np.zeros(0, int)
    ib = order[ib_sorted.astype(int)]
    diff = np.abs(a[ia] - b[ib])
    keep = diff < max_dt
    ia, ib, diff = ia[keep], ib[keep], diff[keep]
    used_a, used_b, pairs = set(), set(), []
    for k in np.lexsort((ib, ia, diff)):
        if ia[k] not in used_a and ib[k] not in used_b:
            used_a.add(ia[k])
            used_b.add(ib[k])
            pairs.append((int(ia[k]), int(ib[k])))
    return sorted(pairs)


# ---------------------------------------------------------------------------------------------
# Images


def read_rgb(path, where: str = '') -> np.ndarray:
    """Read a colour image -> (H, W, 3) uint8 RGB; InputError naming the file when unreadable."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise InputError('cannot read colour image' + (f' ({where})' if where else ''), path)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_depth_png(path, where: str = '', scale: float = DEPTH_SCALE) -> np.ndarray:
    """Read a TUM 16-bit depth PNG -> (H, W) float32 metres, 0 = no reading."""
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise InputError('cannot read depth image' + (f' ({where})' if where else ''), path)
    if img.ndim != 2 or img.dtype != np.uint16:
        raise InputError(f'depth image must be single-channel 16-bit, got {img.dtype} with shape {img.shape}', path)
    return img.astype(np.float32) / np.float32(scale)


def _depth_units(depth: np.ndarray, scale: float) -> np.ndarray:
    """(H, W) metres (0 or NaN = no reading) -> (H, W) uint16 TUM units (rounded, clipped to 65535)."""
    d = np.nan_to_num(np.asarray(depth, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    return np.clip(np.round(d * scale), 0, 65535).astype(np.uint16)


def write_depth_png(path, depth: np.ndarray, scale: float = DEPTH_SCALE) -> None:
    """(H, W) metres (0 or NaN = no reading) -> 16-bit PNG in TUM units (rounded, clipped to 65535)."""
    cv2.imwrite(str(path), _depth_units(depth, scale))


def png_rounded_depth(depth: np.ndarray, scale: float = DEPTH_SCALE) -> np.ndarray:
    """(H, W) metres -> (H, W) float32 metres as :func:`write_depth_png` then :func:`read_depth_png` give them
    back (rounded to 1 / scale m, NaN -> 0), without the file: the in-memory benches see what the command line
    sees."""
    return _depth_units(depth, scale).astype(np.float32) / np.float32(scale)


def read_masks(directory) -> dict[str, np.ndarray]:
    """Read a mask directory (``<key>.png`` mono8, >127 = dynamic) -> {key: (H, W) bool}."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise InputError('mask directory not found', directory)
    masks = {}
    for p in sorted(directory.glob('*.png')):
        img = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)
        if img is None:
            raise InputError('cannot read mask image', p)
        masks[p.stem] = img > 127
    if not masks:
        raise InputError('no *.png masks in directory', directory)
    return masks


def write_masks(directory, masks: dict) -> pathlib.Path:
    """{key: (H, W) bool} -> ``directory/<key>.png`` mono8 (255 = dynamic)."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for key, m in masks.items():
        cv2.imwrite(str(directory / f'{key}.png'), np.asarray(m, dtype=bool).astype(np.uint8) * 255)
    return directory


# ---------------------------------------------------------------------------------------------
# Directory reader


def read_calibration(path) -> Intrinsics:
    """calibration.txt: one line ``fx fy cx cy [k1 k2 p1 p2 k3]`` -> Intrinsics (size unknown: 0 x 0)."""
    for no, fields in _data_lines(path):
        try:
            v = [float(x) for x in fields]
        except ValueError:
            raise InputError('expected numbers "fx fy cx cy [k1 k2 p1 p2 k3]"', path, no) from None
        if len(v) not in (4, 8, 9) or v[0] <= 0 or v[1] <= 0:
            raise InputError('expected "fx fy cx cy [k1 k2 p1 p2 k3]" with positive focal lengths', path, no)
        dist = tuple(v[4:9]) + (0.0,) * (5 - len(v[4:9])) if len(v) > 4 else (0.0,) * 5
        return Intrinsics(v[0], v[1], v[2], v[3], dist, 0, 0)
    raise InputError('no calibration line', path)


SENSOR_TIMING_KEYS = ('rolling_shutter_s', 'depth_delay_s')


def read_sensor_timing(path) -> dict[str, float]:
    """sensor.yaml -> {'rolling_shutter_s': s, 'depth_delay_s': s} (a key left out is 0: global shutter,
    synchronised depth). The same names and ranges as the config's ``backend`` fields; InputError naming
    the file and the key when a value is not a number in range or a key is unknown."""
    import yaml
    try:
        data = yaml.safe_load(pathlib.Path(path).read_text())
    except yaml.YAMLError as exc:
        raise InputError(f'not valid YAML: {exc}', path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f'cannot read the sensor timing file: {exc.strerror or exc}', path) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError(f'expected a mapping of {", ".join(SENSOR_TIMING_KEYS)}', path)
    unknown = sorted(set(data) - set(SENSOR_TIMING_KEYS))
    if unknown:
        raise InputError(f'unknown key(s) {", ".join(map(str, unknown))} '
                         f'(known: {", ".join(SENSOR_TIMING_KEYS)})', path)
    out = {}
    for key in SENSOR_TIMING_KEYS:
        v = data.get(key, 0.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
            raise InputError(f'{key} must be a number of seconds, got {v!r}', path)
        out[key] = float(v)
    if not 0.0 <= out['rolling_shutter_s'] < 1.0:
        raise InputError(f'rolling_shutter_s must be a readout time in [0, 1) s, got {out["rolling_shutter_s"]}', path)
    if not abs(out['depth_delay_s']) < 1.0:
        raise InputError(f'depth_delay_s must be within (-1, 1) s, got {out["depth_delay_s"]}', path)
    return out


def optional_sensor_timing(path) -> tuple[pathlib.Path | None, dict[str, float] | None]:
    """(path, :func:`read_sensor_timing` of it) when a sensor timing file exists at ``path``, else (None, None)
    (a recording without one: the config's timing applies)."""
    path = pathlib.Path(path)
    if not path.exists():
        return None, None
    return path, read_sensor_timing(path)


def write_sensor_timing(path, rolling_shutter_s: float, depth_delay_s: float) -> pathlib.Path:
    """Write sensor.yaml (see :func:`read_sensor_timing`)."""
    path = pathlib.Path(path)
    path.write_text('# sensor timing, seconds: row readout time (0 = global shutter); depth image taken this long\n'
                    '# after the colour image. `dynrecon run` uses it when its config gives no timing.\n'
                    f'rolling_shutter_s: {float(rolling_shutter_s)!r}\ndepth_delay_s: {float(depth_delay_s)!r}\n')
    return path


def resolve_intrinsics(spec, root: pathlib.Path | None, width: int, height: int) -> Intrinsics:
    """Intrinsics for images of ``width`` x ``height`` from a spec: 'fr1' | 'fr2' | 'fr3' | 'ros' (scaled from
    640x480 when the images are another size), a (3, 3) K, an Intrinsics, or 'auto' (``calibration.txt`` in
    ``root`` if present, else fr3)."""
    if isinstance(spec, Intrinsics):
        return spec if spec.width in (0, width) else spec.scaled(width, height)
    if spec is None or (isinstance(spec, str) and spec == 'auto'):
        calib = root / 'calibration.txt' if root is not None else None
        if calib is not None and calib.exists():
            c = read_calibration(calib)
            return Intrinsics(c.fx, c.fy, c.cx, c.cy, c.dist, width, height)
        spec = 'fr3'
    if isinstance(spec, str):
        if spec not in INTRINSICS:
            raise InputError(f'unknown intrinsics "{spec}" (choose one of {", ".join(INTRINSICS)}, auto, or give K)')
        base = INTRINSICS[spec]
        return base if (base.width, base.height) == (width, height) else base.scaled(width, height)
    K = np.asarray(spec, dtype=np.float64)
    if K.shape != (3, 3) or not np.all(np.isfinite(K)) or K[0, 0] <= 0 or K[1, 1] <= 0:
        raise InputError(f'intrinsics must be a name or a finite (3,3) K, got {spec!r}')
    return Intrinsics(K[0, 0], K[1, 1], K[0, 2], K[1, 2], (0.0,) * 5, width, height)


class TumDirectory:
    """A TUM RGB-D directory as a lazily loaded sequence of :class:`Frame` (``len``, indexing, iteration).

    Colour and depth are associated by nearest stamp within ``max_dt`` (each used once; a depth delay in
    ``sensor.yaml`` is taken off the depth stamps first, so a late depth image is not matched with the next
    colour image). Without
    ``depth.txt`` the frames are monocular (depth None). With distortion in the intrinsics (fr1, fr2,
    or a calibration file) and ``undistort=True``, images are undistorted to the pinhole K (depth with
    nearest-neighbour sampling, so readings are never blended across edges).

    Attributes:
        root: the directory; stamps (N,) colour stamps; keys: the rgb.txt stamp strings;
        K (3, 3); intrinsics: the resolved Intrinsics; groundtruth: path of groundtruth.txt or None;
        masks_gt: path of masks_gt/ or None; depth_offsets: (N,) depth stamp - colour stamp of each frame
        (NaN without depth); sensor_timing: ``sensor.yaml``'s values
        (:func:`read_sensor_timing`) or None without one; sensor_timing_path: its path or None.
    """

    def __init__(self, root, intrinsics='auto', max_dt: float = 0.02, undistort: bool = True):
        self.root = root = pathlib.Path(root)
        if not root.is_dir():
            raise InputError('TUM directory not found' if not root.exists() else 'not a directory', root)
        rgb_list = read_file_list(root / 'rgb.txt')
        if not rgb_list:
            raise InputError('no images listed', root / 'rgb.txt')
        self.sensor_timing_path, self.sensor_timing = optional_sensor_timing(root / 'sensor.yaml')
        delay = self.sensor_timing['depth_delay_s'] if self.sensor_timing else 0.0
        depth_txt = root / 'depth.txt'
        self._pairs: list[tuple[tuple, tuple | None]]
        if depth_txt.exists():
            depth_list = read_file_list(depth_txt)
            pairs = associate([e[1] for e in rgb_list], [e[1] for e in depth_list], max_dt, offset=-delay)
            if not pairs:
                raise InputError(f'no colour/depth pair within {max_dt * 1000:.0f} ms: association is empty '
                                 f'({len(rgb_list)} colour, {len(depth_list)} depth stamps)', depth_txt)
            self._pairs = [(rgb_list[a], depth_list[b]) for a, b in pairs]
        else:
            self._pairs = [(e, None) for e in rgb_list]
        first = self._pairs[0][0]
        h, w = read_rgb(root / first[2], f'rgb.txt line {first[3]}').shape[:2]
        self.size = (w, h)
        self.intrinsics = resolve_intrinsics(intrinsics, root, w, h)
        self._maps = None
        self.K = self.intrinsics.K
        if undistort and any(self.intrinsics.dist):
            dist = np.array(self.intrinsics.dist)
            self.K, _ = cv2.getOptimalNewCameraMatrix(self.intrinsics.K, dist, (w, h), 0.0)
            self._maps = cv2.initUndistortRectifyMap(self.intrinsics.K, dist, None, self.K, (w, h), cv2.CV_32FC1)
        self.stamps = np.array([p[0][1] for p in self._pairs])
        self.keys = [p[0][0] for p in self._pairs]
        # (N,) depth stamp - colour stamp of each frame (NaN: monocular)
        self.depth_offsets = np.array([np.nan if d is None else d[1] - c[1] for c, d in self._pairs])
        gt = root / 'groundtruth.txt'
        self.groundtruth = gt if gt.exists() else None
        self.masks_gt = root / 'masks_gt' if (root / 'masks_gt').is_dir() else None

    def __len__(self) -> int:
        return len(self._pairs)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __getitem__(self, i: int) -> Frame:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        (key, stamp, rgb_name, rgb_line), dep = self._pairs[i]
        rgb_path = self.root / rgb_name
        rgb = read_rgb(rgb_path, f'rgb.txt line {rgb_line}')
        if rgb.shape[1::-1] != self.size:
            raise InputError(f'image size {rgb.shape[1]}x{rgb.shape[0]} differs from the first image '
                             f'({self.size[0]}x{self.size[1]})', rgb_path)
        depth, meta = None, {'rgb_path': str(rgb_path)}
        if dep is not None:
            depth_path = self.root / dep[2]
            depth = read_depth_png(depth_path, f'depth.txt line {dep[3]}')
            if depth.shape != rgb.shape[:2]:
                raise InputError(f'depth size {depth.shape[1]}x{depth.shape[0]} differs from colour size '
                                 f'{rgb.shape[1]}x{rgb.shape[0]} ({rgb_path.name})', depth_path)
            meta.update(depth_stamp=dep[1], depth_path=str(depth_path))
        if self._maps is not None:
            rgb = cv2.remap(rgb, *self._maps, cv2.INTER_LINEAR)
            if depth is not None:
                depth = cv2.remap(depth, *self._maps, cv2.INTER_NEAREST)
        return Frame(stamp=stamp, rgb=rgb, depth=depth, K=self.K.copy(), key=key, meta=meta)

    def read_groundtruth(self) -> tuple[np.ndarray, np.ndarray]:
        """groundtruth.txt -> stamps (N,), poses (N, 4, 4); InputError when there is none."""
        if self.groundtruth is None:
            raise InputError('no groundtruth.txt', self.root)
        return read_trajectory(self.groundtruth)


def read_tum_directory(path, intrinsics='auto', max_dt: float = 0.02, undistort: bool = True) -> TumDirectory:
    """Open a TUM RGB-D directory as a lazily loaded frame sequence (see :class:`TumDirectory`)."""
    return TumDirectory(path, intrinsics=intrinsics, max_dt=max_dt, undistort=undistort)


def is_tum_directory(path) -> bool:
    path = pathlib.Path(path)
    return path.is_dir() and (path / 'rgb.txt').is_file()
