"""Parity of the pointmap network with the reference DUSt3R outputs in shared/parity/.

Weights follow shared/parity/README.md's rule, in the model's own state_dict() order; they are
saved as a released-format checkpoint and go through the public API (load_network ->
predict_pairs). Tolerance: |ours - ref| <= 1e-4 + 1e-4 |ref|.
"""
from pathlib import Path

import numpy as np
import pytest
import torch

from dynrecon_ros.network import build_model, load_network, save_checkpoint
from shared_refs import shared_dir
from dust3r_tiny import rule_weights


REFS = sorted(p for p in (shared_dir('parity') / 'parity').glob('*.npz') if not p.name.endswith('.keys.npz'))
OUT_KEYS = ('pts3d_1', 'conf_1', 'pts3d_2_in_1', 'conf_2')


@pytest.fixture(scope='module')
def nets(tmp_path_factory):
    cache = {}

    def get(ref: Path):
        if ref not in cache:
            d = np.load(ref)
            cfg = str(d['config'])
            path = tmp_path_factory.mktemp('ckpt') / f'{ref.stem}.pth'
            save_checkpoint(path, rule_weights(build_model(cfg, 'meta'), int(d['salt'])), cfg)
            cache[ref] = (load_network(path, device='cpu'), d)
        return cache[ref]
    return get


def test_reference_files_present():
    names = {p.name for p in REFS}
    assert len(REFS) >= 4, names
    assert any('linear' in n for n in names) and any('dpt' in n for n in names)
    assert {'landscape', 'square', 'portrait'} <= {n.split('_')[2] for n in names}


@pytest.mark.parametrize('ref', REFS, ids=[p.stem for p in REFS])
def test_key_list_matches_model_built_from_config(ref):
    d = np.load(ref)
    keys = np.load(ref.with_name(ref.stem + '.keys.npz'))
    sd = build_model(str(d['config']), 'meta').state_dict()
    assert list(sd) == list(keys.files)
    for name in keys.files:
        assert tuple(sd[name].shape) == tuple(int(s) for s in keys[name]), name


@pytest.mark.parametrize('ref', REFS, ids=[p.stem for p in REFS])
def test_parity_with_reference(ref, nets):
    net, d = nets(ref)
    torch.manual_seed(0)
    out = net.predict_pairs(d['images'], list(zip(d['pair_i'].tolist(), d['pair_j'].tolist())))
    for k in OUT_KEYS:
        assert out[k].shape == d[k].shape, k
        err = np.abs(out[k] - d[k])
        tol = 1e-4 + 1e-4 * np.abs(d[k])
        assert np.all(err <= tol), f'{ref.name} {k}: max abs err {err.max():.3g}, worst ratio {(err / tol).max():.3g}'


def _first(kind):
    return next(p for p in REFS if kind in p.name)


def test_token_cache_reuse_and_batching_give_same_outputs(nets):
    net, d = nets(_first('linear_landscape'))
    imgs = d['images']
    pairs = [(0, 1), (1, 0), (0, 2), (2, 0), (1, 2)]
    base = net.predict_pairs(imgs, pairs, batch_size=1)
    net.clear_cache()
    before = net.stats['encoded']
    a = net.predict_pairs(imgs, pairs, frame_ids=['a', 'b', 'c'], batch_size=4)
    assert net.stats['encoded'] - before == 3            # each frame encoded once
    # an overlapping window: frames b, c reused from the cache, only d is new
    imgs2 = np.stack([imgs[1], imgs[2], imgs[0][:, ::-1]])
    before = net.stats['encoded']
    b = net.predict_pairs(imgs2, [(0, 1), (2, 0)], frame_ids=['b', 'c', 'd'])
    assert net.stats['encoded'] - before == 1
    for k in OUT_KEYS:
        np.testing.assert_allclose(a[k], base[k], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(b[k][0], base[k][4], rtol=1e-4, atol=1e-5)
    assert not np.allclose(b['pts3d_1'][1], base['pts3d_1'][0])  # the new frame really was new


def test_cross_attention_maps_and_zeroing(nets):
    net, d = nets(_first('linear_landscape'))
    imgs = d['images']
    pairs = [(0, 1), (1, 0)]
    plain = net.predict_pairs(imgs, pairs)
    att = net.predict_pairs(imgs, pairs, return_attention=True)
    L, nh = net.cfg.dec_depth, net.cfg.dec_num_heads
    h, w = imgs.shape[1] // 16, imgs.shape[2] // 16
    assert att['cross_attn_1'].shape == (2, L, nh, h, w) and att['cross_attn_2'].shape == (2, L, nh, h, w)
    assert np.isfinite(att['cross_attn_1']).all()
    for k in OUT_KEYS:  # returning the maps does not change the outputs (same single pass)
        np.testing.assert_array_equal(att[k], plain[k])
    # maps of pair (0,1) decoder 1 concern image 1's tokens; decoder 2 of pair (1,0) as well: differ
    assert not np.allclose(att['cross_attn_1'][0], att['cross_attn_1'][1])
    # an all-False selection goes through the explicit-softmax path and changes nothing
    none = np.zeros((2, h, w), bool)
    same = net.predict_pairs(imgs, pairs, cross_attn_zero=(none, none))
    for k in OUT_KEYS:
        np.testing.assert_allclose(same[k], plain[k], rtol=1e-4, atol=1e-5)
    # zeroing attention from every query to the left half of the keys changes view 1's result
    q = np.ones((2, h, w), bool)
    kk = np.zeros((2, h, w), bool)
    kk[:, :, : w // 2] = True
    z = net.predict_pairs(imgs, pairs, cross_attn_zero=(q, kk))
    assert np.abs(z['pts3d_1'] - plain['pts3d_1']).max() > 1e-3
    assert np.isfinite(z['pts3d_1']).all()


def test_mean_logits_match_explicit_computation():
    from dynrecon_ros.network.blocks import CrossAttention, RoPE2D
    torch.manual_seed(0)
    ca = CrossAttention(32, 4)
    rope = RoPE2D(100.0)
    x, y = torch.randn(2, 6, 32), torch.randn(2, 6, 32)
    cs = rope.cos_sin((2, 3), 8, 'cpu', torch.float32)
    out, logits = ca(x, y, cs, cs, want_logits=True)
    q = RoPE2D.apply(ca.projq(x).view(2, 6, 4, 8).transpose(1, 2), *cs)
    k = RoPE2D.apply(ca.projk(y).view(2, 6, 4, 8).transpose(1, 2), *cs)
    full = (q @ k.transpose(-2, -1)) * 8 ** -0.5
    torch.testing.assert_close(logits, full.mean(dim=2), rtol=1e-5, atol=1e-6)
