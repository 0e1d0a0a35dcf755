"""diffpose-make-bag --from-dicom: a DICOM cine file or a folder series becomes a bag whose frames,
stamps and camera_info are those of the file, and that the node's own conversions turn into the
frames a DRR at the true pose matches."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from ros_harness import ros_disabled

if ros_disabled():
    pytest.skip("DIFFPOSE_NO_ROS=1: ROS 2 tests skipped", allow_module_level=True)
pytest.importorskip("pydicom")

from dicom_files import write_dicom

from diffpose_ros.bags.bagfile import bag_topics, decode, read_messages  # noqa: E402
from diffpose_ros.cli import make_bag  # noqa: E402
from diffpose_ros.core.geometry.camera import Intrinsics, carm_pose  # noqa: E402
from diffpose_ros.core.registration.similarity import ncc  # noqa: E402
from diffpose_ros.core.rendering.renderer import Renderer  # noqa: E402
from diffpose_ros.core.rendering.volume import default_ct_path, hu_to_mu, load_ct  # noqa: E402
from diffpose_ros.core.simulation.detector import simulate_transmission  # noqa: E402
from diffpose_ros.ros.conversions import camera_info_to_intrinsics, image_to_frame, image_to_numpy  # noqa: E402

ACQUIRED_NS = 1741947300_250000000  # 2025-03-14 10:15:00.25 UTC


def read_bag(path: Path) -> dict[str, list]:
    by_topic: dict[str, list] = {}
    for topic, msgtype, t_ns, cdr in read_messages(path):
        by_topic.setdefault(topic, []).append((t_ns, decode(cdr, msgtype)))
    return by_topic


def stamp_ns(msg) -> int:
    return msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec


def test_cine_file_becomes_a_bag_of_its_frames_times_and_camera(tmp_path, capsys):
    hu = load_ct(default_ct_path())
    k = Intrinsics.from_detector(1020.0, 96, 80, (2.4, 2.0))  # dx 2.4 mm, dy 2.0 mm
    iso = hu.center + torch.tensor([10.0, -5.0, 8.0], dtype=torch.float64)
    poses = [carm_pose(math.radians(a), 0.0, 0.0, 760.0, iso) for a in (10, 14, 18)]
    renderer = Renderer(hu_to_mu(hu))
    rng = np.random.default_rng(1)
    with torch.no_grad():
        drrs = [renderer.render(T, k) for T in poses]
    frames = np.stack([simulate_transmission(L, 1e4, dtype="uint8", rng=rng) for L in drrs])
    tags = dict(
        DistanceSourceToDetector=1020.0,
        ImagerPixelSpacing=[2.0, 2.4],
        FrameTimeVector=[0, 100, 150],
        AcquisitionDateTime="20250314111500.25",
        TimezoneOffsetFromUTC="+0100",
    )
    write_dicom(tmp_path / "cine.dcm", frames, "XA", tags=tags)
    assert make_bag.main(["--from-dicom", str(tmp_path / "cine.dcm"), "--out", str(tmp_path / "bag")]) == 0
    assert "3 frame(s)" in capsys.readouterr().out
    topics = bag_topics(tmp_path / "bag")
    assert {t: (i.msgtype, i.count) for t, i in topics.items()} == {
        "/carm/image_raw": ("sensor_msgs/msg/Image", 3),
        "/carm/camera_info": ("sensor_msgs/msg/CameraInfo", 3),
        "/diffpose/scene": ("std_msgs/msg/String", 1),
    }
    assert topics["/diffpose/scene"].qos.transient_local
    bag = read_bag(tmp_path / "bag")
    images, infos = bag["/carm/image_raw"], bag["/carm/camera_info"]
    expected = [ACQUIRED_NS, ACQUIRED_NS + 100_000_000, ACQUIRED_NS + 250_000_000]
    assert [t for t, _ in images] == [stamp_ns(m) for _, m in images] == [stamp_ns(m) for _, m in infos] == expected
    for (_, img), (_, info), frame, L in zip(images, infos, frames, drrs):
        assert img.encoding == "mono8" and np.array_equal(image_to_numpy(img), frame)
        assert camera_info_to_intrinsics(info, img.width, img.height) == k
        # What the node does with the pair: a frame of line integrals that the DRR at the truth matches.
        prepared = image_to_frame(img, camera_info_to_intrinsics(info))
        assert float(ncc(prepared.image, L.float(), dims=2)) > 0.95
    scene = json.loads(bag["/diffpose/scene"][0][1].data)
    assert scene["modality"] == "XA" and scene["ground_truth"] is None and scene["timing"] == "DICOM tags"
    assert scene["frame_times_s"] == [0.0, 0.1, 0.25] and scene["detector"]["fx"] == pytest.approx(1020 / 2.4)


def test_series_folder_becomes_a_mono16_bag_stamped_by_acquisition_time(tmp_path):
    series = tmp_path / "series"
    series.mkdir()
    times = ["111500.25", "111500.75", "111501.25"]  # written out of order
    for i in (2, 0, 1):
        # DX 12-bit for presentation (bones bright): the bag carries 4095 - value (transmission polarity).
        frame = np.full((6, 8), 1000 + 100 * i, np.uint16)
        frame[0, 0] = 4000
        tags = dict(
            DistanceSourceToDetector=1100.0,
            ImagerPixelSpacing=[0.3, 0.3],
            InstanceNumber=i + 1,
            AcquisitionDate="20250314",
            AcquisitionTime=times[i],
        )
        write_dicom(series / f"IMG{5 - i}", frame, "DX", "MONOCHROME2", 12, "FOR PRESENTATION", tags=tags)
    out = tmp_path / "bag"
    assert make_bag.main(["--from-dicom", str(series), "--out", str(out), "--storage", "sqlite3"]) == 0
    bag = read_bag(out)
    images = bag["/carm/image_raw"]
    start = 1741950900_250000000  # 11:15:00.25, no UTC offset given: taken as UTC
    assert [stamp_ns(m) for _, m in images] == [start, start + 500_000_000, start + 1_000_000_000]
    for i, (_, img) in enumerate(images):
        pixels = image_to_numpy(img)
        assert img.encoding == "mono16" and pixels[0, 1] == 4095 - 1000 - 100 * i and pixels[0, 0] == 95
    info = bag["/carm/camera_info"][0][1]
    assert list(info.k) == pytest.approx([1100 / 0.3, 0, 3.5, 0, 1100 / 0.3, 2.5, 0, 0, 1])


def test_from_dicom_refusals(tmp_path, capsys):
    frame = np.arange(48, dtype=np.uint8).reshape(6, 8)
    bare = write_dicom(tmp_path / "bare.dcm", np.stack([frame, frame]), "XA")
    assert make_bag.main(["--from-dicom", str(bare), "--out", str(tmp_path / "b1")]) == 2
    assert "(0018,1110) DistanceSourceToDetector" in capsys.readouterr().err
    assert not (tmp_path / "b1").exists()
    # --camera-info supplies the geometry; no timing tags: frames 1 / --fps apart.
    Intrinsics.from_detector(1000.0, 8, 6, 0.5).to_yaml(tmp_path / "cam.yaml")
    args = ["--from-dicom", str(bare), "--camera-info", str(tmp_path / "cam.yaml"), "--fps", "4"]
    assert make_bag.main([*args, "--out", str(tmp_path / "b2")]) == 0
    stamps = [stamp_ns(m) for _, m in read_bag(tmp_path / "b2")["/carm/image_raw"]]
    assert np.diff(stamps).tolist() == [250_000_000]
    with pytest.raises(SystemExit):
        make_bag.main(["--from-dicom", str(bare), "--views", "2", "--out", str(tmp_path / "b3")])
    assert "--from-dicom bags a recorded run" in capsys.readouterr().err
