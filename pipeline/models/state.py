"""Reading weights from files users hand us, and checking that they fit a model before loading them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.errors import PipelineError


def read(path: Path) -> dict[str, Any]:
    """A torch file, loaded weights_only (never unpickling code from a user's file)."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"checkpoint {path}: not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PipelineError(f"checkpoint {path}: not a loadable torch file ({type(exc).__name__})") from None
    return payload


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The weights of a pipeline checkpoint, a Lightning checkpoint or a plain state dict."""
    payload = read(path)
    if isinstance(payload, dict) and "state_dict" in payload:
        state = payload["state_dict"]
        # Lightning prefixes the module attribute ("model.") to the network's keys; other keys (a module's own
        # buffers or metrics) are not the network's.
        if any(k.startswith("model.") for k in state):
            state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        return state
    if isinstance(payload, dict) and all(isinstance(v, torch.Tensor) for v in payload.values()):
        return payload
    raise PipelineError(f"checkpoint {path}: no state dict inside")


def check_fits(own: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], where: str, who: str) -> None:
    """Every tensor `own` needs is in `theirs` with the same shape; else one line naming the first bad layer."""
    for key, tensor in own.items():
        other = theirs.get(key)
        if other is None or tuple(other.shape) != tuple(tensor.shape):
            got = "missing" if other is None else f"shape {tuple(other.shape)}"
            raise PipelineError(f"{where}: layer {key} does not fit ({got}; {who} needs {tuple(tensor.shape)})")
