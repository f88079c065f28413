"""`python train.py ...` whose stage-1 loss is NaN on rank 1 only, on the (0-based) batches listed in the
environment variable NAN_BATCHES_RANK1. Lightning's DDP launcher re-runs this script for rank 1, so the
patch is in place there too; rank 0 (no LOCAL_RANK) trains normally."""

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from ldm.losses.autoencoder_loss import AutoencoderLoss  # noqa: E402

NAN_BATCHES = {int(i) for i in os.environ["NAN_BATCHES_RANK1"].split(",")}
real_generator_loss = AutoencoderLoss.generator_loss
calls = iter(range(10**9))


def generator_loss(self, *args):
    loss, logs = real_generator_loss(self, *args)
    if next(calls) in NAN_BATCHES and os.environ.get("LOCAL_RANK", "0") == "1":
        loss = loss * float("nan")
    return loss, logs


AutoencoderLoss.generator_loss = generator_loss
# train.py as __main__, keeping sys.argv[0] (runpy would replace it, and Lightning re-runs sys.argv[0] for rank 1).
TRAIN = REPO / "train.py"
exec(compile(TRAIN.read_text(), str(TRAIN), "exec"), {"__name__": "__main__", "__file__": str(TRAIN)})
