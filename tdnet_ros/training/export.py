"""Packs a trained student checkpoint for shipping: weights, configuration and the training
configuration only (no optimizer), written atomically, with its SHA-256 next to it.

    python -m tdnet_ros.training.export outputs/train_default/model.pt tdnet_ros/models/default.pt
    python -m tdnet_ros.training.export outputs/train_wide/model.pt tdnet_ros/models/default.pt --float16-kernels
    python -m tdnet_ros.training.export outputs/detail/model.pt outputs/plain.pt --without-detail td4-r18-narrow
    python -m tdnet_ros.training.export tdnet_ros/models/default.pt outputs/at640.pt --input-size 640x1280
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from tdnet_ros.checkpoint import file_sha256, load_model, read_checkpoint, save_checkpoint
from tdnet_ros.model import TDNet, build_model, fit_layer_norms
from tdnet_ros.runtime import fixed_size_argument

# the provenance a shipped checkpoint keeps (calibrate keeps the same)
KEEP = ("train_config", "val_miou", "iteration", "calibration", "averaged_from")


def without_detail(model: TDNet, name: str) -> TDNet:
    """The model less its stride-4 detail refinement, as variant `name`: it outputs the head's
    stride-8 logits plus the refinement's constant part, its last conv's bias (which holds any
    calibration offsets), folded into the head's last conv. What is lost is the correction
    computed from layer1, and the 2x bilinear step before the segmenter's own upsampling."""
    plain = build_model(dataclasses.replace(model.config, detail_channels=0, detail_depth=1, detail_guide_channels=0,
                                            name=name))
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if ".detail." not in k}, strict=True)
    with torch.no_grad():
        for refined, stride8 in zip(model.paths, plain.paths):
            stride8.classifier.bias.add_(refined.detail.classifier.bias)  # the head's last conv here
    return plain


def at_input_size(model: TDNet, input_size: tuple[int, int]) -> TDNet:
    """The model with `input_size` as its own (ModelConfig.input_size: the size the segmenter
    runs it at by default). Its LayerNorms' affine parameters are resized to the new feature
    map as the forward pass resizes them at another input size, so at `input_size` it
    computes exactly what the original computes when run at that size."""
    resized = build_model(dataclasses.replace(model.config, input_size=tuple(input_size)))
    resized.load_state_dict(fit_layer_norms(model.state_dict(), resized), strict=True)
    return resized


def export(source: str | Path, target: str | Path, *, float16_kernels: bool = False,
           without_detail_as: str | None = None, input_size: tuple[int, int] | None = None, **extra) -> str:
    """Writes `target` (loadable by Segmenter.from_checkpoint) and `<target>.sha256`; returns the hash.

    float16_kernels: store the convolution kernels (nearly all of the weights) in float16,
    which halves the file; loading casts them back to the model's float32. BatchNorm,
    LayerNorm and bias tensors stay float32 (running variances can be too small for float16).
    without_detail_as: drop the stride-4 detail refinement (see without_detail) and name the
    variant so.
    input_size: the input size the model is run at by default from now on (see at_input_size).
    """
    content = read_checkpoint(source)
    model = load_model(source)
    if without_detail_as is not None:
        if not model.config.detail_channels:
            raise ValueError(f"{source} has no detail refinement to drop")
        model = without_detail(model, without_detail_as)
    if input_size is not None:
        model = at_input_size(model, input_size)
    kept = {k: content[k] for k in KEEP if k in content}
    state = model.state_dict()
    if float16_kernels:
        state = {k: v.half() if v.is_floating_point() and v.dim() == 4 else v for k, v in state.items()}
    target = save_checkpoint(model, target, state_dict=state, **kept, **extra)
    digest = file_sha256(target)
    target.with_name(target.name + ".sha256").write_text(f"{digest}  {target.name}\n")
    return digest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="checkpoint written by tdnet-train (model.pt)")
    parser.add_argument("target", help="file to write, e.g. tdnet_ros/models/default.pt")
    parser.add_argument("--float16-kernels", action="store_true",
                        help="store the convolution kernels in float16 (half the size; loaded back as float32)")
    parser.add_argument("--without-detail", metavar="NAME",
                        help="drop the stride-4 detail refinement (stride-8 output), naming the variant NAME")
    parser.add_argument("--input-size", type=fixed_size_argument, metavar="HxW",
                        help="the input size the segmenter runs the model at by default (its LayerNorms fitted "
                             "to it); default: the source's")
    args = parser.parse_args(argv)
    try:
        digest = export(args.source, args.target, float16_kernels=args.float16_kernels,
                        without_detail_as=args.without_detail, input_size=args.input_size)
    except ValueError as error:
        print(f"export: {error}", file=sys.stderr)
        return 2
    size = Path(args.target).stat().st_size
    print(f"{args.target}: {size / 1e6:.2f} MB, sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
