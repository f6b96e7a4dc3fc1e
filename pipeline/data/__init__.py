"""Data: where images come from, the prepared splits, augmentation, and the LightningDataModule."""
