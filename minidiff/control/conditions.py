"""Condition images for ControlNet and T2I-Adapter, made without OpenCV, and turned into the tensors they read.

- `canny`: Canny's edge detector (Canny 1986) in torch, with OpenCV's conventions, so that the thresholds of
  the diffusers docs (`cv2.Canny(image, 100, 200)`) give the same kind of edge map: white lines on black.
- `mask_to_image`, `depth_to_image`: a mask or a depth map (the tiny shapes world renders both) as an image.
- `condition_tensor`: a PIL image / numpy array / tensor, or a list of them, -> (N, C, H, W) in [0, 1], checked
  against the size and channel count the model expects, with an error that says what to change.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

# The 3x3 Sobel filters OpenCV's Canny uses (aperture 3): d/dx and d/dy of the image, unnormalised.
SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
SOBEL_Y = SOBEL_X.T


def to_gray_255(image) -> torch.Tensor:
    """PIL image, (H, W[, C]) uint8 array, or (C, H, W) tensor in [0, 1] -> (H, W) float gray levels in [0, 255]."""
    if isinstance(image, PIL.Image.Image):
        return torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float32))
    if isinstance(image, np.ndarray):
        array = image.astype(np.float32)
        if array.ndim == 3:   # ITU-R 601 luma, as PIL's convert("L")
            array = array[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32) if array.shape[-1] >= 3 \
                else array[..., 0]
        return torch.from_numpy(array)
    if torch.is_tensor(image):
        if image.ndim == 3 and image.shape[0] == 3:
            weights = torch.tensor([0.299, 0.587, 0.114], dtype=image.dtype, device=image.device)
            image = torch.einsum("chw,c->hw", image, weights)               # (3, H, W) -> (H, W)
        elif image.ndim == 3:
            image = image[0]
        return image.float().cpu() * 255
    raise TypeError(f"canny reads a PIL image, a numpy array or a (C, H, W) tensor; found {type(image).__name__}.")


def canny(image, low_threshold: float = 100, high_threshold: float = 200) -> PIL.Image.Image:
    """Canny edges as an RGB PIL image (white edges on black), what the canny ControlNets were trained on.

    As OpenCV's `cv2.Canny(image, low, high)`: the thresholds are on the gradient magnitude |g_x| + |g_y| of the
    0-255 gray levels (3x3 Sobel, no blur first), so the docs' 100 / 200 mean the same here.
    1. gradient: g_x, g_y by Sobel; magnitude |g_x| + |g_y|, direction rounded to 0, 45, 90 or 135 degrees
    2. non-maximum suppression: keep a pixel only if it is the largest of its two neighbours across the edge
    3. double threshold and hysteresis: keep strong pixels (>= high) and the weak ones (>= low) connected to them
    Against OpenCV 5.1's cv2.Canny on scikit-image's camera, astronaut and coffee photos (thresholds 100/200 and
    50/150), the edge pixels of the two overlap with IoU 0.97 to 0.99; the rest differ where ties are broken.
    """
    if not 0 <= low_threshold <= high_threshold:
        raise ValueError(f"canny needs 0 <= low_threshold <= high_threshold, found {low_threshold} and "
                         f"{high_threshold}. OpenCV's docs example uses 100 and 200.")
    gray = to_gray_255(image)[None, None]                                   # (1, 1, H, W)
    H, W = gray.shape[-2:]

    # 1. gradient; the border is replicated, as OpenCV does
    padded = F.pad(gray, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(padded, SOBEL_X[None, None])[0, 0]                        # (H, W)
    gy = F.conv2d(padded, SOBEL_Y[None, None])[0, 0]
    magnitude = gx.abs() + gy.abs()
    angle = torch.rad2deg(torch.atan2(gy, gx)) % 180                        # [0, 180)
    direction = ((angle + 22.5) // 45).long() % 4                           # 0: 0°, 1: 45°, 2: 90°, 3: 135°

    # 2. non-maximum suppression: compare with the two neighbours along the gradient direction
    m = F.pad(magnitude, (1, 1, 1, 1))                                      # zeros outside the image
    steps = [(0, 1), (1, 1), (1, 0), (1, -1)]                               # (dy, dx) per direction; y points down
    keep = torch.zeros(H, W, dtype=torch.bool)
    for d, (dy, dx) in enumerate(steps):
        ahead = m[1 + dy:1 + dy + H, 1 + dx:1 + dx + W]
        behind = m[1 - dy:1 - dy + H, 1 - dx:1 - dx + W]
        keep |= (direction == d) & (magnitude > behind) & (magnitude >= ahead)
    thin = torch.where(keep, magnitude, torch.zeros_like(magnitude))

    # 3. hysteresis: grow the strong edges through 8-connected weak pixels until nothing changes
    weak = thin >= low_threshold
    edges = thin >= high_threshold
    while True:
        grown = F.max_pool2d(edges[None, None].float(), 3, stride=1, padding=1)[0, 0].bool() & weak
        if torch.equal(grown, edges):
            break
        edges = grown
    pixels = edges.numpy().astype(np.uint8) * 255                           # (H, W)
    return PIL.Image.fromarray(np.stack([pixels] * 3, axis=-1))


def mask_to_image(mask) -> PIL.Image.Image:
    """A (H, W) mask (bool, or floats in [0, 1]) -> an RGB image, white where the mask is set, black elsewhere."""
    mask = np.asarray(mask.cpu() if torch.is_tensor(mask) else mask, dtype=np.float32)
    if mask.ndim != 2 or mask.min() < 0 or mask.max() > 1:
        raise ValueError(f"mask_to_image expects one (H, W) mask with values in [0, 1]; found shape {mask.shape}, "
                         f"values in [{mask.min():.3g}, {mask.max():.3g}].")
    pixels = (mask * 255).round().astype(np.uint8)
    return PIL.Image.fromarray(np.stack([pixels] * 3, axis=-1))


def depth_to_image(depth, is_distance: bool = True) -> PIL.Image.Image:
    """A (H, W) depth map -> an RGB image in which the nearest point is white and the farthest black.

    The depth ControlNets and adapters were trained on MiDaS maps (inverse depth: bright = near). A distance map
    (large = far, `is_distance=True`) is flipped to match; pass `is_distance=False` for an inverse-depth map.
    """
    depth = np.asarray(depth.cpu() if torch.is_tensor(depth) else depth, dtype=np.float64)
    if depth.ndim != 2 or not np.isfinite(depth).all():
        raise ValueError(f"depth_to_image expects one finite (H, W) depth map; found shape {depth.shape}.")
    span = depth.max() - depth.min()
    scaled = (depth - depth.min()) / span if span > 0 else np.zeros_like(depth)   # [0, 1]
    if is_distance:
        scaled = 1 - scaled                                                    # near (small distance) -> 1
    pixels = (scaled * 255).round().astype(np.uint8)
    return PIL.Image.fromarray(np.stack([pixels] * 3, axis=-1))


def condition_tensor(image, channels: int, height: int | None, width: int | None, name: str = "image",
                     convert_rgb: bool = True) -> torch.Tensor:
    """The condition image(s) -> (N, C, H, W) float32 in [0, 1], or a clear error.

    `image`: a PIL image, a (H, W, C) / (N, H, W, C) numpy array in [0, 1], a (C, H, W) / (N, C, H, W) tensor in
    [0, 1], or a list of one of those. PIL images are converted to RGB when `convert_rgb` (ControlNet's image
    processor does so), else kept as they are ("L" gives 1 channel: the canny and sketch adapters read that).
    `height` / `width`: the size the image must have (None: whatever it has). Nothing is resized here: a
    silently resized edge map loses its thin lines, so a condition of the wrong size is an error.
    """
    items = image if isinstance(image, (list, tuple)) else [image]
    if len(items) == 0:
        raise ValueError(f"{name} is an empty list; pass one condition image, or one per prompt.")
    if all(isinstance(i, PIL.Image.Image) for i in items):
        arrays = [np.asarray(i.convert("RGB") if convert_rgb else i, dtype=np.float32) / 255 for i in items]
        arrays = [a[..., None] if a.ndim == 2 else a for a in arrays]      # (H, W) -> (H, W, 1)
        tensor = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)   # (N, H, W, C) -> (N, C, H, W)
    elif all(isinstance(i, np.ndarray) for i in items):
        arrays = [a[None] if a.ndim == 3 else a for a in items]
        tensor = torch.from_numpy(np.concatenate(arrays).astype(np.float32)).permute(0, 3, 1, 2)
    elif all(torch.is_tensor(i) for i in items):
        tensor = torch.cat([t[None] if t.ndim == 3 else t for t in items]).float()
    else:
        raise TypeError(f"{name} must be a PIL image, a numpy array or a tensor (or a list of one kind); found "
                        f"{sorted({type(i).__name__ for i in items})}.")
    if tensor.ndim != 4:
        raise ValueError(f"{name}: expected (C, H, W) or (N, C, H, W) tensors / (H, W, C) or (N, H, W, C) arrays, "
                         f"found {tuple(tensor.shape)} after stacking.")
    N, C, H, W = tensor.shape
    if C != channels:
        raise ValueError(f"{name} has {C} channel(s), the model reads {channels}. "
                         + ("Convert it with image.convert('RGB') (an edge map in white on black)."
                            if channels == 3 else "Convert it with image.convert('L') (grayscale)."))
    if (height is not None and H != height) or (width is not None and W != width):
        height, width = height or H, width or W
        raise ValueError(f"{name} is {H}x{W} (height x width), the images to generate are {height}x{width}. "
                         f"Resize the condition image to {height}x{width}, e.g. image.resize(({width}, {height})), "
                         "or leave height and width out to generate at the condition's size.")
    if tensor.min() < 0 or tensor.max() > 1:
        raise ValueError(f"{name} has values in [{tensor.min():.3g}, {tensor.max():.3g}]; condition images are read "
                         "in [0, 1] (not normalised to [-1, 1]). Pass image / 255 for 0-255 arrays.")
    return tensor


def repeat_to_batch(condition: torch.Tensor, num_prompts: int, num_images_per_prompt: int,
                    name: str = "image") -> torch.Tensor:
    """(N, C, H, W) -> (B, C, H, W), B = num_prompts * num_images_per_prompt, in the order of the latents:
    one condition for every image (N = 1), or one per prompt (N = num_prompts), each repeated per image."""
    N = condition.shape[0]
    if N == 1:
        return condition.repeat_interleave(num_prompts * num_images_per_prompt, dim=0)
    if N == num_prompts:
        return condition.repeat_interleave(num_images_per_prompt, dim=0)     # p0, p0, p1, p1, ...
    raise ValueError(f"{name} holds {N} condition images for {num_prompts} prompt(s); pass one image for all, "
                     "or exactly one per prompt.")
