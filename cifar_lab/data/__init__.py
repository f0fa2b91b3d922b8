"""Data sources, the CIFAR LightningDataModule, sampling, batched augmentation and mixing."""
