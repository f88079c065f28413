"""Stage 2 from shards (data=laion) and from a latent cache (cache_latents, data=latents): the cache holds
the encoders' outputs, training from it gives the same loss as encoding on the fly for the same batch
and random state, never runs the encoders per step, and refuses a cache made by other encoders."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir

from ldm.checkpoints import load_autoencoder, state_dict_sha256
from ldm.data.laion import ImageTextDecoder
from ldm.data.latents import LatentCacheMismatchError, LatentDecoder, read_manifest
from ldm.data.shards import ShardedDataset
from ldm.modules.autoencoder import KLAutoencoder
from ldm.modules.text_encoder import OpenCLIPTextEncoder
from ldm.tools import export_shapes, make_shards
from ldm.tools.cache_latents import cache_latents
from ldm.training.run import ConfigError, train
from shard_helpers import corrupt_jpeg, write_shard
from train_helpers import CONFIG_DIR, compose_config

SAMPLES = 24
QUICK_LDM = [
    "stage=ldm",
    "image_size=32",
    "data.batch_size=8",
    "data.num_workers=0",
    "data.batches_per_epoch=4",
    "data.shuffle_buffer=8",
    "stage.module.sample_steps=2",
    "stage.module.scale_factor_batches=2",
    "stage.module.lr_warmup_steps=1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "logger=csv",
]


def _first_batch(urls: str, decoder) -> dict:
    return next(iter(ShardedDataset(urls, decoder, batch_size=8, shard_shuffle=False, drop_last=False)))


@pytest.fixture(scope="module")
def shapes_shards(tmp_path_factory) -> Path:
    """24 shapes at 32x32 through export_shapes and make_shards, 8 to a shard."""
    root = tmp_path_factory.mktemp("shapes_shards")
    export_shapes.export(root / "png", length=SAMPLES, size=32, progress=False)
    written, shards, _ = make_shards.write_shards(make_shards.items_from_folder(root / "png"), root / "shards", 8, progress=False)
    assert (written, shards) == (SAMPLES, 3)
    return root / "shards"


@pytest.fixture(scope="module")
def cache(shapes_shards: Path, tiny_autoencoder_ckpt: str, tmp_path_factory) -> SimpleNamespace:
    out = tmp_path_factory.mktemp("latent_cache") / "cache"
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="cache_latents", overrides=[f"urls={shapes_shards}", f"out={out}", "image_size=32",
                                                              f"autoencoder_ckpt={tiny_autoencoder_ckpt}", "batch_size=8",
                                                              "num_workers=0", "shard_size=10", "device=cpu"])
    manifest = cache_latents(cfg)
    return SimpleNamespace(dir=out, manifest=manifest, text_encoder_cfg=cfg.text_encoder)


def test_the_cache_records_its_encoders_and_holds_their_outputs(cache, shapes_shards: Path, tiny_autoencoder_ckpt: str) -> None:
    manifest = read_manifest(cache.dir / "latents.json")
    assert manifest == cache.manifest | {"format": "ldm-latent-cache/1"}
    assert manifest["samples"] == SAMPLES and manifest["shards"] == ["00000.tar", "00001.tar", "00002.tar"]
    assert manifest["shapes"] == {"mean": [4, 16, 16], "std": [4, 16, 16], "context": [77, 64]}
    autoencoder = load_autoencoder(tiny_autoencoder_ckpt).eval()
    text_encoder = hydra.utils.instantiate(cache.text_encoder_cfg)
    assert manifest["autoencoder"]["sha256"] == state_dict_sha256(autoencoder)
    assert manifest["text_encoder"]["sha256"] == state_dict_sha256(text_encoder)

    images = _first_batch(str(shapes_shards), ImageTextDecoder(32, random_crop=False))
    cached = _first_batch(str(cache.dir), LatentDecoder())
    assert cached["key"] == images["key"] and cached["caption"] == images["caption"]
    with torch.no_grad():
        posterior = autoencoder.encode(images["image"])
    torch.testing.assert_close(cached["latent_mean"], posterior.mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cached["latent_std"], posterior.std, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cached["context"], text_encoder(images["caption"]), rtol=1e-5, atol=1e-6)
    assert cached["metadata"][0]["width"] == 32


@pytest.fixture(scope="module")
def module_config(cache, tiny_autoencoder_ckpt: str, tmp_path_factory):
    return compose_config(str(tmp_path_factory.mktemp("ldm")), [*QUICK_LDM, "data=latents", f"data.urls={cache.dir}",
                                                                 f"autoencoder_ckpt={tiny_autoencoder_ckpt}", "stage.module.scale_factor=0.7"])


@pytest.fixture
def module(module_config):
    """Built afresh for each test (~0.15 s): tests monkeypatch its hparams, which must not leak into the next."""
    return hydra.utils.instantiate(module_config.stage.module)


@pytest.mark.parametrize("caption_dropout", [0.0, 0.5, 1.0])
def test_training_from_the_cache_gives_the_loss_of_encoding_on_the_fly(cache, module, shapes_shards: Path, caption_dropout: float,
                                                                        monkeypatch) -> None:
    monkeypatch.setattr(module.conditioner, "drop_rate", caption_dropout)
    images = _first_batch(str(shapes_shards), ImageTextDecoder(32, random_crop=False))
    cached = _first_batch(str(cache.dir), LatentDecoder())
    for seed in range(3):
        torch.manual_seed(seed)
        on_the_fly = module.training_step(images, 0)
        torch.manual_seed(seed)
        from_cache = module.training_step(cached, 0)
        torch.testing.assert_close(from_cache, on_the_fly, rtol=1e-5, atol=1e-6)


def test_stage2_trains_from_the_cache_without_running_the_encoders_per_step(cache, tiny_autoencoder_ckpt: str, tmp_path: Path,
                                                                            monkeypatch) -> None:
    encoded: list[list[str]] = []
    text_forward = OpenCLIPTextEncoder.forward
    monkeypatch.setattr(KLAutoencoder, "encode", lambda *a, **k: pytest.fail("the autoencoder ran on a cached batch"))
    monkeypatch.setattr(OpenCLIPTextEncoder, "forward", lambda self, captions: encoded.append(list(captions)) or text_forward(self, captions))
    train(compose_config(str(tmp_path), [*QUICK_LDM, "data=latents", f"data.urls={cache.dir}", f"autoencoder_ckpt={tiny_autoencoder_ckpt}",
                                         "trainer.max_steps=3", "trainer.val_check_interval=100", "conditioning.drop_rate=0.5"]))
    assert encoded == [[""]]  # once: the unconditional embedding that replaces dropped captions
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3 and float(ckpt["state_dict"]["scale_factor"]) > 0


def test_a_cache_made_by_other_encoders_is_refused(cache, tiny_autoencoder_ckpt: str, tmp_path: Path) -> None:
    ckpt = torch.load(tiny_autoencoder_ckpt, map_location="cpu", weights_only=False)
    ckpt["state_dict"]["autoencoder.decoder.conv_out.bias"] += 0.01
    other = tmp_path / "other_autoencoder.ckpt"
    torch.save(ckpt, other)
    with pytest.raises(LatentCacheMismatchError, match=r"made by another autoencoder .*from .*last.ckpt.*other_autoencoder.ckpt"):
        train(compose_config(str(tmp_path / "a"), [*QUICK_LDM, "data=latents", f"data.urls={cache.dir}", f"autoencoder_ckpt={other}"]))
    with pytest.raises(LatentCacheMismatchError, match="another text encoder"):
        train(compose_config(str(tmp_path / "b"), [*QUICK_LDM, "data=latents", f"data.urls={cache.dir}",
                                                   f"autoencoder_ckpt={tiny_autoencoder_ckpt}", "text_encoder.seed=1"]))


def test_stage2_trains_on_shapes_shards_and_logs_what_it_skipped(shapes_shards: Path, tiny_autoencoder_ckpt: str, tmp_path: Path) -> None:
    """`python train.py stage=ldm data=laion data.urls=...` on shards of the shapes data, plus a corrupt
    image and an unreadable shard: training goes on, and the skips reach the logger."""
    shards = tmp_path / "shards"
    shards.mkdir()
    for shard in shapes_shards.glob("*.tar"):
        (shards / shard.name).write_bytes(shard.read_bytes())
    write_shard(shards / "00003.tar", [{"__key__": "broken", "jpg": corrupt_jpeg(), "txt": "a broken image"}])
    (shards / "00004.tar").write_bytes(b"not a tar")
    # One epoch of 4 batches of 8 is a pass over the 5 shards (24 good samples) and the start of another.
    train(compose_config(str(tmp_path / "run"), [*QUICK_LDM, "data=laion", f"data.urls={shards}", f"data.val_urls={shapes_shards}/00000.tar",
                                                 "data.resampled=false", f"autoencoder_ckpt={tiny_autoencoder_ckpt}", "trainer.max_steps=4",
                                                 "trainer.val_check_interval=4"]))
    with open(tmp_path / "run" / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    last = {key: float(value) for row in rows for key, value in row.items() if value and key.startswith("data/")}
    assert last["data/samples"] >= 4 * 8
    assert last["data/corrupt_image"] >= 1 and last["data/shard_error"] >= 1
    assert [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert sorted(p.name for p in (tmp_path / "run" / "images").iterdir()) == ["samples_step0000004.png"]


def test_a_pattern_that_matches_nothing_fails_at_start(tmp_path: Path, tiny_autoencoder_ckpt: str) -> None:
    with pytest.raises(ConfigError, match=r"Could not build `data`.*No shards match .*python -m ldm.tools.make_shards"):
        train(compose_config(str(tmp_path), [*QUICK_LDM, "data=laion", f"data.urls='{tmp_path}/nothing/{{00000..00009}}.tar'",
                                             f"autoencoder_ckpt={tiny_autoencoder_ckpt}"]))
