"""Bytes per frame on the wire, raw vs compressed, at 640x480: colour as sensor_msgs/Image rgb8 vs
image_transport's compressed (its defaults: PNG level 3, lossless; JPEG quality 95, lossy), depth as
Image 32FC1 / 16UC1 vs compressedDepth (its default PNG level 9; PNG of inverse-depth quantised 32FC1,
of 16UC1 mm), the encode/decode time of each (median, ms) and the error. Frames: the synthetic
renderer's default scene at 640x480 (textured walls and walking movers; real camera images with sensor
noise compress less, so take the ratios as an upper bound). Prints; asserts nothing.

    .venv/bin/python bench/transport.py [--frames 10]
"""
import argparse
import statistics
import time

import numpy as np

from dynrecon_ros.data.synthetic import SyntheticConfig, render_sequence
from dynrecon_ros.ros import conversions as conv


def median_ms(fn, items):
    times, out = [], []
    for x in items:
        t0 = time.perf_counter()
        out.append(fn(x))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--frames', type=int, default=10)
    args = ap.parse_args()
    seq = render_sequence(SyntheticConfig(width=640, height=480, frames=args.frames))
    rgb = [conv.numpy_to_image(f.rgb, 'rgb8') for f in seq.frames]
    d32 = [conv.numpy_to_image(np.where(f.depth > 0, f.depth, np.nan).astype(np.float32), '32FC1') for f in seq.frames]
    d16 = [conv.numpy_to_image(np.round(f.depth * 1000).astype(np.uint16), '16UC1') for f in seq.frames]
    rows = []
    for name, raw, encode, decode in [
        ('colour rgb8 -> compressed png', rgb, lambda m: conv.image_to_compressed(m, 'png'), conv.compressed_to_rgb),
        ('colour rgb8 -> compressed jpeg', rgb, lambda m: conv.image_to_compressed(m, 'jpeg'), conv.compressed_to_rgb),
        ('depth 32FC1 -> compressedDepth png', d32, conv.image_to_compressed_depth, conv.compressed_depth_to_depth),
        ('depth 16UC1 -> compressedDepth png', d16, conv.image_to_compressed_depth, conv.compressed_depth_to_depth),
    ]:
        t_enc, msgs = median_ms(encode, raw)
        t_dec, back = median_ms(decode, msgs)
        raw_b = statistics.mean(len(m.data) for m in raw)
        cmp_b = statistics.mean(len(m.data) for m in msgs)
        if 'depth' in name:
            ref = [conv.image_to_depth(m) for m in raw]
            err = max(float(np.abs(b - r)[r > 0].max()) for b, r in zip(back, ref))
            note = f'max |error| {err * 1e3:.2f} mm'
        else:
            err = max(int(np.abs(b.astype(int) - conv.image_to_rgb(m).astype(int)).max()) for b, m in zip(back, raw))
            note = f'max |error| {err} grey levels'
        rows.append((name, raw_b, cmp_b, t_enc, t_dec, note))
    print(f'640x480, {args.frames} frames of the synthetic default scene; bytes per frame (mean), times median ms')
    print(f"{'':38s}{'raw B':>10s}{'sent B':>10s}{'ratio':>7s}{'enc ms':>8s}{'dec ms':>8s}")
    for name, raw_b, cmp_b, t_enc, t_dec, note in rows:
        print(f'{name:38s}{raw_b:10,.0f}{cmp_b:10,.0f}{raw_b / cmp_b:7.1f}{t_enc:8.1f}{t_dec:8.1f}  {note}')
    for colour, depth in ((0, 2), (1, 2), (0, 3), (1, 3)):
        raw_b = rows[colour][1] + rows[depth][1]
        cmp_b = rows[colour][2] + rows[depth][2]
        print(f'frame = {rows[colour][0].split()[-1]} colour + {rows[depth][0].split()[1]} compressedDepth: '
              f'{raw_b:,.0f} -> {cmp_b:,.0f} B ({raw_b / cmp_b:.1f}x); at 30 Hz {raw_b * 30 / 1e6:.1f} -> '
              f'{cmp_b * 30 / 1e6:.1f} MB/s')

if __name__ == '__main__':
    main()
