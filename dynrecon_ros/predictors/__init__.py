"""Stage 3, pair predictors: DUSt3R-style outputs for a pair of frames (i, j).

``base.PairPredictor`` is the interface (each predictor names its window step, see
:class:`dynrecon_ros.window.WindowStep`); ``rgbd.RGBDPredictor`` needs no weights (depth + flow),
``dust3r.Dust3rPredictor`` runs the DUSt3R/MonST3R network.
"""
from dynrecon_ros.predictors.base import PairPrediction, PairPredictor

__all__ = ['PairPrediction', 'PairPredictor', 'make_predictor']


def make_predictor(name: str, backend, checkpoint: str | None = None, device: str = 'cpu', segmentation=None):
    """Predictor for a backend name ('rgbd' or 'dust3r'), configured by ``backend`` (the pipeline's
    :class:`dynrecon_ros.config.BackendConfig`); checkpoint None: ``backend.checkpoint``; ``segmentation``
    (its :class:`~dynrecon_ros.segmentation.SegmentationConfig`, None: the defaults) gives the RGB-D
    predictor the sensor's depth noise model."""
    from dynrecon_ros.errors import InputError
    if name == 'rgbd':
        from dynrecon_ros.predictors.rgbd import RGBDPredictor, RGBDPredictorConfig
        return RGBDPredictor(RGBDPredictorConfig.from_backend(backend, segmentation))
    if name == 'dust3r':
        try:
            from dynrecon_ros.predictors import dust3r  # provided by the network work (issue 6)
        except ImportError as exc:
            raise InputError('backend "dust3r" is not available in this installation '
                             f'(dynrecon_ros.predictors.dust3r missing: {exc}); use --backend rgbd') from None
        return dust3r.make(backend, checkpoint, device)
    raise InputError(f'unknown backend {name!r}; choose rgbd or dust3r')
