"""Pictures for the notebook course: image grids, latents per timestep, schedules, attention maps, sliders, GIFs.

Every function returns something small to show (a matplotlib Figure, a widget, an IPython Image) and
keeps figures at fixed small sizes (`PANEL` inches per panel at `DPI`), so committed notebooks stay small.

Value ranges: float tensors and float arrays are read in the model's range [-1, 1] unless `value_range`
says otherwise; `value_range=None` stretches each panel from its own min to max (for latent channels
and attention maps). PIL images and uint8 arrays are shown as they are.

Headless: outside Jupyter and without a display, matplotlib's Agg backend is selected, so the helpers
work under pytest and in CI.
"""

from __future__ import annotations

import copy
import io
import math
import os
import sys

import matplotlib

if "ipykernel" not in sys.modules and not os.environ.get("MPLBACKEND") and not os.environ.get("DISPLAY"):
    matplotlib.use("Agg")  # no screen and no notebook: draw into memory

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from .control.attention_maps import average_maps  # noqa: E402

DPI = 72        # dots per inch of every figure: small PNGs in the committed notebooks
PANEL = 1.3     # inches per image panel
MAX_PANELS = 64  # a grid larger than this is a mistake (and a multi-MB notebook)

# The approximate linear map from Stable Diffusion v1 latents (already multiplied by the VAE's
# scaling_factor 0.18215, i.e. what the UNet sees) to RGB in [-1, 1], fitted by the community
# (ComfyUI's `latent_formats.SD15`, after keturn's 2022 estimate). Rows: latent channels; columns: R, G, B.
SD_V1_LATENT_RGB = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)


# --- turning anything into displayable arrays ------------------------------------------------------------

def _one_image(x, value_range) -> np.ndarray:
    """One image (PIL, (H, W), (C, H, W) tensor, (H, W, C) array) -> float array (H, W, 3) or (H, W) in [0, 1]."""
    if isinstance(x, Image.Image):
        return np.asarray(x.convert("RGB"), dtype=np.float32) / 255.0
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu()
        if x.ndim == 3:
            if x.shape[0] not in (1, 3):
                raise ValueError(f"Expected an image tensor (C, H, W) with C = 1 or 3, found shape {tuple(x.shape)}. "
                                 "Show latent channels with latent_channels_grid, or map them with latents_to_rgb.")
            x = x.permute(1, 2, 0)                                          # (C, H, W) -> (H, W, C)
        x = x.numpy()
    x = np.asarray(x)
    if x.ndim == 3 and x.shape[-1] == 1:
        x = x[..., 0]                                                       # (H, W, 1) -> (H, W)
    if x.ndim not in (2, 3) or (x.ndim == 3 and x.shape[-1] != 3):
        raise ValueError(f"Expected an image of shape (H, W), (H, W, 3) or (C, H, W), found {x.shape}.")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    x = x.astype(np.float32)
    if value_range is None:                                                 # stretch min..max to 0..1
        lo, hi = float(x.min()), float(x.max())
    else:
        lo, hi = value_range
    return np.clip((x - lo) / max(hi - lo, 1e-8), 0.0, 1.0)


def to_images(images, value_range=(-1, 1)) -> list[np.ndarray]:
    """A batch (B, C, H, W) tensor, a (B, H, W, C) array, or a list of images -> list of float arrays in [0, 1]."""
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        images = list(images)                                               # (B, C, H, W) -> B x (C, H, W)
    elif isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)                                               # (B, H, W, C) -> B x (H, W, C)
    elif isinstance(images, (Image.Image, torch.Tensor, np.ndarray)):
        images = [images]
    return [_one_image(x, value_range) for x in images]


def to_uint8(image: np.ndarray, side: int | None = None) -> np.ndarray:
    """A float image in [0, 1] -> uint8 RGB (H, W, 3), resized so its longer side is `side` pixels.

    Small images are enlarged with nearest neighbours (pixels stay crisp), large ones shrunk smoothly.
    """
    if image.ndim == 2:
        image = plt.get_cmap("viridis")(image)[..., :3]                     # (H, W) -> (H, W, 3) colour map
    image = (image * 255).round().astype(np.uint8)
    H, W = image.shape[:2]
    if side is not None and max(H, W) != side:
        scale = side / max(H, W)
        size = (max(1, round(W * scale)), max(1, round(H * scale)))         # PIL sizes are (width, height)
        resample = Image.NEAREST if scale > 1 else Image.LANCZOS
        image = np.asarray(Image.fromarray(image).resize(size, resample))
    return image


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


# --- grids ----------------------------------------------------------------------------------------------

def _figure(nrows: int, ncols: int, panel: float = PANEL, extra_height: float = 0.0):
    if nrows * ncols > MAX_PANELS:
        raise ValueError(f"A grid of {nrows} x {ncols} panels is more than {MAX_PANELS}: pass fewer images "
                         "(e.g. every k-th timestep, see pick_steps).")
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel * ncols, panel * nrows + extra_height), dpi=DPI,
                             squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    return fig, axes


def _show(ax, image: np.ndarray, cmap: str = "gray") -> None:
    ax.imshow(image, cmap=cmap if image.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")


def image_grid(images, titles=None, ncols: int | None = None, value_range=(-1, 1), title: str | None = None,
               cmap: str = "gray", panel: float = PANEL):
    """Images side by side (wrapping after `ncols`), each with an optional title. Returns the Figure."""
    images = to_images(images, value_range)
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"Got {len(titles)} titles for {len(images)} images; pass one title per image.")
    ncols = ncols or min(len(images), 8)
    nrows = math.ceil(len(images) / ncols)
    fig, axes = _figure(nrows, ncols, panel, extra_height=0.3 if title else 0.0)
    for i, image in enumerate(images):
        ax = axes.flat[i]
        _show(ax, image, cmap)
        if titles is not None:
            ax.set_title(str(titles[i]), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(pad=0.3)
    return fig


def pick_steps(num_steps: int, k: int) -> list[int]:
    """`k` indices spread evenly over 0 .. num_steps-1, always with the first and the last."""
    if num_steps <= k:
        return list(range(num_steps))
    return sorted({round(i * (num_steps - 1) / (k - 1)) for i in range(k)})


def steps_grid(rows: dict, timesteps, num_cols: int = 6, value_range=(-1, 1), cmap: str = "viridis",
               panel: float = PANEL):
    """One row per name in `rows` (e.g. {"x_t": [...], "predicted x0": [...]}), one column per chosen step.

    Each value of `rows` holds one image per timestep (a (S, C, H, W) tensor or a list); `num_cols` of the
    S steps are shown, first and last included, titled with their timestep.
    """
    timesteps = [int(t) if float(t).is_integer() else round(float(t), 1) for t in torch.as_tensor(timesteps).tolist()]
    per_row = {name: to_images(images, value_range) for name, images in rows.items()}
    for name, images in per_row.items():
        if len(images) != len(timesteps):
            raise ValueError(f"Row {name!r} has {len(images)} images but there are {len(timesteps)} timesteps; "
                             "pass one image per timestep.")
    cols = pick_steps(len(timesteps), num_cols)
    fig, axes = _figure(len(per_row), len(cols), panel)
    for r, (name, images) in enumerate(per_row.items()):
        for c, i in enumerate(cols):
            ax = axes[r, c]
            _show(ax, images[i], cmap)
            if r == 0:
                ax.set_title(f"t={timesteps[i]}", fontsize=8)
        axes[r, 0].text(-0.08, 0.5, name, transform=axes[r, 0].transAxes, ha="right", va="center",
                        fontsize=8, rotation=90)
    fig.tight_layout(pad=0.3)
    return fig


def latent_channels_grid(latents, timesteps, num_rows: int = 5, rgb_factors=None, rgb_bias=None,
                         panel: float = 1.0):
    """Latents over time: one row per chosen timestep, one column per latent channel (+ an RGB preview).

    `latents`: (S, C, h, w) or a list of S tensors (C, h, w) / (1, C, h, w). Each channel is stretched
    around zero with one colour scale per row (blue negative, red positive), so rows can be compared.
    With `rgb_factors` (see `latents_to_rgb`) a last column shows the cheap RGB preview.
    """
    latents = torch.stack([torch.as_tensor(x).detach().float().cpu().reshape(x.shape[-3:]) for x in latents])
    S, C, h, w = latents.shape
    timesteps = torch.as_tensor(timesteps).tolist()
    if len(timesteps) != S:
        raise ValueError(f"Got {S} latents but {len(timesteps)} timesteps; pass one latent per timestep.")
    rows = pick_steps(S, num_rows)
    ncols = C + (1 if rgb_factors is not None else 0)
    fig, axes = _figure(len(rows), ncols, panel)
    for r, i in enumerate(rows):
        scale = float(latents[i].abs().max().clamp_min(1e-8))
        for c in range(C):
            axes[r, c].imshow(latents[i, c].numpy(), cmap="RdBu_r", vmin=-scale, vmax=scale,
                              interpolation="nearest")
            if r == 0:
                axes[r, c].set_title(f"channel {c}", fontsize=8)
        if rgb_factors is not None:
            preview = latents_to_rgb(latents[i : i + 1], rgb_factors, rgb_bias)[0]  # (3, h, w) in [0, 1]
            _show(axes[r, C], _one_image(preview, (0, 1)))
            if r == 0:
                axes[r, C].set_title("RGB preview", fontsize=8)
        t = timesteps[i]
        axes[r, 0].text(-0.08, 0.5, f"t={int(t) if float(t).is_integer() else round(t, 1)}",
                        transform=axes[r, 0].transAxes, ha="right", va="center", fontsize=8, rotation=90)
    fig.tight_layout(pad=0.3)
    return fig


def heatmap(matrix, title: str = "", xlabel: str = "", ylabel: str = "", cmap: str = "RdBu_r",
            size: tuple[float, float] = (4.0, 2.2)):
    """A 2-D tensor as a colour image with a colour bar (e.g. timestep embeddings: rows t, columns features)."""
    matrix = torch.as_tensor(matrix).detach().float().cpu()
    if matrix.ndim != 2:
        raise ValueError(f"heatmap expects a 2-D matrix, found shape {tuple(matrix.shape)}.")
    fig, ax = plt.subplots(figsize=size, dpi=DPI)
    shown = ax.imshow(matrix.numpy(), cmap=cmap, aspect="auto", interpolation="nearest")
    fig.colorbar(shown, ax=ax)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    fig.tight_layout(pad=0.4)
    return fig


def line_plot(series: dict, xs=None, title: str = "", xlabel: str = "", ylabel: str = "", logy: bool = False,
              size: tuple[float, float] = (4.0, 2.2), marker: str | None = None, xticklabels=None):
    """One line per entry of `series` ({"loss": values}); `xticklabels` names the points (e.g. layer names)."""
    fig, ax = plt.subplots(figsize=size, dpi=DPI)
    for name, ys in series.items():
        ys = torch.as_tensor(ys).detach().double().cpu().numpy()
        x = np.arange(len(ys)) if xs is None else np.asarray(xs)
        ax.plot(x, ys, label=name, marker=marker, markersize=3)
    if logy:
        ax.set_yscale("log")
    if xticklabels is not None:
        ax.set_xticks(range(len(xticklabels)), xticklabels, rotation=90, fontsize=6)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    if len(series) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout(pad=0.4)
    return fig


# --- a cheap look at latents: a linear map 4 -> 3 ---------------------------------------------------------

def latents_to_rgb(latents: torch.Tensor, factors=SD_V1_LATENT_RGB, bias=None) -> torch.Tensor:
    """(B, C, h, w) latents (as the UNet sees them) -> (B, 3, h, w) in [0, 1], with no VAE decoder.

    rgb = latents^T @ factors + bias, per pixel; the result is in [-1, 1] and mapped to [0, 1].
    Costs one tiny matrix product instead of the decoder: good enough to watch the picture form.
    """
    factors = torch.as_tensor(factors, dtype=torch.float32)                          # (C, 3)
    latents = latents.detach().float().cpu()
    if latents.ndim != 4 or latents.shape[1] != factors.shape[0]:
        raise ValueError(f"Expected latents (B, {factors.shape[0]}, h, w) to match the {tuple(factors.shape)} "
                         f"factors, found {tuple(latents.shape)}. Fit factors for this VAE with fit_latent_rgb.")
    rgb = torch.einsum("bchw,cd->bdhw", latents, factors)                            # (B, C, h, w) -> (B, 3, h, w)
    if bias is not None:
        rgb = rgb + torch.as_tensor(bias, dtype=torch.float32).view(1, 3, 1, 1)
    return ((rgb + 1) / 2).clamp(0, 1)


def fit_latent_rgb(latents: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares fit of the linear preview for any VAE: latents (N, C, h, w), images (N, 3, H, W) in [-1, 1].

    Each image is shrunk to h x w (area average); then [latent, 1] @ [factors; bias] ~ rgb is solved over all
    pixels. Returns factors (C, 3) and bias (3,) for `latents_to_rgb`.
    """
    latents = latents.detach().float().cpu()
    N, C, h, w = latents.shape
    small = F.adaptive_avg_pool2d(images.detach().float().cpu(), (h, w))             # (N, 3, H, W) -> (N, 3, h, w)
    X = latents.permute(0, 2, 3, 1).reshape(-1, C)                                   # (N*h*w, C)
    X = torch.cat([X, torch.ones(X.shape[0], 1)], dim=1)                             # (N*h*w, C+1): a bias column
    Y = small.permute(0, 2, 3, 1).reshape(-1, 3)                                     # (N*h*w, 3)
    solution = torch.linalg.lstsq(X.double(), Y.double()).solution.float()           # (C+1, 3)
    return solution[:C], solution[C]


SAMPLE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")  # scikit-image's colour photos, offline


@torch.no_grad()
def fit_latent_rgb_to_vae(vae, images: torch.Tensor | None = None, size: int | None = None,
                          photos=SAMPLE_PHOTOS) -> tuple[torch.Tensor, torch.Tensor]:
    """The linear preview for any VAE: encode `images` (N, 3, H, W) in [-1, 1], scale, and `fit_latent_rgb`.

    Without `images`, scikit-image's sample photos at `size` pixels (default: the VAE's `sample_size`).
    Fit on images like the ones the VAE was trained on. Returns factors (C, 3), bias (3,).
    """
    if images is None:
        size = size or vae.config.sample_size
        images = torch.cat([sample_photo(name, size) for name in photos])            # (N, 3, size, size)
    latents = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mode()        # (N, C, H/8, W/8)
    return fit_latent_rgb(latents * vae.config.scaling_factor, images)


# --- noise schedules ------------------------------------------------------------------------------------

def plot_schedules(schedulers: dict, panel: float = 2.4):
    """ᾱ_t, the signal-to-noise ratio SNR = ᾱ/(1-ᾱ) and σ = sqrt((1-ᾱ)/ᾱ) over the training timesteps.

    `schedulers`: {"name": scheduler}; each needs `.alphas_cumprod` (every minidiff scheduler has it).
    """
    fig, axes = plt.subplots(1, 3, figsize=(3 * panel, panel), dpi=DPI)
    for name, scheduler in schedulers.items():
        alpha_bar = scheduler.alphas_cumprod.double()                                # (T,)
        t = np.arange(len(alpha_bar))
        snr = alpha_bar / (1 - alpha_bar)
        axes[0].plot(t, alpha_bar.numpy(), label=name)
        axes[1].semilogy(t, snr.numpy(), label=name)
        axes[2].semilogy(t, (1 / snr).sqrt().numpy(), label=name)
    for ax, label in zip(axes, ("alpha_bar_t", "SNR_t", "sigma_t")):
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("t", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7)
    fig.tight_layout(pad=0.4)
    return fig


def plot_timesteps(schedulers: dict, num_inference_steps: int, panel: float = 2.4):
    """Where each scheduler samples: one row of dots per scheduler, its `timesteps` after set_timesteps.

    The schedulers are copied, so the ones passed in are left as they were.
    """
    names = list(schedulers)
    fig, ax = plt.subplots(figsize=(3 * panel, 0.35 * len(names) + 0.8), dpi=DPI)
    for row, name in enumerate(names):
        scheduler = copy.deepcopy(schedulers[name])
        scheduler.set_timesteps(num_inference_steps)
        t = torch.as_tensor(scheduler.timesteps).double().numpy()
        ax.plot(t, np.full_like(t, row), "o", markersize=3)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("timestep t", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.invert_yaxis()
    fig.tight_layout(pad=0.4)
    return fig


# --- attention maps ---------------------------------------------------------------------------------------

def aggregate_cross_attention(probs: list, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Cross-attention probabilities of several layers -> one map per token, detached, on the CPU: (B, M, h, w).

    `probs`: tensors (B, heads, N, M) from `Attention.attention_probs`, N = h_l * w_l positions of that
    layer's feature map, M text tokens. Heads are averaged, each map is resized to the latent size
    `latent_hw` (bilinear) and the layers are averaged: `minidiff.control.attention_maps.average_maps`.
    """
    return average_maps([p.detach().cpu() for p in probs], latent_hw)


def attention_overlay(image, maps, labels, value_range=(-1, 1), alpha: float = 0.55, panel: float = PANEL):
    """The image, then one panel per map laid over a gray copy of it. maps: (K, h, w), labels: K strings."""
    base = to_images(image, value_range)[0]                                          # (H, W, 3) in [0, 1]
    H, W = base.shape[:2]
    gray = base.mean(axis=-1) if base.ndim == 3 else base                            # (H, W)
    maps = torch.as_tensor(maps).detach().float().cpu()
    if maps.ndim != 3 or len(labels) != maps.shape[0]:
        raise ValueError(f"Expected maps (K, h, w) and K labels, found maps {tuple(maps.shape)} and "
                         f"{len(labels)} labels.")
    big = F.interpolate(maps[:, None], size=(H, W), mode="bilinear", align_corners=False)[:, 0]  # (K, H, W)
    fig, axes = _figure(1, 1 + len(labels), panel, extra_height=0.1)
    _show(axes[0, 0], base)
    axes[0, 0].set_title("image", fontsize=8)
    for k, label in enumerate(labels):
        m = big[k]
        m = ((m - m.min()) / (m.max() - m.min()).clamp_min(1e-8)).numpy()           # each map stretched to [0, 1]
        axes[0, k + 1].imshow(gray, cmap="gray", vmin=0, vmax=1)
        axes[0, k + 1].imshow(m, cmap="jet", alpha=alpha, vmin=0, vmax=1)
        axes[0, k + 1].set_title(str(label), fontsize=8)
    fig.tight_layout(pad=0.3)
    return fig


# --- scrubbing and animating through timesteps ----------------------------------------------------------

def widgets_available() -> bool:
    """True inside a Jupyter kernel with ipywidgets installed (and MINIDIFF_WIDGETS not set to 0)."""
    if os.environ.get("MINIDIFF_WIDGETS", "1") == "0":
        return False
    try:
        import ipywidgets  # noqa: F401
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and hasattr(shell, "kernel")


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def timestep_slider(frames, timesteps, value_range=(-1, 1), side: int = 192, static_cols: int = 6):
    """A slider that scrubs through one image per timestep (ipywidgets), or a static grid without widgets.

    `frames`: one image per timestep ((S, C, H, W) tensor or a list). In a notebook this returns a VBox
    (slider, label, image); outside Jupyter, or with MINIDIFF_WIDGETS=0, a Figure of `static_cols` steps.
    """
    images = to_images(frames, value_range)
    timesteps = torch.as_tensor(timesteps).tolist()
    if len(images) != len(timesteps):
        raise ValueError(f"Got {len(images)} frames but {len(timesteps)} timesteps; pass one frame per timestep.")
    if not widgets_available():
        return steps_grid({"frames": frames}, timesteps, num_cols=static_cols, value_range=value_range)

    import ipywidgets as widgets

    pngs = [_png(to_uint8(image, side)) for image in images]                         # encoded once, then swapped
    view = widgets.Image(value=pngs[0], format="png")
    label = widgets.Label(f"step 0 of {len(pngs) - 1}, t = {timesteps[0]}")
    slider = widgets.IntSlider(value=0, min=0, max=len(pngs) - 1, description="step", continuous_update=True)

    def show_step(change):
        i = change["new"]
        view.value = pngs[i]
        label.value = f"step {i} of {len(pngs) - 1}, t = {timesteps[i]}"

    slider.observe(show_step, names="value")
    return widgets.VBox([slider, label, view])


def make_gif(frames, value_range=(-1, 1), side: int = 128, duration_ms: int = 150, hold_last_ms: int = 1000,
             max_frames: int = 16, colors: int = 64) -> bytes:
    """An animated GIF (bytes) of the frames at `side` pixels, looping, the last frame held a little longer.

    At most `max_frames` frames (spread evenly, first and last kept) of `colors` colours each, without
    dithering: a few tens of kB, small enough to commit inside a notebook.
    """
    images = to_images(frames, value_range)
    images = [images[i] for i in pick_steps(len(images), max_frames)]
    images = [Image.fromarray(to_uint8(image, side)).quantize(colors=colors, dither=Image.Dither.NONE)
              for image in images]
    durations = [duration_ms] * (len(images) - 1) + [hold_last_ms]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=0)
    return buffer.getvalue()


def show_gif(frames, value_range=(-1, 1), side: int = 128, duration_ms: int = 150, max_frames: int = 16):
    """The GIF of `make_gif`, ready to display in a notebook (an `IPython.display.Image`)."""
    from IPython.display import Image as IPythonImage

    return IPythonImage(data=make_gif(frames, value_range, side, duration_ms, max_frames=max_frames), format="gif")


def animation_html(frames, timesteps, value_range=(-1, 1), panel: float = 2.0, interval_ms: int = 150) -> str:
    """A matplotlib animation as self-contained HTML with play controls (`to_jshtml`); keep frames few."""
    from matplotlib import animation

    images = to_images(frames, value_range)
    timesteps = torch.as_tensor(timesteps).tolist()
    fig, ax = plt.subplots(figsize=(panel, panel), dpi=DPI)
    ax.set_axis_off()
    shown = ax.imshow(images[0], vmin=0, vmax=1, interpolation="nearest")
    title = ax.set_title(f"t = {timesteps[0]}", fontsize=8)

    def draw(i):
        shown.set_data(images[i])
        title.set_text(f"t = {timesteps[i]}")
        return shown, title

    anim = animation.FuncAnimation(fig, draw, frames=len(images), interval=interval_ms, blit=False)
    html = anim.to_jshtml(default_mode="loop")
    plt.close(fig)
    return html
