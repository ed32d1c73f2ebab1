"""Transformer pieces of the CroCo/DUSt3R network: 2D RoPE, attention, encoder and decoder blocks.

Parameter names (``norm1``, ``attn.qkv``, ``cross_attn.projq`` ...) follow the released checkpoints.
Attention uses ``F.scaled_dot_product_attention`` except when cross-attention weights must be
zeroed after the softmax (Easi3R re-weighting), where the explicit form is needed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RoPE2D:
    """2D rotary position embedding (no parameters).

    Each head's channels are split in two halves: the first half is rotated by the token's row (y)
    position, the second by its column (x). Within a half of size D, channel pairs (c, c + D/2) are
    rotated by angle ``pos * freq**(-2k/D)`` for k = c, as in RoFormer's ``rotate_half`` form.
    """

    def __init__(self, freq: float):
        self.freq = float(freq)
        self._cache: dict = {}

    def cos_sin(self, grid_hw: tuple[int, int], head_dim: int, device, dtype):
        """cos, sin tables (1, 1, h*w, head_dim) for tokens of an (h, w) patch grid, row-major."""
        key = (grid_hw, head_dim, str(device), dtype)
        if key not in self._cache:
            h, w = grid_hw
            half = head_dim // 2
            inv = 1.0 / (self.freq ** (torch.arange(0, half, 2, device=device).float() / half))
            ys = torch.arange(h, device=device).float().repeat_interleave(w)  # row of each token
            xs = torch.arange(w, device=device).float().repeat(h)              # column of each token
            fy, fx = ys[:, None] * inv[None], xs[:, None] * inv[None]         # (N, half/2)
            ang = torch.cat((fy, fy, fx, fx), dim=-1)                          # (N, head_dim)
            self._cache[key] = (ang.cos().to(dtype)[None, None], ang.sin().to(dtype)[None, None])
        return self._cache[key]

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (B, heads, N, head_dim) rotated; rotate_half acts inside each of the y and x halves."""
        q = x.unflatten(-1, (2, 2, x.shape[-1] // 4))          # (.., half, quarter, D/4)
        rot = torch.stack((-q[..., 1, :], q[..., 0, :]), dim=-2).flatten(-3)
        return x * cos.to(x.dtype) + rot * sin.to(x.dtype)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope_cs):
        """x (B, N, C); rope_cs = (cos, sin) for the token grid."""
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k = RoPE2D.apply(q, *rope_cs), RoPE2D.apply(k, *rope_cs)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.projq = nn.Linear(dim, dim)
        self.projk = nn.Linear(dim, dim)
        self.projv = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, y, rope_x, rope_y, want_logits=False, zero=None):
        """Queries from x (B, Nq, C), keys/values from y (B, Nk, C).

        want_logits: also return the pre-softmax logits q.k^T*scale averaged over the query
        tokens, (B, heads, Nk) float32 (the mean is linear, so it is (mean q).k^T*scale: no
        (Nq, Nk) matrix is built). zero: optional (query_sel (B, Nq), key_sel (B, Nk)) bool; the
        softmax weights from selected queries to selected keys are set to 0 (no renormalisation).
        """
        B, Nq, C = x.shape
        Nk = y.shape[1]
        h = self.num_heads
        q = self.projq(x).view(B, Nq, h, C // h).transpose(1, 2)
        k = self.projk(y).view(B, Nk, h, C // h).transpose(1, 2)
        v = self.projv(y).view(B, Nk, h, C // h).transpose(1, 2)
        q, k = RoPE2D.apply(q, *rope_x), RoPE2D.apply(k, *rope_y)
        scale = (C // h) ** -0.5
        logits = None
        if want_logits:
            with torch.autocast(device_type=q.device.type, enabled=False):  # float32 product under bf16 autocast
                logits = (q.float().mean(dim=2, keepdim=True) @ k.float().transpose(-2, -1)).squeeze(2) * scale
        if zero is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            qsel, ksel = zero
            w = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)
            drop = (qsel[:, None, :, None] & ksel[:, None, None, :])
            out = w.masked_fill(drop, 0.0) @ v
        return self.proj(out.transpose(1, 2).reshape(B, Nq, C)), logits


class EncoderBlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, rope_cs):
        x = x + self.attn(self.norm1(x), rope_cs)
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    """Self-attention on x, cross-attention from x to the other view's tokens y, MLP."""

    def __init__(self, dim, num_heads, mlp_ratio, norm_mem=True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SelfAttention(dim, num_heads)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.norm3 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm_y = nn.LayerNorm(dim, eps=1e-6) if norm_mem else nn.Identity()

    def forward(self, x, y, rope_x, rope_y, want_logits=False, zero=None):
        x = x + self.attn(self.norm1(x), rope_x)
        y_ = self.norm_y(y)
        ca, logits = self.cross_attn(self.norm2(x), y_, rope_x, rope_y, want_logits, zero)
        x = x + ca
        return x + self.mlp(self.norm3(x)), logits
