"""cnn-pipeline: a DVC + MLflow + Lightning pipeline for convolutional neural networks."""

import os

# Quiet and offline-safe defaults for every process that imports the project, set before any library loads:
# albumentations otherwise asks a package index for updates at import time, DVC otherwise sends analytics.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
