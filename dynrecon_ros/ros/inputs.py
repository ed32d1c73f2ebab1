"""recon_node's input side: what a callback hands the worker, and colour/depth pairing by stamp.

No rclpy: :class:`StampPairer` is plain Python over stamps in seconds (by hand: message_filters'
ApproximateTimeSynchronizer comes only with a ROS distro, not from PyPI, and its policy is more than
a nearest partner within a slop needs).
"""
from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy as np


@dataclass
class InputFrame:
    """What a callback hands the worker: converted arrays plus the header to stamp outputs with."""
    header: object  # std_msgs/Header of the colour image
    rgb: np.ndarray  # (H, W, 3) uint8
    depth: np.ndarray | None  # (H, W) float32 m
    K: np.ndarray | None  # (3, 3)
    D: np.ndarray | None  # (N,)
    reset: bool = False
    received: float | None = None  # time.monotonic() when the callback queued it
    transport: float | None = None  # seconds from the image's stamp to the callback (node clock: sim time under use_sim_time)


class StampPairer:
    """Pairs colour and depth by stamp: each arrival takes the waiting partner nearest in time within
    ``slop`` seconds, each item used once; items older than any partner can still pair are dropped.
    At most ``maxlen`` items wait per side (the oldest go first). ``depth_delay`` s (the sensor's,
    ``backend.depth_delay_s``) is taken off each depth stamp first: a depth image known to be taken that
    long after its colour image is paired with that one, not the next."""

    def __init__(self, slop: float, maxlen: int = 8, depth_delay: float = 0.0):
        self.slop = slop
        self.depth_delay = depth_delay
        self.rgb: collections.deque = collections.deque(maxlen=maxlen)  # (stamp, item)
        self.depth: collections.deque = collections.deque(maxlen=maxlen)

    def add_rgb(self, t: float, item):
        """The waiting depth item paired with this colour item, or None (then the colour item waits)."""
        return self._add(t, item, mine=self.rgb, other=self.depth)

    def add_depth(self, t: float, item):
        """The waiting colour item paired with this depth item, or None (then the depth item waits)."""
        return self._add(t - self.depth_delay, item, mine=self.depth, other=self.rgb)

    def clear(self) -> None:
        self.rgb.clear()
        self.depth.clear()

    def _add(self, t: float, item, mine: collections.deque, other: collections.deque):
        match = self._take_match(other, t)
        if match is None:
            mine.append((t, item))
            return None
        return match[1]

    def _take_match(self, pending: collections.deque, t: float):
        """Remove and return the pending (stamp, item) closest to ``t`` within slop; drop older ones."""
        best = None
        for i, (ts, _) in enumerate(pending):
            if abs(ts - t) <= self.slop and (best is None or abs(ts - t) < abs(pending[best][0] - t)):
                best = i
        if best is None:
            while pending and pending[0][0] < t - self.slop:  # can never pair any more
                pending.popleft()
            return None
        item = pending[best]
        for _ in range(best + 1):  # everything before the match is older: it will not pair either
            pending.popleft()
        return item
