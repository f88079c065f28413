"""Stable Diffusion 1.x / 2.x single files: read against the ecosystem's own networks, sampled, fine-tuned,
exported back (to an SD file our loader reads bit-identically and diffusers reads), and never run.

The reference files hold diffusers' / transformers' / open_clip's networks at random init, narrow, written
in the original layout by `sd_helpers` (diffusers' naming conventions, no code shared with our loader).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from sd_helpers import References, randomize_

from ldm.checkpoints import CheckpointError, UnsafeCheckpointError, read_sd_file
from ldm.checkpoints.sd_single_file import (
    SD1_PAD_TOKEN,
    hf_clip_to_open_clip,
    open_clip_to_hf_clip,
    safetensors_header,
)
from ldm.errors import ConfigError
from ldm.inference import generate_images, load_model

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline"}
CAPTIONS = ["a red circle", "an astronaut riding a horse on the moon, oil painting", " ".join(["a long caption"] * 40)]  # the last is cut to 77
ATOL = 1e-4  # fp32, across implementations


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory) -> References:
    """SD 1.5's layout as v1-5-pruned.safetensors: model weights and their EMA (different values)."""
    return References("sd1", tmp_path_factory.mktemp("sd1") / "sd15.safetensors", with_ema=True)


@pytest.fixture(scope="module")
def sd2(tmp_path_factory) -> References:
    """SD 2.1's layout as a CompVis .ckpt ({"state_dict", "global_step"}), no EMA."""
    return References("sd2", tmp_path_factory.mktemp("sd2") / "sd21.ckpt", global_step=110000)


@pytest.fixture(params=["sd1", "sd2"])
def ref(request) -> References:
    return request.getfixturevalue(request.param)


def assert_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert theirs.abs().max() > 1e-2, "a degenerate output would make the comparison vacuous"
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def run(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# --- reading: the references' outputs --------------------------------------------------------------

def test_sd_file_reproduces_the_reference_networks(ref: References) -> None:
    model = load_model(ref.path, use_ema=False)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, 128, generator=generator)
    timesteps = torch.tensor([3, 981])
    image = torch.rand(2, 3, 64, 64, generator=generator) * 2 - 1
    z = torch.randn(2, 4, 8, 8, generator=generator)
    with torch.no_grad():
        assert_close(model.unet(x, timesteps, context), ref.unet(x, timesteps, encoder_hidden_states=context).sample)
        ours, theirs = model.autoencoder.encode(image), ref.vae.encode(image).latent_dist
        assert_close(ours.mean, theirs.mean)
        torch.testing.assert_close(ours.std, theirs.std, atol=ATOL, rtol=0)
        assert_close(model.autoencoder.decode(z), ref.vae.decode(z).sample)
    ids = ref.token_ids(CAPTIONS)
    assert torch.equal(model.text_encoder.tokenize(CAPTIONS), ids)  # SD 1.x pads with 49407, SD 2.x with 0
    assert_close(model.text_encoder.encode_tokens(ids), ref.context(ids))  # last layer (1.x), penultimate (2.x)


def test_ema_weights_when_present_and_asked_for(sd1: References) -> None:
    generator = torch.Generator().manual_seed(1)
    x, context, t = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 77, 128, generator=generator), torch.tensor([500])
    for use_ema, reference, weights in [(True, sd1.ema_unet, "ema"), (False, sd1.unet, "model")]:
        model = load_model(sd1.path, use_ema=use_ema)
        assert model.metadata["weights"] == weights
        with torch.no_grad():
            assert_close(model.unet(x, t, context), reference(x, t, encoder_hidden_states=context).sample)


def test_configs_prediction_and_schedule_come_from_the_file(sd1: References, sd2: References, tmp_path: Path) -> None:
    one = read_sd_file(sd1.path)
    assert (one.version, one.prediction, one.image_size, one.scale_factor) == ("sd1", "eps", 512, 0.18215)
    assert one.unet_config["num_heads"] == 8 and not one.unet_config["use_linear_in_transformer"]
    assert one.text_encoder_config["layer"] == "last" and one.text_encoder_config["pad_token_id"] == SD1_PAD_TOKEN
    assert one.text_encoder_config["model_cfg"]["quick_gelu"] and one.text_encoder_config["model_cfg"]["text_cfg"]["layers"] == 12
    assert one.schedule_config["kind"] == "scaled_linear" and not one.schedule_config["zero_terminal_snr"]
    two = read_sd_file(sd2.path)
    assert (two.version, two.prediction, two.image_size) == ("sd2", "v", 768)  # 768-v, as v2-1_768-ema-pruned
    assert two.unet_config["num_head_channels"] == 64 and two.unet_config["use_linear_in_transformer"]
    assert two.text_encoder_config["layer"] == "penultimate" and "pad_token_id" not in two.text_encoder_config
    assert read_sd_file(sd2.path, prediction="eps").prediction == "eps"  # an SD 2.x-base file
    assert load_model(sd2.path, prediction="eps").prediction == "eps"
    base = torch.load(sd2.path, weights_only=True)
    base["global_step"] = 875000  # 512-base-ema.ckpt's
    torch.save(base, tmp_path / "base.ckpt")
    assert (read_sd_file(tmp_path / "base.ckpt").prediction, read_sd_file(tmp_path / "base.ckpt").image_size) == ("eps", 512)


def test_the_file_is_read_once(sd2: References, monkeypatch) -> None:
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a) or real(*a, **k))
    load_model(sd2.path)
    assert len(calls) == 1


def test_transformers_and_open_clip_text_names_map_both_ways(sd1: References) -> None:
    state = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in sd1.text.state_dict().items()}
    state.pop("text_model.embeddings.position_ids", None)
    assert open_clip_to_hf_clip(hf_clip_to_open_clip(state)).keys() == state.keys()
    assert all(torch.equal(open_clip_to_hf_clip(hf_clip_to_open_clip(state))[k], v) for k, v in state.items())


def test_files_that_are_not_sd_single_files_are_one_line_errors(sd1: References, tmp_path: Path) -> None:
    state = load_file(str(sd1.path))
    save_file({k: v for k, v in state.items() if not k.startswith("cond_stage_model.")}, str(tmp_path / "no_text.safetensors"))
    save_file({"a.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    for path, message in [(tmp_path / "no_text.safetensors", "has no text encoder"), (tmp_path / "other.safetensors", "not a checkpoint")]:
        with pytest.raises(CheckpointError, match=message) as err:
            load_model(path)
        assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="not a Stable Diffusion single file"):
        read_sd_file(tmp_path / "other.safetensors")


# --- sampling and fine-tuning ---------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "euler", "euler_a", "dpmpp_2m"])
def test_sample_py_runs_every_sampler_on_an_sd_file(sd1: References, sampler: str, tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir

    from ldm.inference.sample import sample

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="sample", overrides=[f"ckpt={sd1.path}", "prompt=a red circle", f"sampler={sampler}", "steps=2",
                                                       "H=64", "W=64", "n_samples=1", "seed=0", "progress=false",
                                                       "guidance_rescale=0.7", f"out_dir={tmp_path}"])
    paths = sample(cfg)
    assert len(paths) == 1 and (tmp_path / "grid.png").is_file()


def test_sample_py_command_line_on_sd_files(sd1: References, sd2: References, tmp_path: Path) -> None:
    runs = {
        "sd1": run("sample.py", f"ckpt={sd1.path}", "prompt=a red circle", "steps=2", "H=64", "W=64", "n_samples=1",
                   "guidance_interval=[100,900]", "progress=false", f"out_dir={tmp_path / 'sd1'}"),
        "sd2": run("sample.py", f"ckpt={sd2.path}", "prompt=a red circle", "steps=2", "H=64", "W=64", "n_samples=1",
                   "prediction=eps", "sampler=euler_a", "progress=false", f"out_dir={tmp_path / 'sd2'}"),
    }
    for name, process in runs.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
        assert (tmp_path / name / "grid.png").is_file()


def test_init_from_fine_tunes_the_sd_unet_with_its_frozen_encoders(sd1: References, tmp_path: Path) -> None:
    """`python train.py stage=ldm init_from=<SD file> data=folder`: a few steps, then the checkpoint samples."""
    from PIL import Image
    from train_helpers import compose_config

    from ldm.training.ldm_module import LatentDiffusionModule
    from ldm.training.run import train

    images = tmp_path / "images"
    images.mkdir()
    generator = torch.Generator().manual_seed(0)
    for i in range(4):
        pixels = (torch.rand(64, 64, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"a photo number {i}")
    run_dir = tmp_path / "run"
    train(compose_config(str(run_dir), [
        "stage=ldm", f"init_from={sd1.path}", "data=folder", f"data.train.root={images}", "data.num_workers=0", "data.batch_size=2",
        "image_size=64", "trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "logger=csv", "stage.module.sample_steps=2", "stage.module.validation_prompts=[a red circle]",
        "stage.module.optimizer.lr=1e-3", "stage.module.lr_warmup_steps=0",
    ]))
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    hparams, state = ckpt["hyper_parameters"], ckpt["state_dict"]
    assert (hparams["prediction"], float(state["scale_factor"]), hparams["schedule"]["kind"]) == ("eps", 0.18215, "scaled_linear")
    assert ckpt["init_from"] == str(sd1.path) and ckpt["global_step"] == 3
    sd = read_sd_file(sd1.path, use_ema=False)
    for prefix, expected in [("autoencoder.", sd.autoencoder), ("conditioner.text_encoder.text_tower.", sd.text_encoder)]:
        assert all(torch.equal(state[prefix + k], v) for k, v in expected.items()), f"{prefix} changed: it must stay frozen"
    changed = [k for k, v in sd.unet.items() if not torch.equal(state["unet." + k], v)]
    assert changed, "the UNet did not train"
    # The checkpoint is an ordinary stage-2 checkpoint: it rebuilds without the SD file and samples.
    module = LatentDiffusionModule.from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert module.hparams.prediction == "eps"
    model = load_model(run_dir / "checkpoints" / "last.ckpt")
    assert model.text_encoder.pad_token_id == SD1_PAD_TOKEN and model.image_size == 512
    from ldm.diffusion.samplers import DDIMSampler

    images_out = generate_images(model, DDIMSampler(model.schedule, 2), ["a red circle"], [0], height=64, width=64, guidance_scale=3.0)
    assert images_out.shape == (1, 3, 64, 64) and torch.isfinite(images_out).all()


def test_the_sd15_fine_tuning_recipe_runs_on_a_tiny_sd_file(sd1: References, tmp_path: Path) -> None:
    """experiment=sd15_finetune_gpu, on the CPU for two steps: the recipe's settings reach the SD UNet."""
    from PIL import Image
    from train_helpers import compose_config

    from ldm.training.run import train

    for i in range(2):
        Image.new("RGB", (64, 64), (60 * i, 90, 200)).save(tmp_path / f"{i}.png")
    run_dir = tmp_path / "run"
    train(compose_config(str(run_dir), [
        "experiment=sd15_finetune_gpu", f"init_from={sd1.path}", f"data.train.root={tmp_path}", "data.num_workers=0",
        "data.batch_size=2", "image_size=64", "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.max_steps=2",
        "trainer.val_check_interval=2", "trainer.enable_progress_bar=false", "logger=csv", "stage.module.sample_steps=2",
        "stage.module.validation_prompts=[a red circle]",
    ]))
    hparams = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]
    assert hparams["model"]["gradient_checkpointing"] and hparams["model"]["num_heads"] == 8
    assert hparams["optimizer"]["lr"] == 1e-5 and hparams["prediction"] == "eps"


def test_init_from_takes_the_prediction_override_and_refuses_a_second_autoencoder(sd2: References) -> None:
    from ldm.training.ldm_module import LatentDiffusionModule

    common = {"model": {"context_dim": 64}, "conditioning": {}, "schedule": {}, "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True}}
    module = LatentDiffusionModule(**common, init_from=str(sd2.path), init_from_prediction="eps", prediction="v")
    assert module.hparams.prediction == "eps" and module.hparams.model["use_linear_in_transformer"]
    assert float(module.scale_factor) == 0.18215 and module.conditioner.text_encoder.layer == "penultimate"
    with pytest.raises(ConfigError, match="not both"):
        LatentDiffusionModule(**common, init_from=str(sd2.path), autoencoder_ckpt="stage1.ckpt")


# --- exporting ------------------------------------------------------------------------------------

def _states(model) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v for name in ("unet", "autoencoder", "text_encoder") for k, v in getattr(model, name).state_dict().items()}


def _export(ckpt: Path, out: Path, *extra: str) -> Path:
    from hydra import compose, initialize_config_dir

    from ldm.tools.export import export

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return export(compose(config_name="export", overrides=[f"ckpt={ckpt}", f"out={out}", *extra]))


def test_ours_to_sd_file_and_back_is_bit_identical(tiny_ldm_ckpt: str, sd1: References, tmp_path: Path) -> None:
    for ckpt in (Path(tiny_ldm_ckpt), sd1.path):
        original = load_model(ckpt)
        exported = load_model(_export(ckpt, tmp_path / f"{ckpt.stem}.safetensors"))
        a, b = _states(original), _states(exported)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
        assert (exported.prediction, float(exported.scale_factor), exported.image_size) == (
            original.prediction, float(original.scale_factor), original.image_size)
        assert exported.schedule.kind == original.schedule.kind and exported.schedule.zero_terminal_snr == original.schedule.zero_terminal_snr
        assert exported.text_encoder.config == {**original.text_encoder.config, "weights_path": None}
    keys, _ = safetensors_header(tmp_path / f"{sd1.path.stem}.safetensors")
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model"}
    assert any(k.startswith("cond_stage_model.transformer.text_model.encoder.layers.11.") for k in keys)


def test_diffusers_reads_our_exports(ref: References, tmp_path: Path) -> None:
    """format=diffusers gives a StableDiffusionPipeline folder; diffusers' from_single_file reads format=sd
    (configs from that folder, offline) to the same weights, which are the reference networks' own."""
    from diffusers import StableDiffusionPipeline

    single, folder = _export(ref.path, tmp_path / "model.safetensors"), _export(ref.path, tmp_path / "model", "format=diffusers")
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    from_single = StableDiffusionPipeline.from_single_file(str(single), config=str(folder), local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(pipe, name).state_dict(), getattr(from_single, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    for name, reference in (("unet", ref.ema_unet or ref.unet), ("vae", ref.vae)):  # the export takes the EMA UNet
        a, b = getattr(from_single, name).state_dict(), reference.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    prediction = {"sd1": "epsilon", "sd2": "v_prediction"}[ref.version]
    assert from_single.scheduler.config.prediction_type == prediction and pipe.vae.config.scaling_factor == 0.18215
    ours = load_model(ref.path)
    captions = ["a red circle", "an astronaut riding a horse"]
    ids = pipe.tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, ref.token_ids(captions))
    with torch.no_grad():
        assert_close(from_single.text_encoder(ids)[0], ours.text_encoder.encode_tokens(ids))
        assert_close(from_single.text_encoder(ids)[0], ref.context(ids))
    images = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="pt").images
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()


def test_export_writes_half_precision_and_refuses_bad_options(sd1: References, tmp_path: Path) -> None:
    out = _export(sd1.path, tmp_path / "half.safetensors", "dtype=float16")
    assert {v.dtype for v in load_file(str(out)).values() if v.is_floating_point()} == {torch.float16}
    assert load_model(out).unet.input_blocks[0][0].weight.dtype == torch.float32
    for extra, message in [([], "exists; pass overwrite=true"), (["format=onnx"], "format=onnx"), (["dtype=int8"], "dtype=int8")]:
        with pytest.raises(ConfigError, match=message):
            _export(sd1.path, out, *extra)
    with pytest.raises(ConfigError, match="writes a .safetensors"):
        _export(sd1.path, tmp_path / "model.ckpt")


# --- never running a file -------------------------------------------------------------------------

class Payload:
    """Unpickling this creates `marker`: what a malicious checkpoint would do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_malicious_sd_ckpt_is_refused_everywhere_without_running(sd2: References, tmp_path: Path) -> None:
    marker = tmp_path / "PAYLOAD_RAN"
    evil = tmp_path / "evil_sd.ckpt"
    ckpt = torch.load(sd2.path, weights_only=True)
    ckpt["callbacks"] = Payload(marker)  # a real SD file that would load and sample while the payload runs
    torch.save(ckpt, evil)
    from ldm.training.ldm_module import LatentDiffusionModule

    loaders = [
        lambda: load_model(evil),
        lambda: read_sd_file(evil),
        lambda: LatentDiffusionModule(model={}, conditioning={}, schedule={}, optimizer={}, init_from=str(evil)),
    ]
    for load in loaders:
        with pytest.raises(UnsafeCheckpointError, match="never runs code from a file"):
            load()
    runs = {
        "train.py init_from=": run("train.py", "stage=ldm", f"init_from={evil}", "data.train.length=8", "data.val.length=4",
                                   "data.batch_size=4", "image_size=64", "logger=csv", f"run_dir={tmp_path / 'run'}"),
        "sample.py ckpt=": run("sample.py", f"ckpt={evil}", "prompt=a red circle", "steps=2", f"out_dir={tmp_path / 'samples'}"),
        "export ckpt=": run("-m", "ldm.tools.export", f"ckpt={evil}", f"out={tmp_path / 'out.safetensors'}"),
    }
    for what, process in runs.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode != 0, what
        assert "Traceback" not in stderr, f"{what}: {stderr[-3000:]}"
        assert "never runs code from a file" in stderr, f"{what}: {stderr[-3000:]}"
    assert not marker.exists()


# --- full size ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_full_size_text_encoders_match(tmp_path: Path) -> None:
    """CLIP ViT-L/14's text model (transformers) and OpenCLIP ViT-H/14's text tower (open_clip) at their real
    sizes: the heads our loader assumes (64 channels) are theirs."""
    import open_clip
    from sd_helpers import (
        diffusers_unet,
        diffusers_vae,
        sd1_reference_context,
        sd1_token_ids,
        sd2_reference_context,
        sd2_token_ids,
        sd_single_file_state,
        write_sd_file,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    vit_l14_text = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                  max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
    clip = randomize_(CLIPTextModel(vit_l14_text).eval())
    openclip = open_clip.create_model("ViT-H-14", pretrained=None)
    del openclip.visual
    openclip = randomize_(openclip.eval())
    for version, text, reference, tokens, width in [("sd1", clip, sd1_reference_context, sd1_token_ids, 768),
                                                     ("sd2", openclip, sd2_reference_context, sd2_token_ids, 1024)]:
        state = sd_single_file_state(version, diffusers_unet(version, context_dim=width), diffusers_vae(), text)
        model = load_model(write_sd_file(tmp_path / f"{version}.safetensors", state))
        ids = tokens(CAPTIONS)
        assert torch.equal(model.text_encoder.tokenize(CAPTIONS), ids)
        assert_close(model.text_encoder.encode_tokens(ids), reference(text, ids))
