"""Sending transforms on ``/tf`` and ``/tf_static``: ``tf2_ros``'s broadcasters where a ROS 2 install
has them, else ``tf2_msgs/TFMessage`` with tf2's QoS (the PyPI wheels have no ``tf2_ros``); the
choice is made here and nowhere else."""

from __future__ import annotations

from .qos import latched_qos, tf_qos

__all__ = ["TransformPublisher"]


class TransformPublisher:
    """``send(tf)`` on ``/tf`` and ``send_static(tf)`` on ``/tf_static`` for ``node``
    (``geometry_msgs/TransformStamped``); :attr:`via` says how."""

    def __init__(self, node):
        try:  # a ROS 2 install has tf2_ros; the PyPI wheels do not
            import tf2_ros
        except ImportError:
            tf2_ros = None
        if tf2_ros is not None:  # pragma: no cover - ROS 2 install
            self.via = "tf2_ros"
            self._dynamic = tf2_ros.TransformBroadcaster(node)
            self._static = tf2_ros.StaticTransformBroadcaster(node)
            return
        from tf2_msgs.msg import TFMessage

        self.via = "tf2_msgs/TFMessage on /tf"
        self._dynamic = _RawBroadcaster(node.create_publisher(TFMessage, "/tf", tf_qos()), TFMessage)
        self._static = _RawBroadcaster(node.create_publisher(TFMessage, "/tf_static", latched_qos(1)), TFMessage)

    def send(self, transform) -> None:
        self._dynamic.sendTransform(transform)

    def send_static(self, transform) -> None:
        self._static.sendTransform(transform)


class _RawBroadcaster:
    """The ``sendTransform`` of a tf2_ros broadcaster over a plain ``TFMessage`` publisher."""

    def __init__(self, publisher, message_type):
        self._publisher, self._type = publisher, message_type

    def sendTransform(self, transform) -> None:  # tf2_ros's method name
        self._publisher.publish(self._type(transforms=[transform]))
