"""Stage 2, sliding window: the last N accepted frames, the keyframe rule and the pair graph; and the
window-step protocol (:class:`WindowStep`) that each backend implements over it.

The window holds the most recent ``size`` frames. Keyframes are older frames kept as anchors: a frame
becomes a keyframe when the camera moved enough (translation / rotation) or enough frames passed
since the last keyframe. The pair graph links each frame to its neighbours within ±k plus strided
"long" pairs to keyframes, like MonST3R's sliding-window pairs; long pairs bound the drift of
frame-to-frame chaining.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:  # config.py imports this module
    from dynrecon_ros.config import WindowConfig


@dataclass
class WindowEntry:
    """One frame in the window: index = push order among accepted frames."""

    index: int
    frame: object  # dynrecon_ros.frames.Frame
    pose: np.ndarray | None = None  # (4, 4) world<-camera
    fixed: bool = False  # held to its estimate by the alignment
    keyframe: bool = False
    mask: np.ndarray | None = None  # (H, W) bool dynamic (RGB-D: or flow known wrong), once segmented: the pose prior
    data: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.frame.key


def rotation_angle_deg(R: np.ndarray) -> float:
    """Angle of a (3, 3) rotation in degrees."""
    c = (np.trace(R) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))


class SlidingWindow:
    """Last ``cfg.size`` frames plus up to ``cfg.keyframes`` older keyframes.

    Args:
        cfg: the window section of the pipeline config (:class:`dynrecon_ros.config.WindowConfig`):
            size (>= 2) frames in the window; neighbours k: each frame is paired with the previous k
            frames; keyframes: how many keyframes outside the window are kept as long-pair anchors;
            keyframe_translation_m / keyframe_rotation_deg / keyframe_max_gap: the keyframe rule (a
            frame becomes a keyframe when it moved this much from the last keyframe or this many
            frames passed since it); long_stride: besides keyframes, pair the new frame with window
            frames at multiples of this. far_keyframes: keyframes pushed out of the anchors are kept as far anchors
            (:attr:`far`, oldest first, up to this many; the step pairs them: ``link_far``).
    """

    def __init__(self, cfg: WindowConfig):
        if cfg.size < 2:
            raise ValueError('window size must be >= 2')
        self.size = cfg.size
        self.neighbours = max(1, cfg.neighbours)
        self.max_keyframes = cfg.keyframes
        self.kf_translation = cfg.keyframe_translation_m
        self.kf_rotation = cfg.keyframe_rotation_deg
        self.kf_max_gap = cfg.keyframe_max_gap
        self.long_stride = cfg.long_stride
        self.entries: list[WindowEntry] = []
        self.keyframes: list[WindowEntry] = []
        if cfg.far_keyframes < 0:
            raise ValueError(f'window.far_keyframes must be >= 0 (0 = off), got {cfg.far_keyframes}')
        self.max_far = cfg.far_keyframes
        self.far: list[WindowEntry] = []  # keyframes older than self.keyframes', oldest first (far anchors)
        self._far_links: dict[int, int] = {}  # push index of a frame -> that of the far anchor paired with it
        self._count = 0

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, frame) -> tuple[WindowEntry, list[WindowEntry]]:
        """Append a frame; returns (its entry, entries that left the window, oldest first)."""
        e = WindowEntry(self._count, frame)
        self._count += 1
        self.entries.append(e)
        left = []
        while len(self.entries) > self.size:
            left.append(self.entries.pop(0))
        if left:
            self._prune_far_links()
        return e, left

    def pop_last(self) -> WindowEntry:
        """Remove the newest entry (a frame that turned out bad)."""
        e = self.entries.pop()
        if e in self.keyframes:
            self.keyframes.remove(e)
        self._far_links.pop(e.index, None)
        return e

    def is_keyframe(self, pose: np.ndarray, index: int) -> bool:
        """Keyframe rule against the last keyframe: motion or frame-count threshold."""
        if not self.keyframes:
            return True
        last = self.keyframes[-1]
        rel = np.linalg.inv(last.pose) @ pose
        return (np.linalg.norm(rel[:3, 3]) > self.kf_translation
                or rotation_angle_deg(rel[:3, :3]) > self.kf_rotation
                or index - last.index >= self.kf_max_gap)

    def mark_keyframe(self, entry: WindowEntry) -> None:
        entry.keyframe = True
        self.keyframes.append(entry)
        # keep the anchors that are outside the window plus the ones inside it
        inside = {id(e) for e in self.entries}
        outside = [k for k in self.keyframes if id(k) not in inside]
        drop = outside[:-self.max_keyframes] if self.max_keyframes > 0 else outside
        self.keyframes = [k for k in self.keyframes if k not in drop]
        if self.max_far > 0:
            for k in drop:  # published long ago: a far anchor needs its frame, pose and mask only
                k.data = {}
            self.far = (self.far + drop)[-self.max_far:]
        if drop:
            self._prune_far_links()

    def link_far(self, anchor: WindowEntry, entry: WindowEntry) -> None:
        """Record that ``entry`` was paired with the far anchor ``anchor``: :meth:`all_entries` holds the anchor
        (its pose fixed: it was published long ago) while ``entry`` is in the window or a keyframe."""
        self._far_links[entry.index] = anchor.index

    def pairs_for_newest(self) -> list[tuple[WindowEntry, WindowEntry]]:
        """Pairs (older, newest) of the graph that involve the newest frame, nearest first."""
        if len(self.entries) < 2:
            return []
        new = self.entries[-1]
        olds: list[WindowEntry] = []
        for d in range(1, self.neighbours + 1):
            if len(self.entries) - 1 - d >= 0:
                olds.append(self.entries[-1 - d])
        if self.long_stride > 0:
            for e in self.entries[:-1]:
                if (new.index - e.index) % self.long_stride == 0 and e not in olds:
                    olds.append(e)
        for k in reversed(self.keyframes):
            if k is not new and k not in olds:
                olds.append(k)
        return [(o, new) for o in olds]

    def graph(self) -> list[tuple[int, int]]:
        """All pairs (i, j), i < j, as push indices, over window frames and keyframes."""
        win = [e.index for e in self.entries]
        pairs = set()
        for a, ia in enumerate(win):
            for ib in win[a + 1:a + 1 + self.neighbours]:
                pairs.add((ia, ib))
        for k in self.keyframes:
            for e in self.entries:
                if k.index < e.index:
                    pairs.add((k.index, e.index))
        return sorted(pairs)

    def all_entries(self) -> list[WindowEntry]:
        """Keyframes and window frames (and the far anchors paired with them), by push order, without duplicates."""
        near = {e.index: e for e in self.entries + self.keyframes}
        if self._far_links:
            used = set(self._far_links.values())
            near.update({e.index: e for e in self.far if e.index in used})
        return sorted(near.values(), key=lambda e: e.index)

    def _prune_far_links(self) -> None:
        """Forget the far links of frames no longer in the window nor keyframes (after either changed)."""
        near = {e.index for e in self.entries + self.keyframes}
        self._far_links = {i: a for i, a in self._far_links.items() if i in near}


@runtime_checkable
class WindowStep(Protocol):
    """A backend's window step: all the Reconstructor calls (``predictor.window_step(...)`` makes it).

    Implementations: :class:`dynrecon_ros.rgbd_step.RGBDStep` (RGB-D predictor) and
    :class:`dynrecon_ros.monocular.MonocularWindow` (DUSt3R/MonST3R network).
    """

    needs_depth: bool  # frames without a depth image are skipped
    estimates_intrinsics: bool  # frames without K (and no configured default) are accepted

    def work_frame(self, frame):
        """The frame as the window holds it (its processing size); ``frame`` itself when unchanged."""

    def step(self, window: SlidingWindow, entry: WindowEntry, published: set[int], world_pose: np.ndarray) -> str:
        """One step for the newest ``entry`` of ``window`` (``published``: push indices of frames whose
        results are out; ``world_pose`` (4, 4): where the first frame goes). Sets pose, depth, K,
        ``data['conf']`` and masks (``mask``, ``data['prob']``, ``data['mask']``) of the unpublished
        entries; returns '' or the reason to skip the new frame (the caller then removes it)."""
