"""recon_node in its own process with pipeline.overlap on (two threads per frame stream): a short stream
below capacity comes back whole, each frame's mask and pose once, in order; the stats line reports the
stamp-to-publish latency. Counts only, no wall-clock assertions."""
import re
import time

import pytest

pytest.importorskip('rclpy')
from dynrecon_ros.data.synthetic import SyntheticConfig, render_sequence  # noqa: E402
from dynrecon_ros.ros.testing import (NodeProcess, RosHarness, StreamProbe, domain_id_for,  # noqa: E402
                                      node_command)

DOMAIN = domain_id_for(__name__)
FRAMES = 16


@pytest.fixture(scope='module')
def ros():
    h = RosHarness(DOMAIN)
    yield h
    h.close()


def test_every_frame_comes_back_with_overlap(ros):
    seq = render_sequence(SyntheticConfig(width=320, height=240, frames=FRAMES, seed=2))
    # processed at 160x120, outputs at 320x240: the outputs made on the map thread are exercised too
    proc = NodeProcess(node_command(['-p', 'qos_reliable:=true', '-p', 'queue_size:=50', '-p', 'idle_flush:=1.0',
                                     '-p', 'stats_period:=1.0', '-p', 'pipeline.overlap:=true',
                                     '-p', 'pipeline.max_work_width:=160']), DOMAIN)
    try:
        assert proc.wait_output('ready:', 60), proc.output()
        assert 'overlap=on' in proc.output()
        probe = StreamProbe(ros, reliable=True)
        assert probe.wait_matched(30), proc.output()
        probe.play(seq.frames, rate=4.0)
        # the last output_lag frames come with the idle flush
        assert ros.wait_for(lambda: probe.report()['complete'] == FRAMES, 120), (probe.report(), proc.output())
        assert proc.wait_output('input idle: flushed', 30), proc.output()
        rep = probe.report()
        assert rep['masks'] == rep['poses'] == FRAMES, rep  # each once: no duplicate either
        assert [t for t, _ in list(probe.masks)] == probe.sent  # in order
        out = proc.output()
        stats = re.findall(r'stats: .*?latency stamp->mask\+pose p50 (\d+) ms, p95 (\d+) ms over (\d+) frames', out)
        assert stats and sum(int(n) for _, _, n in stats) >= FRAMES - 2, out
        assert 'pipeline failed' not in out and 'Traceback' not in out, out
    finally:
        proc.stop()
    out = proc.output()
    assert re.search(rf'processed {FRAMES}, dropped 0.*published {FRAMES}, latency stamp->mask\+pose p50', out), out
    # where the latency goes: every frame published through the pipeline's output thread (all but those the
    # idle flushes published: the last output_lag, more if the sender stalled), each phase of its path from
    # the callback to the publishing
    flushed = sum(int(n) for n in re.findall(r'input idle: flushed (\d+) results', out))
    m = re.search(r'latency breakdown over (\d+) frames, mean / p95 ms: (.*)', out)
    assert m and int(m.group(1)) == FRAMES - flushed and flushed >= 2, out
    assert [p.split()[0] for p in m.group(2).split(', ')] == [
        'transport', 'queue', 'slot_wait', 'stage_a', 'to_b', 'stage_b', 'lag', 'outputs', 'publish', 'total'], out


@pytest.mark.parametrize('track', [True, False])
def test_a_node_that_falls_behind_tracks_frames_instead_of_dropping_them(ros, track):
    """Fed far faster than it steps (30 Hz 640x480 processed at full size, a queue of one): with track_when_behind
    (the default) frames taken after a drop are tracked between window steps, published like the others, each once
    and in order; without it none is. (The sender stamps frames as it sends them: sent faster than the camera's
    30 Hz, the pipeline would rightly reject the motion as a jump.)"""
    seq = render_sequence(SyntheticConfig(width=640, height=480, frames=30, seed=3))
    proc = NodeProcess(node_command(['-p', 'qos_reliable:=true', '-p', 'queue_size:=1', '-p', 'idle_flush:=1.0',
                                     '-p', 'stats_period:=0.0', '-p', 'pipeline.max_work_width:=640',
                                     '-p', f'track_when_behind:={str(track).lower()}']), DOMAIN)
    try:
        assert proc.wait_output('ready:', 60), proc.output()
        probe = StreamProbe(ros, reliable=True)
        assert probe.wait_matched(30), proc.output()
        probe.play(seq.frames, rate=30.0)
        assert proc.wait_output('input idle: flushed', 120), proc.output()
        time.sleep(1.0)
        rep = probe.report()
    finally:
        proc.stop()
    out = proc.output()
    m = re.search(r'frames received (\d+), processed (\d+), dropped (\d+), queue high water \d+, tracked (\d+)', out)
    assert m, out
    received, processed, dropped, tracked = (int(g) for g in m.groups())
    assert dropped > 0 and processed + dropped == received, out  # it fell behind
    assert (tracked > 0) == track and tracked < processed, out
    assert rep['complete'] == rep['masks'] == rep['poses'] == processed, (rep, out)
    got = [t for t, _ in list(probe.masks)]
    assert got == sorted(got), got
    assert 'pipeline failed' not in out and 'Traceback' not in out, out
