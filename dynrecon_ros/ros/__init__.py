"""ROS 2 adapter: the only subpackage that imports rclpy."""
