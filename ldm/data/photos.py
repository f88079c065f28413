"""Real photographs no model here was trained on, for judging how a stage-1 autoencoder generalises
(``python evaluate.py ckpt=... data=photos``): the photos that ship inside scikit-image (astronaut, cat,
coffee, rocket, the Hubble deep field, a retina, ...; grey ones as RGB), each as its centre square and
``crops_per_image`` seeded random square crops (a quarter to all of the shorter side), resized with
antialiasing to ``size``. Needs ``pip install scikit-image`` (an optional dependency: ``.[dev]``).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ldm.data.transforms import uint8_to_model_range

COLOUR_PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina", "rocket", "stereo_motorcycle")
GREY_PHOTOS = ("camera", "coins", "moon", "clock", "brick", "grass", "gravel", "page", "text")


def load_photo(name: str) -> Image.Image:
    try:
        import skimage.data
    except ImportError as err:
        raise FileNotFoundError("data=photos needs scikit-image, whose wheel ships the photos: `pip install scikit-image`.") from err
    array = getattr(skimage.data, name)()
    if isinstance(array, tuple):  # stereo_motorcycle: (left, right, disparity)
        array = array[0]
    image = Image.fromarray(np.asarray(array))
    return image.convert("RGB")


class PhotosDataset(Dataset):
    """``{"image": 3 x size x size in [-1, 1], "caption": the photo's name}``, rendered once at construction."""

    def __init__(self, size: int = 32, crops_per_image: int = 7, seed: int = 0, photos: tuple[str, ...] | None = None) -> None:
        if size < 8:
            raise ValueError(f"size must be at least 8 pixels, got {size}")
        if crops_per_image < 0:
            raise ValueError(f"crops_per_image must be >= 0, got {crops_per_image}")
        self.size, self.crops_per_image, self.seed = size, crops_per_image, seed
        self.photos = tuple(photos or (*COLOUR_PHOTOS, *GREY_PHOTOS))
        images, captions = [], []
        for index, name in enumerate(self.photos):
            photo = load_photo(name)
            width, height = photo.size
            side = min(width, height)
            boxes = [((width - side) // 2, (height - side) // 2, side)]
            rng = np.random.default_rng([seed, index])
            for _ in range(crops_per_image):
                crop = int(rng.integers(side // 4, side + 1))
                boxes.append((int(rng.integers(0, width - crop + 1)), int(rng.integers(0, height - crop + 1)), crop))
            for left, top, crop in boxes:
                square = photo.crop((left, top, left + crop, top + crop)).resize((size, size), Image.Resampling.LANCZOS)
                images.append(np.asarray(square))
                captions.append(name.replace("_", " "))
        self._images = torch.from_numpy(np.stack(images))
        self._captions = captions

    def __len__(self) -> int:
        return len(self._captions)

    def caption(self, index: int) -> str:
        return self._captions[index]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        return {"image": uint8_to_model_range(self._images[index].numpy()), "caption": self._captions[index]}
