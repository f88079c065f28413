"""Sample images from a stage-2 checkpoint: `python sample.py ckpt=PATH prompt="a red circle"` (see configs/sample.yaml)."""

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="configs", config_name="sample")
def main(cfg: DictConfig) -> None:
    # Imported here so that --help and config errors answer without loading torch.
    from ldm.errors import LdmError
    from ldm.inference.sample import sample

    try:
        sample(cfg)
    except LdmError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
