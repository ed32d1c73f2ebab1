"""Easi3R's attention segmentation against the reference code's stage-by-stage outputs
(shared/parity/easi3r/, its README gives the tolerances and how to feed the files), through the
public functions of dynrecon_ros.attention_segmentation, for every file and both passes."""
import numpy as np
import pytest

from dynrecon_ros.attention_segmentation import (aggregate_attention, attention_masks, cluster_refine, kmeans_labels,
                                                 masks_from_scores, multiotsu_level, token_mask,
                                                 token_mask_for_reweighting, upsample_scores)
from shared_refs import shared_dir

FILES = sorted((shared_dir('parity/easi3r') / 'parity' / 'easi3r').glob('easi3r_*.npz'))
CASES = [(f, s) for f in FILES for s in ('', '_pass2')]
IDS = [f'{f.stem}{s or "_pass1"}' for f, s in CASES]
FUSED = ('fused_mean1', 'fused_std1', 'fused_mean2', 'fused_std2', 'raw_score', 'plain_score')


@pytest.fixture(scope='module')
def files():
    return {f: dict(np.load(f)) for f in FILES}


def _close(ours, ref, what):
    """The README's tolerance: |ours - ref| <= 1e-4 + 1e-4 |ref| everywhere."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, what
    bad = np.abs(ours - ref) > 1e-4 + 1e-4 * np.abs(ref)
    assert not bad.any(), f'{what}: {bad.sum()} values off, max |diff| {np.abs(ours - ref).max():.3g}'


def _iou(a, b):
    u = (a | b).sum()
    return 1.0 if u == 0 else (a & b).sum() / u


def _inputs(d, s):
    pairs = [tuple(int(v) for v in p) for p in d['pairs']]
    return int(d['n_frames']), pairs, d['cross_attn_1' + s].astype(np.float32), d['cross_attn_2' + s].astype(np.float32)


def test_files_present():
    assert len(FILES) == 3, FILES


@pytest.mark.parametrize('f,s', CASES, ids=IDS)
def test_fused_and_plain_score(files, f, s):
    d = files[f]
    sc = aggregate_attention(*_inputs(d, s))
    assert sc.defined.all()
    _close(sc.agg_minmax, d['agg_minmax' + s], 'agg_minmax')
    for k in FUSED:
        _close(getattr(sc, k), d[k + s], k)


@pytest.mark.parametrize('f,s', CASES, ids=IDS)
def test_clustered_score(files, f, s):
    d = files[f]
    _close(cluster_refine(d['plain_score' + s], d['cluster_labels' + s]), d['clustered_score' + s], 'stored labels')
    labels = kmeans_labels(d['enc_tokens'])  # the scikit-learn call: the same partition
    np.testing.assert_array_equal(labels, d['cluster_labels' + s])
    _close(cluster_refine(d['plain_score' + s], labels), d['clustered_score' + s], 'k-means labels')


@pytest.mark.parametrize('f,s', CASES, ids=IDS)
def test_threshold_and_masks(files, f, s):
    d = files[f]
    masks, level = masks_from_scores(d['clustered_score' + s], d['image_hw'])
    for k in (2, 3, 4):
        np.testing.assert_allclose(level.thresholds[k], d[f'otsu_thresholds_{k}{s}'], atol=1e-3, rtol=0)
    np.testing.assert_allclose(level.criterion, d['otsu_criterion' + s], atol=1e-3, rtol=0)
    assert level.classes == int(d['otsu_classes' + s])
    assert abs(level.threshold - float(d['threshold' + s])) <= 1e-3
    iou = _iou(masks, d['masks' + s])
    print(f'{f.stem}{s}: threshold {level.threshold:.6f} vs {float(d["threshold" + s]):.6f}, IoU {iou:.4f}')
    assert iou >= 0.98
    # the same level straight from the upsampled pixels (stage 6 then 7)
    px = upsample_scores(d['clustered_score' + s], d['image_hw'])
    assert multiotsu_level(px).threshold == level.threshold


@pytest.mark.parametrize('f,s', CASES, ids=IDS)
def test_end_to_end_from_maps_and_tokens(files, f, s):
    d = files[f]
    res = attention_masks(*_inputs(d, s), d['image_hw'], enc_tokens=d['enc_tokens'], return_details=True)
    iou = _iou(res.masks, d['masks' + s])
    assert iou >= 0.98, iou
    assert abs(res.level.threshold - float(d['threshold' + s])) <= 1e-3
    # the uint8 product output is the same mask
    out = attention_masks(*_inputs(d, s), d['image_hw'], labels=d['cluster_labels' + s])
    assert out.dtype == np.uint8 and _iou(out > 0, d['masks' + s]) >= 0.98


@pytest.mark.parametrize('f', FILES, ids=[f.stem for f in FILES])
def test_token_mask_for_the_second_pass(files, f):
    d = files[f]
    tok = token_mask(d['masks'], int(d['patch_size']))
    np.testing.assert_array_equal(tok, d['token_mask'])
    pairs = [tuple(int(v) for v in p) for p in d['pairs']]
    q, k = token_mask_for_reweighting(d['masks'], pairs, int(d['patch_size']))
    for e, (i, j) in enumerate(pairs):
        np.testing.assert_array_equal(q[e], ~d['token_mask'][i])
        np.testing.assert_array_equal(k[e], d['token_mask'][j])
