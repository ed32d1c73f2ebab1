"""One source for every default (a house rule written as a test): the config.py tree (ReconConfig).

- the YAML files in config/, the dataclasses and the ROS parameter table (ros/parameters.py, no
  rclpy needed) agree;
- every field can be set from a YAML config and from the node's parameters (and reaches the
  predictors' configs, which are built from ``backend``);
- nothing declared is unread: every field is read by the pipeline while it runs (both backends);
- stage classes take their config and have no constructor defaults that could repeat a config value.

How "read" is decided: the config classes are instrumented (a ``__getattribute__`` that records the
field names read) while a tiny RGB-D stream and a tiny network stream (a random-weight checkpoint,
segmentation 'both') go through the Reconstructor. A scan of the source for ``.name`` attribute
reads was the alternative; it cannot tell ``cfg.window.size`` from ``array.size`` (nor ``.mode``,
``.threads``, ``.enabled`` from others'), so an unread field with a common name would pass. The
instrumented run records reads of the config objects themselves, whatever variable they travel
in; its limit is coverage (a field read only on a branch the runs do not take), which shows up as a
failure naming the field, never as a silent pass.
"""
import contextlib
import dataclasses
import inspect
import os
import sys
import threading

import numpy as np
import pytest
import yaml

from dynrecon_ros.config import BackendConfig, ReconConfig
from dynrecon_ros.errors import InputError
from dynrecon_ros.predictors.dust3r import Dust3rConfig
from dynrecon_ros.predictors.rgbd import RGBDPredictorConfig
from dynrecon_ros.ros.parameters import (CONFIG_AT_NODE_LEVEL, NODE_PARAMETERS, PIPELINE_PREFIX, flatten,
                                         pipeline_config, pipeline_defaults, ros_value)
from dynrecon_ros.ros.params_file import params_yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREDICTOR_CONFIGS = (RGBDPredictorConfig, Dust3rConfig)  # built from backend (from_backend)


def sections(obj=None, prefix=''):
    """{'window': WindowConfig instance, ...} of the ReconConfig tree ('' = ReconConfig itself)."""
    obj = ReconConfig() if obj is None else obj
    out = {prefix.rstrip('.'): obj}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            out.update(sections(v, f'{prefix}{f.name}.'))
    return out


def leaves() -> dict:
    """{'section.name': default} for every leaf of ReconConfig, from the dataclasses."""
    return {(f'{s}.' if s else '') + f.name: getattr(obj, f.name) for s, obj in sections().items()
            for f in dataclasses.fields(obj) if not dataclasses.is_dataclass(getattr(obj, f.name))}


def ros_parameters(doc: dict) -> dict:
    return flatten(doc['/**']['ros__parameters'])


# ------------------------------------------------------------------ the three tables agree
def test_ros_table_yaml_and_dataclasses_agree():
    want = leaves()
    table = pipeline_defaults()
    assert {k: v for k, (v, _) in table.items()} == want
    assert all(desc for _, desc in table.values())
    # config/recon.yaml: every parameter the node declares, with the dataclasses' default
    doc = yaml.safe_load(open(os.path.join(ROOT, 'config', 'recon.yaml')).read())
    got = ros_parameters(doc)
    expected = {k: d for k, (d, _) in NODE_PARAMETERS.items()}
    expected.update({PIPELINE_PREFIX + k: ros_value(v) for k, v in want.items() if k not in CONFIG_AT_NODE_LEVEL})
    expected['use_sim_time'] = False
    assert got == expected
    assert open(os.path.join(ROOT, 'config', 'recon.yaml')).read() == params_yaml(), \
        'regenerate: python -m dynrecon_ros.ros.params_file config/recon.yaml'
    # the node-level stand-ins of backend.name / backend.checkpoint: empty = the config's default
    for key, node_name in CONFIG_AT_NODE_LEVEL.items():
        assert key in want and NODE_PARAMETERS[node_name][0] == ''


def test_every_yaml_in_config_is_valid_for_the_node():
    """Each parameter file in config/ names only declared parameters, with values the node accepts."""
    declared = set(NODE_PARAMETERS) | {PIPELINE_PREFIX + k for k in leaves()} | {'use_sim_time'}
    files = [f for f in sorted(os.listdir(os.path.join(ROOT, 'config'))) if f.endswith('.yaml')]
    assert 'recon.yaml' in files and 'tum.yaml' in files
    for name in files:
        doc = yaml.safe_load(open(os.path.join(ROOT, 'config', name)).read())
        given = ros_parameters(doc)
        assert set(given) <= declared, (name, set(given) - declared)
        values = {**{k: d for k, (d, _) in NODE_PARAMETERS.items()},
                  **{PIPELINE_PREFIX + k: ros_value(v) for k, v in leaves().items()}, **given}
        cfg = pipeline_config(values.__getitem__)
        for key, v in given.items():
            if key.startswith(PIPELINE_PREFIX):
                assert ros_value(_get(cfg, key[len(PIPELINE_PREFIX):])) == v, (name, key)


# the depth sensor's noise model has one source, the segmentation section; the RGB-D pose step reads it too
FROM_SEGMENTATION = {RGBDPredictorConfig: ('depth_sigma_a', 'depth_sigma_b')}


def test_predictor_configs_are_built_from_backend_and_have_no_defaults_of_their_own():
    backend = {f.name for f in dataclasses.fields(BackendConfig)}
    for cls in PREDICTOR_CONFIGS:
        for f in dataclasses.fields(cls):
            assert f.name in backend or f.name in FROM_SEGMENTATION.get(cls, ()), \
                f'{cls.__name__}.{f.name} is not a backend field: not settable'
            assert f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING, \
                f'{cls.__name__}.{f.name} has a default of its own (the backend section holds it)'
    cfg = ReconConfig.from_dict({'segmentation': {'depth_sigma_a': 0.002, 'depth_sigma_b': 0.003}})
    got = RGBDPredictorConfig.from_backend(cfg.backend, cfg.segmentation)
    assert (got.depth_sigma_a, got.depth_sigma_b) == (0.002, 0.003)


# ------------------------------------------------------------------ every field can be set
ALTERNATIVES = {  # fields whose type alone does not give a valid other value
    'backend.name': ['rgbd'], 'backend.checkpoint': ['model.pth'], 'flow.method': ['raft'],
    'flow.preset': ['medium'], 'segmentation.mode': ['both'], 'backend.align_warm_mode': ['freeze'],
    'backend.image_size': [224], 'map.median_px': [3],
    'intrinsics': [[500.0, 501.0, 160.0, 120.0]], 'world_pose': [[1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 1.0]],
}


def _get(cfg, key):
    for part in key.split('.'):
        cfg = getattr(cfg, part)
    return cfg


def _other_value(key, default):
    """A value other than the default that the config accepts for ``key``."""
    if key in ALTERNATIVES:
        cands = ALTERNATIVES[key]
    elif isinstance(default, bool):
        cands = [not default]
    elif isinstance(default, int):
        cands = [default + 1, default - 1, 2 * default + 3]
    elif isinstance(default, float):
        cands = [default * 0.5 if default else 0.25, default * 1.5 + 0.125, default + 0.5]
    else:
        raise AssertionError(f'{key}: no test value for a {type(default).__name__} field (add it to ALTERNATIVES)')
    head, _, leaf = key.rpartition('.')
    for v in cands:
        d = {leaf: v}
        if head:
            d = {head: d}
        try:
            ReconConfig.from_dict(d)
        except InputError:
            continue
        if v != default:
            return v
    raise AssertionError(f'{key}: none of {cands} is accepted')


def test_every_field_can_be_set_from_yaml_and_from_ros_parameters(tmp_path):
    defaults = {k: d for k, (d, _) in NODE_PARAMETERS.items()}
    defaults.update({PIPELINE_PREFIX + k: ros_value(v) for k, v in leaves().items()})
    for key, default in leaves().items():
        value = _other_value(key, default)
        head, _, leaf = key.rpartition('.')
        # YAML (a pipeline config file, as `dynrecon run --config` reads it)
        path = tmp_path / 'c.yaml'
        path.write_text(yaml.safe_dump({head: {leaf: value}} if head else {leaf: value}))
        cfg = ReconConfig.from_yaml(path)
        assert _get(cfg, key) == value, key
        assert {k: v for k, v in leaves_of(cfg).items() if k != key} == {k: v for k, v in leaves().items() if k != key}
        # ROS parameters (what the node reads: pipeline.<key>, or its node-level name)
        name = CONFIG_AT_NODE_LEVEL.get(key, PIPELINE_PREFIX + key)
        params = dict(defaults, **{name: ros_value(value)})
        assert _get(pipeline_config(params.__getitem__), key) == value, key
        # and on to the predictors' configs
        if head == 'backend':
            for cls in PREDICTOR_CONFIGS:
                if leaf in {f.name for f in dataclasses.fields(cls)}:
                    assert getattr(cls.from_backend(cfg.backend), leaf) == value, (cls.__name__, leaf)


def leaves_of(cfg) -> dict:
    return {(f'{s}.' if s else '') + f.name: getattr(obj, f.name) for s, obj in sections(cfg).items()
            for f in dataclasses.fields(obj) if not dataclasses.is_dataclass(getattr(obj, f.name))}


def test_bad_values_name_the_field():
    for d, name in (({'backend': {'image_size': 8}}, 'backend.image_size'),
                    ({'backend': {'pair_cache': -1}}, 'backend.pair_cache'),
                    ({'backend': {'shutter_smoothing_frames': 1}}, 'backend.shutter_smoothing_frames'),
                    ({'backend': {'image_size': 'big'}}, 'image_size')):
        with pytest.raises(InputError, match=name.replace('.', r'\.')):
            ReconConfig.from_dict(d)
    values = {**{k: d for k, (d, _) in NODE_PARAMETERS.items()},
              **{PIPELINE_PREFIX + k: ros_value(v) for k, v in leaves().items()}, 'pipeline.backend.pair_cache': -2}
    with pytest.raises(InputError, match=r'parameters: .*backend\.pair_cache'):
        pipeline_config(values.__getitem__)


# ------------------------------------------------------------------ nothing declared is unread
IGNORED_READERS = ('<string>', os.sep + 'dataclasses.py', os.sep + 'copy.py')  # dataclass __eq__/__repr__, copies


@contextlib.contextmanager
def recording_reads(classes):
    """Record {(class name, field)} read from instances of ``classes`` (any thread) while active."""
    reads, lock = set(), threading.Lock()
    patched = []
    for cls in classes:
        names = frozenset(f.name for f in dataclasses.fields(cls))
        base = cls.__getattribute__

        def get(self, name, _cls=cls.__name__, _names=names, _base=base):
            if name in _names and not sys._getframe(1).f_code.co_filename.endswith(IGNORED_READERS):
                with lock:
                    reads.add((_cls, name))
            return _base(self, name)
        patched.append((cls, '__getattribute__' in cls.__dict__, base))
        cls.__getattribute__ = get
    try:
        yield reads
    finally:
        for cls, own, base in patched:
            if own:
                cls.__getattribute__ = base
            else:
                del cls.__getattribute__


def _rgbd_stream(n=7):
    from dynrecon_ros.data.synthetic import SyntheticConfig, render_sequence
    seq = render_sequence(SyntheticConfig(width=160, height=120, frames=n, seed=1))
    return [(f, seq.K) for f in seq.frames]


def _run(cfg, frames, with_depth=True):
    from dynrecon_ros.frames import Frame
    from dynrecon_ros.reconstructor import Reconstructor
    rec = Reconstructor(cfg)
    out = []
    pipe = rec.pipeline(out.extend)  # as the node and `dynrecon run` drive it (ReconConfig.overlap)
    for f, K in frames:
        pipe.submit(Frame(stamp=f.stamp, rgb=f.rgb, depth=f.depth.copy() if with_depth else None, K=K.copy(),
                          key=f.key, meta={}))
    out += pipe.flush()
    pipe.close()
    rec.static_map()
    return out


def test_every_config_field_is_read_by_the_pipeline(tmp_path):
    """An RGB-D stream (segmentation 'flow', wider than max_work_width) and a network stream (tiny
    random-weight checkpoint, segmentation 'both', no depth) through the Reconstructor: together they
    read every field of the ReconConfig tree and of the predictors' configs."""
    sys.path.insert(0, os.path.dirname(__file__))
    from dust3r_tiny import write_tiny_checkpoint
    ckpt = write_tiny_checkpoint(tmp_path / 'tiny.pth')
    # (the map on this process's thread: the recorder sees reads in this process only)
    rgbd = ReconConfig.from_dict({'backend': {'name': 'rgbd'}, 'max_work_width': 100, 'map_process': False})
    net = ReconConfig.from_dict({
        'backend': {'name': 'dust3r', 'checkpoint': ckpt, 'image_size': 48, 'align_iterations': 10,
                    'align_warm_iterations': 2},
        'segmentation': {'mode': 'both'}, 'window': {'size': 3, 'output_lag': 1},
        'checks': {'max_translation_m': 1e3, 'max_rotation_deg': 180.0, 'max_speed_m_s': 1e5,
                   'max_angular_speed_deg_s': 1e5}})  # random weights: meaningless geometry
    classes = {type(obj) for obj in sections().values()} | set(PREDICTOR_CONFIGS)
    frames = _rgbd_stream()
    with recording_reads(classes) as reads:
        res = _run(rgbd, frames)
        assert sum(r.status == 'ok' for r in res) == len(frames), [r.reason for r in res]
        res = _run(net, frames[:4], with_depth=False)
        assert sum(r.status == 'ok' for r in res) >= 3, [r.reason for r in res]
    unread = [f'{cls.__name__}.{f.name}' for cls in sorted(classes, key=lambda c: c.__name__)
              for f in dataclasses.fields(cls) if (cls.__name__, f.name) not in reads
              and not dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING
                                               else f.default)]
    assert not unread, f'declared but read by nothing in the pipeline: {unread}'


# ------------------------------------------------------------------ stage classes have no defaults
def stage_classes():
    """The pipeline's stage classes: those named here plus every class of the core whose constructor
    takes a parameter annotated with a config class."""
    import importlib
    import pkgutil

    import dynrecon_ros
    from dynrecon_ros.alignment import WindowAligner
    from dynrecon_ros.flow import DISFlow, FlowCache
    from dynrecon_ros.monocular import MonocularWindow
    from dynrecon_ros.predictors.dust3r import Dust3rPredictor
    from dynrecon_ros.predictors.rgbd import RGBDPredictor
    from dynrecon_ros.rgbd_step import RGBDStep
    from dynrecon_ros.segmentation import MotionSegmenter
    from dynrecon_ros.static_map import VoxelMap
    from dynrecon_ros.window import SlidingWindow
    found = {SlidingWindow, FlowCache, DISFlow, WindowAligner, VoxelMap, MotionSegmenter, RGBDPredictor,
             Dust3rPredictor, RGBDStep, MonocularWindow}
    for mod in pkgutil.walk_packages(dynrecon_ros.__path__, 'dynrecon_ros.'):
        if mod.name.startswith(('dynrecon_ros.ros', 'dynrecon_ros.commands')) or mod.name.endswith('__main__'):
            continue
        m = importlib.import_module(mod.name)
        for _, cls in inspect.getmembers(m, inspect.isclass):
            if cls.__module__ != m.__name__ or dataclasses.is_dataclass(cls):
                continue
            params = inspect.signature(cls.__init__).parameters.values()
            if any('Config' in str(p.annotation) for p in params):
                found.add(cls)
    return found


# Reconstructor: the pipeline, not a stage (config None = ReconConfig(), the one source; device is the
# node/CLI setting, not a config field). PointmapAligner: its AlignConfig repeats backend.align_*
# (issue 15, the aligner package's part, not done here).
EXEMPT = {'Reconstructor', 'PointmapAligner'}


def test_stage_classes_have_no_constructor_defaults():
    """A stage's constructor may default only to None ("not given"), never to a value a config
    field could hold: the config is the one source."""
    bad = []
    for cls in sorted(stage_classes(), key=lambda c: c.__name__):
        if cls.__name__ in EXEMPT:
            continue
        for p in inspect.signature(cls.__init__).parameters.values():
            if p.default is not inspect.Parameter.empty and p.default is not None:
                bad.append(f'{cls.__module__}.{cls.__name__}({p.name}={p.default!r})')
    assert not bad, bad
    assert len(stage_classes()) >= 10


def test_product_numbers_come_from_the_config():
    """The stages built by the Reconstructor hold the config's values (a spot check per stage)."""
    from dynrecon_ros.reconstructor import Reconstructor
    cfg = ReconConfig.from_dict({'window': {'size': 7, 'keyframe_max_gap': 11}, 'flow': {'fb_relative': 0.07},
                                 'alignment': {'sigma_flow_px': 0.7}, 'backend': {'stride': 5, 'ransac_seed': 3},
                                 'map': {'voxel_size': 0.03}})
    rec = Reconstructor(cfg)
    assert (rec.window.size, rec.window.kf_max_gap) == (7, 11)
    assert rec.flows.relative == 0.07
    assert rec.step.aligner.sigma_flow == 0.7
    assert (rec.predictor.cfg.stride, rec.predictor.cfg.ransac_seed) == (5, 3)
    assert rec.map.cfg.voxel_size == 0.03
    np.testing.assert_array_equal(rec.predictor.rng.integers(0, 1000, 5), np.random.default_rng(3).integers(0, 1000, 5))
