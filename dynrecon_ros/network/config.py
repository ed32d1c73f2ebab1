"""Safe parser for the model config string stored in a released DUSt3R/MonST3R checkpoint.

A checkpoint's ``args.model`` is a Python call expression such as::

    AsymmetricCroCo3DStereo(pos_embed='RoPE100', patch_embed_cls='ManyAR_PatchEmbed',
        img_size=(512, 512), head_type='dpt', output_mode='pts3d',
        depth_mode=('exp', -float('inf'), float('inf')), conf_mode=('exp', 1, float('inf')),
        enc_embed_dim=1024, enc_depth=24, enc_num_heads=16,
        dec_embed_dim=768, dec_depth=12, dec_num_heads=12)

It is parsed with :mod:`ast` (never ``eval``): the call must name the model class, take keyword
arguments only, and every value must be a literal (numbers, strings, booleans, None, tuples/lists
of those) or one of the infinity forms ``float('inf')``, ``-float('inf')``, ``inf``, ``-inf``.

The reference loader rewrites the string before building the model (``ManyAR_PatchEmbed`` ->
``PatchEmbedDust3R`` and ``landscape_only=False``); :func:`parse_model_config` applies the same
rewrite, so landscape, square and portrait inputs all go through one path (no transposition).
"""
from __future__ import annotations

import ast
import math
from dataclasses import dataclass, field

from dynrecon_ros.errors import InputError

MODEL_CLASS = 'AsymmetricCroCo3DStereo'

# Defaults of the reference constructors (AsymmetricCroCo3DStereo + CroCoNet).
_DEFAULTS = dict(
    output_mode='pts3d', head_type='linear',
    depth_mode=('exp', -math.inf, math.inf), conf_mode=('exp', 1, math.inf),
    freeze='none', landscape_only=True, patch_embed_cls='PatchEmbedDust3R',
    img_size=224, patch_size=16, mask_ratio=0.9,
    enc_embed_dim=768, enc_depth=12, enc_num_heads=12,
    dec_embed_dim=512, dec_depth=8, dec_num_heads=16,
    mlp_ratio=4, norm_im2_in_dec=True, pos_embed='cosine',
)


@dataclass(frozen=True)
class ModelConfig:
    """Every architecture fact the network is built from (all from the config string)."""

    enc_embed_dim: int
    enc_depth: int
    enc_num_heads: int
    dec_embed_dim: int
    dec_depth: int
    dec_num_heads: int
    patch_size: int
    img_size: tuple[int, int]
    mlp_ratio: float
    norm_im2_in_dec: bool
    rope_freq: float
    head_type: str
    output_mode: str
    depth_mode: tuple
    conf_mode: tuple | None
    patch_embed_cls: str = 'PatchEmbedDust3R'
    landscape_only: bool = False
    source: str = field(default='', compare=False)

    @property
    def has_conf(self) -> bool:
        return bool(self.conf_mode)


def _literal(node: ast.AST, name: str):
    """Value of one keyword argument node: a literal, or an explicit infinity form."""
    if isinstance(node, (ast.Tuple, ast.List)):
        return tuple(_literal(e, name) for e in node.elts)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal(node.operand, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f'config argument {name!r}: unary sign on a non-number')
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.Call):
        # only float('inf') / float('-inf') / float('nan') style calls
        if (isinstance(node.func, ast.Name) and node.func.id == 'float' and not node.keywords
                and len(node.args) == 1 and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
                and node.args[0].value.strip().lower() in ('inf', '+inf', '-inf', 'infinity', '-infinity')):
            return float(node.args[0].value)
        raise InputError(f'config argument {name!r}: only float(\'inf\') calls are allowed, got {ast.unparse(node)!r}')
    if isinstance(node, ast.Name) and node.id == 'inf':
        return math.inf
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError):
        raise InputError(f'config argument {name!r} is not a literal: {ast.unparse(node)!r}') from None


def parse_config_call(text: str) -> tuple[str, dict]:
    """Parse ``ClassName(key=literal, ...)`` into (class name, kwargs), never evaluating code."""
    if not isinstance(text, str) or not text.strip():
        raise InputError('model config string is empty')
    try:
        tree = ast.parse(text.strip(), mode='eval')
    except SyntaxError as exc:
        raise InputError(f'model config string is not a call expression: {exc.msg}') from None
    call = tree.body
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
        raise InputError(f'model config string must be a call like {MODEL_CLASS}(...), got {text[:80]!r}')
    if call.args:
        raise InputError('model config string: positional arguments are not supported')
    kwargs = {}
    for kw in call.keywords:
        if kw.arg is None:
            raise InputError('model config string: **kwargs are not supported')
        kwargs[kw.arg] = _literal(kw.value, kw.arg)
    return call.func.id, kwargs


def _pair(v, name):
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    if isinstance(v, tuple) and len(v) == 2 and all(isinstance(x, int) for x in v):
        return v
    raise InputError(f'config argument {name!r} must be an int or a pair of ints, got {v!r}')


def parse_model_config(text: str) -> ModelConfig:
    """Parse a checkpoint's config string into a :class:`ModelConfig` (with the reference loader's
    ManyAR_PatchEmbed -> PatchEmbedDust3R and landscape_only=False rewrite applied)."""
    cls, kwargs = parse_config_call(text)
    if cls != MODEL_CLASS:
        raise InputError(f'unsupported model class {cls!r} in checkpoint config (expected {MODEL_CLASS})')
    unknown = sorted(set(kwargs) - set(_DEFAULTS))
    if unknown:
        raise InputError(f'unknown model config argument {unknown[0]!r}')
    a = dict(_DEFAULTS, **kwargs)
    # the reference loader's rewrite (see module docstring)
    if a['patch_embed_cls'] not in ('ManyAR_PatchEmbed', 'PatchEmbedDust3R'):
        raise InputError(f"unsupported patch_embed_cls {a['patch_embed_cls']!r}")
    a['patch_embed_cls'] = 'PatchEmbedDust3R'
    a['landscape_only'] = False

    pos = a['pos_embed']
    if not (isinstance(pos, str) and pos.startswith('RoPE')):
        raise InputError(f'unsupported pos_embed {pos!r} (only RoPE<freq>, e.g. RoPE100, is implemented)')
    try:
        rope_freq = float(pos[len('RoPE'):])
    except ValueError:
        raise InputError(f'bad pos_embed {pos!r}: expected RoPE<number>') from None
    if a['output_mode'] != 'pts3d':
        raise InputError(f"unsupported output_mode {a['output_mode']!r} (only 'pts3d')")
    if a['head_type'] not in ('linear', 'dpt'):
        raise InputError(f"unsupported head_type {a['head_type']!r} (linear or dpt)")
    for name in ('enc_embed_dim', 'enc_depth', 'enc_num_heads', 'dec_embed_dim', 'dec_depth',
                 'dec_num_heads', 'patch_size'):
        if not isinstance(a[name], int) or isinstance(a[name], bool) or a[name] <= 0:
            raise InputError(f'config argument {name!r} must be a positive int, got {a[name]!r}')
    for width, heads in (('enc_embed_dim', 'enc_num_heads'), ('dec_embed_dim', 'dec_num_heads')):
        if a[width] % a[heads] or (a[width] // a[heads]) % 4:
            raise InputError(f'{width}={a[width]} must split into {heads}={a[heads]} heads of a size '
                             'divisible by 4 (2D RoPE)')
    img_size = _pair(a['img_size'], 'img_size')
    if img_size[0] % a['patch_size'] or img_size[1] % a['patch_size']:
        raise InputError(f"img_size={img_size} must be a multiple of patch_size={a['patch_size']}")
    if a['head_type'] == 'dpt' and a['dec_depth'] <= 9:
        raise InputError(f"the dpt head needs dec_depth > 9, got {a['dec_depth']}")
    depth_mode = tuple(a['depth_mode'])
    if (len(depth_mode) != 3 or depth_mode[0] not in ('linear', 'square', 'exp')
            or depth_mode[1] != -math.inf or depth_mode[2] != math.inf):
        raise InputError(f'unsupported depth_mode {depth_mode!r} (linear/square/exp, unbounded)')
    conf_mode = a['conf_mode']
    if conf_mode:
        conf_mode = tuple(conf_mode)
        if len(conf_mode) != 3 or conf_mode[0] not in ('exp', 'sigmoid'):
            raise InputError(f'unsupported conf_mode {conf_mode!r} (exp or sigmoid)')
    else:
        conf_mode = None
    return ModelConfig(
        enc_embed_dim=a['enc_embed_dim'], enc_depth=a['enc_depth'], enc_num_heads=a['enc_num_heads'],
        dec_embed_dim=a['dec_embed_dim'], dec_depth=a['dec_depth'], dec_num_heads=a['dec_num_heads'],
        patch_size=a['patch_size'], img_size=img_size, mlp_ratio=float(a['mlp_ratio']),
        norm_im2_in_dec=bool(a['norm_im2_in_dec']), rope_freq=rope_freq, head_type=a['head_type'],
        output_mode=a['output_mode'], depth_mode=depth_mode, conf_mode=conf_mode,
        patch_embed_cls=a['patch_embed_cls'], landscape_only=False, source=text.strip())
