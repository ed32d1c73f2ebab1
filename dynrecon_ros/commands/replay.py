"""`dynrecon replay BAG`: publish a TUM-style bag (ROS 1 or ROS 2) on its topics with the original timing.

For machines without `ros2 bag play`. ``--compress`` sends the images as image_transport's compressed
and compressedDepth transports would (to test a node's compressed inputs; prints the bandwidth). The rclpy code lives in dynrecon_ros.ros.replay.
"""
from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument('bag', help='ROS 1 .bag file or ROS 2 bag directory')
    parser.add_argument('--rate', type=float, default=1.0, help='playback speed factor (default 1.0)')
    parser.add_argument('--clock', action='store_true', help='also publish /clock (for use_sim_time nodes)')
    parser.add_argument('--loop', action='store_true', help='start again at the end')
    parser.add_argument('--delay', type=float, default=0.0, help='seconds to wait before playing')
    parser.add_argument('--topics', nargs='+', default=None, help='only these topics')
    parser.add_argument('--wait-subscribers', type=float, default=0.0, metavar='SEC',
                        help='wait up to SEC seconds for every image topic to have a subscriber')
    parser.add_argument('--compress', nargs='?', const='png', choices=('png', 'jpeg'), default=None,
                        help='publish images as image_transport does compressed: colour on <topic>/compressed '
                             '(png, the default: lossless; jpeg: smaller, lossy), depth on <topic>/compressedDepth; '
                             'prints bytes per frame raw vs compressed')


def run(args) -> int:
    from dynrecon_ros.ros.replay import replay_bag
    replay_bag(args.bag, rate=args.rate, clock=args.clock, loop=args.loop, delay=args.delay, topics=args.topics,
               wait_subscribers=args.wait_subscribers, compress=args.compress)
    return 0
