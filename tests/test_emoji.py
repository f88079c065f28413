"""data=emoji: OpenMoji rendered from its colour font (ldm/data/emoji.py, configs/data/emoji.yaml)."""

import hydra
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ldm.data import emoji as E


@pytest.fixture(scope="module")
def val():
    return E.EmojiDataset(size=32, split="val")


def test_catalogue_names_and_groups():
    entries = {e.code: e for e in E.catalogue()}
    assert len(entries) > 4000
    apple = entries["1F34E"]
    assert (apple.name, apple.group, apple.subgroup) == ("red apple", "Food & Drink", "food-fruit")
    assert entries["1F603"].name == "grinning face with big eyes"
    assert entries["1F1EF-1F1F5"].name == "flag: Japan" and entries["1F1EF-1F1F5"].group == "Flags"
    assert "light skin tone" in entries["1F44B-1F3FB"].name and entries["1F44B-1F3FB"].group == "People & Body"
    assert not any(0xE000 <= int(code.split("-")[0], 16) <= 0xF8FF for code in entries)  # unnamed private-use extras
    assert all(e.name and e.group for e in entries.values())


def test_samples_batches_and_labels(val):
    sample = val[0]
    assert sample["image"].shape == (3, 32, 32) and sample["image"].dtype == torch.float32
    assert -1.0 <= float(sample["image"].min()) and float(sample["image"].max()) <= 1.0
    assert isinstance(sample["caption"], str) and sample["caption"]
    assert val.classes[sample["label"]] == val.entries[0].group
    batch = next(iter(torch.utils.data.DataLoader(val, batch_size=4)))
    assert batch["image"].shape == (4, 3, 32, 32) and len(batch["caption"]) == 4 and batch["label"].dtype == torch.int64
    # a colour glyph on the background: not blank, not grey
    image = val.image_uint8(10).astype(int)
    assert (image != 255).any(axis=2).mean() > 0.1
    assert np.abs(image[..., 0] - image[..., 2]).max() > 50


def test_splits_are_seeded_disjoint_by_base_emoji_and_cover_everything():
    train, val = (E.EmojiDataset(size=8, split=s, cache=False) for s in ("train", "val"))
    assert {e.base for e in train.entries}.isdisjoint({e.base for e in val.entries})
    assert len(train) + len(val) == len(E.catalogue())
    assert 0.05 < len(val) / (len(train) + len(val)) < 0.15
    other = E.EmojiDataset(size=8, split="val", seed=1, cache=False)
    assert [e.code for e in other.entries] != [e.code for e in val.entries]
    assert train.classes == val.classes


def test_rendering_is_deterministic_at_any_resolution_and_background(val):
    again = E.EmojiDataset(size=32, split="val", cache=False)
    np.testing.assert_array_equal(again.image_uint8(5), val.image_uint8(5))
    big = E.EmojiDataset(size=48, split="val", background="black", padding=0.1, cache=False)
    image = big.image_uint8(5)
    assert image.shape == (48, 48, 3) and tuple(image[0, 0]) == (0, 0, 0)
    assert tuple(E.EmojiDataset(size=8, split="val", background=[10, 20, 30], cache=False).image_uint8(0)[0, 0]) == (10, 20, 30)


def test_caption_template_and_subgroup_labels():
    ds = E.EmojiDataset(size=8, split="val", label="subgroup", caption_template="an emoji of {name}, {group}", cache=False)
    assert ds.caption(0).startswith("an emoji of ") and ds.entries[0].group in ds.caption(0)
    assert len(ds.classes) > 50 and ds.classes[ds[0]["label"]] == ds.entries[0].subgroup


def test_bad_options_fail_clearly():
    with pytest.raises(ValueError, match="split"):
        E.EmojiDataset(split="test", cache=False)
    with pytest.raises(ValueError, match="background"):
        E.EmojiDataset(background="no-such-colour", cache=False)
    with pytest.raises(ValueError, match="label"):
        E.EmojiDataset(label="colour", cache=False)


def test_config_builds_the_datamodule(repo_root):
    cfg = OmegaConf.load(f"{repo_root}/configs/data/emoji.yaml")
    cfg = OmegaConf.merge({"image_size": 16}, {"data": cfg})
    datamodule = hydra.utils.instantiate(cfg.data)
    assert len(datamodule.val_set) == 364 and datamodule.train_set.size == 16
    batch = next(iter(datamodule.val_dataloader()))
    assert batch["image"].shape == (32, 3, 16, 16) and "label" in batch
