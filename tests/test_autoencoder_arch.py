import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ldm.modules.autoencoder import AttnBlock, DiagonalGaussianDistribution, KLAutoencoder

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "model"
SD_VAE_PARAMETERS = 83_653_863
SD_VAE_DIFFUSERS_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=256,
)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """These small CPU workloads run several times faster on one thread when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_config(name: str):
    return OmegaConf.load(CONFIG_DIR / f"{name}.yaml")


def diffusers_vae_to_sd_layout(diffusers_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``AutoencoderKL`` state dict to the CompVis/SD layout (the inverse of diffusers' importer).

    Written from the CompVis layout, independently of ``ldm.modules.autoencoder``.
    """
    num_levels = len(SD_VAE_DIFFUSERS_CONFIG["block_out_channels"])
    renames = [
        (r"down_blocks\.(\d+)\.resnets\.", lambda m: f"down.{m[1]}.block."),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.", lambda m: f"down.{m[1]}.downsample."),
        (r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{num_levels - 1 - int(m[1])}.block."),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{num_levels - 1 - int(m[1])}.upsample."),
        (r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}."),
        (r"mid_block\.attentions\.0\.", lambda m: "mid.attn_1."),
        (r"conv_shortcut", lambda m: "nin_shortcut"),
        (r"conv_norm_out", lambda m: "norm_out"),
        (r"group_norm", lambda m: "norm"),
        (r"to_([qkv])\.", lambda m: f"{m[1]}."),
        (r"to_out\.0\.", lambda m: "proj_out."),
    ]
    sd_state = {}
    for key, value in diffusers_state.items():
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key)
        if ".mid.attn_1." in key and key.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]
        sd_state[key] = value
    return sd_state


def build_on_meta(name: str) -> KLAutoencoder:
    with torch.device("meta"):
        return instantiate(load_config(name))


@pytest.fixture(scope="module")
def diffusers_vae():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(1)
    return diffusers.AutoencoderKL(**SD_VAE_DIFFUSERS_CONFIG).eval()


@pytest.fixture(scope="module")
def kl_f8_from_sd_checkpoint(diffusers_vae) -> KLAutoencoder:
    """kl_f8 loaded strictly from an SD-style checkpoint holding the diffusers model's weights."""
    sd_vae = diffusers_vae_to_sd_layout(diffusers_vae.state_dict())
    checkpoint = {f"first_stage_model.{key}": value for key, value in sd_vae.items()}
    checkpoint["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(1)
    checkpoint["cond_stage_model.model.positional_embedding"] = torch.zeros(1)
    prefix = "first_stage_model."
    vae_state = {key.removeprefix(prefix): value for key, value in checkpoint.items() if key.startswith(prefix)}
    model = build_on_meta("kl_f8")
    model.load_state_dict(vae_state, strict=True, assign=True)
    return model.eval()


def test_kl_f8_has_the_sd_vae_parameter_count_and_names():
    kl_f8 = build_on_meta("kl_f8")
    assert sum(p.numel() for p in kl_f8.parameters()) == SD_VAE_PARAMETERS
    shapes = {key: tuple(value.shape) for key, value in kl_f8.state_dict().items()}
    assert len(shapes) == 248
    expected = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.0.block.1.norm2.bias": (128,),
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.2.downsample.conv.weight": (512, 512, 3, 3),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "encoder.mid.attn_1.proj_out.bias": (512,),
        "encoder.conv_out.weight": (8, 512, 3, 3),
        "quant_conv.weight": (8, 8, 1, 1),
        "post_quant_conv.weight": (4, 4, 1, 1),
        "decoder.conv_in.weight": (512, 4, 3, 3),
        "decoder.mid.block_2.conv2.weight": (512, 512, 3, 3),
        "decoder.up.3.block.2.conv1.weight": (512, 512, 3, 3),
        "decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.up.1.upsample.conv.weight": (256, 256, 3, 3),
        "decoder.up.0.block.2.norm1.weight": (128,),
        "decoder.norm_out.weight": (128,),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    assert {key: shapes.get(key) for key in expected} == expected
    assert "decoder.up.0.upsample.conv.weight" not in shapes
    assert "encoder.down.3.downsample.conv.weight" not in shapes
    assert kl_f8.last_layer is kl_f8.decoder.conv_out.weight


def test_sd_checkpoint_weights_reproduce_diffusers_encode_and_decode(kl_f8_from_sd_checkpoint, diffusers_vae):
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, theirs = kl_f8_from_sd_checkpoint.encode(x), diffusers_vae.encode(x).latent_dist
        torch.testing.assert_close(ours.mean, theirs.mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.logvar, theirs.logvar, atol=1e-5, rtol=1e-5)
        decoded, reference = kl_f8_from_sd_checkpoint.decode(z), diffusers_vae.decode(z).sample
    assert reference.abs().max() > 0.1
    torch.testing.assert_close(decoded, reference, atol=1e-5, rtol=1e-5)


def test_export_to_diffusers_goes_through_diffusers_own_converter(kl_f8_from_sd_checkpoint, diffusers_vae):
    """With the numerical test above, this shows our weights can be handed to diffusers unchanged."""
    from ldm.checkpoints.diffusers import autoencoder_to_diffusers

    exported = autoencoder_to_diffusers(kl_f8_from_sd_checkpoint)
    expected = diffusers_vae.state_dict()
    exported_state = exported.state_dict()
    assert exported_state.keys() == expected.keys()
    mismatched = [key for key, value in exported_state.items() if not torch.equal(value, expected[key])]
    assert mismatched == []


def test_a_narrow_autoencoder_exports_with_its_own_widths_and_groups():
    from ldm.checkpoints.diffusers import autoencoder_to_diffusers

    generator = torch.Generator().manual_seed(0)
    ours = instantiate(load_config("autoencoder_tiny")).eval()
    with torch.no_grad():
        for param in ours.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    exported = autoencoder_to_diffusers(ours)
    x = torch.randn(2, 3, 32, 32, generator=generator)
    z = torch.randn(2, 4, 16, 16, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(exported.encode(x).latent_dist.mean, ours.encode(x).mean, atol=1e-5, rtol=1e-5)
        decoded, reference = ours.decode(z), exported.decode(z).sample
    assert reference.abs().max() > 0.1
    torch.testing.assert_close(decoded, reference, atol=1e-5, rtol=1e-5)


def test_export_to_diffusers_refuses_attention_diffusers_cannot_hold():
    from ldm.checkpoints.diffusers import autoencoder_to_diffusers

    config = OmegaConf.to_container(load_config("autoencoder_tiny"))
    config.update(attn_resolutions=[config["resolution"]])
    with pytest.raises(ValueError, match="middle block only"):
        autoencoder_to_diffusers(instantiate(config))


def test_kl_matches_closed_form_for_hand_numbers():
    mean = torch.tensor([[1.0, 0.0], [0.0, 2.0]]).reshape(2, 1, 1, 2)
    logvar = torch.tensor([[0.0, math.log(2.0)], [0.0, -math.log(4.0)]]).reshape(2, 1, 1, 2)
    posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    expected = torch.tensor([0.5 + 0.5 * (1.0 - math.log(2.0)), 0.5 * (4.0 + 0.25 - 1.0 + math.log(4.0))])
    torch.testing.assert_close(posterior.kl(), expected)
    torch.testing.assert_close(posterior.var, torch.tensor([[1.0, 2.0], [1.0, 0.25]]).reshape(2, 1, 1, 2))


def test_logvar_is_clamped_and_deterministic_posterior_is_its_mean():
    parameters = torch.tensor([0.5, -0.5, 50.0, -100.0]).reshape(1, 4, 1, 1)
    posterior = DiagonalGaussianDistribution(parameters)
    assert posterior.logvar.flatten().tolist() == [20.0, -30.0]

    deterministic = DiagonalGaussianDistribution(parameters, deterministic=True)
    assert torch.equal(deterministic.sample(), deterministic.mean)
    assert torch.equal(deterministic.kl(), torch.zeros(1))


def test_sample_is_reproducible_and_has_the_posterior_statistics():
    mean = torch.tensor([1.5, -2.0]).reshape(1, 2, 1, 1).expand(1, 2, 200, 200)
    std = torch.tensor([0.5, 3.0]).reshape(1, 2, 1, 1)
    logvar = (2 * std.log()).expand(1, 2, 200, 200)
    posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))

    first = posterior.sample(torch.Generator().manual_seed(7))
    assert torch.equal(first, posterior.sample(torch.Generator().manual_seed(7)))
    assert not torch.equal(first, posterior.sample(torch.Generator().manual_seed(8)))

    samples_per_channel = 200 * 200
    sample_mean = first.mean(dim=(0, 2, 3))
    sample_std = first.std(dim=(0, 2, 3))
    mean_tolerance = 5 * std.flatten() / math.sqrt(samples_per_channel)
    assert torch.all((sample_mean - torch.tensor([1.5, -2.0])).abs() < mean_tolerance)
    torch.testing.assert_close(sample_std, std.flatten(), rtol=0.02, atol=0.0)


@pytest.mark.parametrize(
    "name, factor, latent_channels, attention_blocks",
    [("kl_f4", 4, 3, 2), ("kl_f8", 8, 4, 2), ("kl_f16", 16, 16, 7), ("kl_f32", 32, 64, 12), ("autoencoder_tiny", 2, 4, 2)],
)
def test_configs_build_the_compvis_variants(name, factor, latent_channels, attention_blocks):
    with torch.device("meta"):
        model = instantiate(load_config(name))
    assert model.downsample_factor == factor
    assert model.latent_channels == latent_channels
    assert model.quant_conv.out_channels == 2 * latent_channels
    assert sum(isinstance(module, AttnBlock) for module in model.modules()) == attention_blocks


@pytest.mark.parametrize("name", ["autoencoder_tiny", "kl_f4"])
def test_small_configs_decode_a_generator_drawn_sample_at_64px(name):
    torch.manual_seed(0)
    model = instantiate(load_config(name)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        reconstruction, posterior = model(x, generator=torch.Generator().manual_seed(5))
        latent_size = 64 // model.downsample_factor
        assert posterior.mean.shape == (1, model.latent_channels, latent_size, latent_size)
        assert reconstruction.shape == x.shape
        z = posterior.sample(torch.Generator().manual_seed(5))
        assert not torch.equal(z, posterior.mode())
        torch.testing.assert_close(model.decode(z), reconstruction)


def test_tiny_autoencoder_reduces_reconstruction_loss():
    torch.manual_seed(0)
    model = instantiate(load_config("autoencoder_tiny"))
    assert 100_000 < sum(p.numel() for p in model.parameters()) < 400_000
    images = F.interpolate(torch.rand(4, 3, 4, 4) * 2 - 1, size=16, mode="bilinear", align_corners=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        reconstruction, posterior = model(images, sample_posterior=False)
        loss = (reconstruction - images).abs().mean() + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert model.last_layer.grad is not None
    assert losses[-1] < 0.7 * losses[0]
