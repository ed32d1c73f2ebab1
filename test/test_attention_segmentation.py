import numpy as np
import pytest

from dynrecon_ros.attention_segmentation import (aggregate_attention, attention_masks, cluster_refine, combine_masks,
                                                 dynamic_attention_scores, masks_from_scores, multiotsu_level,
                                                 raw_contrast, token_mask_for_reweighting)
from dynrecon_ros.errors import InputError

N, L, HEADS, h, w, PATCH = 6, 2, 3, 6, 8, 16


def _pairs():
    return [(i, j) for i in range(N) for j in range(N) if i != j]


def _planted(rng, dynamic=True, noise=0.1, frames=None):
    """Attention logits with a moving dynamic rectangle: decoder 1 looks at it little and
    inconsistently (low mean, high spread over pairs), decoder 2 strongly and consistently.
    noise: std of the static logits; frames: the frames that have the region (default all)."""
    pairs = _pairs()
    region = np.zeros((N, h, w), bool)
    for t in range(N) if frames is None else frames:
        c = 1 + (t % 4)
        region[t, 2:5, c:c + 3] = dynamic
    P = len(pairs)
    a1 = 2.0 + noise * rng.standard_normal((P, L, HEADS, h, w))
    a2 = 1.0 + noise * rng.standard_normal((P, L, HEADS, h, w))
    for e, (i, j) in enumerate(pairs):
        r2, r1 = region[j], region[i]
        a1[e, :, :, r2] = 0.8 + 0.6 * rng.standard_normal((r2.sum(), L, HEADS))
        a2[e, :, :, r1] = 2.0 + 0.05 * rng.standard_normal((r1.sum(), L, HEADS))
    a1[:, :, :, 0, 0] = 50.0  # attention sink
    a2[:, :, :, 0, 0] = 50.0
    return pairs, a1, a2, region


def _iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


def test_planted_region_recovered():
    rng = np.random.default_rng(0)
    pairs, a1, a2, region = _planted(rng)
    score = dynamic_attention_scores(N, pairs, a1, a2)
    assert score.shape == (N, h, w) and score.dtype == np.float32
    assert score.min() >= 0 and score.max() <= 1
    masks = attention_masks(N, pairs, a1, a2, (h * PATCH, w * PATCH))
    assert masks.shape == (N, h * PATCH, w * PATCH) and masks.dtype == np.uint8
    gt = np.repeat(np.repeat(region, PATCH, 1), PATCH, 2)
    # bilinear upsampling rounds the token-block region's corners: IoU ~0.9 against the blocks
    assert _iou(masks > 0, gt) >= 0.85
    # with k-means refinement on encoder tokens that carry the region identity
    tokens = rng.standard_normal((N, h, w, 8)) * 0.05 + region[..., None] * np.eye(8)[0]
    masks_k = attention_masks(N, pairs, a1, a2, (h * PATCH, w * PATCH), enc_tokens=tokens)
    assert _iou(masks_k > 0, gt) >= 0.85


def test_swapped_statistics_do_not_fire():
    """The score is specific: a region attended *more* consistently by decoder 1 is not dynamic."""
    rng = np.random.default_rng(3)
    pairs, a1, a2, region = _planted(rng)
    score = dynamic_attention_scores(N, pairs, a2 * 0 + 2.0 + 0.1 * rng.standard_normal(a1.shape), a2 * 0 + 1.0)
    assert score[region].mean() < 0.9  # no planted contrast in decoder 1 -> the region is not singled out
    s_ok = dynamic_attention_scores(N, pairs, a1, a2)
    assert s_ok[region].mean() > 0.5 and s_ok[~region].mean() < 0.1


def test_static_only_window_flags_noise_unless_guarded():
    """Easi3R's pipeline (the default) has no no-motion test: the per-frame min-max stretches
    motion-free noise to [0, 1] and Otsu splits it (4-17 % of the pixels here). The optional guards
    each clear every such window (segmentation.attention_min_contrast / attention_min_separation)."""
    flagged = []
    for seed in range(6):
        pairs, a1, a2, region = _planted(np.random.default_rng(seed), dynamic=False)
        assert not region.any()
        size = (h * PATCH, w * PATCH)
        flagged.append((attention_masks(N, pairs, a1, a2, size) > 0).mean())
        assert not attention_masks(N, pairs, a1, a2, size, min_raw_contrast=30.0).any(), seed
        assert not attention_masks(N, pairs, a1, a2, size, min_separation=4.0).any(), seed
    print(f'guards off: flagged fraction {np.round(flagged, 3)}')
    assert min(flagged) > 0.01


def test_guards_on_planted_regions():
    """What the guards change where there is motion: with the region in every frame neither removes
    it; with the region in frames 0-2 only, the raw-contrast guard clears frames 3-5 (their stretched
    noise is flagged without it) and keeps the region, the separation guard (one test for the whole
    window) removes every mask."""
    gt_px = lambda r: np.repeat(np.repeat(r, PATCH, 1), PATCH, 2)  # noqa: E731
    size = (h * PATCH, w * PATCH)
    for seed in range(4):
        pairs, a1, a2, region = _planted(np.random.default_rng(seed))
        for kw in ({}, {'min_raw_contrast': 30.0}, {'min_separation': 4.0}):
            assert _iou(attention_masks(N, pairs, a1, a2, size, **kw) > 0, gt_px(region)) >= 0.85, (seed, kw)
        pairs, a1, a2, region = _planted(np.random.default_rng(seed), frames=(0, 1, 2))
        plain = attention_masks(N, pairs, a1, a2, size) > 0
        assert plain[3:].mean() > 0.05
        guarded = attention_masks(N, pairs, a1, a2, size, min_raw_contrast=30.0) > 0
        assert not guarded[3:].any() and _iou(guarded, gt_px(region)) >= 0.7, seed
        assert not attention_masks(N, pairs, a1, a2, size, min_separation=4.0).any()


def test_frame_in_one_pair_left_out():
    """A frame in one pair per role has no sample std: it is left out of the aggregation, so the
    other frames' scores are exactly those of the graph without it; with encoder tokens it takes
    its clusters' scores, without it is NaN and gets an empty mask."""
    rng = np.random.default_rng(4)
    pairs, a1, a2, region = _planted(rng)
    keep = [e for e, (i, j) in enumerate(pairs) if 5 not in (i, j) or (i, j) in ((4, 5), (5, 4))]
    sub = [pairs[e] for e in keep]
    sc = aggregate_attention(N, sub, a1[keep], a2[keep])
    assert sc.defined.tolist() == [True] * 5 + [False]
    assert np.isnan(sc.plain_score[5]).all() and np.isfinite(sc.plain_score[:5]).all()
    # frame 5's maps do not reach the other frames' scores (taking its std as 0 would move the
    # global min-max of every frame)
    b1, b2 = a1[keep].copy(), a2[keep].copy()
    b1[sub.index((4, 5))] += 3 * rng.standard_normal(b1.shape[1:])
    b2[sub.index((5, 4))] -= 3 * rng.standard_normal(b2.shape[1:])
    other = aggregate_attention(N, sub, b1, b2)
    np.testing.assert_allclose(other.plain_score[:5], sc.plain_score[:5], atol=1e-12)
    np.testing.assert_allclose(other.agg_minmax, sc.agg_minmax, atol=1e-12)
    masks = attention_masks(N, sub, a1[keep], a2[keep], (h * PATCH, w * PATCH)) > 0
    assert not masks[5].any() and masks[:5].any()
    # with tokens that carry the region's identity, frame 5 gets its region from the clusters
    tokens = rng.standard_normal((N, h, w, 8)) * 0.05 + region[..., None] * np.eye(8)[0]
    masks_k = attention_masks(N, sub, a1[keep], a2[keep], (h * PATCH, w * PATCH), enc_tokens=tokens) > 0
    gt5 = np.repeat(np.repeat(region[5], PATCH, 0), PATCH, 1)
    assert _iou(masks_k[5], gt5) >= 0.8
    # a two-frame window: nothing defined, no mask, no error
    two = [(0, 1), (1, 0)]
    assert not attention_masks(2, two, a1[:2], a2[:2], (h * PATCH, w * PATCH), enc_tokens=tokens[:2]).any()
    # ddof 0 (population std) defines every frame
    assert aggregate_attention(N, sub, a1[keep], a2[keep], ddof=0).defined.all()


def test_cluster_refine_means_and_missing_scores():
    score = np.array([[[0.0, 1.0], [0.5, np.nan]]])
    labels = np.array([[[0, 1], [0, 2]]])
    out = cluster_refine(score, labels)
    # cluster 0: mean 0.25, cluster 1: 1.0, cluster 2: no scored token -> the frame's minimum
    np.testing.assert_allclose(out[0], [[0.0, 1.0], [0.0, 0.0]], atol=1e-5)
    with pytest.raises(InputError):
        cluster_refine(score, labels[..., :1])


def test_masks_strictly_above_the_level():
    """Stage 8 is strict: a pixel exactly at the level is not dynamic."""
    score = np.zeros((2, 2, 3), np.float32)
    score[0, 1, 2] = 0.5
    score[1] = 0.5  # a constant frame: bilinear keeps 0.5 everywhere
    masks, level = masks_from_scores(score, (32, 48), threshold=0.5)
    assert level.threshold == 0.5 and not masks.any()
    masks, _ = masks_from_scores(score, (32, 48), threshold=0.4999)
    assert masks[1].all() and masks[0].any()

def test_raw_contrast():
    raw = np.full((2, 4, 4), 1.0) + 0.01 * np.arange(32).reshape(2, 4, 4) % 0.05
    flagged = np.zeros((2, 4, 4), bool)
    flagged[0, 1, 1] = True
    raw[0, 1, 1] = 5.0
    z = raw_contrast(raw, flagged)
    assert z[0] > 100 and z[1] == np.inf
    flagged[0, 1, 1], flagged[0, 2, 2] = False, True  # a token inside the bulk: no contrast
    assert raw_contrast(raw, flagged)[0] < 3


def test_multiotsu_level_on_mixture():
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.normal(0.1, 0.03, 4000), rng.normal(0.45, 0.03, 2000), rng.normal(0.9, 0.02, 500)])
    lv = multiotsu_level(x)
    assert lv.classes == 3 and 0.5 < lv.threshold < 0.85  # highest level separates the top mode
    assert set(lv.thresholds) == {2, 3, 4} and np.isfinite(lv.criterion).all()
    # the criterion is the class means' population variance / sqrt(k), not Otsu's weighted one
    for n, k in enumerate((2, 3, 4)):
        cls = np.digitize(x.astype(np.float32), lv.thresholds[k])
        means = [x.astype(np.float32)[cls == c].mean() for c in range(k)]
        assert abs(lv.criterion[n] - np.var(means) / np.sqrt(k)) < 1e-6
    assert multiotsu_level(np.zeros(10)).threshold == float('inf')  # one value: no class count fits
    two = multiotsu_level(np.r_[np.zeros(10), np.ones(5)])  # two values: only k = 2
    assert two.classes == 2 and 0 < two.threshold < 1

def test_token_mask_for_reweighting():
    masks = np.zeros((3, 32, 48), np.uint8)
    masks[1, 17, 40] = 255  # one pixel -> whole token (1, 2) dynamic (max-pool)
    masks[2, 0:16, 0:16] = 255
    pairs = [(0, 1), (2, 1), (1, 2)]
    q, k = token_mask_for_reweighting(masks, pairs)
    assert q.shape == k.shape == (3, 2, 3) and q.dtype == bool
    assert q[0].all() and k[0].sum() == 1 and k[0][1, 2]
    assert not q[1][0, 0] and q[1].sum() == 5  # view 1 = frame 2: its dynamic token is not a query
    assert not q[2][1, 2] and k[2].sum() == 1 and k[2][0, 0]
    with pytest.raises(InputError):
        token_mask_for_reweighting(np.zeros((1, 20, 32)), [(0, 0)])


def test_combine_masks():
    f = np.array([[1, 0], [1, 0]], bool)[None]
    a = np.array([[1, 1], [0, 0]], bool)[None]
    assert combine_masks(f, a, 'both').sum() == 3
    assert combine_masks(f, a, 'both', rule='and').sum() == 1
    assert (combine_masks(f, None, 'flow') == f).all()
    assert (combine_masks(None, a, 'attention') == a).all()
    with pytest.raises(InputError):
        combine_masks(f, a, 'optical')
    with pytest.raises(InputError):
        combine_masks(None, a, 'both')


def test_second_pass_suppresses_attention_to_masked_tokens(tmp_path):
    """Through the network API (tiny random-weight model): Easi3R attention feeds the scores, the
    token masks feed ``cross_attn_zero``; zeroed weights carry nothing from the masked view-2 tokens."""
    torch = pytest.importorskip('torch')
    from dynrecon_ros.network import build_model, load_network, save_checkpoint
    cfg = ("AsymmetricCroCo3DStereo(pos_embed='RoPE100', patch_embed_cls='ManyAR_PatchEmbed', img_size=(512, 512), "
           "head_type='linear', output_mode='pts3d', depth_mode=('exp', -float('inf'), float('inf')), "
           "conf_mode=('exp', 1, float('inf')), enc_embed_dim=32, enc_depth=2, enc_num_heads=2, "
           "dec_embed_dim=32, dec_depth=2, dec_num_heads=2)")
    torch.manual_seed(0)
    save_checkpoint(tmp_path / 'tiny.pth', build_model(cfg).state_dict(), cfg)
    net = load_network(tmp_path / 'tiny.pth')
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, (3, 32, 48, 3), dtype=np.uint8)
    pairs = [(0, 1), (1, 0), (0, 2), (2, 0), (1, 2), (2, 1)]
    out = net.predict_pairs(imgs, pairs, return_attention=True)
    score = dynamic_attention_scores(3, pairs, out['cross_attn_1'], out['cross_attn_2'])
    assert score.shape == (3, 2, 3) and np.isfinite(score).all()

    masks = np.zeros((3, 32, 48), np.uint8)
    masks[1, :16, 16:32] = 255  # one dynamic token in frame 1
    q, k = token_mask_for_reweighting(masks, pairs)
    second = net.predict_pairs(imgs, pairs, cross_attn_zero=(q, k))
    e = pairs.index((0, 1))  # view 2 = frame 1 has the masked token: view-1 output changes
    assert not np.allclose(second['pts3d_1'][e], out['pts3d_1'][e], atol=1e-6)
    e2 = pairs.index((1, 0))  # view 2 = frame 0 has no dynamic token: nothing is zeroed
    np.testing.assert_allclose(second['pts3d_1'][e2], out['pts3d_1'][e2], rtol=1e-5, atol=1e-6)

    # all of view 2 masked for all view-1 queries: view 1's output no longer depends on view 2's image
    allq, allk = np.ones((1, 2, 3), bool), np.ones((1, 2, 3), bool)
    other = imgs.copy()
    other[1] = rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)
    a = net.predict_pairs(imgs, [(0, 1)], cross_attn_zero=(allq, allk))['pts3d_1']
    b = net.predict_pairs(other, [(0, 1)], cross_attn_zero=(allq, allk))['pts3d_1']
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    a0 = net.predict_pairs(imgs, [(0, 1)])['pts3d_1']
    b0 = net.predict_pairs(other, [(0, 1)])['pts3d_1']
    assert not np.allclose(a0, b0, atol=1e-4)


@pytest.mark.parametrize('grid', [(1, 5), (4, 1), (1, 1)])
def test_thin_token_grids(grid):
    """A token grid one token high or wide (a 16- or 32-pixel network side) has no sink neighbour on
    that side: the scores are computed, not an IndexError."""
    gh, gw = grid
    rng = np.random.default_rng(0)
    pairs = _pairs()
    a1 = 1.0 + 0.1 * rng.standard_normal((len(pairs), L, HEADS, gh, gw))
    a2 = 1.0 + 0.1 * rng.standard_normal((len(pairs), L, HEADS, gh, gw))
    a1[..., 0, 0] = a2[..., 0, 0] = 50.0
    score = dynamic_attention_scores(N, pairs, a1, a2)
    assert score.shape == (N, gh, gw) and np.isfinite(score).all()
