"""recon_node's colour/depth pairing (ros/inputs.py, no rclpy): nearest partner within the slop, each
used once, items that can no longer pair dropped, either arrival order."""
from dynrecon_ros.ros.inputs import StampPairer


def test_pairs_nearest_within_slop_in_either_order():
    p = StampPairer(0.02)
    assert p.add_rgb(1.000, 'c1') is None  # waits
    assert p.add_depth(1.015, 'd1') == 'c1'  # 15 ms apart: paired
    assert p.add_depth(2.000, 'd2') is None
    assert p.add_depth(2.010, 'd3') is None
    assert p.add_rgb(2.009, 'c2') == 'd3'  # the nearer of two candidates
    assert list(p.depth) == []  # d2, older than the match, can never pair: gone
    assert p.add_rgb(3.000, 'c3') is None and p.add_depth(3.021, 'd4') is None  # 21 ms: outside the slop


def test_stale_items_dropped_and_bounded():
    p = StampPairer(0.02, maxlen=3)
    for i in range(5):
        p.add_rgb(float(i), f'c{i}')
    assert [t for t, _ in p.rgb] == [2.0, 3.0, 4.0]  # at most maxlen wait
    assert p.add_depth(3.5, 'd') is None  # pairs with nothing; colour older than 3.48 cannot pair any more
    assert [t for t, _ in p.rgb] == [4.0]
    p.clear()
    assert not p.rgb and not p.depth


def test_a_known_depth_delay_pairs_each_depth_image_with_its_own_colour_image():
    # Depth taken 22 ms after its colour image, which arrives after the next colour image (30 Hz).
    for delay, partner in ((0.0, 'c1'), (0.022, 'c0')):
        p = StampPairer(0.02, depth_delay=delay)
        assert p.add_rgb(0.0, 'c0') is None and p.add_rgb(1 / 30, 'c1') is None
        assert p.add_depth(0.028, 'd0') == partner  # untold: 5 ms from c1, 28 ms (outside the slop) from c0
