"""Scrubbing and animating through timesteps: a slider (ipywidgets), a GIF, an HTML animation."""

from __future__ import annotations

import io
import os

import numpy as np
import torch
from PIL import Image

from .figures import DPI, pick_steps, plt, steps_grid, to_images, to_uint8

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
