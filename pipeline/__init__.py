"""cnn-pipeline: a DVC + MLflow + Lightning pipeline for convolutional neural networks."""

import os

# Quiet and offline-safe defaults for every process that imports the project, set before any library loads:
# albumentations otherwise asks a package index for updates at import time, DVC otherwise sends analytics.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
# The profiler behind evaluate's CPU memory figure logs "gpuGetDeviceCount failed" as an ERROR on machines
# without a GPU; nothing is wrong, so its log is limited to fatal messages.
os.environ.setdefault("KINETO_LOG_LEVEL", "5")
