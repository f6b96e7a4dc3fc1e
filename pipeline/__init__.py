"""cnn-pipeline: a DVC + MLflow + Lightning pipeline for convolutional neural networks."""
