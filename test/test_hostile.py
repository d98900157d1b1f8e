"""Hostile and degenerate input: poisoned or degenerate checkpoints, files that are not
checkpoints, bad parameter files and class tables, colliding camera lists. Each is provoked
for real (the node as its own process, the loaders in this one) and must give one clear
line naming the thing at fault, never a traceback, and never run code from a file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tdnet_ros import CheckpointError, Segmenter
from tdnet_ros.ros.testing import make_tiny_checkpoint

CODE_RAN = Path("/tmp/tdnet_ros_hostile_code_ran")


class RunsCode:
    """Unpickling this would create CODE_RAN: a checkpoint must never do that."""

    def __reduce__(self):
        return (os.system, (f"touch {CODE_RAN}",))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile")
    good = make_tiny_checkpoint(root / "tiny.pt")
    made = {"good": good}

    def variant(name: str, change) -> None:
        content = torch.load(good, weights_only=True)
        change(content)
        torch.save(content, root / f"{name}.pt")
        made[name] = root / f"{name}.pt"

    variant("nan", lambda c: next(iter(c["state_dict"].values())).fill_(float("nan")))
    variant("inf", lambda c: list(c["state_dict"].values())[3].view(-1)[0].fill_(float("inf")))
    variant("paths3000", lambda c: c["config"].update(num_paths=3000))
    variant("stride0", lambda c: c["config"].update(cache_stride=0))
    variant("classes-1", lambda c: c["config"].update(num_classes=-1))
    variant("width2e17", lambda c: c["config"].update(base_width=2**17))
    (root / "text.pt").write_text("not a checkpoint at all # Unsupported operand")
    made["text"] = root / "text.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": RunsCode()}, root / "code.pt")
    made["code"] = root / "code.pt"
    return made


EXPECTED = {
    "nan": "holds non-finite weights (NaN or infinity) in paths.0.backbone.conv1.weight",
    "inf": "holds non-finite weights (NaN or infinity) in",
    "paths3000": "stores an invalid model configuration: num_paths must be within 1..16, got 3000",
    "stride0": "cache_stride must be within 1..64, got 0",
    "classes-1": "num_classes must be within 1..65535, got -1",
    "width2e17": "base_width must be within 1..1024, got 131072",
    "text": "is not a checkpoint (not a PyTorch file, or a damaged one)",
    "code": "is not a checkpoint (it holds Python objects other than tensors and plain data, which are never loaded)",
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_loaders_refuse_bad_checkpoints_in_one_line(files, name):
    from tdnet_ros.training.teacher import load_teacher

    CODE_RAN.unlink(missing_ok=True)
    with pytest.raises(CheckpointError) as caught:
        Segmenter.from_checkpoint(files[name])
    message = str(caught.value)
    assert EXPECTED[name] in message and str(files[name]) in message
    assert "\n" not in message and "weights_only" not in message.lower()
    if name in ("text", "code"):
        with pytest.raises(CheckpointError, match="is not a teacher checkpoint"):
            load_teacher(files[name])
    assert not CODE_RAN.exists()


def test_a_degenerate_configuration_is_refused_before_anything_is_built(files, monkeypatch):
    import tdnet_ros.checkpoint as checkpoint

    built = []
    monkeypatch.setattr(checkpoint, "TDNet", lambda config: built.append(config))
    with pytest.raises(CheckpointError, match="num_paths"):
        checkpoint.load_model(files["paths3000"])
    assert built == []


def test_non_finite_logits_are_flagged(files):
    """Finite but huge weights overflow: the frame's result says its labels mean nothing."""
    import numpy as np

    segmenter = Segmenter.from_checkpoint(files["good"])
    frame = np.random.default_rng(0).integers(0, 256, (128, 256, 3), dtype=np.uint8)
    assert segmenter.segment(frame, stream="a").finite
    with torch.no_grad():
        for parameter in segmenter.model.parameters():
            parameter.mul_(1e30)
    assert not segmenter.segment(frame, stream="b").finite


def test_cli_loaders_give_one_line_and_exit_2(files, tmp_path, capsys):
    from tdnet_ros.benchmark import main as bench
    from tdnet_ros.data import generate_sequence, write_rosbag
    from tdnet_ros.data.writers import IMAGE_TOPIC
    from tdnet_ros.evaluation.cli import main as evaluate

    bag = tmp_path / "bag"
    write_rosbag(generate_sequence(1, 2, 64, 32), bag, storage="mcap")

    for name in ("nan", "text", "paths3000"):
        assert bench(["--model", "td4-tiny", "--checkpoint", str(files[name]), "--frames", "1"]) == 2
        err = capsys.readouterr().err
        assert EXPECTED[name] in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert evaluate([str(bag), "--image-topic", IMAGE_TOPIC, "--checkpoint", str(files[name]),
                         "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert EXPECTED[name] in err and len(err.strip().splitlines()) == 1
