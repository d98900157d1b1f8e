"""Loading and saving checkpoints: the published TDNet `.pkl` files and the project's own.

A published checkpoint is a plain state dict (keys like `pretrained1.layer1.0.conv1.weight`,
`atn1_2.fc.0.conv.weight`), possibly with a `module.` prefix or wrapped under `state_dict` /
`model_state`. The project's checkpoints are a dict with `format`, `config` (the
ModelConfig) and `state_dict` in this package's own parameter names.

Loading always uses `torch.load(..., weights_only=True)`: a checkpoint never runs code.
"""

from __future__ import annotations

import hashlib
import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from .config import ModelConfig
from .model import TDNet

FORMAT = "tdnet_ros/1"

# Keys of the published checkpoints that the model does not use.
_UNUSED_PUBLISHED = re.compile(r"^paths\.\d+\.backbone\.fc\.")


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or does not fit the model."""


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_file(path: str | Path, what: str = "checkpoint") -> Any:
    """The content of a file written by torch.save, loaded without running any code from it.

    Every loader of the project goes through here. A file that is not one, is damaged, or
    holds anything but tensors and plain data gives one CheckpointError line naming the
    file (PyTorch's own message would suggest loading it unsafely: it is not passed on).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # "Unsupported global": a pickled class or function (code that would run).
        objects = "global" in str(error).lower()
        reason = ("it holds Python objects other than tensors and plain data, which are never loaded"
                  if objects else "not a PyTorch file, or a damaged one")
    except (RuntimeError, EOFError, OSError, ValueError, TypeError, AttributeError, IndexError, KeyError) as error:
        reason = "not a PyTorch file, or a damaged one" if not isinstance(error, OSError) else str(error)[:200]
    raise CheckpointError(f"{path} is not a {what} ({reason})")


def save_file(content: Mapping[str, Any], path: str | Path) -> Path:
    """torch.save of `content` to `path`, atomically: written beside it, then renamed over it,
    so that an interrupted save never leaves a damaged file where a good one was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    torch.save(dict(content), partial)
    partial.replace(path)
    return path


def check_finite(state: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuses weights holding NaN or infinity: such a model labels every pixel the same
    class (silently, and dangerously on a vehicle)."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        shown = ", ".join(bad[:5]) + (f", ... ({len(bad)} tensors in all)" if len(bad) > 5 else "")
        raise CheckpointError(f"checkpoint {source} holds non-finite weights (NaN or infinity) in {shown}")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Reads a checkpoint file without running any code from it.

    Returns a dict with `state_dict` (tensors, published or project names), and `config`,
    `format` when the file is a project checkpoint.
    """
    path = Path(path)
    content = load_file(path)
    if not isinstance(content, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(content).__name__}, not a state dict")
    if content.get("format") == FORMAT:
        return dict(content)
    for wrapper in ("state_dict", "model_state"):
        if isinstance(content.get(wrapper), Mapping):
            content = content[wrapper]
            break
    state = {_strip_prefix(k): v for k, v in content.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(f"checkpoint {path} holds no tensors")
    return {"state_dict": state}


def _strip_prefix(key: str) -> str:
    return key[len("module.") :] if key.startswith("module.") else key


def is_published_layout(state: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith("pretrained1.") for k in state)


def infer_published_model(state: Mapping[str, torch.Tensor]) -> str | None:
    """Which published variant a state dict in the published layout is, or None."""
    if "atn1_2.fc.0.conv.weight" in state:
        return "td4-psp18"
    if "atn1.fc.0.conv.weight" in state:
        return "td2-psp50"
    return None


def published_to_internal(state: Mapping[str, torch.Tensor], num_paths: int) -> dict[str, torch.Tensor]:
    """Renames published checkpoint keys to this package's parameter names.

    Unknown keys are kept as they are, so that they show up as unexpected when loading.
    """
    renamed = {}
    for key, value in state.items():
        renamed[_rename_published(key, num_paths)] = value
    return renamed


# Renames inside one sub-network's module: published prefix -> ours, per module.
_INNER_RENAMES: dict[str, list[tuple[str, str]]] = {
    "pyramid": [(f"conv{b + 1}.{layer}.", f"branches.{b}.{layer}.") for b in range(4) for layer in (0, 1)],
    "encoding": [
        (f"w_{p}s.{src}.", f"{ours}.{dst}.")
        for p, ours in (("q", "query"), ("k", "key"))
        for src, dst in (("0.conv", 0), ("0.bn", 1), ("1.conv", 3))
    ]
    + [("w_vs.0.conv.", "value.")],
    "layer_norm": [("ln.", "")],
    "head": [("conv5.", "")],
    "propagation": [("fc.0.conv.", "proj.")],
}
_TOP_LEVEL = re.compile(r"^(pretrained|psp|enc|layer_norm|head)(\d+)\.(.*)$")
_ATTENTION = re.compile(r"^atn(\d+)(?:_(\d+))?\.(.*)$")
_TOP_RENAMES = {
    "pretrained": "backbone",  # keeps torchvision's names inside
    "psp": "pyramid",
    "enc": "encoding",
    "layer_norm": "layer_norm",
    "head": "head",
}


def _rename_inner(module: str, rest: str) -> str:
    for published, ours in _INNER_RENAMES.get(module, []):
        if rest.startswith(published):
            return ours + rest[len(published) :]
    return rest


def _rename_published(key: str, num_paths: int) -> str:
    match = _TOP_LEVEL.match(key)
    if match:
        module, number, rest = match.groups()
        ours = _TOP_RENAMES[module]
        return f"paths.{int(number) - 1}.{ours}.{_rename_inner(ours, rest)}"
    match = _ATTENTION.match(key)
    if match:
        source, target, rest = match.groups()
        source_index = int(source) - 1
        # atn{i}_{k}: path i's step towards sub-network k, k = i+1, i+2, ... in cyclic order.
        step = 0 if target is None else (int(target) - 1 - source_index - 1) % num_paths
        return f"paths.{source_index}.propagation.{step}.{_rename_inner('propagation', rest)}"
    return key


def check_fit(model: TDNet, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raises one clear CheckpointError when the state dict (our names) does not fit the model."""
    expected = model.state_dict()
    unexpected = sorted(k for k in state if k not in expected and not _UNUSED_PUBLISHED.match(k))
    missing = sorted(k for k in expected if k not in state)
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if unexpected or missing or mismatched:
        problems = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("mismatched shapes", mismatched)):
            if items:
                shown = ", ".join(items[:5]) + (f", ... ({len(items)} in all)" if len(items) > 5 else "")
                problems.append(f"{label}: {shown}")
        raise CheckpointError(
            f"checkpoint {source} does not fit model {model.config.name!r}: " + "; ".join(problems)
        )


def load_into(model: TDNet, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Loads a state dict (our names) into the model, or raises one clear CheckpointError."""
    check_fit(model, state, source)
    expected = model.state_dict()
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=True)


def stored_config(content: Mapping[str, Any], source: str) -> ModelConfig:
    """The ModelConfig a project checkpoint (read_checkpoint's content) stores, or one
    CheckpointError naming `source` ("checkpoint <path>") when it is invalid."""
    try:
        return ModelConfig.from_dict(dict(content["config"]))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{source} stores an invalid model configuration: {error}") from None


def load_model(path: str | Path, model_name: str | None = None, **config_overrides: Any) -> TDNet:
    """Builds the model a checkpoint describes and loads its weights.

    Args:
        path: a published `.pkl` or a project checkpoint.
        model_name: variant for published checkpoints (inferred from the keys if None);
            for a project checkpoint, if given, it must match the stored configuration.
        config_overrides: ModelConfig fields to replace (e.g. `input_size`).
    """
    return model_from_checkpoint(read_checkpoint(path), path, model_name, **config_overrides)


def model_from_checkpoint(content: Mapping[str, Any], path: str | Path, model_name: str | None = None,
                          **config_overrides: Any) -> TDNet:
    """`load_model` on a checkpoint already read (`read_checkpoint(path)`), for callers that
    also need its other entries; `path` names it in errors."""
    state = content["state_dict"]
    if "config" in content:
        config = stored_config(content, f"checkpoint {path}")
        if model_name is not None and model_name != config.name:
            raise CheckpointError(
                f"checkpoint {path} holds model {config.name!r}, but model {model_name!r} was asked for"
            )
    else:
        name = model_name or infer_published_model(state)
        if name is None:
            raise CheckpointError(
                f"cannot tell which model checkpoint {path} holds; give the model name explicitly"
            )
        config = ModelConfig.from_name(name)
        if is_published_layout(state):
            state = published_to_internal(state, config.num_paths)
    if config_overrides:
        config = ModelConfig.from_dict({**config.to_dict(), **config_overrides})
    # Keys and shapes are checked on a model without storage first: a checkpoint whose
    # weights do not fit allocates nothing.
    with torch.device("meta"):
        skeleton = TDNet(config)
    check_fit(skeleton, state, str(path))
    check_finite(state, str(path))
    model = TDNet(config).eval()
    load_into(model, state, str(path))
    return model


def save_checkpoint(model: TDNet, path: str | Path, *, state_dict: Mapping[str, torch.Tensor] | None = None,
                    **extra: Any) -> Path:
    """Saves a project checkpoint that carries its own configuration (atomically, `save_file`).

    `state_dict`: the weights to store, if not the model's own (e.g. stored in another
    precision). Extra entries (training iteration, optimizer state, ...) must be plain data
    or tensors, so that the file loads with `weights_only=True`.
    """
    weights = model.state_dict() if state_dict is None else dict(state_dict)
    content = {"format": FORMAT, "config": model.config.to_dict(), "state_dict": weights, **extra}
    return save_file(content, path)
