"""Configuration of the reconstruction pipeline: one dataclass per stage, product defaults.

The tree (``ReconConfig``) maps one-to-one onto YAML files (``from_yaml``) and onto the ROS node's
parameters (section.name, snake_case). Unknown keys are an :class:`InputError` naming the key.
This tree is the one source of defaults: the stage classes take their section (``SlidingWindow``,
``FlowCache``, ``WindowAligner``, ``VoxelMap``, ``MotionSegmenter``) and have no defaults of their own;
the predictors' configs (``RGBDPredictorConfig``, ``Dust3rConfig``) are built from ``backend``
(``from_backend``). test/test_config_defaults.py checks it.
"""
from __future__ import annotations

import dataclasses
import pathlib
from dataclasses import dataclass, field

import numpy as np

from dynrecon_ros.errors import InputError
from dynrecon_ros.segmentation import SegmentationConfig
from dynrecon_ros.static_map import MapConfig
from dynrecon_ros.window import rotation_angle_deg



def typed_like(default, text: str, item: str):
    """``text`` converted to the type of ``default`` (a config field's default): bool from true / false / 1 / 0 /
    yes / no, else ``type(default)(text)``. ValueError naming ``item`` (the override as given) when it does not
    convert (the overrides of bench scripts' --set and bench/segmentation.py's --render)."""
    typ = type(default)
    if typ is bool:
        if text.lower() not in ('1', '0', 'true', 'false', 'yes', 'no'):
            raise ValueError(f'override {item!r}: takes true or false')
        return text.lower() in ('1', 'true', 'yes')
    try:
        return typ(text)
    except ValueError:
        raise ValueError(f'override {item!r}: must be of type {typ.__name__}') from None

@dataclass
class WindowConfig:
    """Sliding window and pair graph.

    size: frames in the window; neighbours: each new frame is paired with the previous k frames;
    keyframes: older keyframes kept as long-pair anchors; keyframe_*: the keyframe rule (motion or
    frame count since the last keyframe); long_stride: extra strided pairs inside the window (0 = off);
    output_lag: a frame's result is emitted (and its pose frozen) this many frames after it arrived (under a
    rolling shutter at least backend.shutter_smoothing_frames, the window growing to match).
    step_every: one accepted frame in this many takes the window step (pairs, alignment, segmentation,
    map); the frames between are tracked (RGB-D only): their pose from their pairs with the newest stepped
    frame (its mask as the static prior), the newest keyframe and the next stepped frame, that frame's
    final mask carried to them along the optical flow; they are emitted right after it and not integrated
    into the map. 1 = every frame stepped (default); 2: ~0.75x the CPU a frame, poses and masks a little
    less accurate (README, "Camera rate"). The window, output_lag and the keyframe rule count stepped
    frames.
    far_keyframes: keyframes older than those (up to this many, 0 = off) stay as far anchors: once every
    keyframe_max_gap stepped frames the newest frame is paired with the oldest of them that still sees most of
    what it sees (pose only), so that the trajectory's drift stays bounded where the camera comes back to a
    place (RGB-D only; ~1 pair more per keyframe_max_gap frames).
    """

    size: int = 4
    neighbours: int = 1
    keyframes: int = 2
    keyframe_translation_m: float = 0.06
    keyframe_rotation_deg: float = 4.0
    keyframe_max_gap: int = 8
    long_stride: int = 0
    output_lag: int = 2
    step_every: int = 1
    far_keyframes: int = 20


@dataclass
class FlowConfig:
    """Optical flow: OpenCV DIS preset ('ultrafast', 'fast', 'medium') and forward-backward check."""

    method: str = 'dis'
    preset: str = 'ultrafast'
    fb_threshold_px: float = 1.0
    fb_relative: float = 0.05


@dataclass
class BackendConfig:
    """Pair predictor. name: 'auto' (rgbd when depth is present), 'rgbd' or 'dust3r'.

    The other fields configure the RGB-D predictor: pose from flow + depth by RANSAC (ransac_*),
    a band around motion outliers excluded (halo_fraction of the width), then direct photometric +
    depth refinement (photometric_iterations, 0 = off) on pixels with gradient >= min_gradient;
    stride: the fit is verified on every stride-th pixel in x and y; ransac_refits: weighted refits
    on the inliers of the best hypothesis (pixel threshold shrinking to 3 robust sigmas, not below
    min_px_threshold); ransac_seed: seed of the RANSAC samples; rolling_shutter_s: the colour/depth
    sensor's row readout time in seconds, top to bottom (0 = global shutter, the default; the direct
    refinement then moves each pixel by the camera's motion between its row's instant and the frame's,
    at a constant velocity: dynrecon_ros/rolling_shutter.py). Kinect v1 / Xtion-class sensors (TUM
    RGB-D) read out over most of the 33 ms frame: Kerl et al. (ICCV 2015) simulate them with 0.028;
    depth_delay_s: the depth image is taken this many seconds after the colour image (its rows as the
    colour's; both 0 = the pose step of a global-shutter, synchronised sensor, the default).
    shutter_smoothing_frames: under a rolling shutter, each frame's pairs are refined again once this many later
    frames are aligned, its in-frame motion taken from the aligned poses on both sides (0 = off, else >= 2; it raises
    window.output_lag to this many frames at least: the frame's pose is published after that;
    dynrecon_ros.rgbd_step.RGBDStep._smooth_motions).
    ransac_depth_sigmas: the flow fit's depth gate (besides the flat ransac_depth_threshold) shrinks with
    the refits to 3 robust sigmas of its consensus's depth residuals, in units of the sensor's noise
    sigma(z) (segmentation.depth_sigma_a / depth_sigma_b), but not below this many: a correspondence whose
    flow fits but whose measured depth does not (a camouflaged mover) is no inlier
    (dynrecon_ros.predictors.rgbd.depth_gate). long_pair_max_sigma_m: a long (keyframe) pair gives no pose
    when its inliers cannot pin its translation: the translation's standard deviation of a rigid fit to them
    (0.5 px across each ray, 1 % of z along it) above this many metres (a thin band of far wall beside a
    close person; dynrecon_ros.geometry.translation_sigma; inf = never). long_pair_max_move_m: nor
    when its direct refinement moves its translation more than this many metres from the pose the tracked
    trajectory predicts for it (the same thin-band pairs that pass that test; inf = never), unless another long
    pair of the frame moved it to within half this of the same place (then the adjacent pair is the one off).
    (RGBDPredictorConfig.from_backend.) refine_slope_sigmas: under a rolling shutter (rolling_shutter_s > 0)
    the pose step takes the older frame's points and the direct refinement's depth slopes from the readings
    smoothed in inverse depth (an edge-preserving bilateral filter whose range sigma is this many
    segmentation.depth_sigma_b, the noise model's z^2 term: a structured-light sensor's inverse-depth noise and
    disparity steps), not from the raw readings' terraces, which bias the split between the pose and the frames'
    in-frame motions (0, or a model without a z^2 term: the points' 5 x 5 median and the raw slopes; a global
    shutter: the readings; dynrecon_ros.predictors.depth_smoothing).
    startup_long_pairs: a lone long pair kept all the same where it spans
    a frame whose adjacent pair had no mask prior (a stream's first pair: slow movers near the camera pass for
    its motion there), and those pairs verified again where the alignment then puts them
    (dynrecon_ros.rgbd_step.RGBDStep._skips_unmasked).
    The dust3r backend's network (Dust3rConfig.from_backend): image_size: network input size (0 =
    the model's, 512 or 224; else >= 16); pair_cache: ordered pairs whose outputs are kept at least
    (0 = the last window step's, all the next step can reuse; 7.9 MB per pair at 512x384).
    metric_scale configures the dust3r backend on monocular input: metres per network unit
    (0 = the first frame's median depth is one unit; depth images, when present, win).
    The dust3r backend's window alignment (dynrecon_ros/monocular.py): shared_focal: one focal for
    the stream (false: one per frame) when no K is given; align_iterations: the first window (from
    MST init, Adam); align_warm_iterations: closed-form refinement sweeps of every later window
    step (warm start); align_warm_mode: 'refine' (all frames refined, published ones keep their
    pose) or 'freeze' (every frame of the previous window is held, only the new frame's pairs count);
    align_flow: MonST3R's flow term in the alignment (optical flow of the new frame's pairs, already
    computed when segmentation.mode uses flow, else computed for it); false: data term only.
    """

    name: str = 'auto'
    checkpoint: str = ''
    metric_scale: float = 0.0
    ransac_iterations: int = 64
    ransac_px_threshold: float = 0.75
    ransac_depth_threshold: float = 0.02
    ransac_samples: int = 800
    min_px_threshold: float = 0.3
    stride: int = 3
    halo_fraction: float = 0.03
    min_depth_m: float = 0.1
    max_depth_m: float = 10.0
    min_inliers: int = 60
    photometric_iterations: int = 3
    photometric_samples: int = 2000
    min_gradient: float = 4.0
    refine_slope_sigmas: float = 3.0
    ransac_refits: int = 4
    ransac_seed: int = 0
    rolling_shutter_s: float = 0.0
    depth_delay_s: float = 0.0
    shutter_smoothing_frames: int = 4
    ransac_depth_sigmas: float = 1.0
    long_pair_max_sigma_m: float = 0.006
    long_pair_max_move_m: float = 0.015
    startup_long_pairs: bool = True
    image_size: int = 0
    pair_cache: int = 0
    shared_focal: bool = True
    align_iterations: int = 300
    align_warm_iterations: int = 5
    align_warm_mode: str = 'refine'
    align_flow: bool = True

    def __post_init__(self) -> None:
        if self.align_warm_mode not in ('refine', 'freeze'):
            raise InputError(f"backend.align_warm_mode must be 'refine' or 'freeze', got {self.align_warm_mode!r}")
        if self.align_iterations < 1 or self.align_warm_iterations < 1:
            raise InputError('backend.align_iterations and backend.align_warm_iterations must be >= 1')
        if self.metric_scale < 0:
            raise InputError(f'backend.metric_scale must be >= 0, got {self.metric_scale}')
        if self.image_size != 0 and self.image_size < 16:
            raise InputError(f"backend.image_size must be 0 (the model's size) or >= 16 pixels, got {self.image_size}")
        if not 0.0 <= self.rolling_shutter_s < 1.0:
            raise InputError(f'backend.rolling_shutter_s must be a readout time in [0, 1) s, got {self.rolling_shutter_s}')
        if self.shutter_smoothing_frames < 0 or self.shutter_smoothing_frames == 1:
            raise InputError('backend.shutter_smoothing_frames must be 0 (off) or >= 2 (aligned frames on either side '
                             f'of a frame whose in-frame motion is taken from them), got {self.shutter_smoothing_frames}')
        if not abs(self.depth_delay_s) < 1.0:
            raise InputError(f'backend.depth_delay_s must be within (-1, 1) s, got {self.depth_delay_s}')
        if not self.ransac_depth_sigmas > 0:
            raise InputError(f'backend.ransac_depth_sigmas must be > 0 (sigmas of the depth noise), '
                             f'got {self.ransac_depth_sigmas}')
        if not self.long_pair_max_sigma_m > 0:
            raise InputError(f'backend.long_pair_max_sigma_m must be > 0 metres (inf: never drop a long pair), '
                             f'got {self.long_pair_max_sigma_m}')
        if not self.long_pair_max_move_m > 0:
            raise InputError(f'backend.long_pair_max_move_m must be > 0 metres (inf: never drop a long pair), '
                             f'got {self.long_pair_max_move_m}')
        if self.pair_cache < 0:
            raise InputError(f'backend.pair_cache must be >= 0, got {self.pair_cache}')
        if not self.refine_slope_sigmas >= 0:
            raise InputError('backend.refine_slope_sigmas must be >= 0 (sigmas of the depth noise; 0: off), '
                             f'got {self.refine_slope_sigmas}')


@dataclass
class AlignmentConfig:
    """Windowed global alignment (Gauss-Newton over the window's poses, torch).

    enabled: off = frame-to-frame poses only; iterations: per window step; points_per_pair:
    static correspondences sampled per pair; sigma_point_m / sigma_flow_px: residual scales;
    flow_weight: MonST3R flow term weight; smooth_weight: camera smoothness weight; threads: torch
    CPU threads (1 is fastest for these small problems on a busy 2-core machine).
    """

    enabled: bool = True
    iterations: int = 1
    points_per_pair: int = 100
    sigma_point_m: float = 0.01
    sigma_flow_px: float = 0.5
    flow_weight: float = 1.0
    smooth_weight: float = 0.0
    huber: float = 1.5
    threads: int = 1


@dataclass
class ChecksConfig:
    """Bad-frame rules: such frames are skipped with a logged reason."""

    min_valid_depth: float = 0.05  # fraction of pixels with a depth reading
    min_image_std: float = 2.0  # grey-level standard deviation below which an image is 'constant'
    max_translation_m: float = 0.3  # per-frame jump limits (relative to the previous accepted frame)
    max_rotation_deg: float = 20.0
    max_speed_m_s: float = 2.0  # camera speed limits (motion / time since the previous accepted frame)
    max_angular_speed_deg_s: float = 180.0
    min_inlier_ratio: float = 0.15  # of the consistent correspondences; below = tracking lost

    def jump(self, T_rel, gap: float, where: str = '', unit: str = 'm') -> str:
        """'' or why the motion T_rel (4, 4) over ``gap`` seconds breaks the jump or speed limits
        (``where`` is put after the motion, e.g. ' from frame K'; ``unit`` names the length unit)."""
        dt, dr = float(np.linalg.norm(T_rel[:3, 3])), rotation_angle_deg(T_rel[:3, :3])
        gap = max(gap, 1e-6)
        if (dt > self.max_translation_m or dr > self.max_rotation_deg
                or dt / gap > self.max_speed_m_s or dr / gap > self.max_angular_speed_deg_s):
            return (f'sudden jump of {dt:.3f} {unit} / {dr:.1f} deg in {gap:.3f} s{where} (limits '
                    f'{self.max_translation_m} {unit} / {self.max_rotation_deg} deg per frame, '
                    f'{self.max_speed_m_s} {unit}/s / {self.max_angular_speed_deg_s} deg/s)')
        return ''


@dataclass
class ReconConfig:
    """The whole pipeline. intrinsics: default [fx, fy, cx, cy] for frames without K (None = skip
    them); world_pose: [tx, ty, tz, qx, qy, qz, qw] of the first accepted camera in the world
    (None = identity: the world is the first camera's optical frame); max_work_width: RGB-D frames
    wider than this many pixels are processed (flow, pair poses, alignment, segmentation) at 1/s of
    their size, s the smallest integer that brings them within it (640x480 -> 320x240), while the
    outputs stay at the input size (masks upsampled with their edges snapped to the input depth,
    the map integrated from the input depth every map.pixel_stride * s pixels); 0 = always the input size;
    overlap: the ROS node and ``dynrecon run`` work on two frames at once (dynrecon_ros/pipelining.py):
    frame t+1's processing size and optical flow (of the pairs it will most likely get) on one thread
    while frame t's poses, alignment, segmentation and outputs run on another; the same results in the
    same order, about one stage A shorter per frame on two cores (false: one thread, the plain push);
    opencv_threads: OpenCV's worker threads for the process (cv2.setNumThreads, set when the
    Reconstructor is built, as alignment.threads sets torch's; 0 = leave OpenCV's setting, one per
    core by default): 1 by default, because the pipeline's own threads (overlap, map, segmentation)
    already keep the cores busy and OpenCV's pool then costs CPU time (its workers wait actively):
    ~10 % more CPU per frame at 640x480 with one per core on 2 cores (bench/pipeline.py --set opencv_threads=0),
    with the same results; blas_threads: the BLAS library's threads (numpy's matmuls; threadpoolctl, set when
    the Reconstructor is built; 0 = leave its setting, one per core by default): 1 by default for the same
    reason: OpenBLAS splits an image-sized matmul over its threads, which then spin beside the pipeline's own
    threads (main's rolling-shutter ego flow, (N, 2) x (2, 6) products: every_effect 640x480 process CPU 484-501
    -> 195 ms/frame with OPENBLAS_NUM_THREADS=1; no such product is left on the default path, where the
    setting measured within noise), with the same results; map_process: the static map integrated in a
    process of its own (dynrecon_ros/map_process.py; the frames through shared memory), so that its ~8 ms of
    CPU a 640x480 frame do not hold the pipeline's interpreter lock; the same map (false: on the map thread
    of this process)."""

    window: WindowConfig = field(default_factory=WindowConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)
    map: MapConfig = field(default_factory=MapConfig)
    checks: ChecksConfig = field(default_factory=ChecksConfig)
    intrinsics: list | None = None
    world_pose: list | None = None
    max_work_width: int = 320
    overlap: bool = True
    map_process: bool = True
    opencv_threads: int = 1
    blas_threads: int = 1

    @classmethod
    def from_dict(cls, d: dict | None, where: str = 'config') -> 'ReconConfig':
        return _build(cls, d or {}, where)

    @classmethod
    def from_yaml(cls, path) -> 'ReconConfig':
        import yaml
        p = pathlib.Path(path)
        try:
            data = yaml.safe_load(p.read_text())
        except FileNotFoundError:
            raise InputError('config file not found', path=p) from None
        except yaml.YAMLError as exc:
            raise InputError(f'not valid YAML: {exc}', path=p) from None
        if data is not None and not isinstance(data, dict):
            raise InputError('top level must be a mapping of sections', path=p)
        return cls.from_dict(data, where=str(p))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build(cls, d: dict, where: str, base=None):
    """cls built from ``base``'s values (or cls's defaults) overridden by the mapping ``d``."""
    if not isinstance(d, dict):
        raise InputError(f'{where}: expected a mapping for {cls.__name__}, got {type(d).__name__}')
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {} if base is None else {n: getattr(base, n) for n in fields}
    for key, value in d.items():
        if key not in fields:
            raise InputError(f'{where}: unknown key {key!r} (known: {", ".join(sorted(fields))})')
        f = fields[key]
        default = getattr(cls(), key) if f.default is dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            kwargs[key] = _build(type(default), value, f'{where}: {key}', base=default)
        else:
            kwargs[key] = _coerce(value, default, f'{where}: {key}')
    try:
        return cls(**kwargs)
    except InputError as exc:
        raise InputError(f'{where}: {exc}') from None
    except (TypeError, ValueError) as exc:
        raise InputError(f'{where}: {exc}') from None


def _coerce(value, default, where: str):
    """Check a YAML value against the type of its default (ints accepted for floats)."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise InputError(f'{where}: expected true/false, got {value!r}')
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f'{where}: expected an integer, got {value!r}')
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f'{where}: expected a number, got {value!r}')
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise InputError(f'{where}: expected a string, got {value!r}')
        return value
    return value
