"""Image preprocessing exactly as the released DUSt3R/MonST3R models expect (one place).

1. Resize (PIL; LANCZOS when shrinking, BICUBIC when enlarging):
   - ``size=512`` models: the LONG side becomes 512 (each side rounded: round(s * 512 / long));
   - ``size=224`` models: the SHORT side becomes 224.
2. Centre crop around (W//2, H//2):
   - 512: to the largest multiple of 16 in each direction (half-extents ((2*c)//16)*8); a square
     image is cropped to 4:3 (height = 3/4 width) unless ``square_ok``;
   - 224: to a 224x224 square.
3. Normalise for the network: ``(x / 255 - 0.5) / 0.5``, channels first, float32;
   ``true_shape = (H, W)`` of the cropped image.
:func:`preprocess_image` does 1-2 and reports the resize scale and crop offset (to carry
intrinsics and masks along); :func:`normalize` does 3.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from dynrecon_ros.errors import InputError


@dataclass(frozen=True)
class Resized:
    """rgb (H, W, 3) uint8 network input; a pixel (u, v) of the original maps to
    (u * scale_x - crop_x0, v * scale_y - crop_y0) in it."""

    rgb: np.ndarray
    scale_x: float
    scale_y: float
    crop_x0: int
    crop_y0: int

    @property
    def true_shape(self) -> tuple[int, int]:
        return self.rgb.shape[0], self.rgb.shape[1]


def preprocess_image(rgb: np.ndarray, size: int = 512, square_ok: bool = False) -> Resized:
    """Resize + crop one RGB image (H, W, 3) uint8 for a network trained at ``size`` (224 or 512)."""
    if not (isinstance(rgb, np.ndarray) and rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype == np.uint8):
        raise InputError(f'expected an RGB uint8 image (H, W, 3), got {getattr(rgb, "shape", None)} '
                         f'{getattr(rgb, "dtype", type(rgb).__name__)}')
    img = Image.fromarray(rgb)
    W1, H1 = img.size
    target_long = round(size * max(W1 / H1, H1 / W1)) if size == 224 else size
    S = max(W1, H1)
    interp = Image.LANCZOS if S > target_long else Image.BICUBIC
    new = tuple(int(round(x * target_long / S)) for x in (W1, H1))
    img = img.resize(new, interp)
    W, H = img.size
    cx, cy = W // 2, H // 2
    if size == 224:
        half = min(cx, cy)
        box = (cx - half, cy - half, cx + half, cy + half)
    else:
        halfw, halfh = ((2 * cx) // 16) * 8, ((2 * cy) // 16) * 8
        if not square_ok and W == H:
            halfh = int(3 * halfw / 4)
        box = (cx - halfw, cy - halfh, cx + halfw, cy + halfh)
    out = np.asarray(img.crop(box))
    if out.shape[0] < 16 or out.shape[1] < 16:
        raise InputError(f'image {rgb.shape[1]}x{rgb.shape[0]} is too small for the network')
    return Resized(out, W / W1, H / H1, box[0], box[1])


def normalize(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [-1, 1]."""
    t = torch.as_tensor(images)
    return (t.permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5
