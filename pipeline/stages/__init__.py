"""One module per DVC stage: `python -m pipeline.stages.<stage>`."""
