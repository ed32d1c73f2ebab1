"""Output heads (``linear`` and ``dpt``) and their post-processing into points and confidence.

Heads take the list of token maps ``feats`` where ``feats[0]`` is the encoder output (enc_norm
applied) and ``feats[k]`` the output of decoder block k (the last one after dec_norm), each
(B, h*w, C), and return raw maps (B, 3 + has_conf, H, W) which :func:`postprocess` turns into
``pts3d`` (B, H, W, 3) and ``conf`` (B, H, W).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def postprocess(raw: torch.Tensor, depth_mode: tuple, conf_mode: tuple | None) -> dict:
    """raw (B, C, H, W) -> {'pts3d': (B, H, W, 3), 'conf': (B, H, W)}.

    depth 'exp': pts = xyz/|xyz| * expm1(|xyz|) ('square': * |xyz|^2, 'linear': xyz);
    conf 'exp': vmin + min(exp(x), vmax - vmin); 'sigmoid': (vmax - vmin) * sigmoid(x) + vmin.
    """
    fmap = raw.permute(0, 2, 3, 1)
    xyz = fmap[..., :3]
    mode = depth_mode[0]
    if mode == 'linear':
        pts = xyz
    else:
        d = xyz.norm(dim=-1, keepdim=True)
        unit = xyz / d.clip(min=1e-8)
        pts = unit * (d.square() if mode == 'square' else torch.expm1(d))
    out = {'pts3d': pts}
    if conf_mode is not None:
        cmode, vmin, vmax = conf_mode
        x = fmap[..., 3]
        if cmode == 'exp':
            out['conf'] = vmin + x.exp().clip(max=vmax - vmin)
        else:
            out['conf'] = (vmax - vmin) * torch.sigmoid(x) + vmin
    return out


class LinearHead(nn.Module):
    """Each final decoder token -> patch x patch pixels of (3 + conf) channels (pixel shuffle)."""

    def __init__(self, dec_dim: int, patch_size: int, out_ch: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(dec_dim, out_ch * patch_size ** 2)
        self.hooks = (-1,)

    def forward(self, feats, hw):
        H, W = hw
        p = self.patch_size
        tok = feats[-1]
        B = tok.shape[0]
        x = self.proj(tok).transpose(-1, -2).reshape(B, -1, H // p, W // p)
        return F.pixel_shuffle(x, p)


class _ResidualConv(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


def _up2(x):
    return F.interpolate(x, scale_factor=2, mode='bilinear', align_corners=True)


class _Fusion(nn.Module):
    """DPT refinement stage: (optional skip through a residual unit) + residual unit, x2, 1x1."""

    def __init__(self, ch):
        super().__init__()
        self.out_conv = nn.Conv2d(ch, ch, 1)
        self.resConfUnit1 = _ResidualConv(ch)
        self.resConfUnit2 = _ResidualConv(ch)

    def forward(self, x, skip=None):
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        return self.out_conv(_up2(self.resConfUnit2(x)))


class _Up2(nn.Module):
    def forward(self, x):
        return _up2(x)


class DPTAdapter(nn.Module):
    """DPT pyramid over 4 token maps (hooks), names as in the released ``...dpt.*`` entries."""

    def __init__(self, dims_in, out_ch, layer_dims=(96, 192, 384, 768), feature_dim=256, last_dim=128):
        super().__init__()
        sc = nn.Module()
        for i, d in enumerate(layer_dims):
            setattr(sc, f'layer{i + 1}_rn', nn.Conv2d(d, feature_dim, 3, padding=1, bias=False))
        # the released state dict lists these convs a second time under this alias list
        sc.layer_rn = nn.ModuleList([getattr(sc, f'layer{i + 1}_rn') for i in range(4)])
        for i in range(4):
            setattr(sc, f'refinenet{i + 1}', _Fusion(feature_dim))
        self.scratch = sc
        self.head = nn.Sequential(
            nn.Conv2d(feature_dim, feature_dim // 2, 3, padding=1), _Up2(),
            nn.Conv2d(feature_dim // 2, last_dim, 3, padding=1), nn.ReLU(),
            nn.Conv2d(last_dim, out_ch, 1))
        l0, l1, l2, l3 = layer_dims
        self.act_postprocess = nn.ModuleList([
            nn.Sequential(nn.Conv2d(dims_in[0], l0, 1), nn.ConvTranspose2d(l0, l0, 4, stride=4)),
            nn.Sequential(nn.Conv2d(dims_in[1], l1, 1), nn.ConvTranspose2d(l1, l1, 2, stride=2)),
            nn.Sequential(nn.Conv2d(dims_in[2], l2, 1)),
            nn.Sequential(nn.Conv2d(dims_in[3], l3, 1), nn.Conv2d(l3, l3, 3, stride=2, padding=1)),
        ])

    def forward(self, maps):
        """maps: 4 tensors (B, C_k, h, w) -> (B, out_ch, 16h, 16w)."""
        lay = [self.scratch.layer_rn[k](self.act_postprocess[k](m)) for k, m in enumerate(maps)]
        p4 = self.scratch.refinenet4(lay[3])[:, :, :lay[2].shape[2], :lay[2].shape[3]]
        p3 = self.scratch.refinenet3(p4, lay[2])
        p2 = self.scratch.refinenet2(p3, lay[1])
        p1 = self.scratch.refinenet1(p2, lay[0])
        return self.head(p1)


class DPTHead(nn.Module):
    """DPT head fed by the encoder output and decoder blocks dec_depth*2//4, *3//4 and the last."""

    def __init__(self, enc_dim: int, dec_dim: int, dec_depth: int, patch_size: int, out_ch: int):
        super().__init__()
        self.patch_size = patch_size
        self.hooks = (0, dec_depth * 2 // 4, dec_depth * 3 // 4, dec_depth)
        self.dpt = DPTAdapter((enc_dim, dec_dim, dec_dim, dec_dim), out_ch)

    def forward(self, feats, hw):
        H, W = hw
        h, w = H // self.patch_size, W // self.patch_size
        maps = [feats[k].transpose(-1, -2).reshape(feats[k].shape[0], -1, h, w) for k in self.hooks]
        return self.dpt(maps)
