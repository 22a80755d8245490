"""Sample photos for the course, offline: scikit-image ships a few colour photos with its package."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

SAMPLE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")  # scikit-image's colour photos


def sample_photo(name: str = "astronaut", size: int = 256) -> torch.Tensor:
    """A photo shipped with scikit-image (offline), center-cropped and resized: (1, 3, size, size) in [-1, 1]."""
    try:
        from skimage import data
    except ImportError as e:
        raise ImportError("sample_photo needs scikit-image: pip install scikit-image "
                          "(it is in minidiff's [notebooks] extra).") from e
    if not hasattr(data, name):
        raise ValueError(f"skimage.data has no photo {name!r}; try 'astronaut', 'coffee', 'chelsea' (a cat) "
                         "or 'rocket'.")
    array = getattr(data, name)()
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)                              # gray (H, W) -> (H, W, 3)
    image = Image.fromarray(array[..., :3])
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)  # (H, W, 3) in [-1, 1]
    return x.permute(2, 0, 1)[None]                                         # (H, W, 3) -> (1, 3, H, W)
