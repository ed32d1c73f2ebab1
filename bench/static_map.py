"""Static map benchmark: CPU ms per frame of VoxelMap.integrate as the map grows to its bound.

Usage: python bench/static_map.py [--sizes 100000,600000,2000000] [--frames 30] [--width 640]
For each size M: a map with ``max_voxels`` = M holds the synthetic room (its first frame integrated) plus
voxels of a building's floor (200 m x 200 m around the room, out of view) up to M (filled directly, in the
map's own key layout: integrating millions of voxels frame by frame would take minutes); then --frames frames
of the room are integrated with their poses shifted by a few cm per frame (new voxels every frame, so the map
stays at its bound). Prints the median and 90th percentile of the CPU ms per frame and the map's size after
them. The room alone holds ~110 k voxels at 2 cm, so a floor of a building reaches the default bound (2 M).
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from dynrecon_ros.data.synthetic import SyntheticConfig, render_sequence
from dynrecon_ros.static_map import MapConfig, VoxelMap, _keys


def filled_map(size: int, seq) -> VoxelMap:
    """A map bounded at ``size`` voxels holding the room's first frame and voxels around it up to ``size``."""
    m = VoxelMap(MapConfig(max_voxels=size))
    f = seq.frames[0]
    m.integrate(f.depth, f.rgb, f.K, seq.poses[0])
    extra = size - len(m)
    if extra > 0:
        rng = np.random.default_rng(0)
        # a building's floor, 200 m x 200 m around the room, the room's 30 m square left empty
        pts = np.c_[rng.uniform(-100, 100, (4 * extra, 2)), rng.uniform(0, 3, 4 * extra)]
        pts = pts[np.abs(pts[:, :2]).max(1) > 15][:2 * extra]
        key, first = np.unique(_keys(np.floor(pts / m.cfg.voxel_size).astype(np.int64)), return_index=True)
        key, first = key[:extra], first[:extra]
        data = np.zeros((len(key), 8), np.float32)
        data[:, 0] = 3.0  # weight (about 3 observations), last seen at frame 0
        data[:, 1:4] = pts[first]
        allk = np.concatenate([m._key, key])
        order = np.argsort(allk, kind='stable')
        m._key, m._data = allk[order], np.concatenate([m._data, data])[order]
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--sizes', default='100000,600000,2000000')
    ap.add_argument('--frames', type=int, default=30)
    ap.add_argument('--width', type=int, default=640)
    args = ap.parse_args()
    seq = render_sequence(SyntheticConfig(width=args.width, height=args.width * 3 // 4, frames=args.frames + 1,
                                          seed=0))
    print(f'machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; frames {seq.frames[0].rgb.shape[1]}x'
          f'{seq.frames[0].rgb.shape[0]}, map defaults but max_voxels')
    for size in (int(s) for s in args.sizes.split(',')):
        m = filled_map(size, seq)
        ts = []
        for k, (f, P, M) in enumerate(zip(seq.frames[1:], seq.poses[1:], seq.masks[1:])):
            P = P.copy()
            P[:3, 3] += [0.03 * k, 0.0, 0.0]  # drift: new voxels each frame
            t = time.process_time()
            m.integrate(f.depth, f.rgb, f.K, P, static=~M)
            ts.append(time.process_time() - t)
        ts = 1e3 * np.array(ts)
        print(f'  max_voxels {size:>9,}: integrate median {np.median(ts):6.1f} ms, p90 {np.percentile(ts, 90):6.1f} ms '
              f'per frame; {len(m):,} voxels after {len(ts)} frames')


if __name__ == '__main__':
    main()
