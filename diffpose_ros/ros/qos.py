"""The QoS profiles of the nodes' topics (``rclpy.qos`` is imported where a profile is built).

- :func:`input_qos`: camera inputs (``image``, ``camera_info``);
- :func:`tf_qos`: ``/tf`` as tf2 publishes and subscribes it;
- :func:`latched_qos`: reliable and transient local, so a late subscriber gets the last ``depth``
  messages (``/tf_static``, ``~/markers``).
"""

from __future__ import annotations

__all__ = ["IMAGE_QOS", "input_qos", "latched_qos", "tf_qos"]

IMAGE_QOS = ("sensor_data", "reliable")
"""The values of the nodes' ``image_qos`` parameter: the sensor-data profile (best effort) or reliable."""


def input_qos(reliable: bool, depth: int):
    """Keep the last ``depth``, volatile; best effort (the sensor-data profile, which also receives
    from reliable publishers) unless ``reliable``."""
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

    reliability = ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT
    return QoSProfile(
        depth=depth, history=HistoryPolicy.KEEP_LAST, reliability=reliability, durability=DurabilityPolicy.VOLATILE
    )


def tf_qos():
    """``/tf``: reliable, depth 100 (tf2's)."""
    from rclpy.qos import QoSProfile, ReliabilityPolicy

    return QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)


def latched_qos(depth: int = 1):
    """Reliable, transient local, keep the last ``depth``."""
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

    return QoSProfile(depth=depth, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
