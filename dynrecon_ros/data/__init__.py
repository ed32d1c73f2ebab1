"""Datasets and formats: synthetic sequences, TUM RGB-D directories, ROS bags, generic sources."""
