"""Rosbag replay testing: synthesize fluoroscopy bags, replay them into DDS, record and score the node.

- :mod:`.bagfile`: rosbag2 files (sqlite3, mcap) through ``rosbags``; messages as rclpy's CDR.
- :mod:`.synthesize`: fluoroscopy sequences with ground truth from a CT (``diffpose-make-bag``).
- :mod:`.replay`: a bag into DDS with its timing (``diffpose-replay``).
- :mod:`.record`: DDS topics into an mcap bag (``diffpose-record``).
- :mod:`.read`: ground truth, frames, camera and a node's estimates read from bags, by stamp.
- :mod:`.score`: estimates against ground truth, per frame and summarized; a navigator's view.
- :mod:`.report`: ``summary.json``, ``frames.json``, ``report.md`` and pictures (``diffpose-score``).
- :mod:`.live`: replay + record in one process, for a run against a node in another process.

The tools stand in for ``ros2 bag play``/``record`` where ROS 2 comes from PyPI wheels and read and
write the same files, so bags go both ways between them and a ROS 2 install.
"""
