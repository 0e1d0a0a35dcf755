"""Launch diffpose_node (a lifecycle node) with its parameter file and topic remappings.

    ros2 launch diffpose_ros diffpose.launch.py patient_model:=/path/model.safetensors \\
        image_topic:=/carm/image_raw camera_info_topic:=/carm/camera_info

Arguments: ``params_file`` (default: the package's ``config/diffpose.yaml``), ``patient_model``
(overrides the file's value when given), ``image_topic``, ``camera_info_topic``, ``use_sim_time``,
``autostart`` (configure + activate at start; otherwise drive the node with
``ros2 lifecycle set /diffpose_node configure`` / ``activate``), ``namespace``, ``log_level`` and
``fastdds_profile`` (a Fast DDS XML profile; empty: the nodes use the package's
``config/fastdds_node.xml``, found in the package's share directory, unless
``FASTDDS_DEFAULT_PROFILES_FILE`` is set; with it a publisher on Fast DDS's defaults gets large
frames to them, given ``net.core.rmem_max`` of 4 MiB or more).

``igtl:=true`` also starts the OpenIGTLink bridge ``diffpose_igtl`` next to the node, with the same
parameter file (so ``mirror``, ``camera_frame``, ``ct_frame``, ``ct_ras_frame`` and ``image_qos``
agree), the same image topics, and ``igtl_port`` (default 18944) or ``igtl_connect:=HOST:PORT``.

``rviz:=true`` also starts ``rviz2`` with the package's ``config/diffpose.rviz`` (fixed frame ``ct``:
TF, the node's ``~/markers`` and ``~/overlay``), in the same namespace.
"""

import os

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import LifecycleNode, Node
from launch_ros.substitutions import FindPackageShare

PACKAGE = "diffpose_ros"


def _true(text):
    return str(text).strip().lower() in ("1", "true", "yes", "on")


def _node(context, *args, **kwargs):
    overrides = {
        "autostart": _true(LaunchConfiguration("autostart").perform(context)),
        "use_sim_time": _true(LaunchConfiguration("use_sim_time").perform(context)),
    }
    patient_model = LaunchConfiguration("patient_model").perform(context)
    if patient_model:  # else the params file's value stands
        overrides["patient_model"] = os.path.abspath(os.path.expanduser(patient_model))
    env = {}
    profile = LaunchConfiguration("fastdds_profile").perform(context)
    if profile:
        env["FASTDDS_DEFAULT_PROFILES_FILE"] = os.path.abspath(os.path.expanduser(profile))
    node = LifecycleNode(
        package=PACKAGE,
        executable="diffpose_node",
        name="diffpose_node",
        namespace=LaunchConfiguration("namespace"),
        output="screen",
        emulate_tty=True,
        parameters=[LaunchConfiguration("params_file"), overrides],
        remappings=[
            ("image", LaunchConfiguration("image_topic")),
            ("camera_info", LaunchConfiguration("camera_info_topic")),
        ],
        ros_arguments=["--log-level", LaunchConfiguration("log_level")],
        additional_env=env or None,
    )
    actions = [node]
    if _true(LaunchConfiguration("igtl").perform(context)):
        actions.append(_bridge(context, overrides["use_sim_time"], env))
    if _true(LaunchConfiguration("rviz").perform(context)):
        actions.append(_rviz(overrides["use_sim_time"]))
    return actions


def _bridge(context, use_sim_time, env):
    return Node(
        package=PACKAGE,
        executable="diffpose_igtl",
        name="diffpose_igtl",
        namespace=LaunchConfiguration("namespace"),
        output="screen",
        emulate_tty=True,
        parameters=[
            LaunchConfiguration("params_file"),
            {
                "port": int(LaunchConfiguration("igtl_port").perform(context)),
                "connect": LaunchConfiguration("igtl_connect").perform(context),
                "use_sim_time": use_sim_time,
            },
        ],
        remappings=[
            ("image", LaunchConfiguration("image_topic")),
            ("camera_info", LaunchConfiguration("camera_info_topic")),
            ("/diffpose_node/status", "diffpose_node/status"),  # the node's, in the same namespace
        ],
        ros_arguments=["--log-level", LaunchConfiguration("log_level")],
        additional_env=env or None,
    )


def _rviz(use_sim_time):
    return Node(
        package="rviz2",
        executable="rviz2",
        name="rviz2",
        namespace=LaunchConfiguration("namespace"),
        output="screen",
        arguments=["-d", PathJoinSubstitution([FindPackageShare(PACKAGE), "config", "diffpose.rviz"])],
        parameters=[{"use_sim_time": use_sim_time}],
        remappings=[  # the config's absolute topics, to the node's in the same namespace
            ("/diffpose_node/markers", "diffpose_node/markers"),
            ("/diffpose_node/overlay", "diffpose_node/overlay"),
        ],
    )


def generate_launch_description():
    return LaunchDescription(
        [
            DeclareLaunchArgument(
                "params_file",
                default_value=PathJoinSubstitution([FindPackageShare(PACKAGE), "config", "diffpose.yaml"]),
                description="YAML parameter file (/**: ros__parameters:)",
            ),
            DeclareLaunchArgument(
                "patient_model",
                default_value="",
                description="patient model file (.safetensors); empty: the value in params_file",
            ),
            DeclareLaunchArgument(
                "image_topic", default_value="image", description="fluoroscopy image topic (sensor_msgs/Image)"
            ),
            DeclareLaunchArgument(
                "camera_info_topic",
                default_value="camera_info",
                description="camera_info topic paired with the images by stamp",
            ),
            DeclareLaunchArgument("use_sim_time", default_value="false", description="use /clock (bag replay)"),
            DeclareLaunchArgument(
                "autostart", default_value="true", description="configure and activate the lifecycle node at start"
            ),
            DeclareLaunchArgument("namespace", default_value="", description="namespace of the node"),
            DeclareLaunchArgument(
                "log_level", default_value="info", description="logging level (debug, info, warn, error)"
            ),
            DeclareLaunchArgument(
                "fastdds_profile",
                default_value="",
                description="Fast DDS XML profile (empty: the package's large-frame one, unless the env names one)",
            ),
            DeclareLaunchArgument(
                "igtl", default_value="false", description="also start the OpenIGTLink bridge diffpose_igtl"
            ),
            DeclareLaunchArgument("igtl_port", default_value="18944", description="OpenIGTLink server port"),
            DeclareLaunchArgument(
                "igtl_connect", default_value="", description="HOST:PORT of a navigator's server (empty: serve)"
            ),
            DeclareLaunchArgument(
                "rviz", default_value="false", description="also start rviz2 with the package's config/diffpose.rviz"
            ),
            OpaqueFunction(function=_node),
        ]
    )
