"""Cost of Easi3R's attention segmentation stages (dynrecon_ros.attention_segmentation) for one window
at the product's size, on random inputs (the stages' cost does not depend on the values).

Prints wall and CPU (process) ms per stage for one pass (CPU time is the fairer figure on a loaded machine;
it counts every thread): aggregation (stages 1-4), k-means on the encoder tokens (stage 5a,
once per window: both passes share it), cluster step, upsampling + multi-level Otsu + masks (6-8).
Usage: python bench/attention.py [--frames 8] [--size 512x384] [--dim 1024] [--reps 3]
"""
import argparse
import time

import numpy as np

from dynrecon_ros.attention_segmentation import aggregate_attention, cluster_refine, kmeans_labels, masks_from_scores


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--frames', type=int, default=8)
    ap.add_argument('--size', default='512x384', help='network input WxH')
    ap.add_argument('--dim', type=int, default=1024, help='encoder width (ViT-L: 1024)')
    ap.add_argument('--reps', type=int, default=3)
    a = ap.parse_args()
    W, H = (int(v) for v in a.size.split('x'))
    h, w, n = H // 16, W // 16, a.frames
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j and abs(i - j) <= 2]  # neighbours 2, both ways
    rng = np.random.default_rng(0)
    a1 = rng.standard_normal((len(pairs), 12, 16, h, w)).astype(np.float32)  # ViT-L/512: 12 blocks x 16 heads
    a2 = rng.standard_normal(a1.shape).astype(np.float32)
    tok = rng.standard_normal((n, h, w, a.dim)).astype(np.float32)
    names = ('aggregate', 'kmeans', 'cluster', 'otsu_masks')
    t = {k: [] for k in names}
    c = {k: [] for k in names}
    for _ in range(a.reps):
        stamps = [(time.perf_counter(), time.process_time())]
        sc = aggregate_attention(n, pairs, a1, a2)
        stamps.append((time.perf_counter(), time.process_time()))
        lab = kmeans_labels(tok)
        stamps.append((time.perf_counter(), time.process_time()))
        cs = cluster_refine(sc.plain_score, lab)
        stamps.append((time.perf_counter(), time.process_time()))
        masks_from_scores(cs, (H, W))
        stamps.append((time.perf_counter(), time.process_time()))
        for k, s0, s1 in zip(names, stamps, stamps[1:]):
            t[k].append(1e3 * (s1[0] - s0[0]))
            c[k].append(1e3 * (s1[1] - s0[1]))
    print(f'{n} frames, {len(pairs)} pairs, {W}x{H} ({h}x{w} tokens, {a.dim} wide), median of {a.reps}, wall / CPU:')
    for k in names:
        print(f'  {k}: {np.median(t[k]):.0f} / {np.median(c[k]):.0f} ms')
    per = [np.median(d['kmeans']) + 2 * sum(np.median(d[k]) for k in ('aggregate', 'cluster', 'otsu_masks'))
           for d in (t, c)]
    print(f'  per window step (k-means once, two passes): {per[0]:.0f} / {per[1]:.0f} ms')


if __name__ == '__main__':
    main()
