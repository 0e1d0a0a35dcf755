"""What a navigator reads, ROS-free: the pose status and staleness (:mod:`.status`), stamps
(:mod:`.stamps`), the 3D scene of a registration (:mod:`.scene`) and the overlay picture
(:mod:`.overlay`)."""
