"""One entry point for every input: TUM directory, ROS bag, video file or image folder -> Frames.

All sources are sized sequences (``len``) that iterate :class:`~dynrecon_ros.frames.Frame` in time order.
Video files and image folders are monocular: depth None, K None unless intrinsics are given.
"""
from __future__ import annotations

import pathlib

import cv2
import numpy as np

from dynrecon_ros.data.bags import is_bag, read_bag
from dynrecon_ros.data.tum import is_tum_directory, read_rgb, read_tum_directory, resolve_intrinsics
from dynrecon_ros.errors import InputError
from dynrecon_ros.frames import Frame

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')
VIDEO_SUFFIXES = ('.mp4', '.avi', '.mov', '.mkv', '.webm', '.m4v', '.mpg', '.mpeg')


def _monocular_K(intrinsics, width: int, height: int) -> np.ndarray | None:
    return None if intrinsics is None else resolve_intrinsics(intrinsics, None, width, height).K


class ImageFolder:
    """Images of a folder in name order. Stamps: the file stem when it is a number (TUM-style names),
    else index / ``fps``. Keys: the file stems."""

    def __init__(self, root, intrinsics=None, fps: float = 30.0):
        self.root = root = pathlib.Path(root)
        self.paths = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.paths:
            raise InputError(f'no images ({", ".join(IMAGE_SUFFIXES)}) in folder', root)
        self.keys = [p.stem for p in self.paths]
        try:
            self.stamps = np.array([float(k) for k in self.keys])
            numeric = bool(np.all(np.isfinite(self.stamps)))
        except ValueError:
            numeric = False
        if numeric:
            order = np.argsort(self.stamps, kind='stable')
            self.paths = [self.paths[i] for i in order]
            self.keys = [self.keys[i] for i in order]
            self.stamps = self.stamps[order]
        else:
            self.stamps = np.arange(len(self.paths)) / float(fps)
        h, w = read_rgb(self.paths[0]).shape[:2]
        self.size = (w, h)
        self.K = _monocular_K(intrinsics, w, h)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Frame:
        rgb = read_rgb(self.paths[i])
        if rgb.shape[1::-1] != self.size:
            raise InputError(f'image size {rgb.shape[1]}x{rgb.shape[0]} differs from the first image '
                             f'({self.size[0]}x{self.size[1]})', self.paths[i])
        return Frame(stamp=self.stamps[i], rgb=rgb, K=self.K, key=self.keys[i], meta={'rgb_path': str(self.paths[i])})

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


class VideoFile:
    """Frames of a video file via cv2.VideoCapture. Stamps from the decoder's position (or index / fps);
    keys are the stamps with 6 decimals."""

    def __init__(self, path, intrinsics=None):
        self.path = pathlib.Path(path)
        cap = self._open()
        self.fps = cap.get(cv2.CAP_PROP_FPS) or 30.0
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        cap.release()
        if w <= 0 or h <= 0:
            raise InputError('video has no readable frames', self.path)
        self._count = max(count, 0)
        self.size = (w, h)
        self.K = _monocular_K(intrinsics, w, h)

    def _open(self):
        cap = cv2.VideoCapture(str(self.path))
        if not cap.isOpened():
            raise InputError('cannot open video file', self.path)
        return cap

    def __len__(self) -> int:
        """Frame count reported by the container (may be approximate for some codecs)."""
        return self._count

    def __iter__(self):
        cap = self._open()
        try:
            i = 0
            while True:
                ok, bgr = cap.read()
                if not ok:
                    break
                stamp = i / self.fps
                yield Frame(stamp=stamp, rgb=cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), K=self.K, key=f'{stamp:.6f}',
                            meta={'video_index': i})
                i += 1
        finally:
            cap.release()


def open_source(path, intrinsics=None, max_dt: float = 0.02):
    """Open ``path`` as a frame source, dispatching on what it is.

    - TUM RGB-D directory (has rgb.txt): :class:`~dynrecon_ros.data.tum.TumDirectory`; ``intrinsics`` None
      means 'auto' (calibration.txt if present, else fr3).
    - ROS 1 ``.bag`` / ROS 2 bag directory: :class:`~dynrecon_ros.data.bags.BagFrames` (K from camera_info
      unless ``intrinsics`` is a (3, 3) K or a preset name).
    - video file: :class:`VideoFile`; folder of images: :class:`ImageFolder` (monocular).
    ``intrinsics``: None, 'fr1' | 'fr2' | 'fr3' | 'ros' | 'auto', or a (3, 3) K.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise InputError('input not found', path)
    if is_tum_directory(path):
        return read_tum_directory(path, intrinsics='auto' if intrinsics is None else intrinsics, max_dt=max_dt)
    if is_bag(path):
        bag = read_bag(path, max_dt=max_dt)
        if intrinsics is not None and not (isinstance(intrinsics, str) and intrinsics == 'auto'):
            bag.K = resolve_intrinsics(intrinsics, None, *bag.size).K
        return bag
    if path.is_dir():
        return ImageFolder(path, intrinsics=intrinsics)
    if path.suffix.lower() in VIDEO_SUFFIXES:
        return VideoFile(path, intrinsics=intrinsics)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        raise InputError('a single image is not a sequence; give its folder', path)
    raise InputError('unknown input: expected a TUM directory, a .bag file, a ROS 2 bag directory, a video file '
                     'or a folder of images', path)
