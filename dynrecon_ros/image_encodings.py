"""sensor_msgs/Image encodings: the one table the ROS conversions and the bag reader both use.

Names and meanings are sensor_msgs/image_encodings.h's; the table is cv_bridge's, trimmed to what the
pipeline reads. ``ENCODINGS`` says how to lay the bytes out (numpy dtype, channels), ``COLOUR_ORDER``
which encodings are a colour or mono image and where R, G, B are, ``DEPTH_SCALE`` which are depth and
their unit. No rclpy here: ``data/bags.py`` reads bags on machines without ROS.

``8UC3`` (and ``8UC1``) are generic OpenCV matrix types: they say nothing about the channel order.
cv_bridge refuses to convert ``8UC3`` to ``rgb8`` or ``bgr8`` ("[8UC3] is not a color format. but [rgb8]
is. The conversion does not make sense", getConversionCode in cv_bridge.cpp) and hands it out only
as ``passthrough``. So does this table: ``8UC3`` lays out as 3 x uint8 but is not a colour encoding
(:func:`colour_order` raises, naming it). ``8UC1`` is one channel: as cv_bridge, only passthrough
(it is not in ``COLOUR_ORDER``), except that ``mono8`` is its colour name.
"""
from __future__ import annotations

import numpy as np

from dynrecon_ros.errors import InputError

# encoding -> (numpy dtype, channels): how the bytes lay out (both directions).
ENCODINGS: dict[str, tuple[np.dtype, int]] = {
    'rgb8': (np.dtype(np.uint8), 3), 'bgr8': (np.dtype(np.uint8), 3),
    'rgba8': (np.dtype(np.uint8), 4), 'bgra8': (np.dtype(np.uint8), 4),
    'mono8': (np.dtype(np.uint8), 1), 'mono16': (np.dtype(np.uint16), 1),
    '8UC1': (np.dtype(np.uint8), 1), '8UC3': (np.dtype(np.uint8), 3),
    '16UC1': (np.dtype(np.uint16), 1), '32FC1': (np.dtype(np.float32), 1),
}
# colour/mono encoding -> channel indices that give R, G, B (mono: the single channel three times).
COLOUR_ORDER: dict[str, tuple[int, int, int]] = {
    'rgb8': (0, 1, 2), 'rgba8': (0, 1, 2), 'bgr8': (2, 1, 0), 'bgra8': (2, 1, 0),
    'mono8': (0, 0, 0), 'mono16': (0, 0, 0),
}
# depth encoding -> factor to metres (REP 118: 32FC1 in metres, 16UC1 in millimetres).
DEPTH_SCALE: dict[str, float] = {'32FC1': 1.0, '16UC1': 1e-3, 'mono16': 1e-3}


def layout(encoding: str) -> tuple[np.dtype, int]:
    """encoding -> (dtype, channels); InputError naming an unknown encoding and the known ones."""
    try:
        return ENCODINGS[encoding]
    except KeyError:
        raise InputError(f"unknown encoding '{encoding}' (supported: {', '.join(ENCODINGS)})") from None


def colour_order(encoding: str) -> tuple[int, int, int]:
    """R, G, B channel indices of a colour/mono encoding; InputError for any other (8UC3 included)."""
    if encoding in COLOUR_ORDER:
        return COLOUR_ORDER[encoding]
    if encoding == '8UC3':
        raise InputError("encoding '8UC3' has no channel order (as cv_bridge, it is not converted to RGB): "
                         "publish the colour image as rgb8 or bgr8")
    raise InputError(f"encoding '{encoding}' is not a colour/mono image encoding "
                     f"({', '.join(COLOUR_ORDER)} are)")


def to_rgb(arr: np.ndarray, encoding: str) -> np.ndarray:
    """(H, W[, C]) array of a colour/mono encoding -> (H, W, 3) uint8 RGB (mono16 >> 8, as cv_bridge).

    Returns a fresh array unless ``arr`` is already rgb8 (then ``arr`` itself)."""
    r, g, b = colour_order(encoding)
    if arr.dtype == np.uint16:
        arr = (arr >> 8).astype(np.uint8)
    if arr.ndim == 2:
        return np.repeat(arr[:, :, None], 3, axis=2)
    if arr.shape[2] == 3 and (r, g, b) == (0, 1, 2):
        return arr
    order = {(0, 1, 2): slice(0, 3), (2, 1, 0): slice(2, None, -1)}[(r, g, b)]
    return np.ascontiguousarray(arr[:, :, order])


def to_depth(arr: np.ndarray, encoding: str) -> np.ndarray:
    """(H, W) depth array -> (H, W) float32 metres, 0 = no reading (NaN, inf and negative -> 0)."""
    if encoding not in DEPTH_SCALE:
        raise InputError(f"unsupported depth encoding '{encoding}' (use 32FC1 in metres or 16UC1 in "
                         'millimetres)')
    d = arr.astype(np.float32) * np.float32(DEPTH_SCALE[encoding])
    d[~np.isfinite(d) | (d < 0)] = 0.0
    return d
