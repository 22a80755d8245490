"""Scrubbing and animating through timesteps: a slider (ipywidgets), a GIF, an HTML animation.

Each carries a static view for viewers that run no kernel and show no GIF (GitHub, nbviewer, nbconvert,
a printed handout): the slider's and the GIF's outputs also hold a PNG strip of some of the frames, titled
with their timesteps, and a text description.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import os

import numpy as np
import torch
from PIL import Image

from .figures import (DPI, PANEL, TITLE_FONT, _timestep_label, figure_png, image_grid, pick_steps, plt, steps_grid,
                      to_images, to_uint8)

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


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


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def frame_strip(frames, timesteps=None, value_range=(-1, 1), num_cols: int = 6, panel: float = PANEL):
    """`num_cols` of the frames in one row (first and last included), titled with their timestep (or their
    frame number without `timesteps`). Returns the Figure; the static view of the slider and of the GIF."""
    images = to_images(frames, value_range)
    picked = pick_steps(len(images), num_cols)
    if timesteps is not None:
        timesteps = torch.as_tensor(timesteps).tolist()
        titles = [f"t={_timestep_label(timesteps[i])}" for i in picked]
    else:
        titles = [f"frame {i}" for i in picked]
    fig = image_grid([images[i] for i in picked], titles=titles, ncols=len(picked), value_range=(0, 1), panel=panel)
    fig.description = f"Figure: {len(picked)} of {len(images)} frames, {', '.join(titles)}"
    return fig


@functools.cache
def _slider_box_class():
    """ipywidgets.VBox whose output also holds a PNG and a description (ipywidgets is imported only here)."""
    import ipywidgets as widgets

    class SliderBox(widgets.VBox):
        """The slider's box: Jupyter shows the live widget, a viewer without widgets the PNG `static_png`."""

        static_png = b""
        alt_text = ""
        _ipython_display_ = None       # ipywidgets 7 displays through this hook, which would leave out the PNG

        def _repr_mimebundle_(self, **kwargs):
            return {WIDGET_MIME: {"version_major": 2, "version_minor": 0, "model_id": self.model_id},
                    "image/png": _b64(self.static_png), "text/plain": self.alt_text}

    return SliderBox


def timestep_slider(frames, timesteps, value_range=(-1, 1), side: int = 192, static_cols: int = 6):
    """A slider that scrubs through one image per timestep (ipywidgets), or a static grid without widgets.

    `frames`: one image per timestep ((S, C, H, W) tensor or a list). In a notebook this returns a VBox
    (slider, label, image) whose output also holds a PNG strip of `static_cols` steps (what GitHub,
    nbviewer and nbconvert show); outside Jupyter, or with MINIDIFF_WIDGETS=0, a Figure of those steps.
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
    box = _slider_box_class()([slider, label, view])
    strip = frame_strip(images, timesteps, value_range=(0, 1), num_cols=static_cols)
    box.alt_text = (f"Timestep slider over {len(pngs)} frames, t = {_timestep_label(timesteps[0])} to "
                    f"{_timestep_label(timesteps[-1])}; its static view: {strip.description.removeprefix('Figure: ')}")
    box.static_png = figure_png(strip)
    return box


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


class AnimatedGif:
    """A GIF to show in a notebook, with a PNG strip of some of its frames and a description beside it.

    Its output holds text/html (the GIF in an <img> with alt text: what Jupyter, nbviewer and nbconvert
    show, animated), image/gif, image/png (the strip, for viewers that show no HTML and no GIF) and text/plain.
    """

    def __init__(self, data: bytes, strip_png: bytes, description: str):
        self.data, self.strip_png, self.description = data, strip_png, description

    def __repr__(self) -> str:
        return self.description

    def _repr_mimebundle_(self, include=None, exclude=None):
        gif = _b64(self.data)
        return {"text/html": f'<img src="data:image/gif;base64,{gif}" alt="{html.escape(self.description)}"/>',
                "image/gif": gif, "image/png": _b64(self.strip_png), "text/plain": self.description}


def show_gif(frames, value_range=(-1, 1), side: int = 128, duration_ms: int = 150, max_frames: int = 16,
             timesteps=None, static_cols: int = 6) -> AnimatedGif:
    """The GIF of `make_gif`, ready to display in a notebook, with a PNG strip of `static_cols` frames (titled
    with their `timesteps` if given) for viewers that cannot play it."""
    images = to_images(frames, value_range)                                          # floats in [0, 1]
    if timesteps is not None and len(torch.as_tensor(timesteps).reshape(-1)) != len(images):
        raise ValueError(f"Got {len(images)} frames but {len(timesteps)} timesteps; pass one timestep per frame, "
                         "or none.")
    strip = frame_strip(images, timesteps, (0, 1), num_cols=static_cols)
    description = (f"Animated GIF of {min(len(images), max_frames)} frames, {side} pixels wide; its static view: "
                   f"{strip.description.removeprefix('Figure: ')}")
    return AnimatedGif(make_gif(images, (0, 1), side, duration_ms, max_frames=max_frames), figure_png(strip),
                       description)


def animation_html(frames, timesteps, value_range=(-1, 1), panel: float = 2.0, interval_ms: int = 150) -> str:
    """A matplotlib animation as self-contained HTML with play controls (`to_jshtml`); keep frames few."""
    from matplotlib import animation

    images = to_images(frames, value_range)
    timesteps = torch.as_tensor(timesteps).tolist()
    fig, ax = plt.subplots(figsize=(panel, panel), dpi=DPI, layout="constrained")
    ax.set_axis_off()
    shown = ax.imshow(images[0], vmin=0, vmax=1, interpolation="nearest")
    title = ax.set_title(f"t = {timesteps[0]}", fontsize=TITLE_FONT)

    def draw(i):
        shown.set_data(images[i])
        title.set_text(f"t = {timesteps[i]}")
        return shown, title

    anim = animation.FuncAnimation(fig, draw, frames=len(images), interval=interval_ms, blit=False)
    html_text = anim.to_jshtml(default_mode="loop")
    plt.close(fig)
    return html_text
