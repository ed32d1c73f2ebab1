"""The monocular window step in segmentation.mode attention (Reconstructor + dust3r predictor over a
tiny random-weight network) gives, for a window, the masks of Easi3R's stages called directly on that
window: the first pass's maps and encoder tokens, k-means, Otsu, the re-weighted second pass, and
the masks recomputed from the second pass's maps."""
import numpy as np
import pytest

from dust3r_tiny import write_tiny_checkpoint
from dynrecon_ros.attention_segmentation import (aggregate_attention, cluster_refine, kmeans_labels, masks_from_scores,
                                                 token_mask_for_reweighting)
from dynrecon_ros.config import ReconConfig
from dynrecon_ros.data.synthetic import SyntheticConfig, render_sequence
from dynrecon_ros.frames import Frame
from dynrecon_ros.network import load_network, preprocess_image
from dynrecon_ros.predictors.dust3r import Dust3rConfig, Dust3rPredictor
from dynrecon_ros.reconstructor import Reconstructor

W, H = 128, 96  # the tiny model's input size: the network image is the frame itself (no resize, no crop)
LOOSE = {'max_translation_m': 1000.0, 'max_rotation_deg': 180.0, 'max_speed_m_s': 1e5,
         'max_angular_speed_deg_s': 1e5, 'min_inlier_ratio': 0.0}  # random weights: jump rules opened


def _reference_masks(net, frames, pairs):
    """Easi3R on the window, stage by stage, with the network called directly (no caches)."""
    imgs = np.stack([preprocess_image(f.rgb, W).rgb for f in frames])
    assert imgs.shape[1:3] == (H, W)
    n = len(frames)
    labels = kmeans_labels(net.encoder_features(imgs))

    def masks_of(out):
        sc = aggregate_attention(n, pairs, out['cross_attn_1'], out['cross_attn_2'])
        return masks_from_scores(cluster_refine(sc.plain_score, labels), (H, W))[0]

    first = masks_of(net.predict_pairs(imgs, pairs, return_attention=True))
    zero = token_mask_for_reweighting(first, pairs)
    return first, masks_of(net.predict_pairs(imgs, pairs, return_attention=True, cross_attn_zero=zero))


class RecordingPredictor(Dust3rPredictor):
    """The product's predictor; records the frames and pairs of each first pass with attention (the
    window's graph changes after the step when the new frame becomes a keyframe)."""

    calls: list

    def predict_window(self, frames, pairs, attention=False):
        if attention:
            self.calls.append(([f.key for f in frames], list(pairs)))
        return super().predict_window(frames, pairs, attention)


@pytest.mark.slow
def test_window_step_masks_are_easi3rs(tmp_path):
    net = load_network(write_tiny_checkpoint(tmp_path / 'tiny.pth'))
    seq = render_sequence(SyntheticConfig(width=W, height=H, frames=7, seed=2, movers=1, fps=10.0))
    cfg = ReconConfig.from_dict({'window': {'size': 5, 'neighbours': 2, 'keyframes': 1, 'output_lag': 2},
                                 'segmentation': {'mode': 'attention'}, 'backend': {'align_flow': False},
                                 'checks': LOOSE})
    assert cfg.segmentation.attention_min_contrast == 0 and cfg.segmentation.attention_min_separation == 0
    pred = RecordingPredictor(net, Dust3rConfig.from_backend(cfg.backend))
    pred.calls = []
    rec = Reconstructor(cfg, predictor=pred)
    by_key = {f.key: f for f in seq.frames}
    compared = []
    for f in seq.frames:  # K given: a random network's focal is meaningless
        n_calls = len(pred.calls)
        res = rec.push(Frame(stamp=f.stamp, rgb=f.rgb, depth=None, K=seq.K.copy(), key=f.key, meta={}))
        assert all(r.status == 'ok' for r in res), [r.reason for r in res]
        if len(pred.calls) == n_calls:
            continue  # the first frame (self-pair only)
        keys, pairs = pred.calls[-1]
        assert keys[-1] == f.key
        entries = {e.frame.key: e for e in rec.window.all_entries()}
        first, second = _reference_masks(net, [by_key[k] for k in keys], pairs)
        if len(keys) == 2:  # two frames: each in one pair per role, no sample std: no mask
            assert not second.any() and not any(entries[k].mask.any() for k in keys if k in entries)
            continue
        # frames still held after the step (a replaced keyframe leaves the window after the step)
        held = [n for n, k in enumerate(keys) if k in entries]
        assert len(held) >= len(keys) - 1
        ours, second, first = np.stack([entries[keys[n]].mask for n in held]), second[held], first[held]
        iou = (ours & second).sum() / max((ours | second).sum(), 1)
        changed = (first != second).mean()
        print(f'{f.key}: {len(keys)} frames, {len(pairs)} pairs, flagged {second.mean():.3f}, IoU {iou:.4f}, '
              f'second pass changed {changed:.4f} of the pixels')
        np.testing.assert_array_equal(ours, second)
        compared.append(changed)
    assert len(compared) >= 4
    assert max(compared) > 0  # the second pass's recomputation matters in these windows


def test_encoder_features_are_the_post_norm_tokens(tmp_path):
    """PairNetwork.encoder_features: (N, h, w, E), the encoder output after enc_norm in row-major token
    order, served from the frame cache after a predict_pairs call with the same ids."""
    import torch
    from dynrecon_ros.network import normalize
    net = load_network(write_tiny_checkpoint(tmp_path / 'tiny.pth'))
    imgs = np.random.default_rng(0).integers(0, 255, (2, 32, 48, 3), dtype=np.uint8)
    with torch.inference_mode():
        ref = net.model.encode(normalize(imgs)).numpy()
    feats = net.encoder_features(imgs)
    assert feats.shape == (2, 2, 3, 64) and feats.dtype == np.float32
    np.testing.assert_allclose(feats.reshape(2, 6, 64), ref, rtol=1e-5, atol=1e-6)
    net.predict_pairs(imgs, [(0, 1)], frame_ids=['a', 'b'])
    hits = net.stats['cache_hits']
    np.testing.assert_array_equal(net.encoder_features(imgs, frame_ids=['a', 'b']), feats)
    assert net.stats['cache_hits'] == hits + 2
