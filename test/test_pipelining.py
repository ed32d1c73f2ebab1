"""FramePipeline: two frames at once on two threads, the same results as the plain push, errors surfaced."""
import threading

import numpy as np
import pytest

from dynrecon_ros.config import ReconConfig
from dynrecon_ros.data.synthetic import SyntheticConfig, render_sequence
from dynrecon_ros.frames import Frame
from dynrecon_ros.pipelining import FramePipeline
from dynrecon_ros.reconstructor import Reconstructor


@pytest.fixture(scope='module')
def seq():
    # 320x240 processed at 160x120: the downscaled path (outputs brought back to the input size) too
    return render_sequence(SyntheticConfig(width=320, height=240, frames=24, seed=1))


def frames(seq):
    return [Frame(stamp=f.stamp, rgb=f.rgb, depth=f.depth.copy(), K=f.K.copy(), key=f.key) for f in seq.frames]


def config():
    cfg = ReconConfig()
    cfg.max_work_width = 160
    return cfg


def run_pipeline(seq, overlap: bool, cfg: ReconConfig | None = None):
    rec = Reconstructor(config() if cfg is None else cfg)
    out = []
    pipe = FramePipeline(rec, out.extend, overlap=overlap)
    for f in frames(seq):
        pipe.submit(f)
    out += pipe.flush()
    pipe.close()
    return rec, out


def test_overlapped_results_equal_the_sequential_ones(seq):
    rec_seq, seq_out = run_pipeline(seq, overlap=False)
    rec_ovl, ovl_out = run_pipeline(seq, overlap=True)
    assert [r.key for r in ovl_out] == [r.key for r in seq_out] == list(seq.keys)
    assert all(r.status == 'ok' for r in ovl_out)
    for a, b in zip(seq_out, ovl_out):
        np.testing.assert_array_equal(a.pose, b.pose, err_msg=a.key)
        np.testing.assert_array_equal(a.mask, b.mask, err_msg=a.key)
        np.testing.assert_array_equal(a.dynamic_prob, b.dynamic_prob, err_msg=a.key)
        np.testing.assert_array_equal(a.confidence, b.confidence, err_msg=a.key)
    np.testing.assert_array_equal(rec_seq.static_map(), rec_ovl.static_map())
    # the overlapped run computed the flows ahead (stage A) and stage B found them
    assert rec_ovl.timings.get('flow_ahead', 0) > 0 and 'flow_ahead' not in rec_seq.timings
    assert rec_ovl.flows.computed < rec_seq.flows.computed / 2


class FailingReconstructor(Reconstructor):
    """A reconstructor whose stage B breaks on one frame (a bug stand-in)."""

    fail_key = ''

    def push_prepared(self, p, deferred=False):
        if p.frame.key == self.fail_key:
            raise ZeroDivisionError('stage B broke')
        return super().push_prepared(p, deferred)


def test_stage_thread_error_is_raised_by_the_next_call(seq):
    rec = FailingReconstructor(config())
    rec.fail_key = seq.keys[3]
    out = []
    pipe = FramePipeline(rec, out.extend, overlap=True)
    fs = frames(seq)
    with pytest.raises(ZeroDivisionError) as info:
        for f in fs[:8]:
            pipe.submit(f)
        pipe.drain(timeout=60)
    assert any(seq.keys[3] in note and 'stage thread' in note for note in info.value.__notes__)
    assert pipe.drain(timeout=60)  # reported once; the stage thread still runs
    pipe.close()


def test_stage_thread_error_goes_to_on_error_and_the_stream_continues(seq):
    rec = FailingReconstructor(config())
    rec.fail_key = seq.keys[3]
    out, errors = [], []
    pipe = FramePipeline(rec, out.extend, on_error=lambda f, exc: errors.append((f.key, exc)), overlap=True)
    for f in frames(seq)[:10]:
        pipe.submit(f)
    out += pipe.flush()
    pipe.close()
    assert [(k, type(e)) for k, e in errors] == [(seq.keys[3], ZeroDivisionError)]
    assert [r.key for r in out] == [k for k in seq.keys[:10] if k != seq.keys[3]]
    assert all(r.status == 'ok' for r in out)


def test_a_closed_pipeline_refuses_frames_instead_of_waiting(seq):
    pipe = FramePipeline(Reconstructor(config()), lambda r: None, overlap=True)
    pipe.close()
    with pytest.raises(RuntimeError, match='stage thread is not running'):
        fs = frames(seq)
        pipe.submit(fs[0])
        pipe.submit(fs[1])



def test_on_results_error_is_raised_by_drain_not_lost(seq):
    def on_results(rs):
        if rs:
            raise KeyError('publishing broke')
    pipe = FramePipeline(Reconstructor(config()), on_results, overlap=True)
    with pytest.raises(KeyError, match='publishing broke'):
        for f in frames(seq)[:6]:
            pipe.submit(f)
        pipe.drain(timeout=60)
    pipe.close()


def test_a_steps_prepare_frame_runs_in_stage_a_on_the_callers_thread(seq):
    rec = Reconstructor(config())
    calls = []
    rec.step.prepare_frame = lambda work: calls.append((work.key, work.rgb.shape, threading.current_thread().name))
    pipe = FramePipeline(rec, lambda rs: None, overlap=True)
    for f in frames(seq)[:5]:
        pipe.submit(f)
    pipe.flush()
    pipe.close()
    main = threading.current_thread().name
    assert calls == [(k, (120, 160, 3), main) for k in seq.keys[:5]]


def test_deferred_outputs_are_handed_over_before_their_map_integration(seq):
    """The emitted frame's Future resolves once its outputs are made, while the map thread still holds its
    integration (publishing does not wait for it); the integration follows, in order."""
    rec = Reconstructor(config())
    release, integrating = threading.Event(), threading.Event()
    integrated = []
    real = rec._integrate

    def held_integrate(*args):
        integrating.set()
        assert release.wait(60)
        real(*args)
        integrated.append(1)
    rec._integrate = held_integrate
    fs = frames(seq)
    lag = rec.cfg.window.output_lag
    futs = []
    for f in fs[:lag + 1]:
        futs += rec.push_prepared(rec.prepare(f), deferred=True)
    assert len(futs) == 1
    assert futs[0].result(timeout=60).key == fs[0].key  # resolved: the integration has not run yet
    assert integrating.wait(60) and integrated == []
    release.set()
    rec.flush()
    assert len(integrated) == 1 + lag  # flush() emitted and integrated the rest


def test_trace_breaks_each_published_frames_latency_into_phases(seq):
    """FrameTrace: one record per frame delivered through on_results, the phases of the overlapped path, none
    negative, summing to the total; with output_lag 0 a frame is emitted by its own stage B (lag 0 s)."""
    for lag in (2, 0):
        cfg = config()
        cfg.window.output_lag = lag
        delivered = []
        pipe = FramePipeline(Reconstructor(cfg), delivered.extend, overlap=True)
        recorded = []
        finish = pipe.trace.finish
        pipe.trace.finish = lambda key, keep=True: recorded.append(finish(key, keep)) or recorded[-1]
        for f in frames(seq)[:8]:
            pipe.submit(f)
        pipe.drain(timeout=120)
        pipe.close()
        assert len(delivered) == 8 - lag and len(recorded) == len(delivered)
        for ph in recorded:
            assert set(ph) == {'slot_wait', 'stage_a', 'to_b', 'stage_b', 'lag', 'outputs', 'total'}, ph
            assert min(ph.values()) >= 0 and abs(sum(v for k, v in ph.items() if k != 'total') - ph['total']) < 1e-9
            if lag == 0:
                assert ph['lag'] == 0.0
        assert pipe.trace.line().startswith(f'latency breakdown over {8 - lag} frames, mean / p95 ms: slot_wait ')


def test_trace_is_bounded_and_skips_frames_without_a_key():
    from dynrecon_ros.pipelining import FrameTrace
    tr = FrameTrace(keep=3, pending=2)
    for k in 'abc':
        tr.mark(k, 'submit', 0.0)
    tr.mark(None, 'submit', 0.0)
    assert tr.finish('a') is None  # forgotten: at most 2 unfinished frames
    for k, t in (('b', 1.0), ('c', 2.0)):
        tr.mark(k, 'received', -0.5)
        tr.mark(k, 'transport', 0.25)
        tr.mark(k, 'out', t)
    gap = 'slot_wait+stage_a+to_b+stage_b+lag+outputs'  # the phases between 'submit' and 'out'
    assert tr.finish('b') == {'queue': 0.5, gap: 1.0, 'transport': 0.25, 'total': 1.75}
    assert tr.finish('c', keep=False)[gap] == 2.0
    assert tr.line().startswith('latency breakdown over 1 frames')


def test_every_effect_runs_repeat_bit_identically():
    """The close crosser under every sensor effect (rolling shutter + depth delay: the shutter fit of the
    pair poses, two segmentation threads, permanence): a sequential and an overlapped run of the same
    frames give the same poses and masks (issue 16: single runs must compare; no races, seeded RANSAC)."""
    from dynrecon_ros.data.scenarios import scenario_config
    cfg_s = scenario_config('every_effect', seed=3, width=160, height=120, frames=16)
    sq = render_sequence(cfg_s)

    def run(overlap):
        cfg = ReconConfig()
        cfg.backend.rolling_shutter_s, cfg.backend.depth_delay_s = cfg_s.rolling_shutter, cfg_s.depth_delay
        return run_pipeline(sq, overlap, cfg)[1]

    a, b = run(False), run(True)
    assert [r.key for r in a] == [r.key for r in b] and sum(r.status == 'ok' for r in a) >= 12
    assert sum(int(r.mask.sum()) for r in a if r.status == 'ok') > 0  # the movers are masked: segmentation ran
    for x, y in zip(a, b):
        if x.status == 'ok':
            np.testing.assert_array_equal(x.pose, y.pose, err_msg=x.key)
            np.testing.assert_array_equal(x.mask, y.mask, err_msg=x.key)


def test_stage_a_prepares_the_frames_data_and_stage_b_reuses_it(seq, monkeypatch):
    """Stage A (``prepare``) derives what the pose step and the segmentation read from a frame alone (the
    refinement's sampling stacks, the segmentation's nearest readings and hole candidates, the grey image):
    stage B computes none of it again for a prepared frame, and the results are those without it."""
    import dynrecon_ros.predictors.rgbd as rgbd_mod
    import dynrecon_ros.rgbd_step as step_mod
    import dynrecon_ros.segmentation as seg_mod

    _, ref = run_pipeline(seq, overlap=False)
    calls = {'stack': 0, 'near': 0, 'grey': 0}
    in_b = threading.local()

    def counted(name, fn):
        def wrapped(*a, **k):
            if getattr(in_b, 'on', False):
                calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(rgbd_mod, '_sampling_stack', counted('stack', rgbd_mod._sampling_stack))
    monkeypatch.setattr(seg_mod, 'nearest_reading', counted('near', seg_mod.nearest_reading))
    monkeypatch.setattr(seg_mod, 'to_gray', counted('grey', seg_mod.to_gray))
    rec = Reconstructor(config())
    out = []
    for f in frames(seq):
        p = rec.prepare(f)
        assert rgbd_mod._PREPARED in p.work.__dict__ and seg_mod._GREY in p.work.__dict__
        in_b.on = True
        out += rec.push_prepared(p)
        in_b.on = False
    out += rec.flush()
    assert calls == {'stack': 0, 'near': 0, 'grey': 0}
    for a, b in zip(ref, out):
        np.testing.assert_array_equal(a.pose, b.pose, err_msg=a.key)
        np.testing.assert_array_equal(a.mask, b.mask, err_msg=a.key)
    # without stage A's preparation, stage B computes them itself
    monkeypatch.setattr(step_mod.RGBDStep, 'prepare_frame', lambda self, work: None)
    rec = Reconstructor(config())
    in_b.on = True
    for f in frames(seq)[:4]:
        rec.push(f)
    in_b.on = False
    assert calls['stack'] > 0 and calls['near'] > 0 and calls['grey'] > 0


def test_overlapped_results_equal_the_sequential_ones_with_tracked_frames(seq):
    """window.step_every 2: stage A guesses each frame's role (stepped / tracked) as stage B takes it."""
    cfg = config()
    cfg.window.step_every = 2
    _, seq_out = run_pipeline(seq, overlap=False, cfg=cfg)
    cfg2 = config()
    cfg2.window.step_every = 2
    rec_ovl, ovl_out = run_pipeline(seq, overlap=True, cfg=cfg2)
    assert [r.key for r in ovl_out] == [r.key for r in seq_out] == list(seq.keys)
    assert all(r.status == 'ok' for r in ovl_out)
    for a, b in zip(seq_out, ovl_out):
        np.testing.assert_array_equal(a.pose, b.pose, err_msg=a.key)
        np.testing.assert_array_equal(a.mask, b.mask, err_msg=a.key)
    assert rec_ovl.timings.get('track', 0) > 0
