"""Parameters of the segmentation node: one dataclass, its ROS descriptors and validation."""

from __future__ import annotations

import difflib
import re
import textwrap
from dataclasses import dataclass, field, fields
from typing import Any, Optional

import yaml

from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
    ParameterType,
)
from rclpy.node import Node
from rclpy.parameter import Parameter

from tdnet_ros import runtime
from tdnet_ros.runtime import RuntimeConfig


@dataclass
class NodeConfig:
    """Settings of :class:`tdnet_ros.ros.node.SegmenterNode` (ROS parameters of the same names)."""

    model: str = ""  # variant name for published .pkl checkpoints; "" = from the checkpoint
    checkpoint: str = ""  # "" = the bundled default model
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "float32"  # float32 | float16 | bfloat16 (weights and activations)
    backend: str = "auto"  # auto (cuda-graph on CUDA, eager on the CPU) | eager | compile | cuda-graph | onnx | tensorrt
    engine_dir: str = ""  # prebuilt ONNX files / TensorRT engines (tdnet-build-engines)
    preprocess: str = "auto"  # auto (device on CUDA, cv2 on the CPU) | cv2 | device
    input_size: str = ""  # "" = the model's own input size | HEIGHTxWIDTH | frame
    scales: list[float] = field(default_factory=lambda: [1.0])  # multi-scale inference: [1.0, 1.5]
    batch_cameras: bool = True  # cameras at the same sub-network step run as one batch
    class_table: str = ""  # YAML class table overriding the checkpoint's names/colours
    use_cv_bridge: bool = True  # convert with cv_bridge where it is installed
    cameras: list[str] = field(default_factory=lambda: ["image"])  # input topics
    qos_reliability: str = "auto"  # input subscriptions: auto follows the camera's publishers
    qos_depth: int = 1
    output_namespace: str = "segmentation"  # outputs: <camera namespace>/<this>/...
    output_reliability: str = "reliable"
    output_depth: int = 1
    overlay_alpha: float = 0.5
    reset_period_factor: float = 5.0  # a forward stamp jump of more frame periods resets the cache
    reset_time_jump_s: float = 0.5  # ... but a jump up to this always keeps it (the floor)
    reset_time_jump_max_s: float = 10.0  # ... and a longer one always resets it (the ceiling)
    min_image_size: int = 16  # smaller width or height is refused
    max_image_pixels: int = 4096 * 4096  # larger images are refused
    expected_rate_hz: float = 0.0  # diagnostics WARN below this output rate (0: off)
    input_timeout_s: float = 2.0  # diagnostics ERROR after this long without input
    error_log_period_s: float = 5.0  # throttle of bad-input errors per camera and kind
    autostart: bool = True  # configure and activate at start (false: a lifecycle manager does)


def runtime_config(config: NodeConfig) -> RuntimeConfig:
    """The core's runtime configuration of the node's (validated) parameters."""
    return RuntimeConfig(
        device=config.device, precision=config.precision, backend=config.backend,
        preprocess=config.preprocess, input_size=runtime.parse_input_size(config.input_size),
        scales=tuple(config.scales), engine_dir=config.engine_dir, batch_cameras=config.batch_cameras,
    )


@dataclass(frozen=True)
class _Spec:
    description: str
    read_only: bool = False
    float_range: Optional[tuple[float, float]] = None
    int_range: Optional[tuple[int, int]] = None
    choices: Optional[tuple[str, ...]] = None


_SPECS: dict[str, _Spec] = {
    "model": _Spec(
        "Model variant (e.g. td4-psp18, td2-psp50); needed only for published .pkl "
        "checkpoints, empty = from the checkpoint.",
        read_only=True,
    ),
    "checkpoint": _Spec(
        "Checkpoint file; empty = the bundled default model.", read_only=True
    ),
    "device": _Spec(
        "auto (CUDA when available, else CPU with a warning), cpu, cuda or cuda:N.",
        read_only=True,
    ),
    "precision": _Spec(
        "Numeric precision of the model: float32, float16 (CUDA) or bfloat16.",
        read_only=True,
        choices=runtime.PRECISIONS,
    ),
    "backend": _Spec(
        "How each sub-network step runs: auto (cuda-graph on CUDA, eager on the CPU), eager, "
        "compile (torch.compile), cuda-graph (captured CUDA graphs, replayed every frame), onnx "
        "(onnxruntime) or tensorrt (torch-tensorrt); onnx and tensorrt load prebuilt files from "
        "engine_dir. One that cannot run falls back with one log line.",
        read_only=True,
        choices=(runtime.AUTO, *runtime.BACKENDS),
    ),
    "engine_dir": _Spec(
        "Folder of prebuilt ONNX files / TensorRT engines (built by tdnet-build-engines for this "
        "checkpoint, input size and precision); empty = none.",
        read_only=True,
    ),
    "preprocess": _Spec(
        "Where frames are resized and normalized: auto (device on CUDA, cv2 on the CPU), cv2 "
        "(on the host, as the published pipeline) or device (uint8 uploaded once, resized on the GPU).",
        read_only=True,
        choices=(runtime.AUTO, *runtime.PREPROCESS),
    ),
    "input_size": _Spec(
        "Size frames are resized to for the network: empty = the model's own input size, "
        "HEIGHTxWIDTH (e.g. 544x960), or frame (each frame's own size).",
        read_only=True,
    ),
    "scales": _Spec(
        "Multi-scale inference: each frame also runs at these multiples of the input size (its "
        "own feature cache per scale) and the labels are the argmax of the mean probabilities. "
        "[1.0] = one scale; e.g. [1.0, 1.5] with input_size 512x1024 is the most accurate setting measured (README). "
        "Not with the onnx or tensorrt backends (their steps are built for one input size).",
        read_only=True,
    ),
    "batch_cameras": _Spec(
        "Run cameras whose frames wait together and are at the same sub-network step as one "
        "batch (fewer, larger GPU launches; more GPU memory).",
        read_only=True,
    ),
    "class_table": _Spec(
        "YAML class table (classes: [{id, name, color}]) overriding the checkpoint's class "
        "names and colours; empty = the checkpoint's.",
        read_only=True,
    ),
    "use_cv_bridge": _Spec(
        "Convert sensor_msgs/Image with cv_bridge where it is installed (ROS 2 installs); "
        "otherwise, or when false, the project's own zero-copy conversion is used.",
        read_only=True,
    ),
    "cameras": _Spec(
        "Input image topics, one per camera (relative names resolve in the node's "
        "namespace and follow remapping). Topics ending in /compressed are "
        "sensor_msgs/CompressedImage.",
        read_only=True,
    ),
    "qos_reliability": _Spec(
        "Reliability of the input subscriptions: auto (follow the topic's publishers: reliable "
        "when every publisher is reliable, else best effort; the subscription is recreated "
        "when publishers change), best_effort (sensor-data profile) or reliable.",
        read_only=True,
        choices=("auto", "best_effort", "reliable"),
    ),
    "qos_depth": _Spec(
        "History depth (keep last) of the input subscriptions.", read_only=True, int_range=(1, 100)
    ),
    "output_namespace": _Spec(
        "Outputs are published under <camera namespace>/<output_namespace>/.", read_only=True
    ),
    "output_reliability": _Spec(
        "Reliability of the output publishers: reliable (also serves best-effort "
        "subscribers) or best_effort.",
        read_only=True,
        choices=("best_effort", "reliable"),
    ),
    "output_depth": _Spec(
        "History depth (keep last) of the output publishers.", read_only=True, int_range=(1, 100)
    ),
    "overlay_alpha": _Spec(
        "Weight of the class colours in the overlay image (0 = camera only, 1 = colours only).",
        float_range=(0.0, 1.0),
    ),
    "reset_period_factor": _Spec(
        "A camera's temporal cache resets when its stamp jumps forward by more than this many "
        "of its median frame periods (bounded by reset_time_jump_s and reset_time_jump_max_s); "
        "backwards jumps, size and frame_id changes always reset.",
        float_range=(1.0, 1000.0),
    ),
    "reset_time_jump_s": _Spec(
        "Floor of the reset jump (seconds): a forward stamp jump up to this never resets, "
        "whatever the camera's rate.",
        float_range=(0.001, 3600.0),
    ),
    "reset_time_jump_max_s": _Spec(
        "Ceiling of the reset jump (seconds): a longer forward jump always resets; it is also "
        "the limit until a camera's frame period is known (its first frames).",
        float_range=(0.001, 3600.0),
    ),
    "min_image_size": _Spec(
        "Images narrower or lower than this (pixels) are refused as bad input.",
        int_range=(1, 4096),
    ),
    "max_image_pixels": _Spec(
        "Images with more pixels than this are refused as bad input.",
        int_range=(1, 2**31 - 1),
    ),
    "expected_rate_hz": _Spec(
        "Diagnostics report WARN when a camera's output rate falls below this (0 = no "
        "expectation).",
        float_range=(0.0, 1000.0),
    ),
    "input_timeout_s": _Spec(
        "Diagnostics report ERROR when a camera sent no image for this long (seconds).",
        float_range=(0.01, 3600.0),
    ),
    "error_log_period_s": _Spec(
        "Bad-input errors are logged at most once per period, per camera and kind of error.",
        float_range=(0.0, 3600.0),
    ),
    "autostart": _Spec(
        "Configure and activate the lifecycle node by itself at start (true), or wait in "
        "'unconfigured' for a lifecycle manager (false: ros2 lifecycle set ... configure/activate).",
        read_only=True,
    ),
}

_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_TOPIC_PATTERN = re.compile(r"^[~/]?[A-Za-z_{][A-Za-z0-9_/{}~]*$")


def _descriptor(name: str, default: Any) -> ParameterDescriptor:
    spec = _SPECS[name]
    descriptor = ParameterDescriptor(
        name=name, description=spec.description, read_only=spec.read_only
    )
    if spec.choices:
        descriptor.additional_constraints = "one of: " + ", ".join(spec.choices)
    if spec.float_range:
        descriptor.floating_point_range = [
            FloatingPointRange(from_value=spec.float_range[0], to_value=spec.float_range[1])
        ]
    if spec.int_range:
        descriptor.integer_range = [
            IntegerRange(from_value=spec.int_range[0], to_value=spec.int_range[1], step=1)
        ]
    if isinstance(default, list):
        descriptor.type = (ParameterType.PARAMETER_DOUBLE_ARRAY if _is_double_array(default)
                           else ParameterType.PARAMETER_STRING_ARRAY)
    return descriptor


def _is_double_array(default: Any) -> bool:
    """Whether a NodeConfig default is a list of doubles (the others are lists of strings)."""
    return isinstance(default, list) and bool(default) and isinstance(default[0], float)


def check_value(name: str, value: Any) -> Optional[str]:
    """Why ``value`` is not acceptable for parameter ``name``, or None when it is.

    Covers what descriptors cannot express (choices, formats); ranges are checked too so
    that values from a parameter file get the same message as runtime changes.
    """
    spec = _SPECS.get(name)
    if spec is None:
        return None
    if spec.choices and value not in spec.choices:
        return f"parameter '{name}': '{value}' is not one of {', '.join(spec.choices)}"
    if spec.float_range and not spec.float_range[0] <= float(value) <= spec.float_range[1]:
        low, high = spec.float_range
        return f"parameter '{name}': {value} is outside [{low}, {high}]"
    if spec.int_range and not spec.int_range[0] <= int(value) <= spec.int_range[1]:
        low, high = spec.int_range
        return f"parameter '{name}': {value} is outside [{low}, {high}]"
    if name == "device" and not _DEVICE_PATTERN.match(value):
        return f"parameter 'device': '{value}' is not auto, cpu, cuda or cuda:N"
    if name == "input_size":
        try:
            runtime.parse_input_size(value)
        except ValueError as error:
            return f"parameter 'input_size': {error}"
    if name == "scales":
        problem = runtime.scales_problem(tuple(value))
        if problem:
            return f"parameter 'scales': {problem}"
    if name == "cameras":
        if not value:
            return "parameter 'cameras': needs at least one topic"
        for topic in value:
            if not _TOPIC_PATTERN.match(topic) or "//" in topic or topic.endswith("/"):
                return f"parameter 'cameras': '{topic}' is not a valid topic name"
        if len(set(value)) != len(value):
            return f"parameter 'cameras': duplicate topics in {list(value)}"
    if name == "output_namespace" and (
            not value or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*(/[A-Za-z_][A-Za-z0-9_]*)*$", value)):
        return f"parameter 'output_namespace': '{value}' is not a valid relative namespace"
    return None


class ParameterError(ValueError):
    """A parameter has a value the node cannot start with."""


#: Parameters rclpy itself declares or reads on every node.
ROS_OWN_PARAMETERS = ("use_sim_time", "start_type_description_service")


def unknown_parameter_warnings(given: list[str]) -> list[str]:
    """One warning per given parameter name the node does not have, with the closest one."""
    known = [item.name for item in fields(NodeConfig)]
    lines = []
    for name in given:
        if name in known or name in ROS_OWN_PARAMETERS or name.startswith("qos_overrides."):
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else f"; its parameters: {', '.join(known)}"
        lines.append(f"parameter '{name}' is not a parameter of this node and is ignored{hint}")
    return lines


def _section_applies(key: str, fully_qualified_name: str) -> bool:
    """Whether a parameter file's top-level key addresses the node, with rcl's wildcards
    (`*`: one name, `**`: any number of names)."""
    parts = [part for part in key.split("/") if part]
    pattern = "".join(
        "(/[^/]+)*" if part == "**" else "/[^/]+" if part == "*" else "/" + re.escape(part) for part in parts
    )
    return re.fullmatch(pattern, fully_qualified_name) is not None


def _parameter_files(arguments: list[str]) -> list[str]:
    return [arguments[i + 1] for i, a in enumerate(arguments[:-1]) if a == "--params-file"]


def parameter_file_problem(arguments: list[str]) -> Optional[str]:
    """Why a `--params-file` of `arguments` cannot be read as a ROS parameter file, or None."""
    for path in _parameter_files(arguments):
        try:
            with open(path, encoding="utf-8") as stream:
                content = yaml.safe_load(stream)
        except OSError as error:
            return f"parameter file '{path}': cannot read it ({error.strerror})"
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            return f"parameter file '{path}' is not valid YAML{where}"
        if not isinstance(content, dict) or not all(
                isinstance(v, dict) and isinstance(v.get("ros__parameters"), dict) for v in content.values()):
            return (f"parameter file '{path}' is not a ROS parameter file: expected "
                    "'<node name or /**>: {ros__parameters: {name: value}}'")
    return None


def parameter_file_warnings(arguments: list[str], fully_qualified_name: str) -> list[str]:
    """Warnings for the `--params-file` files of `arguments` that hold no section for the
    node (e.g. keyed by another node name): rcl then ignores the whole file silently."""
    lines = []
    for path in _parameter_files(arguments):
        try:
            with open(path, encoding="utf-8") as stream:
                content = yaml.safe_load(stream)
        except (OSError, ValueError, yaml.YAMLError):  # parameter_file_problem reports those
            continue
        if not isinstance(content, dict):
            continue
        if not any(_section_applies(str(key), fully_qualified_name) for key in content):
            sections = ", ".join(str(key) for key in content) or "none"
            lines.append(
                f"parameter file '{path}' has no section for this node ({fully_qualified_name}; its sections: "
                f"{sections}): none of its values apply. Key it by the node's name or /**"
            )
    return lines


def declare_parameters(node: Node) -> NodeConfig:
    """Declares every :class:`NodeConfig` field on ``node`` and returns the values.

    Raises:
        ParameterError: a value (from a parameter file or the command line) is invalid;
            the message names the parameter.
    """
    config = NodeConfig()
    overrides = getattr(node, "_parameter_overrides", {})  # rclpy: values from files and -p
    for item in fields(NodeConfig):
        given = overrides.get(item.name)
        default = getattr(config, item.name)
        # Integers in YAML for doubles (`overlay_alpha: 1`, `scales: [1, 2]`): the double parameter takes them.
        if isinstance(default, float) and given is not None and given.type_ == Parameter.Type.INTEGER:
            overrides[item.name] = Parameter(item.name, Parameter.Type.DOUBLE, float(given.value))
        if _is_double_array(default) and given is not None and given.type_ == Parameter.Type.INTEGER_ARRAY:
            overrides[item.name] = Parameter(item.name, Parameter.Type.DOUBLE_ARRAY, [float(v) for v in given.value])
        try:
            parameter = node.declare_parameter(
                item.name, default, _descriptor(item.name, default)
            )
        except Exception as error:  # rclpy raises several types for bad overrides
            raise ParameterError(f"parameter '{item.name}': {error}") from error
        value = parameter.value
        if isinstance(default, list):
            value = list(value) if value is not None else []  # YAML `[]` arrives untyped
        elif isinstance(default, float) and isinstance(value, int):
            value = float(value)
        reason = check_value(item.name, value)
        if reason:
            raise ParameterError(reason)
        setattr(config, item.name, value)
    problem = runtime.scales_problem(tuple(config.scales), config.backend)  # the one check across parameters
    if problem:
        raise ParameterError(f"parameter 'scales': {problem}")
    return config


def apply_parameters(config: NodeConfig, parameters: list[Parameter]) -> Optional[str]:
    """Validates a runtime change and applies it to ``config`` when every value is valid.

    Returns:
        None on success, else the reason the change is refused (nothing is applied).
    """
    updates = {}
    for parameter in parameters:
        if parameter.name not in _SPECS:
            continue  # e.g. use_sim_time: handled by rclpy
        spec = _SPECS[parameter.name]
        if spec.read_only:
            return f"parameter '{parameter.name}' is read-only: restart the node to change it"
        value = parameter.value
        current = getattr(config, parameter.name)
        if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not type(current):
            return (
                f"parameter '{parameter.name}': expected {type(current).__name__}, got "
                f"{type(value).__name__}"
            )
        reason = check_value(parameter.name, value)
        if reason:
            return reason
        updates[parameter.name] = value
    for name, value in updates.items():
        setattr(config, name, value)
    return None


def help_text() -> str:
    """`segmenter_node --help`: how to run it, and every parameter with its default."""
    lines = [
        "usage: segmenter_node [--ros-args [--params-file FILE] [-p NAME:=VALUE ...] [-r image:=TOPIC]]",
        "",
        "TDNet video semantic segmentation node: camera images in; label images, colours, overlay,",
        "per-class masks, timing and diagnostics out. Parameters (defaults in brackets):",
        "",
    ]
    defaults = NodeConfig()
    for item in fields(NodeConfig):
        spec = _SPECS[item.name]
        default = getattr(defaults, item.name)
        shown = "''" if default == "" else str(default)
        flags = " (read-only)" if spec.read_only else ""
        lines.append(f"  {item.name} [{shown}]{flags}")
        lines.extend(f"      {line}" for line in textwrap.wrap(spec.description, 84))
    return "\n".join(lines)
