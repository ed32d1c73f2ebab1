"""Message conversion timings: PointCloud2 packing of a 300k-point map (target well under 50 ms) and
640x480 image conversions in both directions (compressedDepth of random depth: the worst case for PNG;
bench/transport.py has sizes and times on rendered frames). Prints median of repeated runs; asserts nothing."""
import statistics
import time

import numpy as np

from dynrecon_ros.ros import conversions as conv


def timeit(fn, repeat=15):
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main():
    rng = np.random.default_rng(0)
    pts = np.concatenate([rng.normal(size=(300_000, 3)), rng.integers(0, 256, (300_000, 3))], 1).astype(np.float32)
    cloud = conv.xyzrgb_to_cloud(pts)
    rgb = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    depth = rng.random((480, 640), dtype=np.float32) * 5
    mask = (rng.random((480, 640)) > 0.5).astype(np.uint8) * 255
    img, bgr, dimg = conv.numpy_to_image(rgb, 'rgb8'), conv.numpy_to_image(rgb[..., ::-1], 'bgr8'), conv.numpy_to_image(depth, '32FC1')
    mm = conv.numpy_to_image((depth * 1000).astype(np.uint16), '16UC1')
    png = conv.rgb_to_compressed(rgb, 'jpg')
    cdepth = conv.depth_to_compressed_depth(depth, '32FC1')
    rows = [
        ('PointCloud2 pack 300k xyz+rgb (xyzrgb_to_cloud)', lambda: conv.xyzrgb_to_cloud(pts)),
        ('PointCloud2 unpack 300k (cloud_to_xyzrgb)', lambda: conv.cloud_to_xyzrgb(cloud)),
        ('Image rgb8 640x480 -> rgb (image_to_rgb)', lambda: conv.image_to_rgb(img)),
        ('Image bgr8 640x480 -> rgb', lambda: conv.image_to_rgb(bgr)),
        ('Image 32FC1 640x480 -> depth m', lambda: conv.image_to_depth(dimg)),
        ('Image 16UC1 640x480 -> depth m', lambda: conv.image_to_depth(mm)),
        ('CompressedImage jpeg 640x480 -> rgb', lambda: conv.compressed_to_rgb(png)),
        ('compressedDepth 32FC1 640x480 -> depth m', lambda: conv.compressed_depth_to_depth(cdepth)),
        ('depth m 640x480 -> compressedDepth 32FC1', lambda: conv.depth_to_compressed_depth(depth, '32FC1')),
        ('mono8 mask 640x480 -> Image (numpy_to_image)', lambda: conv.numpy_to_image(mask, 'mono8')),
        ('32FC1 depth 640x480 -> Image', lambda: conv.numpy_to_image(depth, '32FC1')),
    ]
    print('median of 15 runs (ms)')
    for name, fn in rows:
        print(f'{timeit(fn):8.2f}  {name}')


if __name__ == '__main__':
    main()
