"""DUSt3R / MonST3R pointmap network: released checkpoints, fast windowed pair inference.

Public API::

    from dynrecon_ros.network import load_network
    net = load_network(path, device='cpu')      # or 'cuda'; a released-format checkpoint file
    out = net.predict_pairs(images, pairs)      # images uint8 (N, H, W, 3), H, W multiples of 16
    out['pts3d_1']       # (P, H, W, 3) points of image i in i's camera frame
    out['conf_1']        # (P, H, W)
    out['pts3d_2_in_1']  # (P, H, W, 3) points of image j in i's camera frame
    out['conf_2']        # (P, H, W)

For a sliding window (the pair predictor adapter), pass stable frame ids so each frame is encoded
once and its encoder tokens are reused by every later call while it stays in the cache::

    out = net.predict_pairs(window_images, pairs, frame_ids=[frame.key for frame in window])

Optional Easi3R support: ``return_attention=True`` adds decoder cross-attention logits averaged
over query tokens (``cross_attn_1``/``cross_attn_2``, (P, layers, heads, h, w)); a second pass with
``cross_attn_zero=(query_sel, key_sel)`` zeroes decoder 1's attention weights from the selected
view-1 tokens to the selected view-2 tokens.

Modules: ``config`` (safe parser of the stored config string), ``blocks`` / ``heads`` / ``model``
(the network), ``loading`` (checkpoint files), ``preprocess`` (resize/crop/normalise, documented
there), ``engine`` (windowed inference).
"""
from .config import ModelConfig, parse_model_config
from .engine import PairNetwork
from .loading import build_model, load_model, load_network, read_checkpoint, save_checkpoint
from .preprocess import normalize, preprocess_image

__all__ = ['ModelConfig', 'PairNetwork', 'build_model', 'load_model', 'load_network', 'normalize',
           'parse_model_config', 'preprocess_image', 'read_checkpoint', 'save_checkpoint']
