"""The Stable Diffusion UNet: layout and numerics against diffusers, gradient checkpointing, learning."""

import copy
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from ldm.checkpoints import SD_PREFIXES
from ldm.checkpoints.diffusers import unet_to_diffusers
from ldm.modules.timestep import timestep_embedding
from ldm.modules.unet import UNetModel

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "model"
SD_PREFIX = SD_PREFIXES["unet"]


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """One intra-op thread: on a CPU shared with other processes, OpenMP threads that spin-wait for
    each other made these small ops ~15x slower than one thread alone."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_config(name: str, **overrides: Any) -> dict[str, Any]:
    config = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / f"{name}.yaml"))
    config.update(overrides)
    return config


def build_unet(name: str, device: str | torch.device = "cpu", **overrides: Any) -> UNetModel:
    with torch.device(device):
        return instantiate(load_config(name, **overrides))


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter with random values, including the zero-initialised output layers
    that would otherwise hide whole branches (attention, residual paths) from a comparison."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1:
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=generator) * fan_in**-0.5)
            elif name.endswith("weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return model


def assert_same_as_diffusers(config: dict[str, Any], latent_size: int, tokens: int) -> None:
    with torch.device("meta"):
        model = instantiate(config)
    model = randomize_(model.to_empty(device="cpu")).eval()
    reference = unet_to_diffusers(model, config)

    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, latent_size, latent_size, generator=generator)
    context = torch.randn(2, tokens, config["context_dim"], generator=generator)
    timesteps = torch.tensor([3, 981])
    with torch.no_grad():
        ours = model(x, timesteps, context)
        theirs = reference(x, timesteps, encoder_hidden_states=context).sample
    scale = theirs.abs().max().item()
    assert scale > 1e-2, "a degenerate output would make the comparison vacuous"
    torch.testing.assert_close(ours, theirs, atol=1e-4 * max(1.0, scale), rtol=1e-4)


def test_timestep_embedding_matches_diffusers_flip_sin_to_cos_without_freq_shift() -> None:
    from diffusers.models.embeddings import get_timestep_embedding

    timesteps = torch.tensor([0, 1, 17, 500, 999])
    for dim in (320, 64):
        ours = timestep_embedding(timesteps, dim)
        theirs = get_timestep_embedding(timesteps, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert torch.equal(timestep_embedding(timesteps.half(), 32), timestep_embedding(timesteps, 32))
    assert timestep_embedding(timesteps.bfloat16(), 32).dtype == torch.float32


@pytest.mark.parametrize(
    ("name", "expected"), [("sd15", 859_520_964), ("sd21", 865_910_724)]
)
def test_parameter_count_of_stable_diffusion_configs(name: str, expected: int) -> None:
    model = build_unet(name, device="meta")
    assert sum(p.numel() for p in model.parameters()) == expected


def test_sd15_state_dict_has_the_stable_diffusion_layout() -> None:
    state = build_unet("sd15", device="meta").state_dict()
    assert len(state) == 686
    expected_shapes = {
        "time_embed.0.weight": (1280, 320),
        "time_embed.2.weight": (1280, 1280),
        "input_blocks.0.0.weight": (320, 4, 3, 3),
        "input_blocks.1.0.in_layers.0.weight": (320,),
        "input_blocks.1.0.in_layers.2.weight": (320, 320, 3, 3),
        "input_blocks.1.0.emb_layers.1.weight": (320, 1280),
        "input_blocks.1.0.out_layers.3.weight": (320, 320, 3, 3),
        "input_blocks.1.1.norm.weight": (320,),
        "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (320, 320),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_out.0.bias": (320,),
        "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
        "input_blocks.1.1.transformer_blocks.0.ff.net.2.weight": (320, 1280),
        "input_blocks.1.1.transformer_blocks.0.norm3.weight": (320,),
        "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "input_blocks.11.0.in_layers.2.weight": (1280, 1280, 3, 3),
        "middle_block.1.proj_out.weight": (1280, 1280, 1, 1),
        "middle_block.2.out_layers.3.weight": (1280, 1280, 3, 3),
        "output_blocks.0.0.skip_connection.weight": (1280, 2560, 1, 1),
        "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.11.1.transformer_blocks.0.attn2.to_v.weight": (320, 768),
        "out.0.weight": (320,),
        "out.2.weight": (4, 320, 3, 3),
    }
    assert {k: tuple(state[k].shape) for k in expected_shapes} == expected_shapes
    assert not any(k.startswith("input_blocks.12") or k.startswith("output_blocks.12") for k in state)


def test_sd21_uses_linear_projections_and_64_channel_heads() -> None:
    model = build_unet("sd21", device="meta")
    state = model.state_dict()
    assert tuple(state["input_blocks.1.1.proj_in.weight"].shape) == (320, 320)
    assert tuple(state["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape) == (1280, 1024)
    assert [m.heads for m in model.modules() if hasattr(m, "heads")][:2] == [5, 5]
    assert model.middle_block[1].transformer_blocks[0].attn1.heads == 20


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("sd15", {"model_channels": 32, "context_dim": 48}),
        ("sd21", {"model_channels": 32, "num_head_channels": 8, "context_dim": 48}),
        ("sd15", {"model_channels": 32, "context_dim": 48, "transformer_depth": 2}),
    ],
    ids=["sd15-narrow", "sd21-narrow", "sd15-narrow-depth2"],
)
def test_narrow_sd_architecture_matches_diffusers(name: str, overrides: dict[str, Any]) -> None:
    assert_same_as_diffusers(load_config(name, **overrides), latent_size=16, tokens=7)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_full_size_sd_unet_matches_diffusers(name: str) -> None:
    assert_same_as_diffusers(load_config(name), latent_size=8, tokens=77)


def test_sd_state_dict_loads_strictly_from_a_checkpoint() -> None:
    source = randomize_(build_unet("unet_tiny"))
    checkpoint = {SD_PREFIX + k: v.clone() for k, v in source.state_dict().items()}
    checkpoint["first_stage_model.encoder.conv_in.weight"] = torch.zeros(1)
    target = build_unet("unet_tiny")
    unet_weights = {k.removeprefix(SD_PREFIX): v for k, v in checkpoint.items() if k.startswith(SD_PREFIX)}
    target.load_state_dict(unet_weights, strict=True)
    x, t, c = torch.randn(1, 4, 16, 16), torch.tensor([5]), torch.randn(1, 3, 64)
    with torch.no_grad():
        assert torch.equal(source(x, t, c), target(x, t, c))


def test_float_and_integer_timesteps_agree() -> None:
    model = randomize_(build_unet("unet_tiny")).eval()
    x, c = torch.randn(2, 4, 16, 16), torch.randn(2, 5, 64)
    with torch.no_grad():
        assert torch.equal(model(x, torch.tensor([7, 400]), c), model(x, torch.tensor([7.0, 400.0]), c))
        moved = model(x, torch.tensor([7.0, 400.5]), c)
    assert not torch.equal(moved, model(x, torch.tensor([7, 400]), c))


def gradients(model: nn.Module, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, autocast: bool) -> dict:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x, t, c)
    (out.float().square().mean()).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_gradient_checkpointing_gives_the_same_gradients(autocast: bool) -> None:
    plain = randomize_(build_unet("unet_tiny")).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing = True
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 16, 16, generator=generator)
    c = torch.randn(2, 5, 64, generator=generator)
    t = torch.tensor([10, 700])

    expected = gradients(plain, x, t, c, autocast)
    actual = gradients(checkpointed, x, t, c, autocast)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert expected[name].abs().sum() > 0, name
        torch.testing.assert_close(actual[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)


def test_gradient_checkpointing_recomputes_under_autocast() -> None:
    """The recomputed forward must run in bf16 like the first one (the CompVis checkpoint ran it in fp32)."""
    model = randomize_(build_unet("unet_tiny", gradient_checkpointing=True)).train()
    dtypes: list[torch.dtype] = []
    target = model.middle_block[1].transformer_blocks[0].attn1.to_q
    target.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(1, 4, 16, 16), torch.tensor([3]), torch.randn(1, 4, 64))
    out.float().mean().backward()
    assert dtypes == [torch.bfloat16, torch.bfloat16]


def test_tiny_unet_fits_a_batch() -> None:
    torch.manual_seed(0)
    model = build_unet("unet_tiny").train()
    x, c = torch.randn(2, 4, 16, 16), torch.randn(2, 5, 64)
    t = torch.tensor([50, 900])
    target = torch.randn(2, 4, 16, 16)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(15):
        loss = (model(x, t, c) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_tiny_config_size() -> None:
    model = build_unet("unet_tiny")
    assert 1_000_000 <= sum(p.numel() for p in model.parameters()) <= 3_000_000


@pytest.mark.slow
def test_tiny_unet_training_step_time() -> None:
    """Reports fwd+bwd time of the tiny UNet on a batch of 32 4x16x16 latents (run with -s to see it)."""
    model = build_unet("unet_tiny").train()
    x, t, c = torch.randn(32, 4, 16, 16), torch.randint(0, 1000, (32,)), torch.randn(32, 8, 64)
    for autocast in (False, True):
        timings = []
        for _ in range(4):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = model(x, t, c).float().square().mean()
            loss.backward()
            timings.append(time.perf_counter() - start)
        print(f"tiny UNet fwd+bwd, batch 32, autocast={autocast}: {min(timings[1:]) * 1000:.0f} ms")
