"""The ROS 2 layer of diffpose_ros: message conversions and the ``diffpose_node`` lifecycle node.

:mod:`.conversions` needs only numpy/torch (message classes are passed in or imported lazily);
:mod:`.node` needs ``rclpy`` and the message packages.
"""
