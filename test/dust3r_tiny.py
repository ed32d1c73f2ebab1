"""A tiny released-format random-weight checkpoint for the dust3r backend tests (fast on CPU).

Weights follow the parity rule (rule_weights below) with the linear heads' weights
scaled down and the z channel's bias raised, so the random network predicts points in front of the
camera (z > 0) with per-pixel noise; the geometry is otherwise meaningless.
"""
import zlib

import numpy as np
import torch

from dynrecon_ros.network import build_model, save_checkpoint



def rule_weights(model, salt: int) -> dict:
    """shared/parity/README.md's weight rule for every state_dict entry of ``model`` (meta is fine)."""
    out = {}
    for name, t in model.state_dict().items():
        shape = tuple(t.shape)
        z = np.random.default_rng([salt, zlib.crc32(name.encode())]).standard_normal(shape)
        if len(shape) >= 2:
            v = 0.8 * z / np.sqrt(np.prod(shape[1:]))
        elif len(shape) == 1 and name.endswith('.weight'):
            v = 1 + 0.1 * z
        else:
            v = 0.02 * z
        out[name] = torch.from_numpy(v.astype(np.float32))
    return out


TINY = ("AsymmetricCroCo3DStereo(pos_embed='RoPE100', patch_embed_cls='ManyAR_PatchEmbed', img_size=(128, 128), "
        "head_type='linear', output_mode='pts3d', depth_mode=('exp', -float('inf'), float('inf')), "
        "conf_mode=('exp', 1, float('inf')), enc_embed_dim=64, enc_depth=2, enc_num_heads=2, "
        "dec_embed_dim=64, dec_depth=2, dec_num_heads=2)")


def write_tiny_checkpoint(path, salt: int = 0) -> str:
    model = build_model(TINY, 'meta')
    sd = rule_weights(model, salt)
    for name, t in sd.items():
        if name.startswith('downstream_head') and name.endswith('proj.weight'):
            sd[name] = 0.05 * t
        if name.startswith('downstream_head') and name.endswith('proj.bias'):
            p2 = t.shape[0] // 4  # channels are (x, y, z, conf) x patch pixels (pixel shuffle)
            t[2 * p2:3 * p2] += 1.5
    save_checkpoint(path, sd, TINY)
    return str(path)
