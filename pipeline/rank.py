"""The one rank-zero rule: the process that owns outputs and MLflow (as torchvision's save_on_master)."""

from __future__ import annotations

import os


def is_rank_zero() -> bool:
    """True unless this is a DDP child: Lightning's launchers and torchrun set LOCAL_RANK and NODE_RANK
    (or RANK) in the children before any code runs, so the answer holds from the first line on."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"]) == 0
    return int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0
