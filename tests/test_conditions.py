"""Condition images without OpenCV (minidiff/control/conditions.py): Canny edges, masks, depth maps, and the
checks of condition_tensor."""

import numpy as np
import pytest
import torch
from PIL import Image

from minidiff.control.conditions import canny, condition_tensor, depth_to_image, mask_to_image, repeat_to_batch


def square(contrast: int, size: int = 32, low: int = 0) -> np.ndarray:
    """A (size, size) uint8 image: a square of gray level low + contrast on a background of `low`."""
    image = np.full((size, size), low, dtype=np.uint8)
    image[8:24, 8:24] = low + contrast
    return image


def test_canny_draws_one_thin_line_around_a_square():
    edges = np.asarray(canny(Image.fromarray(square(255))))
    assert edges.shape == (32, 32, 3) and set(np.unique(edges)) == {0, 255}
    on = edges[..., 0] > 0
    border = np.zeros((32, 32), dtype=bool)
    border[7:25, 7:25] = True
    border[9:23, 9:23] = False                       # the 2-pixel ring the step runs through
    assert on[border].mean() > 0.45                  # one of the two pixels across the step, nearly all round
    assert not on[~border].any()                     # nothing inside, nothing outside
    assert on.sum() < 2 * 4 * 16                     # thin: not both pixels across the step


def test_canny_thresholds_are_on_opencvs_scale():
    """|g_x| + |g_y| of a vertical step of d gray levels is 4d (3x3 Sobel): with OpenCV's docs' 100 / 200, a
    step of 30 (120) is weak only and not drawn, a step of 60 (240) is strong."""
    assert not np.asarray(canny(square(30, low=100), 100, 200)).any()
    assert np.asarray(canny(square(60, low=100), 100, 200)).any()
    assert np.asarray(canny(square(30, low=100), 50, 100)).any()     # strong at these thresholds
    assert not np.asarray(canny(np.full((16, 16), 90, dtype=np.uint8))).any()


def test_canny_hysteresis_keeps_weak_edges_joined_to_strong_ones():
    image = np.zeros((32, 32), dtype=np.uint8)
    image[:, 16:] = 40                               # a weak step (160) down the whole image ...
    image[:8, 16:] = 80                              # ... strong (320) over its top quarter
    joined = np.asarray(canny(image, 100, 200))[..., 0] > 0
    alone = np.asarray(canny(image[8:], 100, 200))[..., 0] > 0       # the weak part without the strong one
    assert joined[20:28].any() and not alone.any()


def test_canny_reads_tensors_and_rgb_like_pil():
    rgb = np.stack([square(255)] * 3, axis=-1)
    from_pil = np.asarray(canny(Image.fromarray(rgb)))
    from_tensor = np.asarray(canny(torch.from_numpy(rgb).permute(2, 0, 1).float() / 255))
    assert np.array_equal(from_pil, from_tensor)
    with pytest.raises(ValueError, match="low_threshold <= high_threshold"):
        canny(rgb, 200, 100)


def test_mask_and_depth_images():
    mask = np.zeros((8, 8), dtype=bool)
    mask[2:5, 3:6] = True
    image = np.asarray(mask_to_image(mask))
    assert image.shape == (8, 8, 3) and np.array_equal(image[..., 1] > 0, mask)
    distance = np.linspace(1.0, 5.0, 64).reshape(8, 8)
    near_bright = np.asarray(depth_to_image(distance))[..., 0]
    assert near_bright[0, 0] == 255 and near_bright[-1, -1] == 0         # the nearest point is white
    assert np.asarray(depth_to_image(distance, is_distance=False))[0, 0, 0] == 0
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        mask_to_image(mask * 2.0)


def test_condition_tensor_forms_and_errors():
    rgb = Image.fromarray(np.zeros((16, 24, 3), dtype=np.uint8))
    assert condition_tensor(rgb, 3, None, None).shape == (1, 3, 16, 24)
    assert condition_tensor([rgb, rgb], 3, 16, 24).shape == (2, 3, 16, 24)
    assert condition_tensor(rgb.convert("L"), 1, None, None, convert_rgb=False).shape == (1, 1, 16, 24)
    assert condition_tensor(np.zeros((16, 24, 3)), 3, None, None).shape == (1, 3, 16, 24)
    with pytest.raises(ValueError, match=r"image has 3 channel\(s\), the model reads 1"):
        condition_tensor(rgb, 1, None, None, convert_rgb=False)
    with pytest.raises(ValueError, match=r"image is 16x24 .* are 32x24"):
        condition_tensor(rgb, 3, 32, None)
    with pytest.raises(TypeError, match="PIL image, a numpy array or a tensor"):
        condition_tensor([rgb, np.zeros((16, 24, 3))], 3, None, None)
    with pytest.raises(ValueError, match="empty list"):
        condition_tensor([], 3, None, None)
    one = torch.arange(2.0).reshape(2, 1, 1, 1)
    assert repeat_to_batch(one, 2, 2).flatten().tolist() == [0, 0, 1, 1]     # per prompt, then per image
    with pytest.raises(ValueError, match="2 condition images for 3 prompt"):
        repeat_to_batch(one, 3, 1)
