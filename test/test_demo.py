"""The one-command demo, end to end: generator -> bag -> live node over DDS -> report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tdnet_ros import ModelConfig, build_model, save_checkpoint
from tdnet_ros.ros.testing import pick_domain_id


def test_demo_writes_report_plots_and_video(tmp_path):
    """Also: --input-size reaches the node's evaluation (the tiny model's own size is 256x512)."""
    checkpoint = save_checkpoint(build_model(ModelConfig.from_name("td4-tiny", input_size=(256, 512))), tmp_path / "tiny.pt")
    out = tmp_path / "demo"
    env = dict(os.environ, ROS_DOMAIN_ID=str(pick_domain_id()))
    completed = subprocess.run(
        [sys.executable, "-m", "tdnet_ros.cli.demo", "--frames", "12", "--checkpoint", str(checkpoint),
         "--out", str(out), "--no-progress", "--input-size", "128X256"],
        capture_output=True, text=True, timeout=240, env=env,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = out / "report"
    for name in ("report.md", "results.json", "overlay.mp4", "per_class_iou.png", "latency_histogram.png", "per_frame.png"):
        assert (report / name).stat().st_size > 0, name
    results = json.loads((report / "results.json").read_text())
    assert results["frames"] + results["dropped_frames"] == 12
    assert results["frames"] > 0 and 0.0 <= results["miou"] <= 100.0
    assert "--input-size 128x256" in results["command"]
    assert "output folder" in completed.stdout and str(out.resolve()) in completed.stdout


def test_demo_without_model_names_the_missing_checkpoint(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "tdnet_ros.cli.demo", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "d"), "--frames", "2", "--no-progress"],
        capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode != 0
    assert "missing.pt" in completed.stderr


def test_test_domains_stay_below_the_ephemeral_ports():
    """Fast DDS's unicast user-data port for participant p of domain d is 7400 + 250 d + 11 +
    2 p; Linux hands out ephemeral ports from 32768, so a test domain must keep at least its
    first 50 participants' ports below that."""
    domains = {pick_domain_id() for _ in range(2000)}
    assert min(domains) >= 1 and len(domains) > 50
    assert all(7400 + 250 * d + 11 + 2 * 49 < 32768 for d in domains)
