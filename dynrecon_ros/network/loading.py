"""Reading and writing released-format checkpoints.

A released checkpoint is a ``torch.save``'d dict: ``model`` (the state dict), ``args`` (an
``argparse.Namespace`` whose ``model`` attribute is the config string) and possibly training
state. It is read with ``torch.load(weights_only=True)``; only ``argparse.Namespace`` is
allow-listed (scoped, not global). The model is built from the config string alone, on the meta
device (no memory), allocated on the target device and filled from the memory-mapped file
(so host memory holds one copy of the weights).
"""
from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path

import torch

from dynrecon_ros.errors import InputError

from .config import ModelConfig, parse_model_config
from .model import PointmapNet


def build_model(config: str | ModelConfig, device='cpu') -> PointmapNet:
    """Model from a config string (or parsed config); ``device='meta'`` allocates nothing."""
    cfg = parse_model_config(config) if isinstance(config, str) else config
    with torch.device(device):
        return PointmapNet(cfg)


def read_checkpoint(path) -> tuple[str, dict]:
    """(config string, state dict) of a released-format checkpoint file."""
    path = Path(path)
    if not path.is_file():
        raise InputError('checkpoint file not found', path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
            except RuntimeError as exc:
                if 'mmap' not in str(exc):
                    raise
                ckpt = torch.load(path, map_location='cpu', weights_only=True)  # legacy format
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f'checkpoint holds objects that are not allowed in a safe load: {first}', path) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f'cannot read checkpoint (truncated or not a torch checkpoint): {msg}', path) from None
    if not isinstance(ckpt, dict) or 'model' not in ckpt:
        raise InputError("not a released-format checkpoint: expected a dict with 'model' and 'args'", path)
    args = ckpt.get('args')
    config = getattr(args, 'model', None) if not isinstance(args, dict) else args.get('model')
    if not isinstance(config, str):
        raise InputError("checkpoint has no config string ('args.model')", path)
    sd = ckpt['model']
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise InputError("checkpoint 'model' entry is not a state dict of tensors", path)
    return config, sd


def check_state_dict(model: torch.nn.Module, sd: dict, path=None) -> None:
    """Raise InputError naming the first key that is missing, unexpected or of the wrong shape."""
    expected = model.state_dict()
    for name, ref in expected.items():
        if name not in sd:
            raise InputError(f'checkpoint does not match the architecture of its config: missing key {name!r} '
                             f'(expected shape {tuple(ref.shape)})', path)
        if tuple(sd[name].shape) != tuple(ref.shape):
            raise InputError(f'checkpoint entry {name!r} has shape {tuple(sd[name].shape)}, the config needs '
                             f'{tuple(ref.shape)}', path)
    for name in sd:
        if name not in expected:
            raise InputError(f'checkpoint does not match the architecture of its config: unexpected key {name!r}',
                             path)


def load_model(path, device='cpu') -> PointmapNet:
    """Build the model from the checkpoint's config string and load its weights strictly (float32)."""
    config, sd = read_checkpoint(path)
    try:
        model = build_model(config, device='meta')
    except InputError as exc:
        raise InputError(f'bad model config in checkpoint: {exc}', path) from None
    check_state_dict(model, sd, path)
    # allocate on the target device, then copy out of the memory-mapped file (tensors left
    # backed by the file mapping run many times slower on CPU)
    model = model.to_empty(device=device)
    model.load_state_dict(sd, strict=True)
    model.eval()
    model.requires_grad_(False)
    return model


def load_network(path, device='cpu', **engine_options):
    """Public entry point: a :class:`~dynrecon_ros.network.engine.PairNetwork` for a checkpoint file.

    engine_options go to PairNetwork (``memory_budget``, ``cache_frames``, ``amp``, ``batch_size``).
    """
    from .engine import PairNetwork
    device = torch.device(device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise InputError('device cuda requested but CUDA is not available')
    return PairNetwork(load_model(path, device), device=device, **engine_options)


def save_checkpoint(path, state_dict: dict, config: str) -> None:
    """Write a released-format file ({'model': state_dict, 'args': Namespace(model=config)})."""
    tmp = f'{path}.tmp{os.getpid()}'
    torch.save({'model': state_dict, 'args': argparse.Namespace(model=config)}, tmp)
    os.replace(tmp, path)
