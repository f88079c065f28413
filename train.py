"""Train a stage of the latent diffusion pipeline: `python train.py stage=autoencoder` or `stage=ldm`."""

import hydra
from omegaconf import DictConfig

from ldm.training.run import train


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
