"""``diffpose_igtl``: diffpose_node's poses, frames and validity for navigators over OpenIGTLink.

    diffpose-igtl --ros-args -p port:=18944 -r image:=/carm/image_raw -r camera_info:=/carm/camera_info
    ros2 run diffpose_ros diffpose_igtl --ros-args -p connect:=navigator:18944 ...

Serves OpenIGTLink on ``port`` (any number of clients: 3D Slicer's OpenIGTLinkIF, PLUS-style tools),
or connects to a navigator's server at ``connect:=HOST:PORT`` and reconnects when it goes away.
Follows ``diffpose_node``: ``/tf`` (``ct`` -> the image's frame), ``/tf_static`` (``ct`` ->
``ct_ras``), its ``~/status`` (subscribed as ``/diffpose_node/status``: remap that name for another
node or namespace), ``image`` and ``camera_info`` (sensor-data QoS, or ``image_qos: reliable``). What
it sends is in :mod:`.bridge`; parameters in :data:`~.bridge.BRIDGE_PARAMETERS`. Sockets are served
by threads of their own (:mod:`.link`), so no client can stall the ROS callbacks.
"""

from __future__ import annotations

import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import String
from tf2_msgs.msg import TFMessage

from diffpose_ros.ros.parameters import declare_parameters, parameter_values
from diffpose_ros.ros.qos import input_qos, latched_qos, tf_qos
from diffpose_ros.ros.runtime import NODE_PROFILE_NAME, use_large_frame_profile

from .bridge import BRIDGE_PARAMETERS, Bridge, BridgeSettings
from .link import IgtlClient, IgtlServer, parse_endpoint

__all__ = ["FOLLOWING", "IgtlNode", "main"]

NODE_NAME = "diffpose_igtl"
STATUS_TOPIC = "/diffpose_node/status"
TICK_S = 0.05
FOLLOWING = "following diffpose_node"
"""Start of the line logged once ``~/status`` and ``/tf`` each have a matched publisher: from then on
the node's poses reach the bridge (DDS delivers nothing a writer sent before the match)."""


class IgtlNode(Node):
    """The node ``diffpose_igtl`` (see the module docstring)."""

    def __init__(self, node_name: str = NODE_NAME, **kwargs):
        super().__init__(node_name, **kwargs)
        declare_parameters(self, BRIDGE_PARAMETERS)
        settings = BridgeSettings.from_parameters(parameter_values(self, BRIDGE_PARAMETERS))
        problems = settings.problems()
        if problems:
            raise ValueError("invalid parameters: " + "; ".join(problems))
        if settings.connect:
            self.link = IgtlClient(*parse_endpoint(settings.connect))
        else:
            self.link = IgtlServer(settings.port, settings.address)
        clock = self.get_clock()
        self.bridge = Bridge(settings, self.link.send, now_ns=lambda: clock.now().nanoseconds, logger=self.get_logger())

        reliable = settings.image_qos == "reliable"
        self.create_subscription(Image, "image", self.bridge.on_image, input_qos(reliable, 5))
        self.create_subscription(CameraInfo, "camera_info", self.bridge.on_camera_info, input_qos(reliable, 10))
        static_qos = latched_qos(100)
        self.create_subscription(TFMessage, "/tf_static", lambda m: self.bridge.on_tf(m, static=True), static_qos)
        self._followed = {
            "/tf": self.create_subscription(TFMessage, "/tf", self.bridge.on_tf, tf_qos()),
            STATUS_TOPIC: self.create_subscription(
                String, STATUS_TOPIC, lambda m: self.bridge.on_status(m.data), latched_qos()
            ),
        }
        self._following = False
        self.create_timer(TICK_S, self._tick)
        self.get_logger().info(
            f"{self.link.describe()}; devices {settings.transform_device}, {settings.image_device}, "
            f"{settings.status_device}; stale after {settings.stale_after_s:g} s"
        )

    def _tick(self) -> None:
        self.bridge.tick()
        following = all(sub.get_publisher_count() > 0 for sub in self._followed.values())
        if following != self._following:
            self._following = following
            topics = " and ".join(self._followed)
            if following:
                self.get_logger().info(f"{FOLLOWING}: {topics} matched")
            else:
                self.get_logger().warning(f"a publisher of {topics} is gone: waiting for diffpose_node")

    def close(self) -> None:
        self.link.close()


def main(args=None) -> int:
    """Entry point of ``diffpose_igtl`` (``ros2 run diffpose_ros diffpose_igtl``, ``diffpose-igtl``)."""
    use_large_frame_profile(NODE_PROFILE_NAME)
    rclpy.init(args=args)
    node = None
    try:
        node = IgtlNode()
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Exception:
        if rclpy.ok():
            raise
    finally:
        if node is not None:
            node.close()
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
