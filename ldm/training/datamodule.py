"""The LightningDataModule around any map-style or iterable dataset of {"image", "caption"} samples."""

from __future__ import annotations

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ldm.data.datamodule import build_dataloader


class ImageCaptionDataModule(pl.LightningDataModule):
    def __init__(
        self,
        train: Dataset,
        val: Dataset | None = None,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.train_set, self.val_set = train, val
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.seed = seed

    def _loader(self, dataset: Dataset, batch_size: int, train: bool) -> DataLoader:
        shuffle = train and not isinstance(dataset, IterableDataset)
        return build_dataloader(dataset, batch_size, shuffle=shuffle, num_workers=self.num_workers, seed=self.seed,
                                drop_last=train, pin_memory=self.pin_memory)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        return self._loader(self.val_set, self.val_batch_size, train=False)
