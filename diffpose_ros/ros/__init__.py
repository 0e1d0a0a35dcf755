"""The ROS 2 layer of diffpose_ros: thin adapters over the core.

- :mod:`.node`: ``diffpose_node``, a lifecycle node; its frame thread (:mod:`.worker`), what it
  publishes (:mod:`.outputs`, :mod:`.status`, :mod:`.markers`, :mod:`.diagnostics`) and the
  intrinsics of a frame (:mod:`.camera_info`);
- :mod:`.settings` and :mod:`.parameters`: the nodes' parameters, declared once; :mod:`.parameter_docs`
  writes their table into the docs;
- :mod:`.conversions`: messages <-> arrays, intrinsics and poses (numpy, torch and roma only);
  :mod:`.qos` and :mod:`.tf_publisher`;
- :mod:`.igtl`: the OpenIGTLink bridge ``diffpose_igtl``;
- :mod:`.runtime`: running rclpy, the package's data and the large-frame Fast DDS profiles.
"""
