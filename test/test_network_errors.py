"""Config parsing, checkpoint errors, input checks and preprocessing of dynrecon_ros.network."""
import math

import numpy as np
import pytest
import torch

from dynrecon_ros.errors import InputError
from dynrecon_ros.network import (build_model, load_network, normalize, parse_model_config,
                                  preprocess_image, save_checkpoint)

TINY = ("AsymmetricCroCo3DStereo(pos_embed='RoPE100', patch_embed_cls='ManyAR_PatchEmbed', img_size=(512, 512), "
        "head_type='linear', output_mode='pts3d', depth_mode=('exp', -float('inf'), float('inf')), "
        "conf_mode=('exp', 1, float('inf')), enc_embed_dim=32, enc_depth=2, enc_num_heads=2, "
        "dec_embed_dim=32, dec_depth=2, dec_num_heads=2)")


def tiny_ckpt(path, config=TINY, mutate=None):
    model = build_model(config)
    sd = model.state_dict()
    if mutate:
        sd = mutate(dict(sd))
    save_checkpoint(path, sd, config)
    return path


def test_parse_released_style_string_and_rewrite():
    cfg = parse_model_config(TINY)
    assert cfg.patch_embed_cls == 'PatchEmbedDust3R' and cfg.landscape_only is False
    assert cfg.depth_mode == ('exp', -math.inf, math.inf) and cfg.conf_mode == ('exp', 1, math.inf)
    assert (cfg.enc_embed_dim, cfg.dec_depth, cfg.rope_freq, cfg.img_size) == (32, 2, 100.0, (512, 512))
    # the other infinity spelling a checkpoint may carry, plus landscape_only given explicitly
    alt = TINY.replace("-float('inf'), float('inf')", '-inf, inf')[:-1] + ', landscape_only=True)'
    cfg2 = parse_model_config(alt)
    assert cfg2.depth_mode == cfg.depth_mode and cfg2.landscape_only is False


@pytest.mark.parametrize('bad, word', [
    ("AsymmetricCroCo3DStereo(enc_depth=__import__('os').system('true'))", 'enc_depth'),
    ("AsymmetricCroCo3DStereo(pos_embed='RoPE100', head_type=open('x'))", 'head_type'),
    ("os.system('true')", 'call like'),
    ("AsymmetricCroCo3DStereo(pos_embed='RoPE100', bogus=1)", 'bogus'),
    ("OtherNet(pos_embed='RoPE100')", 'OtherNet'),
    ("AsymmetricCroCo3DStereo(pos_embed='cosine')", 'pos_embed'),
    ("AsymmetricCroCo3DStereo(pos_embed='RoPE100', head_type='dpt', dec_depth=8)", 'dec_depth'),
    ("AsymmetricCroCo3DStereo(pos_embed='RoPE100', enc_embed_dim=30, enc_num_heads=4)", 'enc_embed_dim'),
    ("AsymmetricCroCo3DStereo(pos_embed='RoPE100', depth_mode=('exp', 0, 10))", 'depth_mode'),
    ("AsymmetricCroCo3DStereo(pos_embed='RoPE100'", 'not a call'),
])
def test_parser_rejects_with_named_reason(bad, word):
    with pytest.raises(InputError, match=word):
        parse_model_config(bad)


def test_config_decides_architecture():
    other = TINY.replace('dec_depth=2', 'dec_depth=3').replace('dec_embed_dim=32', 'dec_embed_dim=48') \
                .replace("head_type='linear'", "head_type='linear', patch_size=8")
    sd = build_model(other, 'meta').state_dict()
    assert 'dec_blocks2.2.mlp.fc2.weight' in sd and 'dec_blocks.3.norm1.weight' not in sd
    assert tuple(sd['downstream_head1.proj.weight'].shape) == (4 * 8 * 8, 48)
    assert tuple(sd['patch_embed.proj.weight'].shape) == (32, 3, 8, 8)


def test_load_and_predict_tiny(tmp_path):
    net = load_network(tiny_ckpt(tmp_path / 'ok.pth'))
    imgs = np.random.default_rng(0).integers(0, 256, (3, 32, 48, 3), dtype=np.uint8)
    out = net.predict_pairs(imgs, [(0, 1), (2, 0)])
    assert out['pts3d_1'].shape == (2, 32, 48, 3) and out['conf_2'].shape == (2, 32, 48)
    assert all(np.isfinite(v).all() for v in out.values())


def test_missing_and_truncated_files(tmp_path):
    with pytest.raises(InputError, match='not found'):
        load_network(tmp_path / 'nope.pth')
    good = tiny_ckpt(tmp_path / 'good.pth')
    data = good.read_bytes()
    cut = tmp_path / 'cut.pth'
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match='truncated') as exc:
        load_network(cut)
    assert 'cut.pth' in str(exc.value)
    junk = tmp_path / 'junk.pth'
    junk.write_bytes(b'not a checkpoint at all')
    with pytest.raises(InputError, match='cut|junk|truncated'):
        load_network(junk)


def test_wrong_architecture_names_first_key(tmp_path):
    # a dpt config over linear weights: the first missing entry is named
    dpt = TINY.replace("head_type='linear'", "head_type='dpt'").replace('dec_depth=2', 'dec_depth=10')
    lin = build_model(TINY.replace('dec_depth=2', 'dec_depth=10')).state_dict()
    path = tmp_path / 'arch.pth'
    save_checkpoint(path, lin, dpt)
    with pytest.raises(InputError, match=r"missing key 'downstream_head1\.dpt\.scratch\.layer1_rn\.weight'"):
        load_network(path)
    # an extra entry is named too
    extra = tiny_ckpt(tmp_path / 'extra.pth', mutate=lambda sd: {**sd, 'foo.bar': torch.zeros(1)})
    with pytest.raises(InputError, match="unexpected key 'foo.bar'"):
        load_network(extra)


def test_wrong_shape_names_key(tmp_path):
    def widen(sd):
        sd['enc_blocks.1.mlp.fc1.weight'] = torch.zeros(7, 32)
        return sd
    path = tiny_ckpt(tmp_path / 'shape.pth', mutate=widen)
    with pytest.raises(InputError, match=r"'enc_blocks\.1\.mlp\.fc1\.weight' has shape \(7, 32\)"):
        load_network(path)


def test_unsafe_pickle_is_refused(tmp_path):
    path = tmp_path / 'evil.pth'
    torch.save({'model': {}, 'args': object()}, path)
    with pytest.raises(InputError, match='not allowed'):
        load_network(path)


def test_input_checks(tmp_path):
    net = load_network(tiny_ckpt(tmp_path / 'ok.pth'))
    imgs = np.zeros((2, 32, 48, 3), np.uint8)
    with pytest.raises(InputError, match='multiple of 16'):
        net.predict_pairs(np.zeros((2, 30, 48, 3), np.uint8), [(0, 1)])
    with pytest.raises(InputError, match='uint8'):
        net.predict_pairs(imgs.astype(np.float32), [(0, 1)])
    with pytest.raises(InputError, match='outside'):
        net.predict_pairs(imgs, [(0, 2)])
    with pytest.raises(InputError, match='frame_ids'):
        net.predict_pairs(imgs, [(0, 1)], frame_ids=['a'])


def test_pair_batch_from_memory_budget(tmp_path):
    net = load_network(tiny_ckpt(tmp_path / 'ok.pth'), memory_budget=1 << 20)
    small = net.pair_batch_size((32, 48))
    big = load_network(tmp_path / 'ok.pth', memory_budget=64 << 20).pair_batch_size((32, 48))
    assert 1 <= small < big
    assert net.pair_bytes((512, 384)) > net.pair_bytes((224, 224))


@pytest.mark.parametrize('shape, size, expect', [
    ((480, 640), 512, (384, 512)),     # landscape: long side 512
    ((640, 480), 512, (512, 384)),     # portrait stays portrait
    ((500, 500), 512, (384, 512)),     # square -> 4:3 unless square_ok
    ((480, 640), 224, (224, 224)),     # 224 models: short side 224, centre square
    ((375, 500), 512, (384, 512)),     # 384 = 2*((2*192)//16)*8
])
def test_preprocess_sizes(shape, size, expect):
    rgb = np.random.default_rng(0).integers(0, 256, shape + (3,), dtype=np.uint8)
    r = preprocess_image(rgb, size=size)
    assert r.rgb.shape == expect + (3,) and r.rgb.dtype == np.uint8
    assert r.true_shape == expect


def test_preprocess_geometry_and_normalize():
    rgb = np.zeros((480, 640, 3), np.uint8)
    rgb[240, 320] = 255                      # a dot at the centre
    r = preprocess_image(rgb, size=512)
    v, u = np.unravel_index(r.rgb[..., 0].argmax(), r.rgb.shape[:2])
    assert abs(u - (320 * r.scale_x - r.crop_x0)) <= 1 and abs(v - (240 * r.scale_y - r.crop_y0)) <= 1
    x = normalize(np.array([[[[0, 255, 128]]]], np.uint8))
    assert x.shape == (1, 3, 1, 1)
    torch.testing.assert_close(x.flatten(), torch.tensor([-1.0, 1.0, 128 / 255 * 2 - 1]))


def test_device_and_precision_guards(tmp_path):
    path = tiny_ckpt(tmp_path / 'ok.pth')
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match='CUDA is not available'):
            load_network(path, device='cuda')
    with pytest.raises(InputError, match='only supported on CUDA'):
        load_network(path, device='cpu', amp='bf16')
    net = load_network(path, device='cpu')
    assert net.amp_dtype is None and next(net.model.parameters()).dtype == torch.float32
