"""ldm.inference.pipeline: text-to-image, img2img and inpainting on the tiny stage-2 checkpoint."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from ldm.diffusion import SAMPLERS, build_sampler
from ldm.inference import (
    check_image_size,
    denoise_latents,
    generate_images,
    latent_mask,
    load_model,
    seeded_noise,
)

SIZE = 32
PROMPT = "a large red square in the center on a white background"


@pytest.fixture(scope="module")
def model(tiny_ldm_ckpt):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_model(tiny_ldm_ckpt)
    torch.set_num_threads(threads)


@pytest.fixture
def ddim(model):
    return build_sampler("ddim", model.schedule, 10)


@pytest.fixture
def init_image() -> Tensor:
    """A red square on white, in [-1, 1]."""
    image = torch.ones(1, 3, SIZE, SIZE)
    image[:, 1:, 8:24, 8:24] = -1
    return image


def generate(model, sampler, seeds=(1,), **kwargs) -> Tensor:
    return generate_images(model, sampler, [PROMPT] * len(seeds), list(seeds), height=SIZE, width=SIZE, **kwargs)


def autoencoder_reconstruction(model, image: Tensor) -> Tensor:
    autoencoder = model.autoencoder
    return autoencoder.decode(autoencoder.encode(image).mean).clamp(-1, 1)


def test_img2img_strength_zero_is_the_autoencoder_reconstruction(model, ddim, init_image):
    out = generate(model, ddim, init_image=init_image, strength=0.0)
    torch.testing.assert_close(out, autoencoder_reconstruction(model, init_image), atol=1e-5, rtol=0)


def test_img2img_strength_one_is_text_to_image_for_the_same_seed(model, ddim, init_image):
    text_to_image = generate(model, ddim)
    assert torch.equal(generate(model, ddim, init_image=init_image, strength=1.0), text_to_image)
    assert not torch.equal(generate(model, ddim, seeds=(2,)), text_to_image)


def test_img2img_stays_closer_to_the_init_image_at_lower_strength(model, ddim, init_image):
    reconstruction = autoencoder_reconstruction(model, init_image)
    distances = [(generate(model, ddim, init_image=init_image, strength=s) - reconstruction).abs().mean() for s in (0.3, 0.6, 1.0)]
    assert distances[0] < distances[1] < distances[2]


def test_inpainting_regenerates_white_and_keeps_black_latents_exactly(model, ddim, init_image):
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., : SIZE // 2] = 1
    latents = generate(model, ddim, init_image=init_image, mask=mask, decode=False)
    kept = model.codec.encode(init_image, sample=False)
    factor = model.autoencoder.downsample_factor
    regenerated, untouched = latents[..., : SIZE // 2 // factor], latents[..., SIZE // 2 // factor :]
    assert torch.equal(untouched, kept[..., SIZE // 2 // factor :])
    assert (regenerated - kept[..., : SIZE // 2 // factor]).abs().mean() > 0.1


def test_inpainting_with_nothing_or_everything_masked(model, ddim, init_image):
    nothing = torch.zeros(1, 1, SIZE, SIZE)
    everything = torch.ones(1, 1, SIZE, SIZE)
    torch.testing.assert_close(generate(model, ddim, init_image=init_image, mask=nothing), autoencoder_reconstruction(model, init_image), atol=1e-5, rtol=0)
    assert torch.equal(generate(model, ddim, init_image=init_image, mask=everything), generate(model, ddim))


def test_latent_mask_regenerates_a_latent_pixel_if_any_of_its_pixels_is_white():
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 5, 9] = 1
    mask[..., 12:, :] = 1
    expected = torch.zeros(1, 1, 4, 4)
    expected[..., 1, 2] = 1
    expected[..., 3, :] = 1
    assert torch.equal(latent_mask(mask, 4), expected)


@pytest.mark.parametrize(("name", "options"), [("ddim", {}), ("euler_a", {}), ("ddim", {"eta": 1.0}), ("ddpm", {})])
def test_image_k_depends_on_its_seed_only(model, name, options):
    """Also for the samplers that add fresh noise at every step: it comes from the image's own seed."""
    sampler = build_sampler(name, model.schedule, 6, **options)
    batch = generate(model, sampler, seeds=(5, 6, 7))
    alone = generate(model, sampler, seeds=(7,))
    torch.testing.assert_close(batch[2:], alone, atol=1e-4, rtol=1e-5)
    assert (batch[0] - batch[2]).abs().mean() > 1e-2
    assert torch.equal(seeded_noise([7], (4, 2, 2), "cpu")[0], torch.randn(4, 2, 2, generator=torch.Generator().manual_seed(7)))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_runs_through_the_pipeline(model, name):
    sampler = build_sampler(name, model.schedule, 3)
    first = generate(model, sampler, seeds=(3,))
    assert first.isfinite().all() and first.abs().max() <= 1
    assert torch.equal(generate(model, sampler, seeds=(3,)), first)
    assert not torch.equal(generate(model, sampler, seeds=(4,)), first)


class CountingUNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    def forward(self, x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        self.batches.append(x.shape[0])
        return 0.1 * x + context.mean(dim=(1, 2)).view(-1, 1, 1, 1)


@pytest.mark.parametrize("scale, per_call", [(5.0, 6), (1.0, 3)])
def test_guidance_is_one_batched_unet_call_per_step(model, scale, per_call):
    unet = CountingUNet()
    context, uncond = torch.ones(3, 2, 8), torch.zeros(3, 2, 8)
    sampler = build_sampler("ddim", model.schedule, 4)
    denoise_latents(unet, sampler, context, uncond, scale, torch.randn(3, 4, 2, 2), prediction=model.prediction)
    assert unet.batches == [per_call] * 4


def test_guided_loop_never_reads_tensor_values_on_the_host(model):
    """On the meta device any .item(), bool() or branch on a tensor value raises."""
    context, uncond = torch.ones(2, 2, 8, device="meta"), torch.zeros(2, 2, 8, device="meta")
    x_T = torch.randn(2, 4, 2, 2, device="meta")
    for name in sorted(SAMPLERS):
        out = denoise_latents(CountingUNet(), build_sampler(name, model.schedule, 3), context, uncond, 5.0, x_T, None, prediction=model.prediction)
        assert out.device.type == "meta"


def test_bad_sizes_and_missing_inputs_are_named(model, ddim, init_image):
    with pytest.raises(ValueError, match=r"H=30: .*multiples of 4"):
        check_image_size(30, 32, 4)
    with pytest.raises(ValueError, match=r"H=30 and W=10"):
        check_image_size(30, 10, 4)
    with pytest.raises(ValueError, match="need an init image"):
        generate(model, ddim, mask=torch.ones(1, 1, SIZE, SIZE))
    with pytest.raises(ValueError, match="init image is 16x16"):
        generate(model, ddim, init_image=init_image[..., :16, :16], strength=0.5)
