"""One rank of the two-process DDP data test (tests/test_shards.py), launched with RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set: joins a gloo group, then for split and for resampled shards reads two
epochs with 2 DataLoader workers, as data=laion's DataModule sets them up, and writes the keys of each
batch to a JSON file: {"split": [epoch0, epoch1], "resampled": [...]}, each epoch a list of batches.

    python tests/ddp_shards_worker.py SHARDS_DIR OUT.json
"""

import json
import sys

import torch.distributed as dist
from torch.utils.data import DataLoader

from ldm.data.laion import ImageTextDecoder
from ldm.data.shards import ShardedDataset


def read(shards: str, resampled: bool) -> list[list[list[str]]]:
    dataset = ShardedDataset(shards, ImageTextDecoder(16), batch_size=2, batches_per_epoch=7, resampled=resampled,
                             shuffle_buffer=4, seed=0)
    dataset.distribute(dist.get_rank(), dist.get_world_size())  # what ShardDataModule.setup does
    loader = DataLoader(dataset, batch_size=None, num_workers=2, persistent_workers=True)
    return [[batch["key"] for batch in loader] for _ in range(2)]


def main(shards: str, out: str) -> None:
    dist.init_process_group("gloo")
    keys = {"split": read(shards, resampled=False), "resampled": read(shards, resampled=True)}
    with open(out, "w") as f:
        json.dump(keys, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
