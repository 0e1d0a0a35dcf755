"""The launch file and the parameter file.

``launch``/``launch_ros`` are not on PyPI (PyPI's ``launch`` is an unrelated program), so here the
launch file is checked statically with ``ast``; where ``launch_ros`` imports (a ROS 2 install) it is
also executed. ``config/diffpose.yaml`` must only hold parameters the node declares.
"""

from __future__ import annotations

import ast
import importlib.util

import pytest
import yaml
from ros_harness import CONFIG_YAML, REPO, flatten_parameters, rclpy_context, ros_disabled

LAUNCH_FILE = REPO / "launch" / "diffpose.launch.py"
ARGUMENTS = {
    "params_file", "patient_model", "image_topic", "camera_info_topic", "use_sim_time", "autostart", "igtl",
    "igtl_port", "igtl_connect", "rviz",
}  # fmt: skip


def _tree():
    return ast.parse(LAUNCH_FILE.read_text(), filename=str(LAUNCH_FILE))


def _calls(tree, name):
    return [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and getattr(n.func, "id", getattr(n.func, "attr", None)) == name
    ]


def _module_constants() -> dict:
    """Module-level ``NAME = 'literal'`` assignments of the launch file."""
    out = {}
    for n in _tree().body:
        if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant):
            for target in n.targets:
                if isinstance(target, ast.Name):
                    out[target.id] = n.value.value
    return out


def _const(node):
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return _module_constants().get(node.id)
    return None


def test_launch_file_declares_the_arguments():
    tree = _tree()
    declared = {_const(c.args[0]) for c in _calls(tree, "DeclareLaunchArgument")}
    assert ARGUMENTS <= declared, ARGUMENTS - declared
    # Every LaunchConfiguration used is declared.
    used = {_const(c.args[0]) for c in _calls(tree, "LaunchConfiguration")}
    assert used <= declared, used - declared
    assert any(isinstance(n, ast.FunctionDef) and n.name == "generate_launch_description" for n in tree.body)
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert {"LaunchDescription", "DeclareLaunchArgument", "LaunchConfiguration", "LifecycleNode"} <= imported


def test_launch_file_node_and_remappings():
    tree = _tree()
    (node,) = _calls(tree, "LifecycleNode")
    kw = {k.arg: k.value for k in node.keywords}
    assert _const(kw["package"]) == "diffpose_ros" and _const(kw["executable"]) == "diffpose_node"
    assert _const(kw["name"]) == "diffpose_node" and "namespace" in kw
    remaps = {}
    for pair in kw["remappings"].elts:
        source, target = pair.elts
        assert _calls(target, "LaunchConfiguration") or isinstance(target, ast.Call)
        remaps[_const(source)] = _const(target.args[0])
    assert remaps == {"image": "image_topic", "camera_info": "camera_info_topic"}
    # The parameter file comes first, the overrides (patient_model, autostart, use_sim_time) after it.
    params = kw["parameters"].elts
    assert _const(params[0].args[0]) == "params_file"
    source = LAUNCH_FILE.read_text()
    for key in ('"autostart"', '"use_sim_time"', '"patient_model"'):  # ruff format's double quotes
        assert f"overrides[{key}]" in source or f"{key}:" in source, key
    # The default params_file is the installed package share (ament index).
    (default,) = [
        k.value
        for c in _calls(tree, "DeclareLaunchArgument")
        if _const(c.args[0]) == "params_file"
        for k in c.keywords
        if k.arg == "default_value"
    ]
    assert _calls(default, "FindPackageShare") and "diffpose.yaml" in ast.unparse(default)


def test_setup_installs_launch_and_config():
    setup = (REPO / "setup.py").read_text()
    assert "launch/*.launch.py" in setup and "config/*.yaml" in setup and "config/*.rviz" in setup
    assert "diffpose_node = diffpose_ros.ros.node:main" in setup
    for script in ("diffpose_igtl", "diffpose-igtl"):
        assert f"{script} = diffpose_ros.ros.igtl.node:main" in setup


def _node_keywords(executable: str) -> dict:
    """The keywords of the launch file's one ``Node(...)`` of ``executable``."""
    nodes = [{k.arg: k.value for k in n.keywords} for n in _calls(_tree(), "Node")]
    (kw,) = [kw for kw in nodes if _const(kw["executable"]) == executable]
    return kw


def test_launch_file_starts_the_bridge_with_igtl():
    kw = _node_keywords("diffpose_igtl")
    assert _const(kw["name"]) == "diffpose_igtl"
    remaps = {_const(pair.elts[0]) for pair in kw["remappings"].elts}
    assert remaps == {"image", "camera_info", "/diffpose_node/status"}
    assert _const(kw["parameters"].elts[0].args[0]) == "params_file"  # mirror etc. as the node's
    source = LAUNCH_FILE.read_text()
    assert 'LaunchConfiguration("igtl").perform(context)' in source


def test_launch_file_starts_rviz_with_the_package_config():
    kw = _node_keywords("rviz2")
    assert _const(kw["package"]) == "rviz2" and "namespace" in kw
    flag, config = kw["arguments"].elts
    assert _const(flag) == "-d" and _calls(config, "FindPackageShare") and "diffpose.rviz" in ast.unparse(config)
    remaps = {_const(pair.elts[0]): _const(pair.elts[1]) for pair in kw["remappings"].elts}
    assert remaps == {
        "/diffpose_node/markers": "diffpose_node/markers",
        "/diffpose_node/overlay": "diffpose_node/overlay",
    }
    assert 'LaunchConfiguration("rviz").perform(context)' in LAUNCH_FILE.read_text()


@pytest.mark.dds
def test_launch_file_runs_where_launch_ros_imports(tmp_path):
    if importlib.util.find_spec("launch_ros") is None or importlib.util.find_spec("launch") is None:
        pytest.skip(
            "launch_ros is not installed here (not on PyPI; it comes with a ROS 2 install): "
            "the launch file is only checked statically"
        )
    from launch import LaunchContext, LaunchDescription
    from launch.actions import DeclareLaunchArgument, OpaqueFunction

    spec = importlib.util.spec_from_file_location("diffpose_launch", LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    description = module.generate_launch_description()
    assert isinstance(description, LaunchDescription)
    names = {e.name for e in description.entities if isinstance(e, DeclareLaunchArgument)}
    assert ARGUMENTS <= names
    (opaque,) = [e for e in description.entities if isinstance(e, OpaqueFunction)]
    context = LaunchContext()
    context.launch_configurations.update(
        {
            "params_file": str(CONFIG_YAML),
            "patient_model": str(tmp_path / "m.safetensors"),
            "image_topic": "/x/image",
            "camera_info_topic": "/x/camera_info",
            "use_sim_time": "true",
            "autostart": "true",
            "namespace": "",
            "log_level": "info",
            "fastdds_profile": "",
            "igtl": "false",
            "igtl_port": "18944",
            "igtl_connect": "",
            "rviz": "false",
        }
    )
    (node,) = opaque.execute(context)
    assert type(node).__name__ == "LifecycleNode"
    context.launch_configurations["igtl"] = "true"
    node, bridge = opaque.execute(context)
    assert type(bridge).__name__ == "Node"
    context.launch_configurations["rviz"] = "true"
    node, bridge, rviz = opaque.execute(context)
    assert type(rviz).__name__ == "Node"


def test_config_yaml_holds_declared_parameters_only():
    """Every value of ``config/diffpose.yaml`` is a parameter of ``diffpose_node`` at its default, and the
    launch file gives the bridge the same file: the names they share mean the same and agree."""
    from diffpose_ros.ros.igtl.bridge import BRIDGE_PARAMETERS
    from diffpose_ros.ros.settings import PARAMETERS

    doc = yaml.safe_load(CONFIG_YAML.read_text())
    assert list(doc) == ["/**"] and list(doc["/**"]) == ["ros__parameters"]
    values = dict(flatten_parameters(doc["/**"]["ros__parameters"]))
    node = {p.name: p for p in PARAMETERS}
    assert set(values) <= set(node), set(values) - set(node)
    for name, value in values.items():  # the YAML shows the defaults, of the parameter's type
        assert value == node[name].default and not node[name].problem(value), name
    shared = [p for p in BRIDGE_PARAMETERS if p.name in node]
    assert {p.name for p in shared} == {"mirror", "camera_frame", "ct_frame", "ct_ras_frame", "image_qos"}
    for p in shared:
        assert (p.default, p.choices) == (node[p.name].default, node[p.name].choices), p.name


@pytest.mark.dds
def test_node_declares_the_table(monkeypatch):
    """``diffpose_node`` declares exactly its table's parameters (and the ones rclpy adds)."""
    if ros_disabled():
        pytest.skip("DIFFPOSE_NO_ROS=1")
    import rclpy

    from diffpose_ros.ros.node import DiffPoseNode
    from diffpose_ros.ros.settings import PARAMETERS

    with rclpy_context(monkeypatch) as context:
        plain = rclpy.create_node("diffpose_plain_node", context=context)
        own = set(plain.list_parameters([], 0).names)  # what rclpy declares on every node
        plain.destroy_node()
        node = DiffPoseNode(context=context)
        try:
            assert set(node.list_parameters([], 0).names) - own == {p.name for p in PARAMETERS}
            for p in PARAMETERS:
                value = node.get_parameter(p.name).value
                assert value == (None if p.default == () else p.default), p.name
        finally:
            node.destroy_node()


def test_docs_parameter_table_is_generated_from_the_declarations():
    """``docs/node.md``'s table between the markers is :func:`markdown_table`'s (rewrite it with
    ``python -m diffpose_ros.ros.parameter_docs docs/node.md``)."""
    from diffpose_ros.ros.parameter_docs import BEGIN, END, NODES, markdown_table, with_table

    table = markdown_table()
    for node, parameters in NODES.items():
        assert f"`{node}`" in table
        assert all(f"| `{p.name}` |" in table for p in parameters), node
    docs = REPO / "docs" / "node.md"
    assert docs.is_file(), "docs/node.md is missing"
    text = docs.read_text(encoding="utf-8")
    assert BEGIN in text and END in text, f"docs/node.md has no {BEGIN} ... {END} block"
    assert with_table(text) == text, "docs/node.md's parameter table is out of date: python -m " + (
        "diffpose_ros.ros.parameter_docs docs/node.md"
    )
