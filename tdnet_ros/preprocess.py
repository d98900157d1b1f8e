"""Frame checks, resizing, normalization and label upsampling (torch and numpy only)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_frame(frame: object) -> np.ndarray:
    """Returns the frame if it is an HxWx3 uint8 C-contiguous array, else raises ValueError."""
    if not isinstance(frame, np.ndarray):
        raise ValueError(f"frame must be a numpy array, got {type(frame).__name__}")
    if frame.dtype != np.uint8:
        raise ValueError(f"frame must be uint8 RGB, got dtype {frame.dtype}")
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"frame must have shape (H, W, 3) (RGB), got {frame.shape}")
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise ValueError(f"frame is empty: shape {frame.shape}")
    if not frame.flags.c_contiguous:
        raise ValueError(
            "frame must be C-contiguous (a flipped or strided view was given); "
            "pass np.ascontiguousarray(frame)"
        )
    return frame


def check_normalized(x: object, size: tuple[int, int] | None) -> torch.Tensor:
    """Checks a (1, 3, H, W) float32 tensor already normalized at the model input size."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"normalized input must be a torch tensor, got {type(x).__name__}")
    if x.dtype != torch.float32:
        raise ValueError(f"normalized input must be float32, got {x.dtype}")
    if x.ndim != 4 or x.shape[0] != 1 or x.shape[1] != 3:
        raise ValueError(f"normalized input must have shape (1, 3, H, W), got {tuple(x.shape)}")
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"normalized input is empty: shape {tuple(x.shape)}")
    if size is not None and tuple(x.shape[-2:]) != tuple(size):
        raise ValueError(f"normalized input must be {size[0]}x{size[1]} (the model input size), got {tuple(x.shape[-2:])}")
    return x


def resize_frame(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a uint8 frame to (height, width), as the published pipeline does."""
    if frame.shape[:2] == tuple(size):
        return frame
    return cv2.resize(frame, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)


class Normalizer:
    """uint8 HxWx3 frame -> normalized (1, 3, H, W) tensor on the model's device.

    The frame is uploaded as uint8 (a quarter of the float bytes) and converted there.
    `normalize` is the arithmetic alone, shared with :class:`DevicePreprocessor`.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, channels_last: bool) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.scale = (1.0 / (255.0 * torch.tensor(IMAGENET_STD))).view(1, 3, 1, 1).to(self.device)  # (1, 3, 1, 1)
        self.shift = (torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)).view(1, 3, 1, 1).to(self.device)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(1, 3, H, W) float pixel values 0..255 on the device -> model input (in place)."""
        x = x.mul_(self.scale).sub_(self.shift)  # (x / 255 - mean) / std
        return x.to(dtype=self.dtype, memory_format=self.memory_format)

    def __call__(self, frame: np.ndarray) -> torch.Tensor:
        if not frame.flags.writeable:  # e.g. a view of a received message's buffer
            frame = frame.copy()  # torch.from_numpy wants memory it may write to
        pixels = torch.from_numpy(frame).to(self.device, non_blocking=True)
        return self.normalize(pixels.permute(2, 0, 1)[None].float())  # (H, W, 3) -> (1, 3, H, W)


class DevicePreprocessor:
    """Preprocessing on the model's device: upload uint8 once, resize and normalize there.

    The camera frame goes up as uint8 through a pinned host buffer reused across frames
    (CUDA only), then is resized (bilinear, half-pixel centres, no antialiasing: cv2's
    INTER_LINEAR geometry) and normalized on the device. cv2 rounds its resized uint8
    pixels and this path does not, so inputs differ by up to half a grey level and labels
    agree closely but not bit for bit with the cv2 path.

    Args:
        device: where the frame is resized and normalized.
        dtype: dtype of the returned tensor (the model's conv precision).
        channels_last: memory format of the returned tensor.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype = torch.float32, channels_last: bool = True) -> None:
        self._normalizer = Normalizer(device, dtype, channels_last)
        self.device = self._normalizer.device
        self._pinned: torch.Tensor | None = None  # reused host staging buffer (CUDA)
        self._uploaded: torch.cuda.Event | None = None  # marks the end of the last upload from it

    def upload(self, frame: np.ndarray) -> torch.Tensor:
        """The frame as a uint8 (H, W, 3) tensor on the device, through a reused pinned buffer."""
        pixels = torch.from_numpy(frame)
        if self.device.type != "cuda":
            return pixels
        if self._uploaded is not None:
            self._uploaded.synchronize()  # the previous frame's copy out of the buffer is done
        if self._pinned is None or self._pinned.shape != pixels.shape:
            self._pinned = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
        self._pinned.copy_(pixels)
        on_device = self._pinned.to(self.device, non_blocking=True)  # (H, W, 3) uint8
        self._uploaded = torch.cuda.Event()
        self._uploaded.record()
        return on_device

    def __call__(self, frame: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
        x = self.upload(frame).permute(2, 0, 1)[None].float()  # (H, W, 3) -> (1, 3, H, W)
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size, mode="bilinear", align_corners=False, antialias=False)  # (1, 3, h, w)
        return self._normalizer.normalize(x)


@functools.lru_cache(maxsize=64)
def _interpolation_matrix(source: int, target: int, align_corners: bool, dtype: torch.dtype,
                          device: torch.device) -> torch.Tensor:
    """(target, source) weights of linear interpolation along one axis, with the sample
    positions of F.interpolate(mode="bilinear") and the same clamping at the borders.

    Built outside inference mode whatever the caller's: the cached matrix is shared by
    inference and by training, where autograd saves it for the backward pass.
    """
    with torch.inference_mode(False):
        return _build_interpolation_matrix(source, target, align_corners).to(device=device, dtype=dtype)


def _build_interpolation_matrix(source: int, target: int, align_corners: bool) -> torch.Tensor:
    position = torch.arange(target, dtype=torch.float64)
    if align_corners:
        position = position * ((source - 1) / (target - 1) if target > 1 else 0.0)
    else:
        position = ((position + 0.5) * (source / target) - 0.5).clamp(min=0.0)
    lower = position.floor().long().clamp(max=source - 1)
    upper = (lower + 1).clamp(max=source - 1)
    fraction = position - lower
    rows = torch.arange(target)
    matrix = torch.zeros(target, source, dtype=torch.float64)
    matrix.index_put_((rows, lower), 1.0 - fraction, accumulate=True)
    matrix.index_put_((rows, upper), fraction, accumulate=True)  # upper == lower at the last row
    return matrix


def upsample_logits(logits: torch.Tensor, size: tuple[int, int], *, align_corners: bool,
                    pixel_step: int = 1) -> torch.Tensor:
    """(B, K, h, w) stride-8 logits -> (B, K, H, W) at the model input `size`, bilinear, with
    `align_corners` as the model was trained (ModelConfig.upsample_align_corners).

    Bilinear interpolation is separable, so it is computed as two matrix products: the same
    values as F.interpolate up to rounding, and in training a backward pass that is two
    matrix products too, where F.interpolate's backward scatters into every source pixel
    (half the cost of the loss terms at 256x512 on a CPU). Always in the logits' dtype:
    autocast would round them to 16 bits.

    With `pixel_step` s > 1 only the centre pixel of each s x s block of the (H, W) grid is
    computed (rows and columns s // 2, s // 2 + s, ...), for losses that score a sample of
    the pixels.
    """
    first = pixel_step // 2
    height, width = (int(n) for n in size)
    rows = _interpolation_matrix(logits.shape[-2], height, align_corners, logits.dtype, logits.device)  # (H, h)
    columns = _interpolation_matrix(logits.shape[-1], width, align_corners, logits.dtype, logits.device)  # (W, w)
    rows, columns = rows[first::pixel_step], columns[first::pixel_step]  # (H/s, h), (W/s, w)
    with torch.autocast(logits.device.type, enabled=False):
        wide = logits @ columns.T  # (B, K, h, W/s)
        return rows @ wide  # (B, K, H/s, W/s)


def interpolation_size(size: tuple[int, int], out_size: tuple[int, int] | None) -> tuple[int, int]:
    """Where the logits are interpolated for a frame of `out_size` run at the model input `size`.

    A frame no larger than the input in either dimension (a 512x256 camera enlarged to a
    1024x512 input): at the frame's own size, so that every frame pixel samples the logits
    at its own centre. Taking the labels at the input size and then every second one (nearest
    resampling) would shift them by a quarter of a frame pixel, for four times the work.
    A larger frame (the published Cityscapes setting): at the input size, the published
    pipeline's order, and K maps at the model's size rather than at the camera's.
    """
    if out_size is not None and out_size[0] <= size[0] and out_size[1] <= size[1]:
        return (int(out_size[0]), int(out_size[1]))
    return (int(size[0]), int(size[1]))


def logits_at_frame(logits: torch.Tensor, size: tuple[int, int], out_size: tuple[int, int], *,
                    align_corners: bool) -> torch.Tensor:
    """(B, K, h, w) stride-8 logits -> (B, K, H', W') at the frame's `out_size`, sampled where
    :func:`labels_from_logits` takes its labels (their argmax is its labels)."""
    target = interpolation_size(size, out_size)
    upsampled = upsample_logits(logits, target, align_corners=align_corners)  # (B, K, *target)
    if target == tuple(out_size):
        return upsampled
    return F.interpolate(upsampled, tuple(out_size), mode="nearest")  # (B, K, H', W')


def labels_from_logits(
    logits: torch.Tensor, size: tuple[int, int], out_size: tuple[int, int] | None = None, *,
    align_corners: bool,
) -> torch.Tensor:
    """Class ids of (1, K, h, w) logits, on the logits' device.

    The logits are upsampled bilinearly (with `align_corners` as the model was trained,
    ModelConfig.upsample_align_corners) to the frame's `out_size` where that is no larger
    than the model input `size`, else to `size`, whose argmax is then resized nearest to
    `out_size` (cv2 INTER_NEAREST's geometry); see :func:`interpolation_size`.

    Returns:
        (H, W) uint8 labels (int32 above 255 classes) at `out_size` (default `size`).
    """
    return labels_from_scales([(logits, size)], out_size or size, align_corners=align_corners)


def labels_from_scales(
    outputs: Sequence[tuple[torch.Tensor, tuple[int, int]]], out_size: tuple[int, int], *, align_corners: bool,
) -> torch.Tensor:
    """Class ids of one frame run at one or several input sizes (multi-scale inference).

    `outputs` holds (logits (1, K, h, w), input size) pairs, the first at the base input
    size. One: as :func:`labels_from_logits`. Several: each one's softmax probabilities,
    interpolated where the base size's labels are taken, are averaged, and the labels are
    their argmax (resized nearest to `out_size` as in :func:`labels_from_logits`).
    """
    target = interpolation_size(outputs[0][1], out_size)
    if len(outputs) == 1:
        scores = upsample_logits(outputs[0][0], target, align_corners=align_corners)  # (1, K, *target)
    else:
        # a sum rather than a mean: the argmax is the same
        scores = sum(torch.softmax(upsample_logits(logits, target, align_corners=align_corners), dim=1)
                     for logits, _ in outputs)  # (1, K, *target)
    # max(dim).indices is argmax (the first of tied maxima too), but PyTorch's CPU argmax over
    # a dimension that is not the last runs several times slower: 1024x512, 19 classes
    labels = scores.max(dim=1, keepdim=True).indices  # (1, 1, *target)
    small_ids = scores.shape[1] <= 255
    # nearest resampling takes uint8 or floats (exact for ids below 2**24), not int64
    labels = labels.to(torch.uint8 if small_ids else torch.float32)
    if tuple(out_size) != target:
        labels = F.interpolate(labels, tuple(out_size), mode="nearest")  # (1, 1, H', W')
    return labels[0, 0] if small_ids else labels[0, 0].to(torch.int32)


def labels_to_numpy(labels: torch.Tensor) -> np.ndarray:
    """(H, W) labels from :func:`labels_from_logits` as a host array: uint8, or uint16 above 255 classes."""
    array = labels.cpu().numpy()
    return array if array.dtype == np.uint8 else array.astype(np.uint16)
