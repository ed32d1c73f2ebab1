"""image_transport's ``compressedDepth`` format, both ways (numpy + OpenCV's PNG; no rclpy).

What compressed_depth_image_transport (image_transport_plugins, ``codec.cpp``) puts in a
sensor_msgs/CompressedImage, and what this module reads and writes:

- ``format``: ``"<encoding>; compressedDepth png"`` where ``<encoding>`` is the raw image's, ``16UC1`` or
  ``32FC1`` (older publishers wrote no ``; ...`` part: PNG). ``rvl`` is the plugin's other codec; it is
  refused here with an error naming it.
- ``data``: a 12-byte ConfigHeader, then the PNG file. The header is the C struct
  ``{int32 format; float32 depthParam[2]}`` in the sender's byte order (little-endian on every
  platform ROS ships for); ``format`` is 0 (``INV_DEPTH``, the only value ever written).
- ``16UC1`` (millimetres): the PNG is the image itself, 16-bit grey; readings beyond ``depth_max`` are
  written as 0. depthParam is unused (0, 0).
- ``32FC1`` (metres): the PNG holds the quantised *inverse* depth ``q = uint16(A / d + B)`` (C++'s
  float -> integer conversion: truncation), 0 = no reading, with ``A = z0 (z0 + 1)`` and
  ``B = 1 - A / depth_max`` stored as depthParam; the reader inverts ``d = A / (q - B)`` (no reading ->
  NaN). ``z0`` is the plugin's ``depth_quantization`` (default 100), ``depth_max`` its ``depth_max``
  (default 10 m). The step is ``d^2 / A``: 0.4 mm at 2 m, 1.6 mm at 4 m, 1 cm at 10 m; truncation
  makes decoded depths up to one step farther, never nearer.

Where the plugin's loop leaves the result to the C++ float->uint16 conversion (depth <= 0, NaN, or so
close that ``q`` passes 65535: nearer than about 15 cm with the defaults) this writer stores 0, "no
reading"; the plugin's output there is undefined. The per-pixel maths is numpy over whole arrays; the
PNG is OpenCV's (IMWRITE_PNG_COMPRESSION as the plugin's ``png_level``).
"""
from __future__ import annotations

import struct

import cv2
import numpy as np

from dynrecon_ros.errors import InputError

HEADER = struct.Struct('<iff')  # ConfigHeader: compressionFormat (enum, int32), float depthParam[2]
INV_DEPTH = 0  # compressionFormat::INV_DEPTH, the only format the plugin writes
DEPTH_MAX = 10.0  # the plugin's default depth_max (m)
DEPTH_QUANTIZATION = 100.0  # the plugin's default depth_quantization (z0)
PNG_LEVEL = 9  # the plugin's default png_level
ENCODINGS = ('16UC1', '32FC1')  # what a depth camera publishes, and what encode() takes
DECODED = ENCODINGS + ('mono16',)  # the plugin takes any 16-bit single-channel encoding


class CompressedDepthError(InputError):
    """A compressedDepth payload that cannot be decoded; the text names what is wrong."""


def quantisation(depth_max: float = DEPTH_MAX, depth_quantization: float = DEPTH_QUANTIZATION
                 ) -> tuple[float, float]:
    """(depthQuantA, depthQuantB) as the plugin computes them, in float32."""
    z0, dmax = np.float32(depth_quantization), np.float32(depth_max)
    a = np.float32(z0 * (z0 + np.float32(1.0)))
    return float(a), float(np.float32(np.float32(1.0) - a / dmax))


def encode(depth: np.ndarray, encoding: str, depth_max: float = DEPTH_MAX,
           depth_quantization: float = DEPTH_QUANTIZATION, png_level: int = PNG_LEVEL) -> tuple[str, bytes]:
    """(H, W) depth of ``encoding`` (uint16 mm for 16UC1, float32 m for 32FC1, NaN/0 = no reading)
    -> (format string, data bytes) of a compressedDepth CompressedImage."""
    depth = np.asarray(depth)
    if encoding not in ENCODINGS:
        raise CompressedDepthError(f"compressedDepth takes 16UC1 or 32FC1 depth, not '{encoding}'")
    if depth.ndim != 2 or depth.size == 0:
        raise CompressedDepthError(f'compressedDepth needs a non-empty (H, W) depth image, got shape {depth.shape}')
    if encoding == '16UC1':
        img = depth.astype(np.uint16, copy=True)
        img[img > min(65535, int(depth_max * 1000.0))] = 0  # the plugin's unsigned short depth_max * 1000
        header = HEADER.pack(INV_DEPTH, 0.0, 0.0)
    else:
        a, b = quantisation(depth_max, depth_quantization)
        d = depth.astype(np.float32)
        with np.errstate(divide='ignore', invalid='ignore'):
            q = np.float32(a) / d + np.float32(b)
        valid = np.isfinite(d) & (d > 0) & (d < np.float32(depth_max)) & (q >= 0) & (q < 65536)
        img = np.where(valid, q, 0).astype(np.uint16)  # astype truncates toward zero, as C++ does
        header = HEADER.pack(INV_DEPTH, a, b)
    ok, png = cv2.imencode('.png', img, [cv2.IMWRITE_PNG_COMPRESSION, int(png_level)])
    if not ok:
        raise CompressedDepthError('OpenCV could not encode the depth image as PNG')
    return f'{encoding}; compressedDepth png', header + png.tobytes()


def parse_format(fmt: str) -> tuple[str, str]:
    """``"32FC1; compressedDepth png"`` -> ('32FC1', 'png'); no ``;`` part -> png (older publishers)."""
    encoding, sep, rest = fmt.partition(';')
    encoding, rest = encoding.strip(), rest.strip()
    if not sep or rest == 'compressedDepth':
        codec = 'png'
    elif rest.startswith('compressedDepth '):
        codec = rest[len('compressedDepth '):].strip()
    else:
        raise CompressedDepthError(f"format '{fmt}' is not a compressedDepth format "
                                   "('<encoding>; compressedDepth png')")
    if codec != 'png':
        raise CompressedDepthError(f"compressedDepth codec '{codec}' is not supported (only png; set the "
                                   "publisher's format parameter to png)")
    if encoding not in DECODED:
        raise CompressedDepthError(f"compressedDepth of encoding '{encoding}' is not supported ({', '.join(DECODED)})")
    return encoding, codec


def decode(fmt: str, data: bytes | bytearray | memoryview | np.ndarray) -> tuple[str, np.ndarray]:
    """(format, data) of a compressedDepth message -> (encoding, (H, W) array of that encoding):
    uint16 millimetres for 16UC1 (and mono16), float32 metres with NaN for no reading for 32FC1."""
    encoding, _ = parse_format(fmt)
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.view(np.uint8)
    if buf.size <= HEADER.size:
        raise CompressedDepthError(f'compressedDepth payload of {buf.size} bytes is too short (a {HEADER.size}-byte '
                                   'header, then a PNG)')
    kind, a, b = HEADER.unpack(buf[:HEADER.size].tobytes())
    if kind != INV_DEPTH:
        raise CompressedDepthError(f'compressedDepth header has compression format {kind} (expected '
                                   f'{INV_DEPTH}, INV_DEPTH): not a compressedDepth payload')
    img = cv2.imdecode(buf[HEADER.size:], cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise CompressedDepthError(f'compressedDepth PNG of {buf.size - HEADER.size} bytes cannot be decoded '
                                   '(corrupt or truncated)')
    if img.dtype != np.uint16 or img.ndim != 2:
        raise CompressedDepthError(f'compressedDepth PNG is {img.dtype} with shape {img.shape}, not 16-bit '
                                   'single-channel')
    if encoding != '32FC1':
        return encoding, img
    if not (np.isfinite(a) and np.isfinite(b) and a > 0):
        raise CompressedDepthError(f'compressedDepth header has invalid quantisation parameters A={a}, B={b}')
    q = img.astype(np.float32)
    with np.errstate(divide='ignore'):
        d = np.float32(a) / (q - np.float32(b))
    d[img == 0] = np.nan
    return encoding, d
