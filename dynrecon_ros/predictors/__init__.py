"""Stage 3, pair predictors: DUSt3R-style outputs for a pair of frames (i, j).

``base.PairPredictor`` is the interface; ``rgbd.RGBDPredictor`` needs no weights (depth + flow).
"""
from dynrecon_ros.predictors.base import PairPrediction, PairPredictor

__all__ = ['PairPrediction', 'PairPredictor', 'make_predictor']


def make_predictor(backend: str, config=None, checkpoint: str | None = None, device: str = 'cpu'):
    """Predictor for a backend name ('rgbd' or 'dust3r')."""
    from dynrecon_ros.errors import InputError
    if backend == 'rgbd':
        from dynrecon_ros.predictors.rgbd import RGBDPredictor
        return RGBDPredictor(config)
    if backend == 'dust3r':
        try:
            from dynrecon_ros.predictors import dust3r  # provided by the network work (issue 6)
        except ImportError as exc:
            raise InputError('backend "dust3r" is not available in this installation '
                             f'(dynrecon_ros.predictors.dust3r missing: {exc}); use --backend rgbd') from None
        return dust3r.make(config=config, checkpoint=checkpoint, device=device)
    raise InputError(f'unknown backend {backend!r}; choose rgbd or dust3r')
