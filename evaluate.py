"""Measure a checkpoint of either stage: `python evaluate.py ckpt=PATH` (see configs/evaluate.yaml).

Stage 1: PSNR/SSIM/LPIPS/rFID of reconstructions; stage 2: FID/KID/IS/precision/recall of generated images.
"""

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    # Imported here so that --help and config errors answer without loading torch.
    from ldm.errors import LdmError
    from ldm.evaluation.evaluate import evaluate

    try:
        evaluate(cfg)
    except LdmError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
