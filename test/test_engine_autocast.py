"""The engine's CUDA precision branch (bf16 autocast around encoder and decoders), run on CPU.

PairNetwork picks bf16 autocast on CUDA only; CPU autocast supports bf16 too, so these tests set the
engine's ``amp_dtype`` after construction and run the same code path as on a GPU (what differs on
a GPU is only the device): every output must come back as finite float32 numpy arrays close to the
fp32 result, the attention maps included (they come out of autocast's matmul in bf16, which numpy
cannot hold), and Easi3R's second pass (explicit attention) must run under autocast too.
"""
import numpy as np
import pytest
import torch

from dynrecon_ros.network import build_model
from dynrecon_ros.network.engine import PairNetwork

CFG = ("AsymmetricCroCo3DStereo(pos_embed='RoPE100', patch_embed_cls='ManyAR_PatchEmbed', img_size=(512, 512), "
       "head_type='{head}', output_mode='pts3d', depth_mode=('exp', -float('inf'), float('inf')), "
       "conf_mode=('exp', 1, float('inf')), enc_embed_dim=64, enc_depth=2, enc_num_heads=2, "
       "dec_embed_dim=32, dec_depth={depth}, dec_num_heads=2)")


def _model(head):
    torch.manual_seed(0)
    model = build_model(CFG.format(head=head, depth=12 if head == 'dpt' else 4), 'cpu')  # dpt: depth > 9.eval().requires_grad_(False)
    with torch.no_grad():
        for name, p in model.named_parameters():  # small outputs: exp depth stays in range
            if name.startswith('downstream_head') and p.ndim > 1 and ('proj' in name or 'head.4' in name):
                p.mul_(0.05)
    return model


@pytest.mark.parametrize('head', ['linear', 'dpt'])
def test_bf16_autocast_outputs_are_float32_and_close(head):
    model = _model(head)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3, 48, 64, 3), dtype=np.uint8)
    pairs = [(0, 1), (1, 0), (1, 2)]
    ref = PairNetwork(model, device='cpu').predict_pairs(images, pairs, return_attention=True)
    net = PairNetwork(model, device='cpu')
    net.amp_dtype = torch.bfloat16  # the CUDA branch's precision (PairNetwork(amp='auto') on CUDA)
    out = net.predict_pairs(images, pairs, frame_ids=['a', 'b', 'c'], return_attention=True)
    assert set(out) == set(ref)
    for k, v in out.items():
        assert isinstance(v, np.ndarray) and v.dtype == np.float32, k
        assert v.shape == ref[k].shape and np.isfinite(v).all(), k
    for k in ('pts3d_1', 'pts3d_2_in_1', 'conf_1', 'conf_2', 'cross_attn_1', 'cross_attn_2'):
        scale = np.abs(ref[k]).max()
        err = np.abs(out[k] - ref[k]).max()
        assert err < 0.1 * scale, (k, err, scale)  # bf16 has 8 mantissa bits
        assert not np.array_equal(out[k], ref[k]), k  # autocast did run
    # Easi3R's second pass under autocast: explicit attention with zeroed weights; tokens from the cache
    h, w = 48 // 16, 64 // 16
    q = np.zeros((1, h, w), bool)
    q[:, :, :2] = True
    kk = np.zeros((1, h, w), bool)
    kk[:, :, 2:] = True
    second = net.predict_pairs(images, [(0, 1)], frame_ids=['a', 'b', 'c'], cross_attn_zero=(q, kk))
    assert net.stats['encoded'] == 3
    assert second['pts3d_1'].dtype == np.float32 and np.isfinite(second['pts3d_1']).all()
    assert np.abs(second['pts3d_1'][0] - out['pts3d_1'][0]).max() > 0
