"""Figures at fixed small sizes: image grids, images per timestep, heat maps, line plots.

Every function returns a matplotlib Figure at a fixed small size (`PANEL` inches per image panel at `DPI`),
with its text at `FONT` / `TITLE_FONT` points and matplotlib's constrained layout (no cut or overlapping
titles), so committed notebooks stay small and legible. Every figure is a `DescribedFigure`: its text form
(what Jupyter stores as `text/plain` beside the PNG) is a one-line description, not `<Figure size ...>`.

Value ranges: float tensors and float arrays are read in the model's range [-1, 1] unless `value_range`
says otherwise; `value_range=None` stretches each panel from its own min to max (for latent channels
and attention maps; symmetric around 0 with a diverging colour map such as RdBu_r). PIL images and uint8
arrays are shown as they are. One-channel maps drawn with a colour map get a colour bar.

Headless: outside Jupyter and without a display, matplotlib's Agg backend is selected, so the helpers
work under pytest and in CI.
"""

from __future__ import annotations

import io
import math
import os
import sys

import matplotlib

if "ipykernel" not in sys.modules and not os.environ.get("MPLBACKEND") and not os.environ.get("DISPLAY"):
    matplotlib.use("Agg")  # no screen and no notebook: draw into memory

import matplotlib.figure  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.font_manager import FontProperties  # noqa: E402
from matplotlib.textpath import TextToPath  # noqa: E402
from matplotlib.ticker import MaxNLocator, ScalarFormatter  # noqa: E402
from PIL import Image  # noqa: E402

DPI = 110         # dots per inch of every figure: 9-point text is 14 pixels tall
FONT = 9          # points: tick labels, axis labels, legends, colour bars, row labels
TITLE_FONT = 10   # points: titles
PANEL = 1.0       # inches per image panel (110 pixels)
MAX_PANELS = 64   # a grid larger than this is a mistake (and a multi-MB notebook)

# Colour maps centred on 0 (blue negative, red positive): signed values are stretched symmetrically around 0.
DIVERGING = {"RdBu", "RdBu_r", "coolwarm", "bwr", "seismic", "PiYG", "PRGn", "BrBG", "PuOr", "RdGy", "RdYlBu"}
# Not perceptually uniform: bright bands that are not in the data, and unreadable in gray or by colour-blind readers.
RAINBOWS = {"jet", "rainbow", "gist_rainbow", "nipy_spectral", "gist_ncar"}
_TEXT_TO_PATH = TextToPath()     # measures text, for wrapping titles to their panel


class DescribedFigure(matplotlib.figure.Figure):
    """A matplotlib Figure whose repr is a short description of what it shows (its alt text in a notebook)."""

    description = ""

    def __repr__(self) -> str:
        return self.description or super().__repr__()


def new_figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (4.0, 2.2), description: str = ""):
    """A DescribedFigure at `DPI` with constrained layout, and its axes as an (nrows, ncols) array."""
    fig, axes = plt.subplots(nrows, ncols, figsize=size, dpi=DPI, layout="constrained", squeeze=False,
                             FigureClass=DescribedFigure)
    fig.description = description
    return fig, axes


def figure_png(fig) -> bytes:
    """The figure as PNG bytes, saved as Jupyter's inline backend saves it (tight box, the figure's dpi); closes it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=fig.dpi, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def check_cmap(cmap: str) -> str:
    """The colour map name, or a ValueError for a rainbow map such as jet."""
    if str(cmap).removesuffix("_r") in RAINBOWS:
        raise ValueError(f"Colour map {cmap!r} is a rainbow map: it shows bands that are not in the data. Use "
                         "'viridis' or 'magma' for magnitudes, or 'RdBu_r' for signed values.")
    return cmap


def integer_ticks(ax, axis: str = "x") -> None:
    """Ticks at whole numbers only (steps, timesteps), at most about six, at round values."""
    locator = MaxNLocator(nbins=6, integer=True, steps=[1, 2, 2.5, 5, 10])
    (ax.xaxis if axis == "x" else ax.yaxis).set_major_locator(locator)


def colorbar(fig, mappable, ax, label: str = "", ticks=None, ticklabels=None, shrink: float = 0.9):
    """A colour bar beside `ax` (one axes or several), its text at FONT points."""
    bar = fig.colorbar(mappable, ax=ax, shrink=shrink, ticks=ticks)
    if ticklabels is not None:
        bar.set_ticklabels(ticklabels)
    bar.ax.tick_params(labelsize=FONT)
    if label:
        bar.set_label(label, fontsize=FONT)
    return bar


def _text_width(text: str, fontsize: float) -> float:
    """Width of one line of `text` in points, in matplotlib's default font."""
    return _TEXT_TO_PATH.get_text_width_height_descent(text, FontProperties(size=fontsize), ismath=False)[0]


def wrap(text: str, inches: float, fontsize: float = TITLE_FONT, max_lines: int = 3) -> str:
    """`text` broken at spaces into lines that fit `inches` at `fontsize` points (measured), at most
    `max_lines`; a word wider than that is cut, and text beyond the last line becomes '…'."""
    room = 0.95 * inches * 72                                               # points, a little space between panels
    lines, line = [], ""
    for word in str(text or "").split():
        if _text_width(f"{line} {word}".strip(), fontsize) <= room:
            line = f"{line} {word}".strip()
            continue
        if line:
            lines.append(line)
        while _text_width(word, fontsize) > room and len(word) > 1:          # wider than the panel: cut it
            k = max(k for k in range(1, len(word)) if _text_width(word[:k], fontsize) <= room or k == 1)
            lines.append(word[:k])
            word = word[k:]
        line = word
    lines += [line] if line else []
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and _text_width(last + "…", fontsize) > room:
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last.rstrip() + "…"]
    return "\n".join(lines)


def _lines_height(texts, fontsize: float = TITLE_FONT) -> float:
    """Inches taken by the tallest of `texts` (already wrapped) above a panel, 0 without any."""
    lines = max((str(t).count("\n") + 1 for t in texts if t), default=0)
    return (lines * fontsize * 1.3 + 6) / 72 if lines else 0.0                # 6 points: matplotlib's title pad


def _brief(items, limit: int = 8) -> str:
    items = [str(x) for x in items]
    return ", ".join(items if len(items) <= limit else items[: limit - 1] + ["…", items[-1]])


# --- turning anything into displayable arrays ------------------------------------------------------------

def _as_array(x) -> np.ndarray:
    """One image (PIL, (H, W), (C, H, W) tensor, (H, W, C) array) -> (H, W) or (H, W, 3) array, values as given."""
    if isinstance(x, Image.Image):
        return np.asarray(x.convert("RGB"))                                 # uint8 (H, W, 3)
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
    return x


def _limits(x: np.ndarray, value_range, cmap: str | None = None) -> tuple[float, float]:
    """The values shown as the ends of the colour scale: `value_range`, or the panel's own min and max
    (with a diverging colour map, -max|x| and +max|x|, so that 0 sits in the middle)."""
    if value_range is not None:
        return float(value_range[0]), float(value_range[1])
    if cmap is not None and str(cmap) in DIVERGING:
        scale = float(np.abs(x).max())
        return -scale, scale
    return float(x.min()), float(x.max())


def _one_image(x, value_range, cmap: str | None = None) -> np.ndarray:
    """One image -> float array (H, W, 3) or (H, W) in [0, 1] (uint8 / PIL divided by 255)."""
    x = _as_array(x)
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    x = x.astype(np.float32)
    lo, hi = _limits(x, value_range, cmap)
    return np.clip((x - lo) / max(hi - lo, 1e-8), 0.0, 1.0)


def to_images(images, value_range=(-1, 1)) -> list[np.ndarray]:
    """A batch (B, C, H, W) tensor, a (B, H, W, C) array, or a list of images -> list of float arrays in [0, 1]."""
    return [_one_image(x, value_range) for x in _as_list(images)]


def _as_list(images) -> list:
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        return list(images)                                                 # (B, C, H, W) -> B x (C, H, W)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)                                                 # (B, H, W, C) -> B x (H, W, C)
    if isinstance(images, (Image.Image, torch.Tensor, np.ndarray)):
        return [images]
    return list(images)


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


# --- grids ----------------------------------------------------------------------------------------------

def _figure(nrows: int, ncols: int, panel: float = PANEL, extra_height: float = 0.0, extra_width: float = 0.0,
            description: str = ""):
    if nrows * ncols > MAX_PANELS:
        raise ValueError(f"A grid of {nrows} x {ncols} panels is more than {MAX_PANELS}: pass fewer images "
                         "(e.g. every k-th timestep, see pick_steps).")
    fig, axes = new_figure(nrows, ncols, (panel * ncols + extra_width, panel * nrows + extra_height), description)
    fig.get_layout_engine().set(w_pad=0.02, wspace=0.02, hspace=0.02)   # image panels sit close side by side
    for ax in axes.flat:
        ax.set_axis_off()
        ax.set_anchor("S")          # a square image in a taller cell sits at its foot, under its title's room
    return fig, axes


def _show(ax, image: np.ndarray, cmap: str = "gray"):
    return ax.imshow(image, cmap=cmap if image.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")


def _is_map(x, cmap: str) -> bool:
    """A one-channel float image drawn with a colour map (not gray): it gets a colour bar."""
    return x.ndim == 2 and x.dtype != np.uint8 and cmap not in ("gray", "Greys", "gray_r", "Greys_r")


def image_grid(images, titles=None, ncols: int | None = None, value_range=(-1, 1), title: str | None = None,
               cmap: str = "gray", panel: float = PANEL, colorbars: bool = True):
    """Images side by side (wrapping after `ncols`), each with an optional title. Returns the Figure.

    One-channel maps drawn with a colour map other than gray get a colour bar in their own units
    (`colorbars=False` leaves them out).
    """
    check_cmap(cmap)
    arrays = [_as_array(x) for x in _as_list(images)]
    if titles is not None and len(titles) != len(arrays):
        raise ValueError(f"Got {len(titles)} titles for {len(arrays)} images; pass one title per image.")
    ncols = ncols or min(len(arrays), 8)
    nrows = math.ceil(len(arrays) / ncols)
    with_bars = [colorbars and _is_map(x, cmap) for x in arrays]
    wrapped = [wrap(t, panel) for t in titles] if titles is not None else []
    suptitle = wrap(title, panel * ncols, TITLE_FONT + 1) if title else ""
    described = f"{title}: " if title else ""
    described += f"{len(arrays)} images in {nrows} x {ncols}" + (f": {_brief(titles)}" if titles is not None else "")
    fig, axes = _figure(nrows, ncols, panel, extra_height=nrows * _lines_height(wrapped) + _lines_height([suptitle]),
                        extra_width=0.45 * panel if any(with_bars) else 0.0, description="Figure: " + described)
    for i, x in enumerate(arrays):
        ax = axes.flat[i]
        if with_bars[i]:
            lo, hi = _limits(x.astype(np.float32), value_range, cmap)
            shown = ax.imshow(x, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
            colorbar(fig, shown, ax, shrink=0.8).ax.yaxis.set_major_locator(MaxNLocator(3))
        else:
            _show(ax, _one_image(x, value_range, cmap), cmap)
        if titles is not None:
            ax.set_title(wrapped[i], fontsize=TITLE_FONT)
    if title:
        fig.suptitle(suptitle, fontsize=TITLE_FONT + 1)
    return fig


def pick_steps(num_steps: int, k: int) -> list[int]:
    """`k` indices spread evenly over 0 .. num_steps-1, always with the first and the last."""
    if num_steps <= k:
        return list(range(num_steps))
    return sorted({round(i * (num_steps - 1) / (k - 1)) for i in range(k)})


def _timestep_label(t) -> str:
    t = float(t)
    return f"{int(t) if t.is_integer() else round(t, 1)}"


def steps_grid(rows: dict, timesteps, num_cols: int = 6, value_range=(-1, 1), cmap: str = "viridis",
               panel: float = PANEL, colorbars: bool = True):
    """One row per name in `rows` (e.g. {"x_t": [...], "predicted x0": [...]}), one column per chosen step.

    Each value of `rows` holds one image per timestep (a (S, C, H, W) tensor or a list); `num_cols` of the
    S steps are shown, first and last included, titled with their timestep. A row of one-channel maps gets
    a colour bar: in its units with a `value_range`, else from each panel's min to its max.
    """
    check_cmap(cmap)
    timesteps = [_timestep_label(t) for t in torch.as_tensor(timesteps).tolist()]
    per_row = {name: [_as_array(x) for x in _as_list(images)] for name, images in rows.items()}
    for name, images in per_row.items():
        if len(images) != len(timesteps):
            raise ValueError(f"Row {name!r} has {len(images)} images but there are {len(timesteps)} timesteps; "
                             "pass one image per timestep.")
    cols = pick_steps(len(timesteps), num_cols)
    with_bars = {name: colorbars and all(_is_map(x, cmap) for x in images)
                 for name, images in per_row.items()}
    description = (f"Figure: {_brief(per_row)} (rows) at t = {_brief(timesteps[i] for i in cols)} (columns), "
                   f"{len(cols)} of {len(timesteps)} steps")
    fig, axes = _figure(len(per_row), len(cols), panel, extra_height=_lines_height(["t"]),
                        extra_width=0.5 * panel if any(with_bars.values()) else 0.0, description=description)
    for r, (name, images) in enumerate(per_row.items()):
        for c, i in enumerate(cols):
            ax = axes[r, c]
            shown = _show(ax, _one_image(images[i], value_range, cmap), cmap)
            if r == 0:
                ax.set_title(f"t={timesteps[i]}", fontsize=TITLE_FONT)
        axes[r, 0].text(-0.08, 0.5, wrap(name, panel, FONT, 2), transform=axes[r, 0].transAxes, ha="right",
                        va="center", fontsize=FONT, rotation=90)
        if with_bars[name] and value_range is not None:                     # one scale for the row, in its units
            lo, hi = value_range
            mappable = ScalarMappable(Normalize(lo, hi), cmap)
            colorbar(fig, mappable, axes[r, :], shrink=0.8).ax.yaxis.set_major_locator(MaxNLocator(3))
        elif with_bars[name]:                                               # each panel has its own scale
            ticks, labels = ([0, 0.5, 1], ["-max|x|", "0", "+max|x|"]) if cmap in DIVERGING else ([0, 1], ["min", "max"])
            colorbar(fig, shown, axes[r, :], ticks=ticks, ticklabels=labels, label="each panel", shrink=0.8)
    return fig


def heatmap(matrix, title: str = "", xlabel: str = "", ylabel: str = "", cmap: str = "RdBu_r",
            size: tuple[float, float] = (4.0, 2.2)):
    """A 2-D tensor as a colour image with a colour bar (e.g. timestep embeddings: rows t, columns features).

    With a diverging colour map (the default, RdBu_r) the scale is symmetric, so 0 is white.
    """
    check_cmap(cmap)
    matrix = torch.as_tensor(matrix).detach().float().cpu()
    if matrix.ndim != 2:
        raise ValueError(f"heatmap expects a 2-D matrix, found shape {tuple(matrix.shape)}.")
    rows, cols = matrix.shape
    described = f"Heat map{' ' + repr(title) if title else ''}: {rows} x {cols}"
    if ylabel or xlabel:
        described += f" ({ylabel or 'rows'} x {xlabel or 'columns'})"
    fig, axes = new_figure(1, 1, size, described + f", colour map {cmap} with a colour bar")
    ax = axes[0, 0]
    lo, hi = _limits(matrix.numpy(), None, cmap)
    shown = ax.imshow(matrix.numpy(), cmap=cmap, vmin=lo, vmax=hi, aspect="auto", interpolation="nearest")
    colorbar(fig, shown, ax, shrink=1.0)
    ax.set_title(title, fontsize=TITLE_FONT)
    ax.set_xlabel(xlabel, fontsize=FONT)
    ax.set_ylabel(ylabel, fontsize=FONT)
    ax.tick_params(labelsize=FONT)
    return fig


def line_plot(series: dict, xs=None, title: str = "", xlabel: str = "", ylabel: str = "", logy: bool = False,
              size: tuple[float, float] = (4.0, 2.2), marker: str | None = None, xticklabels=None):
    """One line per entry of `series` ({"loss": values}); `xticklabels` names the points (e.g. layer names).

    Whole-number x values (steps, timesteps) get whole-number ticks. The y axis has no offset label
    ("1e-5 + 1.234"): a line whose values differ by less than 0.1% is drawn flat, on a scale of its size.
    """
    described = f"Line plot{' ' + repr(title) if title else ''}: {_brief(series)}"
    described += f" against {xlabel or 'index'}" + (f", {ylabel}" if ylabel else "") + (", log scale" if logy else "")
    fig, axes = new_figure(1, 1, size, described)
    ax = axes[0, 0]
    integral, all_ys = True, []
    for name, ys in series.items():
        ys = torch.as_tensor(ys).detach().double().cpu().numpy()
        x = np.arange(len(ys)) if xs is None else np.asarray(xs)
        integral = integral and bool(np.all(np.asarray(x, dtype=float) == np.round(np.asarray(x, dtype=float))))
        ax.plot(x, ys, label=name, marker=marker, markersize=4)
        all_ys.append(ys[np.isfinite(ys)])
    if logy:
        ax.set_yscale("log")
    else:
        ax.yaxis.set_major_formatter(ScalarFormatter(useOffset=False))
        ys = np.concatenate(all_ys) if all_ys else np.zeros(0)
        size_of = max(abs(ys.max()), abs(ys.min())) if ys.size else 0.0
        if size_of > 0 and ys.max() - ys.min() <= 1e-3 * size_of:           # flat: show it flat, at its size
            middle = (ys.max() + ys.min()) / 2
            ax.set_ylim(middle - 0.1 * size_of, middle + 0.1 * size_of)
    if xticklabels is not None:
        ax.set_xticks(range(len(xticklabels)), xticklabels, rotation=90, fontsize=FONT)
    elif integral:
        integer_ticks(ax)
    ax.set_title(title, fontsize=TITLE_FONT)
    ax.set_xlabel(xlabel, fontsize=FONT)
    ax.set_ylabel(ylabel, fontsize=FONT)
    ax.tick_params(labelsize=FONT)
    if len(series) > 1:
        ax.legend(fontsize=FONT)
    return fig
