"""Conditioners (ldm.modules.conditioning) through the real configs: each conditioning trains, guides,
saves, loads in sample.py and refuses what it cannot use; text-to-image is what it was before them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import hydra
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image

from ldm.checkpoints.io import read_checkpoint
from ldm.checkpoints.models import LEGACY_TEXT_PREFIX, TEXT_PREFIX
from ldm.data.shapes import CLASSES, ShapesDataset
from ldm.diffusion import NoiseSchedule, build_sampler
from ldm.diffusion.guidance import ClassifierFreeGuidance
from ldm.errors import EvaluationError, SamplingInputError
from ldm.evaluation import evaluate as evaluate_module
from ldm.inference import denoise_latents, generate_images, load_model, seeded_noise
from ldm.inference.pipeline import STEP_NOISE_SEED_OFFSET
from ldm.inference.sample import sample
from ldm.modules.conditioning import SamplingRequest, random_masks, unet_forward
from ldm.training.run import build_trainer
from train_helpers import TINY_LDM, compose_config

REPO = Path(__file__).resolve().parents[1]
KINDS = ("text", "class", "none", "inpaint", "superres")
PROMPT = "a large red circle in the center on a white background"


def _fixed_loss(module, batch: dict, seed: int = 6) -> float:
    """The loss on one batch with its conditioning, timesteps, noise (and random masks) fixed by `seed`."""
    torch.manual_seed(seed)
    with torch.no_grad():
        z0 = module.codec.encode(batch["image"], sample=False)
        cond = module.conditioning_of(batch, dropout=False)
        t = torch.randint(0, module.schedule.num_timesteps, (z0.shape[0],))
        noise = torch.randn_like(z0)
        return module.diffusion_loss(z0, cond, t, noise)[1].item()


@pytest.fixture(scope="module", params=KINDS)
def run(request, tiny_autoencoder_ckpt, tmp_path_factory) -> SimpleNamespace:
    """A tiny model of one conditioning trained for 20 steps through `python train.py`'s configs (eps on
    SD's schedule, whose loss falls fastest), its fixed-batch loss before and after, and its checkpoint."""
    torch.set_num_threads(1)
    kind = request.param
    run_dir = tmp_path_factory.mktemp(f"cond_{kind}")
    # FID during training, for the kinds that generate for a reference set (their labels, or nothing).
    evaluation = ["callbacks=with_eval", "callbacks.evaluation.every_n_steps=20", "callbacks.evaluation.n_images=4",
                  "callbacks.evaluation.steps=2", "callbacks.evaluation.metrics=[fid]", "callbacks.evaluation.at_train_end=false",
                  f"callbacks.evaluation.feature_cache={run_dir / 'features'}"] if kind in ("class", "none") else []
    cfg = compose_config(str(run_dir), [*TINY_LDM, f"autoencoder_ckpt={tiny_autoencoder_ckpt}", f"conditioning={kind}",
                                        "schedule=scaled_linear", "stage.module.prediction=eps", "trainer.max_steps=20",
                                        "trainer.val_check_interval=20", "data.train.length=320", "stage.module.optimizer.lr=1e-3",
                                        *evaluation])
    pl.seed_everything(0)
    datamodule = hydra.utils.instantiate(cfg.data)
    module = hydra.utils.instantiate(cfg.stage.module)
    datamodule.setup("fit")
    batch = next(iter(datamodule.val_dataloader()))
    module.scale_factor.fill_(module.measure_scale_factor([batch]))
    before = _fixed_loss(module, batch)
    build_trainer(cfg, run_dir).fit(module, datamodule=datamodule)
    after = _fixed_loss(module, batch)
    return SimpleNamespace(kind=kind, module=module, before=before, after=after, ckpt=str(run_dir / "checkpoints" / "last.ckpt"),
                           run_dir=run_dir, batch=batch)


def _request(kind: str, n: int = 2) -> SamplingRequest:
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    if kind == "text":
        return SamplingRequest(n, prompts=[PROMPT] * n)
    if kind == "class":
        return SamplingRequest(n, class_labels=[3, 7][:n])
    if kind == "inpaint":
        return SamplingRequest(n, prompts=[PROMPT] * n, image=image, mask=mask)
    if kind == "superres":
        return SamplingRequest(n, image=image[..., ::4, ::4])
    return SamplingRequest(n)


# --- training ---------------------------------------------------------------------------------


def test_each_conditioning_trains_with_falling_loss(run) -> None:
    assert run.after < 0.8 * run.before, (run.kind, run.before, run.after)
    grids = sorted((run.run_dir / "images").glob("samples_step*.png"))
    assert grids, "the validation grid was not drawn"


def test_the_unet_takes_what_its_conditioning_gives(run) -> None:
    unet, latent_channels = run.module.unet, run.module.autoencoder.latent_channels
    assert unet.in_channels == {"inpaint": 2 * latent_channels + 1, "superres": latent_channels + 3}.get(run.kind, latent_channels)
    assert hasattr(unet, "label_emb") == (run.kind == "class")
    if run.kind == "class":
        assert unet.label_emb.num_embeddings == len(CLASSES) + 1  # the null class is the last row
    attn2 = next(m.attn2 for m in unet.modules() if hasattr(m, "attn2"))
    text_width = 64 if run.kind in ("text", "inpaint") else attn2.to_k.in_features
    assert attn2.to_k.in_features == text_width  # no text: the cross-attention attends to the feature map


def test_only_the_unet_trains(run) -> None:
    trainable = {name.split(".")[0] for name, p in run.module.named_parameters() if p.requires_grad}
    assert trainable == {"unet"}


# --- guidance ---------------------------------------------------------------------------------


def test_guidance_at_scale_one_is_the_conditional_prediction(run) -> None:
    model = load_model(run.ckpt)
    cond, uncond = model.conditioner.sampling(_request(run.kind), model.codec)
    network = lambda x, t, c: unet_forward(model.unet, x, t, c)  # noqa: E731
    x, t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([999, 400])
    with torch.no_grad():
        guided = ClassifierFreeGuidance(network, cond, uncond, 1.0)(x, t)
        conditional = network(x, t, cond)
        unconditional = network(x, t, uncond)
    torch.testing.assert_close(guided, conditional, rtol=1e-5, atol=1e-5)
    if run.kind == "class":
        assert torch.equal(uncond["y"], torch.full((2,), len(CLASSES)))  # the null class
    if run.kind in ("inpaint", "superres"):
        assert torch.equal(cond["concat"], uncond["concat"])  # the image is never dropped
    if model.conditioner.guidable:
        assert (conditional - unconditional).abs().max() > 1e-4
    else:
        assert cond.keys() == uncond.keys() and all(torch.equal(cond[k], uncond[k]) for k in cond)


@pytest.mark.parametrize("run", ["class"], indirect=True)
def test_a_dropped_class_trains_the_null_class_guidance_uses(run) -> None:
    conditioner = run.module.conditioner
    drop_rate, conditioner.drop_rate = conditioner.drop_rate, 1.0
    try:
        dropped = conditioner({"label": torch.tensor([0, 5, 9])}, run.module.codec, dropout=True)["y"]
        kept = conditioner({"label": torch.tensor([0, 5, 9])}, run.module.codec, dropout=False)["y"]
    finally:
        conditioner.drop_rate = drop_rate
    _, uncond = conditioner.sampling(SamplingRequest(3, class_labels=[0, 5, 9]), run.module.codec)
    assert torch.equal(dropped, uncond["y"]) and torch.equal(kept, torch.tensor([0, 5, 9]))


# --- sample.py --------------------------------------------------------------------------------


def _sample(*overrides: str) -> list[Path]:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="sample", overrides=["progress=false", "steps=3", *overrides])
    return sample(cfg)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("cond_inputs")
    rng = np.random.default_rng(0)
    full, small, mask = root / "full.png", root / "small.png", root / "mask.png"
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(full)
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(small)
    box = np.zeros((32, 32), np.uint8)
    box[8:24, 8:24] = 255
    Image.fromarray(box).save(mask)
    Image.fromarray(box[::4, ::4]).save(root / "small_mask.png")
    return SimpleNamespace(full=full, small=small, mask=mask, small_mask=root / "small_mask.png")


def _right_options(kind: str, images: SimpleNamespace) -> list[str]:
    return {
        "text": [f"prompt={PROMPT}"],
        "class": ["class_label=[3,7]"],
        "none": [],
        "inpaint": [f"prompt={PROMPT}", f"init_image={images.full}", f"mask={images.mask}"],
        "superres": [f"init_image={images.small}"],
    }[kind]


WRONG = {
    "text": [(["class_label=3"], r"is a text-to-image model: it takes no class_label; sample it with prompt=\"\.\.\.\"")],
    "class": [([f"prompt={PROMPT}"], r"is a class-conditional model: it takes no prompt; sample it with class_label=N \(0\.\.23\)"),
              ([], r"is a class-conditional model: sample it with class_label=N \(0\.\.23\)"),
              (["class_label=24"], r"class labels must be in 0\.\.23")],
    "none": [([f"prompt={PROMPT}"], r"is an unconditional model: it takes no prompt; sample it with no prompt"),
             (["class_label=1"], r"it takes no class_label"),
             (["negative_prompt=blurry"], r"it takes no negative_prompt")],
    "inpaint": [([f"prompt={PROMPT}"], r"is an inpainting model: sample it with prompt=\"\.\.\.\" init_image=PATH mask=PATH")],
    "superres": [([f"prompt={PROMPT}", "init_image=IMAGE"], r"is a super-resolution model: it takes no prompt; sample it with init_image=PATH"),
                 (["init_image=IMAGE", "mask=MASK"], r"it takes no mask"),
                 (["init_image=IMAGE", "strength=0.5"], r"the init image is its conditioning, so strength=0.5 does not apply")],
}


def test_each_checkpoint_samples_with_its_own_options(run, images, tmp_path: Path) -> None:
    paths = _sample(f"ckpt={run.ckpt}", *_right_options(run.kind, images), "n_samples=2", "seed=5", f"out_dir={tmp_path}")
    conditions = 2 if run.kind == "class" else 1
    assert len(paths) == 2 * conditions
    for path in paths:
        image = Image.open(path)
        assert image.size == (32, 32)
        if run.kind != "text":
            assert image.text["conditioning"] == run.kind
    if run.kind == "class":
        assert [Image.open(p).text["class_label"] for p in paths] == ["3", "3", "7", "7"]
    if run.kind == "none":
        assert "prompt" not in Image.open(paths[0]).text


def test_each_checkpoint_refuses_options_it_cannot_use(run, images, tmp_path: Path) -> None:
    for overrides, message in WRONG[run.kind]:
        overrides = [o.replace("IMAGE", str(images.small)).replace("MASK", str(images.small_mask)) for o in overrides]
        with pytest.raises(SamplingInputError, match=message) as err:
            _sample(f"ckpt={run.ckpt}", *overrides, f"out_dir={tmp_path}")
        assert "\n" not in str(err.value)
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("run", ["none"], indirect=True)
def test_the_refusal_is_one_line_from_the_command(run, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "sample.py", f"ckpt={run.ckpt}", f"prompt={PROMPT}", f"out_dir={tmp_path}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert re.match(r"error: ckpt=.* is an unconditional model: it takes no prompt", line)


@pytest.mark.parametrize("run", ["superres"], indirect=True)
def test_superres_upsamples_by_its_factor(run, images, tmp_path: Path) -> None:
    model = load_model(run.ckpt)
    low = torch.rand(1, 3, 8, 12) * 2 - 1
    out = generate_images(model, build_sampler("ddim", model.schedule, 2), None, [0], height=32, width=48, init_image=low)
    assert out.shape == (1, 3, 32, 48)
    with pytest.raises(ValueError, match=r"makes 48x32 from it, not 32x32"):
        generate_images(model, build_sampler("ddim", model.schedule, 2), None, [0], height=32, width=32, init_image=low)


@pytest.mark.parametrize("run", ["class"], indirect=True)
def test_an_ordinary_model_still_inpaints_by_latent_blending(run) -> None:
    model = load_model(run.ckpt)
    init = torch.rand(1, 3, 32, 32) * 2 - 1
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., :, 16:] = 1
    z = generate_images(model, build_sampler("ddim", model.schedule, 3), None, [0], height=32, width=32, class_labels=[2],
                        init_image=init, mask=mask, decode=False)
    kept = model.codec.encode(init, sample=False)
    assert torch.equal(z[..., :8], kept[..., :8]) and not torch.equal(z[..., 8:], kept[..., 8:])


# --- text-to-image is what it was -------------------------------------------------------------


@pytest.mark.parametrize("run", ["text"], indirect=True)
def test_text_sampling_is_the_plain_text_embedding_path(run) -> None:
    """Sampling a text model through its conditioner gives bit for bit what the UNet gives on the text
    encoder's embeddings of the prompt and of the negative prompt, guided as before conditioners existed."""
    model = load_model(run.ckpt)
    prompts, seeds, scale = [PROMPT, "a blue square"], [3, 4], 4.0
    sampler = build_sampler("dpmpp_2m", model.schedule, 4)
    ours = generate_images(model, sampler, prompts, seeds, height=32, width=32, guidance_scale=scale, negative_prompt="blurry", decode=False)
    encoder = model.text_encoder
    context, uncond = encoder(prompts).float(), encoder(["blurry", "blurry"]).float()
    x_T = seeded_noise(seeds, model.codec.latent_shape(32, 32), "cpu")
    generators = [torch.Generator().manual_seed(STEP_NOISE_SEED_OFFSET + s) for s in seeds]
    reference = denoise_latents(model.unet, sampler, context, uncond, scale, x_T, generators, prediction=model.prediction)
    assert torch.equal(ours, reference)


@pytest.mark.parametrize("run", ["text"], indirect=True)
def test_a_checkpoint_from_before_conditioners_loads_and_samples_identically(run, tmp_path: Path) -> None:
    """A text checkpoint in the layout written before conditioners (`text_encoder.*`, hparams `text_encoder`
    and `caption_dropout`) is the same model: same tensors, same images for the same seed."""
    ckpt = read_checkpoint(run.ckpt)
    state, hparams = ckpt["state_dict"], ckpt["hyper_parameters"]
    prefixes = {key.split(".")[0] for key in state}
    assert prefixes == {"unet", "ema", "autoencoder", "conditioner", "scale_factor"}
    assert {k for k in state if k.startswith("conditioner.")} == {TEXT_PREFIX + k for k in run.module.conditioner.text_encoder.state_dict()}
    assert hparams["model"] == {**hparams["model"], "in_channels": 4, "context_dim": 64} and "num_classes" not in hparams["model"]

    legacy_hparams = {k: v for k, v in hparams.items() if k != "conditioning"}
    legacy_hparams.update(text_encoder=hparams["conditioning"]["encoder"], caption_dropout=hparams["conditioning"]["drop_rate"])
    legacy_state = {(LEGACY_TEXT_PREFIX + k[len(TEXT_PREFIX):] if k.startswith(TEXT_PREFIX) else k): v for k, v in state.items()}
    legacy = tmp_path / "legacy.ckpt"
    torch.save({**ckpt, "state_dict": legacy_state, "hyper_parameters": legacy_hparams}, legacy)

    sampler = build_sampler("ddim", load_model(run.ckpt).schedule, 4)
    now, before = (generate_images(load_model(path), sampler, [PROMPT], [7], height=32, width=32, decode=False) for path in (run.ckpt, legacy))
    assert torch.equal(now, before)
    from ldm.training.ldm_module import LatentDiffusionModule

    module = LatentDiffusionModule.from_checkpoint(legacy)
    assert module.conditioner.kind == "text" and module.conditioner.drop_rate == hparams["conditioning"]["drop_rate"]


# --- data and masks ---------------------------------------------------------------------------


def test_shapes_labels_are_the_colour_and_shape_of_each_image() -> None:
    data = ShapesDataset(size=32, length=50, cache=True)
    uncached = ShapesDataset(size=32, length=50, cache=False)
    assert len(CLASSES) == 24
    for i in range(50):
        attributes = data.attributes(i)
        assert CLASSES[data[i]["label"]] == (attributes["colour"], attributes["shape"]) and uncached.label(i) == data[i]["label"]


def test_random_masks_mix_whole_images_boxes_and_strokes() -> None:
    masks = random_masks(400, 32, 32, generator=torch.Generator().manual_seed(0))
    assert masks.shape == (400, 1, 32, 32) and set(masks.unique().tolist()) <= {0.0, 1.0}
    covered = masks.mean(dim=(1, 2, 3))
    whole = (covered == 1).float().mean()
    assert 0.18 < whole < 0.32  # p_whole = 0.25
    partial = covered[(covered < 1)]
    assert (partial > 0).all() and partial.median() < 0.6


# --- the measurements of docs/conditioning.md -------------------------------------------------


@pytest.mark.parametrize("run", [k for k in KINDS if k != "text"], indirect=True)  # text: benchmarks/prompt_following.py
def test_each_kind_is_measured_on_its_tiny_checkpoint(run, tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import conditioning_eval
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    out = tmp_path / "result.json"
    grid = tmp_path / "grid.png"
    result = conditioning_eval.main([run.ckpt, "--n", "2", "--steps", "2", "--batch-size", "16", "--device", "cpu", "--json", str(out),
                                     "--grid", str(grid), "--guidance-interval", "0", "400"])
    assert json.loads(out.read_text()) == result and result["task"] == run.kind and result["cpu_seconds"] >= 0
    assert result.get("guidance_interval") == ([0.0, 400.0] if run.kind in ("class", "inpaint") else None)
    rows = {"class": len(CLASSES), "none": 1, "inpaint": 3, "superres": 4}[run.kind]  # a row per class; input/masked/output; ...
    assert Image.open(grid).size == (8 * 34 + 2, rows * 34 + 2)
    figure = {"class": "accuracy", "none": "max_tv", "inpaint": "asked_colour", "superres": "gain_db"}[run.kind]
    assert np.isfinite(result[figure])
    if run.kind == "class":
        assert result["n"] == 2 * len(CLASSES) and 0 <= result["accuracy"] <= result["colour"] <= 1
    if run.kind == "inpaint":
        assert result["autoencoder_kept_psnr"] > 10 and np.isfinite(result["kept_psnr"])
    if run.kind == "superres":
        assert result["factor"] == 4 and result["bicubic_psnr"] > 10


def test_class_accuracy_is_one_for_a_model_that_draws_the_asked_class(monkeypatch) -> None:
    import ldm.evaluation.conditioning as measure
    from ldm.data.shapes import render

    def perfect(model, sampler, prompts, seeds, *, height, width, class_labels, **_):
        drawn = [render({"colour": CLASSES[c][0], "shape": CLASSES[c][1], "size": "large", "position": "center",
                         "background": "black"}, height) for c in class_labels]
        return torch.from_numpy(np.stack(drawn)).permute(0, 3, 1, 2).float() / 127.5 - 1

    monkeypatch.setattr(measure, "generate_images", perfect)
    model = SimpleNamespace(schedule=NoiseSchedule(kind="linear"), image_size=32)
    result = measure.class_accuracy(model, per_class=2, steps=2)
    assert result["accuracy"] == 1.0 and set(result["per_class"].values()) == {1.0}


def test_the_sampling_floor_is_the_binomial_mean_deviation() -> None:
    """Two equally likely values, n = 100 draws: E|k/n - 1/2| = C(100, 50) / 2^101 (0.0398)."""
    import math

    from ldm.evaluation.conditioning import sampling_floor

    exact = math.comb(100, 50) / 2**101
    assert sampling_floor({"a": 0.5, "b": 0.5}, 100, draws=20000) == pytest.approx(exact, abs=0.002)


def test_an_unconditional_model_that_draws_the_data_scores_near_its_floor(monkeypatch) -> None:
    import ldm.evaluation.conditioning as measure

    other_draws = ShapesDataset(size=32, length=512, split="train", seed=7, cache=False)

    def like_the_data(model, sampler, prompts, seeds, **_):
        return torch.stack([other_draws[k]["image"] for k in seeds])

    monkeypatch.setattr(measure, "generate_images", like_the_data)
    model = SimpleNamespace(schedule=NoiseSchedule(kind="linear"), image_size=32)
    result = measure.unconditional_match(model, 512, steps=2, reference_n=4096)
    assert result["max_tv"] < 3 * result["max_floor"] < 0.15
    lopsided = ShapesDataset(size=32, length=512, split="train", seed=7, cache=False)
    circles = [k for k in range(512) if lopsided.attributes(k)["shape"] == "circle"]
    monkeypatch.setattr(measure, "generate_images", lambda model, sampler, prompts, seeds, **_: torch.stack(
        [lopsided[circles[k % len(circles)]]["image"] for k in seeds]))
    assert measure.unconditional_match(model, 512, steps=2, reference_n=4096)["shape"]["tv"] > 0.6  # circles only


def test_distances_and_masked_psnr() -> None:
    from ldm.evaluation.conditioning import masked_psnr, total_variation

    assert total_variation({"red": 0.5, "blue": 0.5}, {"blue": 0.5, "red": 0.5}) == 0
    assert total_variation({"red": 1.0}, {"blue": 1.0}) == 1
    a = torch.zeros(1, 3, 4, 4)
    b = a.clone()
    b[..., :2, :] = 0.2  # an error of 0.1 in [0, 1] units on the top half only
    keep = torch.zeros(1, 1, 4, 4)
    keep[..., :2, :] = 1
    torch.testing.assert_close(masked_psnr(b, a, keep), torch.tensor([20.0]))
    assert masked_psnr(b, a, 1 - keep).item() > 90  # nothing differs where the bottom half is kept


# --- the field's metrics for each kind --------------------------------------------------------


@pytest.mark.parametrize("run", ["class", "none"], indirect=True)
def test_the_evaluation_callback_measures_class_and_unconditional_models(run) -> None:
    history = json.loads((run.run_dir / "evaluation" / "metrics.json").read_text())
    assert [entry["step"] for entry in history] == [20] and history[0]["fid"] > 0


@pytest.mark.parametrize("run", ["class", "none", "superres"], indirect=True)
def test_evaluate_generates_for_what_the_model_takes(run, tmp_path: Path, monkeypatch) -> None:
    """evaluate.py: a class model generates for the held-out images' labels (class-conditional FID), an
    unconditional one for nothing; a model that needs input images is sent to conditioning_eval.py."""
    from hydra import compose, initialize_config_dir

    seen: list[tuple] = []
    real = evaluate_module.generate_images

    def spy(model, sampler, prompts, seeds, **kwargs):
        seen.append((prompts, kwargs.get("class_labels"), list(seeds)))
        return real(model, sampler, prompts, seeds, **kwargs)

    monkeypatch.setattr(evaluate_module, "generate_images", spy)
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[
            f"ckpt={run.ckpt}", "n_images=6", "steps=2", "batch_size=4", "metrics.names=[fid]", "progress=false", "device=cpu",
            f"out_dir={tmp_path / 'out'}", f"metrics.feature_cache={tmp_path / 'cache'}"])  # fmt: skip
    if run.kind == "superres":
        with pytest.raises(EvaluationError, match=r"super-resolution model: .*benchmarks/conditioning_eval.py"):
            evaluate_module.evaluate(cfg)
        return
    result = evaluate_module.evaluate(cfg)
    assert result["conditioning"] == run.kind and result["metrics"]["fid"] > 0
    assert [seed for *_, seeds in seen for seed in seeds] == list(range(6))
    assert all(prompts is None for prompts, *_ in seen)
    labels = [label for _, batch, _ in seen for label in (batch or [])]
    if run.kind == "class":
        val = hydra.utils.instantiate(cfg.data.val)
        assert labels == [int(val[i]["label"]) for i in range(6)] and result["class_labels"] == "labels of data.val"
        assert "class labels: labels of data.val." in (tmp_path / "out" / "metrics.md").read_text()
    else:
        assert labels == [] and result["class_labels"] is None and result["prompts"] is None
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a large red circle in the center on a white background\n")
    cfg.prompts_file = str(prompts)
    with pytest.raises(EvaluationError, match=r"prompts_file= is for text-to-image models; this is an? (class-conditional|unconditional)"):
        evaluate_module.evaluate(cfg)
