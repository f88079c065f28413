"""ldm.inference: generation without Lightning, from the same checkpoint the training module writes."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ldm.checkpoints import read_checkpoint
from ldm.diffusion import build_sampler
from ldm.errors import CheckpointStageError
from ldm.inference import generate_images, load_model
from ldm.modules.latent_codec import LatentCodec

PROMPT = "a large red circle in the center on a white background"


def test_inference_imports_no_lightning_and_no_training_code(repo_root: str) -> None:
    script = (
        "import sys, ldm.inference, ldm.inference.sample, ldm.checkpoints, ldm.diffusion, ldm.modules.latent_codec\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning') or m.startswith('ldm.training'))\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]


def test_load_model_holds_the_checkpoints_ema_or_trained_weights(tiny_ldm_ckpt: str) -> None:
    state = read_checkpoint(tiny_ldm_ckpt)["state_dict"]
    ema, raw = load_model(tiny_ldm_ckpt), load_model(tiny_ldm_ckpt, use_ema=False)
    for name, tensor in ema.unet.state_dict().items():
        assert torch.equal(tensor, state[f"ema.module.{name}"]), name
    for name, tensor in raw.unet.state_dict().items():
        assert torch.equal(tensor, state[f"unet.{name}"]), name
    assert any(not torch.equal(state[f"ema.module.{n}"], state[f"unet.{n}"]) for n in raw.unet.state_dict())
    assert torch.equal(ema.scale_factor, state["scale_factor"]) and ema.prediction == "v" and not ema.training
    assert ema.metadata["global_step"] == read_checkpoint(tiny_ldm_ckpt)["global_step"]


def test_the_lightning_module_and_the_plain_model_generate_the_same_images(tiny_ldm_ckpt: str) -> None:
    from ldm.training.ldm_module import LatentDiffusionModule

    module = LatentDiffusionModule.from_checkpoint(tiny_ldm_ckpt)
    model = load_model(tiny_ldm_ckpt)
    sampler = build_sampler("ddim", model.schedule, 4)
    kwargs = dict(height=32, width=32, guidance_scale=3.0)
    ours = generate_images(model, sampler, [PROMPT, "a blue square"], [0, 1], **kwargs)
    theirs = generate_images(module.generation_model(), sampler, [PROMPT, "a blue square"], [0, 1], **kwargs)
    assert torch.equal(ours, theirs)


def test_the_codec_scales_on_the_way_in_and_unscales_on_the_way_out(tiny_ldm_ckpt: str) -> None:
    model = load_model(tiny_ldm_ckpt)
    codec = model.codec
    image = torch.rand(2, 3, 32, 32) * 2 - 1
    posterior = model.autoencoder.encode(image)
    torch.testing.assert_close(codec.encode(image, sample=False), posterior.mean * float(model.scale_factor), rtol=1e-6, atol=1e-7)
    z = codec.encode(image, sample=False)
    torch.testing.assert_close(codec.decode(z), model.autoencoder.decode(posterior.mean).clamp(-1, 1), rtol=1e-5, atol=1e-6)
    assert codec.latent_shape(32, 48) == (model.autoencoder.latent_channels, 16, 24)
    halved = LatentCodec(model.autoencoder, 0.5 * float(model.scale_factor))
    torch.testing.assert_close(halved.encode(image, sample=False), 0.5 * z, rtol=1e-6, atol=1e-7)


def test_a_stage_1_checkpoint_is_refused_by_the_loader(tiny_autoencoder_ckpt: str) -> None:
    with pytest.raises(CheckpointStageError, match=r"is a 'autoencoder' checkpoint, not a stage-2 \(ldm\) one"):
        load_model(tiny_autoencoder_ckpt)
