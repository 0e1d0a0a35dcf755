"""diffpose_ros: DiffPose 2D/3D X-ray registration as a ROS 2 node (ROS-free core in diffpose_ros.core)."""
