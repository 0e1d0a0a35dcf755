"""Rosbag replay testing: synthesize fluoroscopy bags, replay them into DDS, record and score the node.

- :mod:`.bagfile`: rosbag2 files (sqlite3, mcap) through ``rosbags``; messages as rclpy's CDR.
- :mod:`.synthesize`: fluoroscopy sequences with ground truth from a CT (``diffpose-make-bag``).
- :mod:`.replay`: a bag into DDS with its timing (``diffpose-replay``).
- :mod:`.record`: DDS topics into an mcap bag (``diffpose-record``).
- :mod:`.score`: estimates against ground truth; JSON, Markdown and pictures (``diffpose-score``).
- :mod:`.live`: replay + record in one process, for a run against a node in another process.
- :mod:`.navigator`: a navigator's OpenIGTLink client (pyigtl) that keeps every message of ``diffpose-igtl``.

The tools stand in for ``ros2 bag play``/``record`` where ROS 2 comes from PyPI wheels and read and
write the same files, so bags go both ways between them and a ROS 2 install.
"""
