"""The published checkpoints' outputs, reproduced on the shared vectors (../shared/vectors)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from published_vectors import PUBLISHED_MODELS, filled_state_dict, published_preprocess, vector_files
from tdnet_ros import Segmenter

CASES = [(model, path) for model in PUBLISHED_MODELS for path in vector_files(model)]
SUB_NETWORKS = {"td4-psp18": 4, "td2-psp50": 2}


@pytest.fixture(scope="module", params=CASES, ids=[f"{m}-{p.stem}" for m, p in CASES])
def vector_run(request, tmp_path_factory):
    """Runs the frames through both entry points of a segmenter loaded from a published-layout .pkl.

    Every frame goes through `segment_normalized` (the logits and labels tests). `segment`,
    which adds this project's own preprocessing of the raw frame, gets the first N + 1 frames:
    every sub-network once, then one with the cache warm. Running it on all frames too would
    double this module's time (a third of the suite's) for the same regime repeated.
    """
    model, vector_path = request.param
    vectors = dict(np.load(vector_path))
    assert str(vectors["model"]) == model
    checkpoint = tmp_path_factory.mktemp("ckpt") / f"{model}.pkl"
    torch.save(filled_state_dict(model, int(vectors["seed"])), checkpoint)
    segmenter = Segmenter.from_checkpoint(checkpoint, model=model, device="cpu")
    normalized = [segmenter.segment_normalized(published_preprocess(f), stream="normalized") for f in vectors["frames"]]
    raw = [segmenter.segment(f, stream="raw") for f in vectors["frames"][: SUB_NETWORKS[model] + 1]]
    return model, vectors, normalized, raw


def test_sub_network_schedule(vector_run):
    model, vectors, normalized, _ = vector_run
    n = SUB_NETWORKS[model]
    assert [r.path for r in normalized] == [t % n for t in range(len(vectors["frames"]))]
    assert [r.cache_warm for r in normalized] == [t >= n - 1 for t in range(len(vectors["frames"]))]


def test_logits_match_published(vector_run):
    """Logits within max 0.05 / mean 0.005 of the published code's.

    The max bound holds everywhere but at isolated positions where two attention logits of
    ~7e5 differ by a few units: there the softmax weights depend on float rounding and the
    published code itself, run on this machine, differs from the vectors by up to 0.6 (seen
    for td2-psp50). So the max bound is asserted on all but 0.2 % of the 97x193 positions (a few near-ties).
    """
    _, vectors, normalized, _ = vector_run
    for t, result in enumerate(normalized):
        expected = torch.from_numpy(vectors["logits"][t].astype(np.float32))
        assert result.logits.shape == expected.shape
        diff = (result.logits - expected).abs()  # (K, h, w)
        assert diff.mean().item() <= 0.005, f"frame {t}: mean |diff| {diff.mean().item():.5f}"
        # A near-tie moves one feature position, which the head's 3x3 conv spreads to 9.
        outliers = (diff.amax(dim=0) > 0.05).float().mean().item()
        labels = (result.labels == vectors["labels"][t]).mean()
        print(f"frame {t}: max {diff.max().item():.4f} mean {diff.mean().item():.5f} labels {labels:.5f} positions>0.05 {outliers:.4%}")
        assert outliers <= 0.002, f"frame {t}: {outliers:.2%} of positions off by > 0.05 (max {diff.max().item():.3f})"


def test_labels_match_published(vector_run):
    _, vectors, normalized, _ = vector_run
    for t, result in enumerate(normalized):
        assert result.labels.shape == (769, 1537) and result.labels.dtype == np.uint8
        agreement = (result.labels == vectors["labels"][t]).mean()
        assert agreement >= 0.999, f"frame {t}: {agreement:.5f} of labels agree"


def test_raw_frames_labelled_at_frame_resolution(vector_run):
    model, vectors, _, raw = vector_run
    assert len(raw) == SUB_NETWORKS[model] + 1 and raw[-1].cache_warm
    for t, (frame, result) in enumerate(zip(vectors["frames"], raw)):
        h, w = frame.shape[:2]
        assert result.labels.shape == (h, w)
        expected = cv2.resize(vectors["labels"][t], (w, h), interpolation=cv2.INTER_NEAREST)
        agreement = (result.labels == expected).mean()
        assert agreement >= 0.97, f"frame {t}: {agreement:.4f} of labels agree"
