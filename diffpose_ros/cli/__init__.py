"""Command-line tools: thin adapters over diffpose_ros.core (no ROS needed)."""
