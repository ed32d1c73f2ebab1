"""Windowed pair inference: encode each frame once, decode pairs in memory-bounded batches.

The reference code encodes both images for every pair; the encoder does not depend on the other
view, so :class:`PairNetwork` keeps each frame's encoder tokens in a cache keyed by the caller's
frame id (plus image size) and reuses them across all pairs of a call and across overlapping
windows of later calls. Pairs go through the two decoders and heads in batches whose size comes
from a memory budget. On CUDA the encoder and decoders run under bf16 autocast (fp16 where bf16 is
not supported); the heads and post-processing run in float32 as in the reference. On CPU all is
float32.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, Sequence

import numpy as np
import torch

from dynrecon_ros.errors import InputError

from .model import PointmapNet
from .preprocess import normalize

GiB = 1 << 30


class PairNetwork:
    """Pairwise pointmap predictor around a loaded :class:`PointmapNet`.

    memory_budget: bytes of activations one decoder/encoder batch may use (default: CPU 1 GiB;
    CUDA min(4 GiB, half the free memory)). batch_size: fixed pair batch (overrides the budget).
    cache_frames: how many frames' encoder tokens the frame-id cache keeps (LRU).
    amp: 'auto' (bf16/fp16 on CUDA, none on CPU), 'bf16', 'fp16' or 'fp32'.
    """

    def __init__(self, model: PointmapNet, device='cpu', amp='auto', memory_budget: int | None = None,
                 batch_size: int | None = None, cache_frames: int = 64):
        self.model = model
        self.cfg = model.cfg
        self.device = torch.device(device)
        cuda = self.device.type == 'cuda'
        if amp == 'auto':
            amp = ('bf16' if torch.cuda.is_bf16_supported() else 'fp16') if cuda else 'fp32'
        if amp not in ('bf16', 'fp16', 'fp32'):
            raise InputError(f'amp must be auto, bf16, fp16 or fp32, got {amp!r}')
        if amp != 'fp32' and not cuda:
            raise InputError('reduced precision (amp) is only supported on CUDA')
        self.amp_dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': None}[amp]
        if memory_budget is None:
            if cuda:
                free, _ = torch.cuda.mem_get_info(self.device)
                memory_budget = min(4 * GiB, free // 2)
            else:
                memory_budget = 1 * GiB
        self.memory_budget = int(memory_budget)
        self.batch_size = batch_size
        self.cache_frames = int(cache_frames)
        self._cache: OrderedDict = OrderedDict()
        self.stats = {'encoded': 0, 'cache_hits': 0}

    # ------------------------------------------------------------------ sizing
    def _act_bytes(self) -> int:
        return 2 if self.amp_dtype is not None else 4

    def pair_bytes(self, hw: tuple[int, int], explicit_attention: bool = False) -> int:
        """Rough upper bound of the activation bytes one pair needs in decoder + heads."""
        H, W = hw
        p = self.cfg.patch_size
        n = (H // p) * (W // p)
        D, b = self.cfg.dec_embed_dim, self._act_bytes()
        dec = 2 * n * D * b * (4 + 10 + 2 * self.cfg.mlp_ratio)
        if explicit_attention:
            dec += 3 * self.cfg.dec_num_heads * n * n * 4
        if self.cfg.head_type == 'dpt':
            head = 2 * H * W * 2048   # fp32 pyramid: 256 ch at H/2 (x4 live) + 128 ch at full size (x2)
        else:
            head = 2 * H * W * 4 * 4 * 3
        return int(dec + head)

    def image_bytes(self, hw: tuple[int, int]) -> int:
        H, W = hw
        p = self.cfg.patch_size
        n = (H // p) * (W // p)
        return int(n * self.cfg.enc_embed_dim * self._act_bytes() * (8 + 2 * self.cfg.mlp_ratio))

    def pair_batch_size(self, hw, explicit_attention=False) -> int:
        if self.batch_size:
            return int(self.batch_size)
        return int(max(1, min(64, self.memory_budget // self.pair_bytes(hw, explicit_attention))))

    # ------------------------------------------------------------------ encoding
    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype,
                              enabled=self.amp_dtype is not None)

    def clear_cache(self) -> None:
        self._cache.clear()

    def encode(self, images: np.ndarray, frame_ids: Sequence[Hashable] | None = None,
               which: Sequence[int] | None = None) -> dict:
        """Encoder tokens {index: (h*w, E)} for images[which] (default all), via the frame-id cache.

        Without frame_ids nothing is kept between calls. Frame ids must identify image content.
        """
        H, W = images.shape[1:3]
        which = range(len(images)) if which is None else which
        out, todo = {}, []
        for i in which:
            key = None if frame_ids is None else (frame_ids[i], H, W)
            if key is not None and key in self._cache:
                self._cache.move_to_end(key)
                out[i] = self._cache[key]
                self.stats['cache_hits'] += 1
            else:
                todo.append(i)
        bs = int(max(1, min(32, self.memory_budget // self.image_bytes((H, W)))))
        with torch.inference_mode(), self._autocast():
            for s in range(0, len(todo), bs):
                idx = todo[s:s + bs]
                x = normalize(images[idx]).to(self.device)
                toks = self.model.encode(x)
                for k, i in enumerate(idx):
                    out[i] = toks[k]
                    if frame_ids is not None:
                        self._cache[(frame_ids[i], H, W)] = toks[k]
                self.stats['encoded'] += len(idx)
        while len(self._cache) > self.cache_frames:
            self._cache.popitem(last=False)
        return out

    def encoder_features(self, images, frame_ids: Sequence[Hashable] | None = None) -> np.ndarray:
        """(N, h, w, E) float32 host array: each image's encoder output after the encoder's final norm
        (the tokens the decoders read; Easi3R clusters them), through the frame-id cache of
        :meth:`encode` (no encoding for frames a ``predict_pairs`` call with the same ids encoded).
        images: uint8 (N, H, W, 3) as for :meth:`predict_pairs`; h, w = H / 16, W / 16."""
        images = self._check_images(images)
        if frame_ids is not None and len(list(frame_ids)) != len(images):
            raise InputError(f'frame_ids has {len(list(frame_ids))} entries for {len(images)} images')
        p = self.cfg.patch_size
        h, w = images.shape[1] // p, images.shape[2] // p
        toks = self.encode(images, None if frame_ids is None else list(frame_ids))
        return np.stack([_host(toks[i]).reshape(h, w, -1) for i in range(len(images))])

    # ------------------------------------------------------------------ pairs
    def predict_pairs(self, images, pairs, frame_ids=None, return_attention: bool = False,
                      cross_attn_zero=None, batch_size: int | None = None) -> dict:
        """Pointmaps for ordered pairs (i, j): view 1 = images[i], view 2 = images[j].

        images: uint8 (N, H, W, 3), H and W multiples of the patch size (16); pairs: [(i, j), ...].
        frame_ids: optional N hashable ids; encoder tokens are then cached across calls.
        return_attention: add 'cross_attn_1' (P, L, heads, h, w), decoder 1's cross-attention
          logits (pre-softmax) averaged over view-1 queries, per view-2 key token, and
          'cross_attn_2' (P, L, heads, h, w), decoder 2's over view-2 queries per view-1 token.
        cross_attn_zero: optional (query_sel, key_sel), bool arrays (P, h, w) (or (P, h*w)): in
          decoder 1 the softmax weights from selected view-1 query tokens to selected view-2 key
          tokens are set to 0 (Easi3R's second pass).
        Returns numpy float32: 'pts3d_1' (P, H, W, 3), 'conf_1' (P, H, W), 'pts3d_2_in_1'
        (P, H, W, 3), 'conf_2' (P, H, W).
        """
        images = self._check_images(images)
        N, H, W = images.shape[:3]
        pairs = self._check_pairs(pairs, N)
        if frame_ids is not None:
            frame_ids = list(frame_ids)
            if len(frame_ids) != N:
                raise InputError(f'frame_ids has {len(frame_ids)} entries for {N} images')
        P = len(pairs)
        p = self.cfg.patch_size
        h, w = H // p, W // p
        zero = None
        if cross_attn_zero is not None:
            zero = [torch.as_tensor(np.asarray(m)).reshape(P, -1).bool() for m in cross_attn_zero]
            if any(m.shape[1] != h * w for m in zero):
                raise InputError(f'cross_attn_zero masks must be (P, {h}, {w}) for {P} pairs')
        needed = sorted({i for pr in pairs for i in pr})
        tokens = self.encode(images, frame_ids, needed)

        res = {'pts3d_1': np.empty((P, H, W, 3), np.float32), 'conf_1': np.empty((P, H, W), np.float32),
               'pts3d_2_in_1': np.empty((P, H, W, 3), np.float32), 'conf_2': np.empty((P, H, W), np.float32)}
        L, nh = self.cfg.dec_depth, self.cfg.dec_num_heads
        if return_attention:
            res['cross_attn_1'] = np.empty((P, L, nh, h, w), np.float32)
            res['cross_attn_2'] = np.empty((P, L, nh, h, w), np.float32)
        bs = batch_size or self.pair_batch_size((H, W), explicit_attention=zero is not None)
        with torch.inference_mode():
            for s in range(0, P, bs):
                chunk = pairs[s:s + bs]
                f1 = torch.stack([tokens[i] for i, _ in chunk])
                f2 = torch.stack([tokens[j] for _, j in chunk])
                z = None if zero is None else tuple(m[s:s + bs].to(self.device) for m in zero)
                with self._autocast():
                    feats1, feats2, lg1, lg2 = self.model.decode(f1, f2, (H, W), (H, W), return_attention, z)
                r1, r2 = self.model.heads(feats1, feats2, (H, W), (H, W))
                e = s + len(chunk)
                res['pts3d_1'][s:e] = _host(r1['pts3d'])
                res['pts3d_2_in_1'][s:e] = _host(r2['pts3d'])
                if self.cfg.has_conf:
                    res['conf_1'][s:e] = _host(r1['conf'])
                    res['conf_2'][s:e] = _host(r2['conf'])
                else:
                    res['conf_1'][s:e] = 1.0
                    res['conf_2'][s:e] = 1.0
                if return_attention:  # the logits come out of autocast's matmul in bf16/fp16 under amp
                    res['cross_attn_1'][s:e] = _host(torch.stack(lg1, 1).reshape(-1, L, nh, h, w))
                    res['cross_attn_2'][s:e] = _host(torch.stack(lg2, 1).reshape(-1, L, nh, h, w))
        return res

    # ------------------------------------------------------------------ checks
    def _check_images(self, images) -> np.ndarray:
        if isinstance(images, torch.Tensor):
            images = images.cpu().numpy()
        if not (isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[3] == 3
                and images.dtype == np.uint8):
            raise InputError(f'images must be uint8 (N, H, W, 3), got {getattr(images, "shape", None)} '
                             f'{getattr(images, "dtype", type(images).__name__)}')
        p = self.cfg.patch_size
        if images.shape[1] % p or images.shape[2] % p or images.shape[1] == 0 or images.shape[2] == 0:
            raise InputError(f'image size {images.shape[2]}x{images.shape[1]} is not a multiple of {p} '
                             '(use dynrecon_ros.network.preprocess_image)')
        return images

    @staticmethod
    def _check_pairs(pairs, n) -> list:
        out = []
        for pr in pairs:
            try:
                i, j = (int(v) for v in pr)
            except (TypeError, ValueError):
                raise InputError(f'pair {pr!r} is not an (i, j) pair of image indices') from None
            if not (0 <= i < n and 0 <= j < n):
                raise InputError(f'pair {pr!r} refers to an image outside 0..{n - 1}')
            out.append((i, j))
        if not out:
            raise InputError('no pairs given')
        return out


def _host(t: torch.Tensor) -> np.ndarray:
    """A network output tensor (any device, any float dtype) as a float32 host array (numpy has no
    bfloat16: ``.numpy()`` of a bf16 tensor raises)."""
    return t.float().cpu().numpy()
