"""The released ViT-L checkpoints' key lists (shared/checkpoints/*.keys.txt) load strictly into the
model built from their own stored config strings.

Names, order and shapes are compared on the meta device (no memory); one full end-to-end load of
a released-format file with exactly the listed entries (the 224 linear one, ~1.2 GB in fp16 on
disk) runs in the slow set.
"""
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from dynrecon_ros.network import build_model, load_network, parse_model_config, save_checkpoint
from shared_refs import shared_dir


KEY_FILES = sorted((shared_dir('checkpoints') / 'checkpoints').glob('*.keys.txt'))


def read_key_list(path: Path):
    """(config string, [(name, shape, dtype)]) of a keys.txt file."""
    config, entries = None, []
    for line in path.read_text().splitlines():
        if line.startswith('#'):
            body = line.lstrip('# ').strip()
            if body.startswith('AsymmetricCroCo3DStereo('):
                config = body
            continue
        if line.strip():
            name, shape, dtype = line.split('\t')
            dims = tuple(int(v) for v in re.findall(r'\d+', shape))
            entries.append((name, dims, dtype))
    assert config, f'no config string in {path}'
    return config, entries


def test_three_released_key_lists_present():
    assert {p.name for p in KEY_FILES} >= {'dust3r_vitl_224_linear.keys.txt', 'dust3r_vitl_512_dpt.keys.txt',
                                           'dust3r_vitl_512_linear.keys.txt'}


@pytest.mark.parametrize('path', KEY_FILES, ids=[p.name.split('.')[0] for p in KEY_FILES])
def test_released_key_list_matches_model_from_its_config(path):
    config, entries = read_key_list(path)
    cfg = parse_model_config(config)
    assert cfg.enc_embed_dim == 1024 and cfg.enc_depth == 24 and cfg.dec_depth == 12
    assert cfg.depth_mode == ('exp', -math.inf, math.inf) and cfg.conf_mode == ('exp', 1, math.inf)
    sd = build_model(cfg, 'meta').state_dict()
    assert [n for n, _, _ in entries] == list(sd)
    for name, shape, dtype in entries:
        assert tuple(sd[name].shape) == shape, name
        assert dtype == 'torch.float32'
    # strict load of exactly these names/shapes (meta tensors: no memory)
    model = build_model(cfg, 'meta')
    model.load_state_dict({n: torch.empty(s, device='meta') for n, s, _ in entries}, strict=True, assign=True)


@pytest.mark.slow
def test_vitl_224_linear_released_format_end_to_end(tmp_path):
    config, entries = read_key_list(shared_dir('checkpoints') / 'checkpoints' / 'dust3r_vitl_224_linear.keys.txt')
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for name, shape, _ in entries:   # names and shapes from the list, not from our model
        if len(shape) >= 2:
            t = torch.randn(shape, generator=gen, dtype=torch.float16) * (0.8 / math.sqrt(math.prod(shape[1:])))
        elif name.endswith('.weight'):
            t = torch.ones(shape, dtype=torch.float16)
        else:
            t = torch.randn(shape, generator=gen, dtype=torch.float16) * 0.02
        sd[name] = t
    path = tmp_path / 'DUSt3R_ViTLarge_BaseDecoder_224_linear.pth'
    save_checkpoint(path, sd, config)
    del sd
    net = load_network(path, device='cpu')
    assert sum(p.numel() for p in net.model.parameters()) > 500e6
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    out = net.predict_pairs(imgs, [(0, 1)])
    assert out['pts3d_1'].shape == (1, 224, 224, 3) and out['conf_2'].shape == (1, 224, 224)
    for v in out.values():
        assert np.isfinite(v).all()
    assert (out['conf_1'] >= 1).all()
