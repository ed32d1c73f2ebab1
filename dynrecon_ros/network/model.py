"""The asymmetric CroCo pointmap network (DUSt3R / MonST3R), built from a :class:`ModelConfig`.

Data flow for a pair (view 1 = image i, view 2 = image j), token grid (h, w) = (H/16, W/16):
  encode:  patch_embed -> enc_blocks (self-attention with 2D RoPE) -> enc_norm        (B, h*w, E)
  decode:  decoder_embed on both views; block k of ``dec_blocks`` updates view 1 from view 1 and
           view 2 of block k-1, block k of ``dec_blocks2`` updates view 2 likewise; last -> dec_norm
  heads:   downstream_head1 on view 1's maps, downstream_head2 on view 2's; postprocess.
The encoder does not look at the other view, so :meth:`encode` runs once per image and
:meth:`decode_heads` takes cached tokens (see ``engine.py``).
"""
from __future__ import annotations

import torch
from torch import nn

from .blocks import DecoderBlock, EncoderBlock, RoPE2D
from .config import ModelConfig
from .heads import DPTHead, LinearHead, postprocess


class PatchEmbed(nn.Module):
    """Non-overlapping patch x patch convolution; no transposition of portrait images."""

    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)

    def forward(self, img):
        """img (B, 3, H, W) -> tokens (B, h*w, dim), row-major over the (h, w) patch grid."""
        return self.proj(img).flatten(2).transpose(1, 2)


class PointmapNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        E, D = cfg.enc_embed_dim, cfg.dec_embed_dim
        self.rope = RoPE2D(cfg.rope_freq)
        # registration order reproduces the released state_dict order
        self.patch_embed = PatchEmbed(cfg.patch_size, E)
        self.enc_blocks = nn.ModuleList(
            [EncoderBlock(E, cfg.enc_num_heads, cfg.mlp_ratio) for _ in range(cfg.enc_depth)])
        self.enc_norm = nn.LayerNorm(E, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))  # unused at inference, kept for the keys
        self.decoder_embed = nn.Linear(E, D)
        self.dec_blocks = nn.ModuleList([DecoderBlock(D, cfg.dec_num_heads, cfg.mlp_ratio, cfg.norm_im2_in_dec)
                                         for _ in range(cfg.dec_depth)])
        self.dec_norm = nn.LayerNorm(D, eps=1e-6)
        self.dec_blocks2 = nn.ModuleList([DecoderBlock(D, cfg.dec_num_heads, cfg.mlp_ratio, cfg.norm_im2_in_dec)
                                          for _ in range(cfg.dec_depth)])
        out_ch = 3 + int(cfg.has_conf)
        for k in (1, 2):
            if cfg.head_type == 'linear':
                head = LinearHead(D, cfg.patch_size, out_ch)
            else:
                head = DPTHead(E, D, cfg.dec_depth, cfg.patch_size, out_ch)
            setattr(self, f'downstream_head{k}', head)

    def _rope(self, grid_hw, head_dim, ref):
        return self.rope.cos_sin(grid_hw, head_dim, ref.device, torch.float32)

    def grid(self, hw):
        p = self.cfg.patch_size
        return hw[0] // p, hw[1] // p

    def encode(self, img: torch.Tensor) -> torch.Tensor:
        """img (B, 3, H, W) normalised -> encoder tokens (B, h*w, E) after enc_norm."""
        x = self.patch_embed(img)
        cs = self._rope(self.grid(img.shape[-2:]), self.cfg.enc_embed_dim // self.cfg.enc_num_heads, x)
        for blk in self.enc_blocks:
            x = blk(x, cs)
        return self.enc_norm(x)

    def decode(self, f1, f2, hw1, hw2, want_logits=False, zero=None):
        """Two-view decoder on encoder tokens f1 (B, N1, E), f2 (B, N2, E) of images of size hw1, hw2.

        Returns (feats1, feats2, logits1, logits2): feats are dicts {layer index: tokens} holding only
        the layers the heads read (0 = encoder output, dec_depth = final after dec_norm); logits are
        lists per block of (B, heads, N_other) mean cross-attention logits (None unless asked).
        zero: (query_sel (B, N1), key_sel (B, N2)) applied to decoder 1's cross-attention.
        """
        hd = self.cfg.dec_embed_dim // self.cfg.dec_num_heads
        r1 = self._rope(self.grid(hw1), hd, f1)
        r2 = self._rope(self.grid(hw2), hd, f2)
        L = self.cfg.dec_depth
        keep1 = {k % (L + 1) for k in self.downstream_head1.hooks}
        keep2 = {k % (L + 1) for k in self.downstream_head2.hooks}
        feats1 = {0: f1} if 0 in keep1 else {}
        feats2 = {0: f2} if 0 in keep2 else {}
        x1, x2 = self.decoder_embed(f1), self.decoder_embed(f2)
        logits1, logits2 = [], []
        for k, (b1, b2) in enumerate(zip(self.dec_blocks, self.dec_blocks2), start=1):
            n1, l1 = b1(x1, x2, r1, r2, want_logits, zero)
            n2, l2 = b2(x2, x1, r2, r1, want_logits, None)
            x1, x2 = n1, n2
            if k == L:
                x1, x2 = self.dec_norm(x1), self.dec_norm(x2)
            if k in keep1:
                feats1[k] = x1
            if k in keep2:
                feats2[k] = x2
            if want_logits:
                logits1.append(l1)
                logits2.append(l2)
        return feats1, feats2, (logits1 if want_logits else None), (logits2 if want_logits else None)

    def heads(self, feats1, feats2, hw1, hw2):
        """Run both heads in float32 (as the reference does) and post-process.

        Returns (res1, res2) with res1 = {'pts3d', 'conf'} of view 1 and res2 = {'pts3d', 'conf'}
        of view 2, both in view 1's frame; pts (B, H, W, 3), conf (B, H, W).
        """
        L = self.cfg.dec_depth
        out = []
        for head, feats, hw in ((self.downstream_head1, feats1, hw1), (self.downstream_head2, feats2, hw2)):
            lst = [None] * (L + 1)
            for k, v in feats.items():
                lst[k] = v.float()
            with torch.autocast(device_type=lst[L].device.type, enabled=False):
                raw = head(lst, hw)
                out.append(postprocess(raw, self.cfg.depth_mode, self.cfg.conf_mode))
        return out[0], out[1]

    def forward(self, img1, img2):
        """Reference-style pair forward (encodes both images): (B,3,H,W) x2 -> (res1, res2)."""
        hw1, hw2 = tuple(img1.shape[-2:]), tuple(img2.shape[-2:])
        if hw1 == hw2:
            f1, f2 = self.encode(torch.cat((img1, img2))).chunk(2)
        else:
            f1, f2 = self.encode(img1), self.encode(img2)
        feats1, feats2, _, _ = self.decode(f1, f2, hw1, hw2)
        return self.heads(feats1, feats2, hw1, hw2)
