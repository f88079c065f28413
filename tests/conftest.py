import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def repo_root() -> str:
    return REPO


@pytest.fixture(scope="session")
def tiny_autoencoder_ckpt(tmp_path_factory) -> str:
    """A stage-1 checkpoint of the tiny autoencoder (32x32 shapes, a few steps), made once per session."""
    from ldm.training.run import train
    from train_helpers import TINY_AUTOENCODER, compose_config

    run_dir = tmp_path_factory.mktemp("tiny_autoencoder")
    train(compose_config(str(run_dir), [*TINY_AUTOENCODER, "trainer.max_steps=30", "trainer.val_check_interval=30",
                                        "stage.module.optimizer.lr=2e-3"]))
    return str(run_dir / "checkpoints" / "last.ckpt")


@pytest.fixture(scope="session")
def tiny_ldm_ckpt(tmp_path_factory, tiny_autoencoder_ckpt) -> str:
    """A stage-2 checkpoint (tiny UNet + tiny random text encoder) on the tiny autoencoder, made once per session."""
    from ldm.training.run import train
    from train_helpers import TINY_LDM, compose_config

    run_dir = tmp_path_factory.mktemp("tiny_ldm")
    train(compose_config(str(run_dir), [*TINY_LDM, f"autoencoder_ckpt={tiny_autoencoder_ckpt}", "trainer.max_steps=10",
                                        "trainer.val_check_interval=10"]))
    return str(run_dir / "checkpoints" / "last.ckpt")
