"""Users' mistakes get one line naming the thing at fault and exit code 2 (console scripts)
or a warning (node parameters), never a traceback."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tdnet_ros.ros.testing import make_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("errors") / "tiny.pt")


@pytest.fixture(scope="module")
def bag(tmp_path_factory) -> Path:
    from tdnet_ros.data import generate_sequence, write_rosbag

    path = tmp_path_factory.mktemp("bag") / "street"
    write_rosbag(generate_sequence(4, 3, 64, 32), path, storage="mcap")
    return path


def one_error_line(main, argv: list[str], capsys) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, (code, captured.err)
    lines = [line for line in captured.err.strip().splitlines() if line]
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present")
def test_cuda_without_cuda(bag, capsys):
    from tdnet_ros.cli.bench import main as bench
    from tdnet_ros.data.writers import IMAGE_TOPIC
    from tdnet_ros.cli.evaluate import main as evaluate

    line = one_error_line(evaluate, [str(bag), "--image-topic", IMAGE_TOPIC, "--device", "cuda"], capsys)
    assert "device 'cuda' was requested but CUDA is not available" in line
    line = one_error_line(bench, ["--device", "cuda"], capsys)
    assert line.startswith("tdnet-bench: error:") and "CUDA is not available" in line


def test_tdnet_bench_unknown_model_names_the_known_ones(capsys):
    from tdnet_ros.cli.bench import main as bench

    with pytest.raises(SystemExit) as caught:  # argparse: usage line, then the error
        bench(["--model", "foo"])
    err = capsys.readouterr().err
    assert caught.value.code == 2 and "invalid choice: 'foo'" in err and "td4-psp18" in err
    assert "Traceback" not in err


def test_tdnet_bench_prints_json_only_when_asked(checkpoint, tmp_path, capsys):
    from tdnet_ros.cli.bench import main as bench

    assert bench(["--model", "td4-tiny", "--size", "64x128", "--frames", "2", "--warmup", "1"]) == 0
    assert "{" not in capsys.readouterr().out
    out = tmp_path / "rows.json"
    assert bench(["--model", "td4-tiny", "--size", "64x128", "--frames", "2", "--warmup", "1", "--json", str(out)]) == 0
    assert out.read_text().lstrip().startswith("[")


def test_tdnet_eval_model_without_checkpoint_is_refused(bag, capsys):
    from tdnet_ros.data.writers import IMAGE_TOPIC
    from tdnet_ros.cli.evaluate import main as evaluate

    line = one_error_line(evaluate, [str(bag), "--image-topic", IMAGE_TOPIC, "--model", "td4-psp18"], capsys)
    assert "--model td4-psp18 needs --checkpoint" in line


def test_tdnet_eval_label_topic_missing_lists_the_topics(bag, checkpoint, tmp_path, capsys):
    from tdnet_ros.data.writers import IMAGE_TOPIC
    from tdnet_ros.cli.evaluate import main as evaluate

    code = evaluate([str(bag), "--image-topic", IMAGE_TOPIC, "--label-topic", "/camera/label",
                     "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "label topic '/camera/label' is not in recording" in err
    assert "/camera/labels" in err and "Traceback" not in err  # the recording's topics listed
    assert not (tmp_path / "out").exists()


def test_tdnet_demo_bad_checkpoint_fails_before_rendering(tmp_path, capsys):
    from tdnet_ros.cli.demo import main as demo

    line = one_error_line(demo, ["--checkpoint", "/nope.pt", "--out", str(tmp_path / "demo")], capsys)
    assert line == "tdnet-demo: error: --checkpoint: checkpoint file not found: /nope.pt"
    assert not (tmp_path / "demo" / "street").exists()


def test_tdnet_demo_bad_input_size_names_the_flag(tmp_path, capsys):
    from tdnet_ros.cli.demo import main as demo

    with pytest.raises(SystemExit) as caught:  # argparse: usage line, then the error
        demo(["--input-size", "8x8", "--out", str(tmp_path / "demo")])
    err = capsys.readouterr().err
    assert caught.value.code == 2 and "argument --input-size: '8x8'" in err and "16..8192" in err
    assert "Traceback" not in err and not (tmp_path / "demo").exists()


def test_tdnet_demo_bad_scales_name_the_flag(tmp_path, capsys):
    from tdnet_ros.cli.demo import main as demo

    with pytest.raises(SystemExit) as caught:
        demo(["--scales", "2", "--out", str(tmp_path / "demo")])
    err = capsys.readouterr().err
    assert caught.value.code == 2 and "argument --scales: scales must start with 1.0" in err
    assert "Traceback" not in err and not (tmp_path / "demo").exists()


@pytest.mark.parametrize("command", ["tdnet-demo", "tdnet-eval", "tdnet-bench"])
def test_help_texts_show_every_default(command):
    result = subprocess.run([str(Path(sys.executable).parent / command), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "default" in result.stdout
    if command == "tdnet-eval":
        assert "--label-topic always" in " ".join(result.stdout.split())
    if command == "tdnet-bench":
        assert "\\\n" not in result.stdout  # the examples read as commands, no stray continuations


def test_segmenter_node_help_prints_the_parameters_and_exits():
    pytest.importorskip("rclpy")
    result = subprocess.run([str(Path(sys.executable).parent / "segmenter_node"), "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "qos_reliability [auto]" in result.stdout
    assert "reset_period_factor [5.0]" in result.stdout and "ready:" not in result.stdout + result.stderr


def test_unknown_parameters_are_warned_and_integers_taken_for_doubles(checkpoint, tmp_path):
    pytest.importorskip("rclpy")
    from tdnet_ros.ros.testing import NodeProcess, pick_domain_id

    wrong_node = tmp_path / "wrong.yaml"
    wrong_node.write_text("/camera_driver:\n  ros__parameters:\n    device: cpu\n")
    node = NodeProcess(["-p", f"checkpoint:={checkpoint}", "-p", "device:=cpu", "-p", "devcie:=cpu",
                        "-p", "overlay_alpha:=1", "--params-file", str(wrong_node)],
                       domain_id=pick_domain_id(), log_path=tmp_path / "node.log")
    try:
        deadline = time.monotonic() + 60
        while "ready:" not in node.log():
            assert node.alive() and time.monotonic() < deadline, node.log()
            time.sleep(0.1)
        log = node.log()
        assert log.count("parameter 'devcie' is not a parameter of this node and is ignored; "
                         "did you mean 'device'?") == 1
        assert f"parameter file '{wrong_node}' has no section for this node (/segmenter_node" in log
        assert "overlay_alpha" not in log  # an integer for a double is taken silently
    finally:
        node.stop()
        node.kill()
