"""window.far_keyframes: the newest frame paired with a keyframe published long ago measures the chain's drift."""
import numpy as np
import pytest

from dynrecon_ros.config import ReconConfig
from dynrecon_ros.data.synthetic import SyntheticConfig, render_sequence
from dynrecon_ros.far_anchors import FAR_OVERLAP, overlap
from dynrecon_ros.frames import Frame
from dynrecon_ros.reconstructor import Reconstructor


@pytest.fixture(scope='module')
def run():
    seq = render_sequence(SyntheticConfig(width=160, height=120, frames=40, seed=4))
    cfg = ReconConfig()
    cfg.window.far_keyframes = 20
    cfg.map_process = False
    rec = Reconstructor(cfg)
    for f in seq.frames:
        rec.push(Frame(stamp=f.stamp, rgb=f.rgb, depth=f.depth.copy(), K=f.K.copy(), key=f.key))
    return seq, rec


def _rel_error_mm(seq, a, b, T_a_b) -> float:
    gt = dict(zip(seq.keys, seq.poses))
    g = np.linalg.inv(gt[a.key]) @ gt[b.key]
    return 1000 * float(np.linalg.norm((np.linalg.inv(g) @ T_a_b)[:3, 3]))


def _fitted(c) -> np.ndarray:
    """T_a_b of a constraint (its points in b are a's points moved by the pair's pose: exact in closed form)."""
    from dynrecon_ros.geometry import fit_rigid
    return np.linalg.inv(fit_rigid(c.pts_a, c.pts_b))


def test_the_far_pair_measures_a_drifted_pose(run):
    seq, rec = run
    w, step = rec.window, rec.step
    assert len(w.far) >= 1  # keyframes pushed out of the anchors stay as far anchors
    entry = w.entries[-1]
    a = next(f for f in w.far if overlap(f, entry) >= FAR_OVERLAP)
    assert a.index < min(k.index for k in w.keyframes)  # older than any long pair of the window
    before = _rel_error_mm(seq, a, entry, np.linalg.inv(a.pose) @ entry.pose)
    # as if the chain had drifted 9 mm more, the way it already drifted (a fixed direction could cancel the run's own
    # error: 4.5 mm + 9 mm read 4.5 mm once the masks changed)
    gt = dict(zip(seq.keys, seq.poses))
    own = (np.linalg.inv(a.pose) @ entry.pose)[:3, 3] - (np.linalg.inv(gt[a.key]) @ gt[entry.key])[:3, 3]
    drifted = entry.pose.copy()
    drifted[:3, 3] += a.pose[:3, :3] @ (0.009 * own / np.linalg.norm(own))
    far_ids = {f.index for f in w.far}
    for key in [k for k in step._constraints if k[1] == entry.index and k[0] in far_ids]:
        del step._constraints[key]  # the stream's own far pair of this frame, if it made one
    saved, entry.pose = entry.pose, drifted
    try:
        step._next_far, step._far_failed = 0, set()
        step._far_pair(w, entry, n_ref=100)
    finally:
        entry.pose = saved
    far = [(i, j) for (i, j) in step._constraints if j == entry.index and i in far_ids]
    assert far, 'no far pair made'
    c = step._constraints[far[0]]
    anchor = next(f for f in w.far if f.index == far[0][0])
    err = _rel_error_mm(seq, anchor, entry, _fitted(c))
    drift = _rel_error_mm(seq, anchor, entry, np.linalg.inv(anchor.pose) @ drifted)
    assert drift > 6.0 and err < min(5.0, drift / 3), (before, drift, err)  # 160x120: 18 -> 3.4 mm
    assert anchor in w.all_entries()  # joins the alignment, held (published long ago)
