"""Training: the LightningModule, the Trainer built from params.trainer, and callbacks."""
