"""Train a stage of the latent diffusion pipeline: `python train.py stage=autoencoder` or `stage=ldm`."""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    from ldm.errors import LdmError
    from ldm.training.run import TrainingStopped, pin_run_dir, train

    pin_run_dir(cfg, HydraConfig.get().runtime.output_dir)  # one run directory for every rank
    try:
        train(cfg)
    except TrainingStopped as stopped:  # the shell's convention for a process ended by a signal
        print(f"stopped: {stopped}", file=sys.stderr)
        sys.exit(128 + stopped.signum)
    except (LdmError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
