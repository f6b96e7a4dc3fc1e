"""Models for other runtimes: ONNX (checked against PyTorch with onnxruntime) and int8 quantization.

ONNX: torch.onnx's exporter (the dynamo one, opset 20, a dynamic batch dimension, one self-contained file); the
exported graph includes the Classifier's preprocessing, so it takes the same float pixels in [0, 1].
int8: PyTorch's dynamic quantization of the dense layers (torch.ao.quantization.quantize_dynamic): their weights
stored as int8, activations quantized on the fly; the convolutions stay float. For the seed CNN the dense layers
hold 95% of the parameters.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.predict import to_float


@contextlib.contextmanager
def _quiet():
    """The exporter's and quantizer's own chatter (deprecations, its progress lines) says nothing actionable."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        level = logging.getLogger("torch.onnx").level
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        try:
            yield
        finally:
            logging.getLogger("torch.onnx").setLevel(level)


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], path: Path) -> None:
    """Write `model` as ONNX with a dynamic batch dimension; a model the exporter cannot take is one line."""
    model = model.cpu().eval()
    x = torch.rand(2, *input_shape)
    try:
        with _quiet():
            torch.onnx.export(model, (x,), str(path), dynamo=True, input_names=["pixels"], output_names=["logits"],
                              dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False)
    except Exception as exc:
        first = re.sub(r"\x1b\[[0-9;]*m", "", (str(exc).strip().splitlines() or [""])[0])  # no terminal colours
        raise PipelineError(f"ONNX export failed ({type(exc).__name__}: {first[:160]})") from None


def onnx_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_logits(session, images: np.ndarray, image_size: int, batch_size: int = 32) -> np.ndarray:
    """onnxruntime's logits for uint8 (N, H, W, C) images, fed exactly as predict_proba feeds PyTorch."""
    out = [session.run(None, {"pixels": to_float(images[i : i + batch_size], image_size).numpy()})[0]
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out)


def onnx_latency_ms(session, input_shape: tuple[int, ...], runs: int, warmup: int) -> float:
    """Batch-1 latency p50 in onnxruntime: `warmup` untimed runs first, then `runs` timed ones."""
    x = {"pixels": np.random.default_rng(0).random((1, *input_shape), dtype=np.float32)}
    for _ in range(warmup):
        session.run(None, x)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, x)
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def quantize_int8(model: nn.Module) -> nn.Module:
    """A copy of `model` with its dense layers dynamically quantized to int8 (on the CPU)."""
    import copy

    with _quiet():
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model).cpu().eval(), {nn.Linear},
                                                      dtype=torch.qint8)


def state_mb(model: nn.Module) -> float:
    """The size of the model's saved weights (torch.save of its state dict), in MB."""
    buffer = io.BytesIO()
    with _quiet():
        torch.save(model.state_dict(), buffer)
    return buffer.tell() / 2**20
