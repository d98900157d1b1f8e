"""The evaluation video plays in a browser: H.264 in MP4, opened by headless Chromium in an
HTML <video> element until readyState reaches HAVE_ENOUGH_DATA (4).

Chromium is Debian's `chromium` package; the test setup installs it when it is absent
(as root with apt), and skips only where it cannot be installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from tdnet_ros.classes import CLASS_COLORS, CLASS_NAMES
from tdnet_ros.evaluation.video import EvaluationVideoWriter

PAGE = """<html><head><title>pending</title></head><body>
<video id="v" muted preload="auto" src="{video}"></video>
<script>
const v = document.getElementById('v');
function report() {{
  document.title = 'readyState=' + v.readyState + ' error=' + (v.error ? v.error.code : 'none') +
    ' size=' + v.videoWidth + 'x' + v.videoHeight;
}}
['loadeddata', 'canplay', 'canplaythrough', 'error'].forEach(e => v.addEventListener(e, report));
</script></body></html>
"""


@pytest.fixture(scope="module")
def chromium() -> str:
    found = shutil.which("chromium")
    if found is None and shutil.which("apt-get") and Path("/proc/self").exists():
        import os

        if os.geteuid() == 0:
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
            subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], env=env, capture_output=True,
                           timeout=900)
            found = shutil.which("chromium")
    if found is None:
        pytest.skip("chromium is not installed and cannot be installed here (needs root and apt)")
    return found


def browser_state(chromium: str, video: Path) -> str:
    page = video.with_suffix(".html")
    page.write_text(PAGE.format(video=video.name))
    result = subprocess.run(
        [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
         "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    match = re.search(r"<title>([^<]*)</title>", result.stdout)
    assert match, result.stderr[-2000:]
    return match.group(1)


def write_video(path: Path, frames: int = 12) -> Path:
    from tdnet_ros.data import generate_sequence

    writer = EvaluationVideoWriter(path, np.asarray(CLASS_COLORS, np.uint8), tuple(CLASS_NAMES))
    for index, frame in enumerate(generate_sequence(3, frames, 256, 128)):
        truth = frame.labels if index % 4 else None  # frames without ground truth too
        writer.add(frame.rgb, frame.labels, truth, f"frame {index}")
    assert writer.close() == path
    return path


def test_the_evaluation_video_is_h264_and_plays_in_chromium(chromium, tmp_path):
    import av

    video = write_video(tmp_path / "overlay.mp4")
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.frames == 12
        # three panels side by side: camera | ground truth | prediction
        assert stream.width == 3 * 256
    assert browser_state(chromium, video).startswith("readyState=4 error=none size=768x")


def test_the_browser_check_fails_for_the_old_mpeg4_part2_video(chromium, tmp_path):
    """The same check on what the project wrote before (OpenCV's mp4v): it does not play."""
    path = tmp_path / "mp4v.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (256, 128))
    for value in range(10):
        writer.write(np.full((128, 256, 3), value * 20, np.uint8))
    writer.release()
    assert not browser_state(chromium, path).startswith("readyState=4")


def test_the_frame_shows_a_legend_of_the_classes_present(tmp_path):
    writer = EvaluationVideoWriter(tmp_path / "x.mp4", np.asarray(CLASS_COLORS, np.uint8), tuple(CLASS_NAMES))
    frame = np.zeros((128, 256, 3), np.uint8)
    labels = np.zeros((128, 256), np.uint8)
    labels[:, 128:] = 13  # road and car
    image = writer.compose(frame, labels, labels, "frame 0")
    legend = image[28 + 128:]  # below the caption line and the panels
    colours = {tuple(c) for c in legend.reshape(-1, 3)}
    assert tuple(CLASS_COLORS[0]) in colours and tuple(CLASS_COLORS[13]) in colours
    assert tuple(CLASS_COLORS[11]) not in colours  # person is absent from both
