"""Tests of the course helpers: minidiff.viz (pictures) and minidiff.course (model / device choice). The
committed notebooks are checked in tests/test_notebooks.py; nbval runs them."""

import base64
import importlib.util
import io
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import matplotlib

from minidiff import course, viz

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    matplotlib.pyplot.close("all")


def image_axes(fig):
    return [ax for ax in fig.axes if ax.images]


# --- viz: conversions -----------------------------------------------------------------------------------

def test_headless_backend_under_pytest():
    assert matplotlib.get_backend().lower() == "agg"


def test_to_images_ranges_and_layouts():
    x = torch.tensor([-1.0, 0.0, 1.0, 3.0]).view(1, 1, 2, 2)               # (B, C, H, W)
    (img,) = viz.to_images(x)
    assert img.shape == (2, 2)
    np.testing.assert_allclose(img.ravel(), [0.0, 0.5, 1.0, 1.0])          # [-1, 1] -> [0, 1], clipped
    (img,) = viz.to_images(x, value_range=None)                            # min..max stretch
    np.testing.assert_allclose(img.ravel(), [0.0, 0.25, 0.5, 1.0])
    rgb = np.zeros((3, 4, 5, 3), dtype=np.float32) + 0.25                  # (B, H, W, C) as pipelines return
    out = viz.to_images(rgb, value_range=(0, 1))
    assert len(out) == 3 and out[0].shape == (4, 5, 3) and np.allclose(out[0], 0.25)
    pil = Image.fromarray(np.full((4, 4, 3), 255, dtype=np.uint8))
    assert np.allclose(viz.to_images([pil, pil])[1], 1.0)
    with pytest.raises(ValueError, match="latent_channels_grid"):
        viz.to_images(torch.zeros(4, 8, 8))                                # 4 channels are latents, not an image


def test_to_uint8_resizes_to_a_fixed_side():
    img = np.array([[0.0, 1.0]], dtype=np.float32)[..., None].repeat(3, -1)   # (1, 2, 3)
    out = viz.to_uint8(img, side=6)                                          # enlarged: nearest neighbours
    assert out.shape == (3, 6, 3) and out.dtype == np.uint8
    assert (out[:, :3] == 0).all() and (out[:, 3:] == 255).all()
    assert viz.to_uint8(np.random.rand(64, 32, 3), side=16).shape == (16, 8, 3)   # shrunk, aspect kept
    assert viz.to_uint8(np.random.rand(5, 5)).shape == (5, 5, 3)                   # a map gets a colour map


def test_sample_photo_is_offline_and_in_model_range():
    x = viz.sample_photo("chelsea", size=32)
    assert x.shape == (1, 3, 32, 32) and x.min() >= -1 and x.max() <= 1 and x.std() > 0.05
    with pytest.raises(ValueError, match="skimage.data has no photo"):
        viz.sample_photo("no-such-photo")


# --- viz: grids ------------------------------------------------------------------------------------------

def test_image_grid_panels_titles_and_size():
    fig = viz.image_grid(torch.rand(5, 3, 8, 8) * 2 - 1, titles=list("abcde"), ncols=3)
    axes = image_axes(fig)
    assert len(axes) == 5 and [ax.get_title() for ax in axes] == list("abcde")
    assert fig.dpi == viz.DPI and fig.get_size_inches()[0] == pytest.approx(3 * viz.PANEL)
    fig.canvas.draw()
    for ax in axes:                                        # the titles' room was added, not taken from the images
        width = ax.get_window_extent().width
        assert 0.9 * viz.PANEL * viz.DPI < width <= viz.PANEL * viz.DPI
    with pytest.raises(ValueError, match="one title per image"):
        viz.image_grid(torch.rand(2, 3, 8, 8), titles=["only one"])
    with pytest.raises(ValueError, match="pick_steps"):
        viz.image_grid(torch.rand(viz.MAX_PANELS + 1, 1, 2, 2))


def test_pick_steps_keeps_first_and_last():
    assert viz.pick_steps(50, 6) == [0, 10, 20, 29, 39, 49]
    assert viz.pick_steps(3, 6) == [0, 1, 2]
    for n, k in [(10, 4), (1000, 7), (25, 25)]:
        steps = viz.pick_steps(n, k)
        assert steps[0] == 0 and steps[-1] == n - 1 and len(steps) == min(n, k)


def test_steps_grid_rows_and_timestep_titles():
    timesteps = torch.arange(900, -1, -100)                                 # 10 steps
    xt = torch.rand(10, 3, 8, 8)
    fig = viz.steps_grid({"x_t": xt, "x0": list(xt)}, timesteps, num_cols=4)
    axes = image_axes(fig)
    assert len(axes) == 8
    assert [ax.get_title() for ax in axes[:4]] == ["t=900", "t=600", "t=300", "t=0"]
    # the panel of step 3 shows frame 3 (the frame moved to [0, 1])
    np.testing.assert_allclose(axes[1].images[0].get_array(), (xt[3].permute(1, 2, 0).numpy() + 1) / 2, atol=1e-6)
    with pytest.raises(ValueError, match="one image per timestep"):
        viz.steps_grid({"x_t": xt[:3]}, timesteps)


def test_latent_channels_grid_layout_and_preview_column():
    latents = torch.randn(8, 4, 6, 6)
    fig = viz.latent_channels_grid(latents, list(range(8)), num_rows=3, rgb_factors=viz.SD_V1_LATENT_RGB)
    assert len(image_axes(fig)) == 3 * 5
    assert image_axes(fig)[4].get_title() == "RGB preview"
    # each row shares one symmetric colour scale
    row = viz.pick_steps(8, 3)[1]
    scale = latents[row].abs().max().item()
    assert image_axes(fig)[5].images[0].get_clim() == pytest.approx((-scale, scale))
    np.testing.assert_allclose(image_axes(fig)[5].images[0].get_array(), latents[row, 0].numpy())
    with pytest.raises(ValueError, match="one latent per timestep"):
        viz.latent_channels_grid(latents, [1, 2])


def test_heatmap_and_line_plot_show_their_data():
    m = torch.randn(5, 7)
    fig = viz.heatmap(m, title="emb")
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), m.numpy())
    with pytest.raises(ValueError, match="2-D"):
        viz.heatmap(torch.zeros(2, 2, 2))
    fig = viz.line_plot({"a": [3, 2, 1], "b": torch.tensor([1.0, 2.0, 4.0])}, logy=True, xticklabels=["x", "y", "z"])
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.lines[1].get_ydata(), [1, 2, 4])
    assert ax.get_yscale() == "log" and [t.get_text() for t in ax.get_xticklabels()] == ["x", "y", "z"]


# --- viz: latent -> RGB ----------------------------------------------------------------------------------

def test_latents_to_rgb_is_the_linear_map():
    latents = torch.randn(2, 4, 5, 7)
    factors = torch.tensor(viz.SD_V1_LATENT_RGB)
    bias = torch.tensor([0.1, -0.2, 0.0])
    out = viz.latents_to_rgb(latents, factors, bias)
    ref = torch.zeros(2, 3, 5, 7)
    for b in range(2):
        for y in range(5):
            for x in range(7):
                ref[b, :, y, x] = latents[b, :, y, x] @ factors + bias
    torch.testing.assert_close(out, ((ref + 1) / 2).clamp(0, 1))
    with pytest.raises(ValueError, match="fit_latent_rgb"):
        viz.latents_to_rgb(torch.randn(1, 3, 4, 4))


def test_fit_latent_rgb_recovers_a_known_map():
    g = torch.Generator().manual_seed(0)
    factors = torch.randn(4, 3, generator=g) * 0.3
    bias = torch.tensor([0.05, -0.1, 0.2])
    latents = torch.randn(6, 4, 4, 4, generator=g)
    rgb_small = torch.einsum("bchw,cd->bdhw", latents, factors) + bias.view(1, 3, 1, 1)
    images = rgb_small.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)   # (6, 3, 32, 32), like a VAE's 8x
    fit_factors, fit_bias = viz.fit_latent_rgb(latents, images)
    torch.testing.assert_close(fit_factors, factors, atol=1e-5, rtol=0)
    torch.testing.assert_close(fit_bias, bias, atol=1e-5, rtol=0)


def test_fit_latent_rgb_to_vae_encodes_scales_and_fits():
    from minidiff import AutoencoderKL

    vae = AutoencoderKL.from_config(dict(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4,
                                         latent_channels=4, sample_size=16, scaling_factor=0.5,
                                         down_block_types=["DownEncoderBlock2D"] * 2,
                                         up_block_types=["UpDecoderBlock2D"] * 2)).eval()
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    factors, bias = viz.fit_latent_rgb_to_vae(vae, images)
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mode() * 0.5                   # (3, 4, 8, 8)
    ref_factors, ref_bias = viz.fit_latent_rgb(latents, images)
    torch.testing.assert_close(factors, ref_factors)
    torch.testing.assert_close(bias, ref_bias)
    factors, bias = viz.fit_latent_rgb_to_vae(vae)                               # scikit-image photos at 16 px
    assert factors.shape == (4, 3) and bias.shape == (3,) and torch.isfinite(factors).all()


# --- viz: schedules --------------------------------------------------------------------------------------

class _FakeScheduler:
    def __init__(self, T):
        self.alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, T), 0)
        self.timesteps = None

    def set_timesteps(self, n):
        self.timesteps = torch.linspace(len(self.alphas_cumprod) - 1, 0, n).round().long()


def test_plot_training_schedules_plots_alpha_bar_snr_sigma():
    s = _FakeScheduler(100)
    fig = viz.plot_training_schedules({"linear": s})
    a, snr, sigma = (ax.lines[0].get_ydata() for ax in fig.axes)
    ab = s.alphas_cumprod.double().numpy()
    np.testing.assert_allclose(a, ab)
    np.testing.assert_allclose(snr, ab / (1 - ab))
    np.testing.assert_allclose(sigma, np.sqrt((1 - ab) / ab))


def test_plot_timesteps_leaves_schedulers_untouched():
    s = _FakeScheduler(100)
    fig = viz.plot_timesteps({"a": s, "b": _FakeScheduler(100)}, 5)
    assert s.timesteps is None
    np.testing.assert_allclose(fig.axes[0].lines[0].get_xdata(), [99, 74, 50, 25, 0])


# --- viz: attention ----------------------------------------------------------------------------------------

def test_aggregate_cross_attention_places_each_token():
    B, M, h, w = 2, 3, 8, 8
    probs = []
    for hl in (8, 4):                                          # two resolutions, as in the UNet's down path
        p = torch.zeros(B, 2, hl * hl, M)                      # (B, heads, N, M)
        p[..., 2] = 1.0                                        # every position looks at token 2 ...
        p[:, :, 0, 2], p[:, :, 0, 1] = 0.0, 1.0                # ... except the top-left one, at token 1
        probs.append(p)
    maps = viz.aggregate_cross_attention(probs, (h, w))
    assert maps.shape == (B, M, h, w)
    assert torch.allclose(maps.sum(1), torch.ones(B, h, w))    # still a distribution over tokens
    assert maps[0, 1, 0, 0] > 0.5 and maps[0, 1, -1, -1] == 0 and maps[0, 2, -1, -1] == 1
    # one layer at full resolution is returned exactly (head mean, no resizing)
    p = torch.rand(B, 4, h * w, M)
    torch.testing.assert_close(viz.aggregate_cross_attention([p], (h, w)),
                               p.mean(1).transpose(1, 2).reshape(B, M, h, w))
    with pytest.raises(ValueError, match="latent_hw"):
        viz.aggregate_cross_attention([torch.rand(1, 1, 10, 3)], (h, w))
    with pytest.raises(ValueError, match="store_attention_probs"):
        viz.aggregate_cross_attention([], (h, w))


def test_attention_overlay_one_panel_per_label():
    fig = viz.attention_overlay(torch.rand(3, 16, 16) * 2 - 1, torch.rand(2, 4, 4), ["cat", "hat"])
    titles = [ax.get_title() for ax in image_axes(fig)]
    assert titles == ["image", "cat", "hat"]
    with pytest.raises(ValueError, match="K labels"):
        viz.attention_overlay(torch.rand(3, 16, 16), torch.rand(2, 4, 4), ["cat"])


# --- viz: slider and animations ---------------------------------------------------------------------------

def test_timestep_slider_falls_back_to_a_static_grid():
    assert not viz.widgets_available()                         # pytest is no Jupyter kernel
    fig = viz.timestep_slider(torch.rand(10, 3, 8, 8), range(10), static_cols=4)
    assert isinstance(fig, matplotlib.figure.Figure) and len(image_axes(fig)) == 4


def test_timestep_slider_widget_scrubs(monkeypatch):
    ipywidgets = pytest.importorskip("ipywidgets")
    monkeypatch.setattr(viz.animation, "widgets_available", lambda: True)   # where timestep_slider looks it up
    frames = torch.rand(5, 3, 4, 4) * 2 - 1
    box = viz.timestep_slider(frames, [40, 30, 20, 10, 0], side=8)
    slider, label, view = box.children
    assert isinstance(slider, ipywidgets.IntSlider) and slider.max == 4
    slider.value = 3
    assert label.value == "step 3 of 4, t = 10"
    shown = np.asarray(Image.open(io.BytesIO(view.value)))
    assert shown.shape == (8, 8, 3)
    np.testing.assert_array_equal(shown, viz.to_uint8(viz.to_images(frames[3])[0], side=8))


def test_make_gif_frames_and_size():
    data = viz.make_gif(torch.rand(4, 3, 8, 8), side=16)
    gif = Image.open(io.BytesIO(data))
    assert gif.format == "GIF" and gif.n_frames == 4 and gif.size == (16, 16)
    # long runs are thinned to max_frames, first and last kept; each frame has at most `colors` colours
    frames = torch.linspace(-1, 1, 30).view(30, 1, 1, 1).expand(30, 3, 8, 8)     # frame i is one flat gray
    gif = Image.open(io.BytesIO(viz.make_gif(frames, max_frames=5, colors=8)))
    assert gif.n_frames == 5
    firsts = []
    for i in range(5):
        gif.seek(i)
        rgb = np.asarray(gif.convert("RGB"))
        firsts.append(int(rgb[0, 0, 0]))
        assert len(np.unique(rgb.reshape(-1, 3), axis=0)) <= 8
    assert firsts[0] == 0 and firsts[-1] == 255 and firsts == sorted(firsts)


def test_animation_html_is_self_contained():
    html = viz.animation_html(torch.rand(3, 3, 8, 8), [20, 10, 0])
    assert "<script" in html and html.count("data:image/png;base64") == 3


# --- viz: legible everywhere ------------------------------------------------------------------------------

def every_figure():
    """One figure of each helper, with the inputs the notebooks give them: {name: Figure}."""
    maps = torch.rand(2, 4, 4)
    latents = torch.randn(6, 4, 6, 6)
    return {
        "image_grid": viz.image_grid(torch.rand(4, 3, 16, 16) * 2 - 1, titles=["a", "b", "c", "d"], title="grid"),
        "image_grid maps": viz.image_grid(list(latents[0]), value_range=None, cmap="RdBu_r"),
        "steps_grid": viz.steps_grid({"x_t": torch.rand(6, 3, 8, 8)}, range(6)),
        "steps_grid maps": viz.steps_grid({"cat": list(maps.repeat(3, 1, 1))}, range(6), value_range=None,
                                          cmap="inferno"),
        "latent_channels_grid": viz.latent_channels_grid(latents, range(6), num_rows=3,
                                                         rgb_factors=viz.SD_V1_LATENT_RGB),
        "attention_overlay": viz.attention_overlay(torch.rand(3, 16, 16), maps, ["cat", "hat"]),
        "heatmap": viz.heatmap(torch.randn(5, 7), title="emb", xlabel="feature", ylabel="t"),
        "line_plot": viz.line_plot({"a": [3, 2, 1], "b": [1, 2, 3]}, title="loss", xlabel="step"),
        "plot_training_schedules": viz.plot_training_schedules({"linear": _FakeScheduler(100)}),
        "plot_timesteps": viz.plot_timesteps({"a": _FakeScheduler(100)}, 5),
        "frame_strip": viz.frame_strip(torch.rand(9, 3, 8, 8), range(9)),
    }


def colorbars(fig):
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


def test_every_figure_is_legible():
    """dpi, text of at least 9 points, constrained layout, no title cut off by the figure's edge, no rainbow map."""
    assert viz.DPI >= 100 and viz.FONT >= 9 and viz.TITLE_FONT >= viz.FONT
    for name, fig in every_figure().items():
        assert fig.dpi == viz.DPI, name
        assert fig.get_layout_engine().__class__.__name__ == "ConstrainedLayoutEngine", name
        fig.canvas.draw()
        texts = [t for t in fig.findobj(matplotlib.text.Text) if t.get_visible() and t.get_text().strip()]
        assert texts, name
        small = [(t.get_text(), t.get_fontsize()) for t in texts if t.get_fontsize() < 9]
        assert not small, f"{name}: text under 9 points {small}"
        box = fig.bbox
        for ax in fig.axes:
            title = ax.title.get_window_extent()
            assert not ax.get_title() or (title.x0 >= box.x0 - 1 and title.x1 <= box.x1 + 1 and title.y1 <= box.y1 + 1), name
        for image in fig.findobj(matplotlib.image.AxesImage):
            assert image.get_cmap().name.removesuffix("_r") not in viz.figures.RAINBOWS, name


def test_long_titles_wrap_without_overlapping():
    long = "a photo of an astronaut riding a horse on the moon, highly detailed"
    fig = viz.image_grid(torch.rand(3, 3, 8, 8), titles=[long] * 3, title=long)
    fig.canvas.draw()
    boxes = [ax.title.get_window_extent() for ax in image_axes(fig)]
    assert all("\n" in ax.get_title() for ax in image_axes(fig))
    for left, right in zip(boxes, boxes[1:]):
        assert left.x1 <= right.x0, "neighbouring titles overlap"
    suptitle = fig._suptitle.get_window_extent()
    assert all(suptitle.y0 >= b.y1 - 1 for b in boxes), "the figure title overlaps the panel titles"
    fig = viz.image_grid(torch.rand(3, 3, 8, 8), titles=["prompt alone", "+ blue", "supercalifragilisticexpialidocious"])
    titles = [ax.get_title() for ax in image_axes(fig)]
    assert titles[:2] == ["prompt alone", "+ blue"] and "\n" in titles[2]         # only what does not fit is wrapped
    fig.canvas.draw()
    for ax in image_axes(fig):
        assert ax.title.get_window_extent().width <= ax.get_window_extent().width * 1.01


def test_rainbow_colour_maps_are_refused():
    for call in (lambda: viz.image_grid(torch.rand(2, 8, 8), cmap="jet"),
                 lambda: viz.steps_grid({"m": torch.rand(2, 1, 4, 4)}, [1, 0], cmap="jet_r"),
                 lambda: viz.heatmap(torch.rand(3, 3), cmap="rainbow"),
                 lambda: viz.attention_overlay(torch.rand(3, 8, 8), torch.rand(1, 4, 4), ["a"], cmap="jet")):
        with pytest.raises(ValueError, match="viridis"):
            call()


def test_latent_and_attention_panels_have_colour_bars():
    latents = torch.randn(8, 4, 6, 6)
    fig = viz.latent_channels_grid(latents, range(8), num_rows=3)
    bars = colorbars(fig)
    assert len(bars) == 3                                                  # one per row, its symmetric scale
    rows = viz.pick_steps(8, 3)
    for bar, i in zip(bars, rows):
        scale = latents[i].abs().max().item()
        assert bar.get_ylim() == pytest.approx((-scale, scale)) and bar._colorbar.cmap.name == "RdBu_r"

    fig = viz.attention_overlay(torch.rand(3, 16, 16), torch.rand(3, 4, 4), ["a", "b", "c"])
    (bar,) = colorbars(fig)
    overlays = [ax.images[-1] for ax in image_axes(fig)[1:]]
    assert bar._colorbar.cmap.name == "magma" and all(im.get_cmap().name == "magma" for im in overlays)
    assert [t.get_text() for t in bar.get_yticklabels()] == ["min", "max"]

    # one-channel maps in a grid: a colour bar each, in their own units; RdBu_r is centred on 0
    m = torch.tensor([[-1.0, 0.5], [0.25, 0.0]])
    fig = viz.image_grid([m, m + 3], value_range=None, cmap="RdBu_r")
    assert len(colorbars(fig)) == 2
    assert [ax.images[0].get_clim() for ax in image_axes(fig)] == [(-1.0, 1.0), (-3.5, 3.5)]
    fig = viz.image_grid([m], value_range=None, cmap="viridis")
    assert image_axes(fig)[0].images[0].get_clim() == (-1.0, 0.5) and len(colorbars(fig)) == 1
    assert not colorbars(viz.image_grid(torch.rand(2, 3, 8, 8)))                       # RGB images: no bar
    assert not colorbars(viz.image_grid([m], value_range=None, colorbars=False, cmap="viridis"))
    # maps over the timesteps: one bar per row
    fig = viz.steps_grid({"a": torch.rand(4, 1, 4, 4), "b": torch.rand(4, 1, 4, 4)}, range(4), value_range=None,
                         cmap="inferno")
    assert len(colorbars(fig)) == 2
    fig = viz.steps_grid({"a": torch.rand(4, 1, 4, 4)}, range(4), value_range=(0, 2), cmap="viridis")
    assert colorbars(fig)[0].get_ylim() == pytest.approx((0, 2))                     # one scale, in the row's units


def test_step_axes_have_integer_ticks():
    figs = [viz.plot_training_schedules({"linear": _FakeScheduler(30)}), viz.plot_timesteps({"a": _FakeScheduler(30)}, 7),
            viz.line_plot({"loss": torch.rand(7)}, xlabel="step"), viz.line_plot({"l": [1.0, 2.0, 3.0]}, xs=[10, 20, 30])]
    for fig in figs:
        fig.canvas.draw()
        for ax in fig.axes:
            ticks = ax.get_xticks()
            assert len(ticks) >= 2 and np.allclose(ticks, np.round(ticks)), ticks
    fig = viz.line_plot({"l": [1.0, 2.0]}, xs=[0.0, 0.4])                          # not steps: ticks as they come
    fig.canvas.draw()
    assert not np.allclose(fig.axes[0].get_xticks(), np.round(fig.axes[0].get_xticks()))


def test_a_flat_line_is_drawn_flat_without_an_offset_label():
    values = 28.0 + 1e-5 * torch.randn(77)                                    # e.g. norms of layer-normed vectors
    fig = viz.line_plot({"norm": values})
    fig.canvas.draw()
    ax = fig.axes[0]
    assert ax.yaxis.get_offset_text().get_text() == ""
    low, high = ax.get_ylim()
    assert low < 27 and high > 29                                              # the 1e-5 noise is not blown up


def test_figures_describe_themselves_as_text():
    """Jupyter stores a figure's repr as its text/plain beside the PNG: a description, not '<Figure size ...>'."""
    from IPython.lib.pretty import pretty

    for name, fig in every_figure().items():
        text = pretty(fig)
        assert text == repr(fig) and not text.startswith("<Figure size") and len(text) < 300, name
    fig = viz.steps_grid({"x_t": torch.rand(10, 3, 4, 4)}, range(900, -1, -100), num_cols=3)
    assert "x_t" in repr(fig) and "t = 900, 500, 0" in repr(fig)
    assert "'cat', 'hat'" in repr(viz.attention_overlay(torch.rand(3, 8, 8), torch.rand(2, 4, 4), ["cat", "hat"]))
    assert "a, b" in repr(viz.image_grid(torch.rand(2, 3, 4, 4), titles=["a", "b"]))


def test_typical_figures_stay_small():
    photos = torch.cat([viz.sample_photo(name, 64) for name in viz.SAMPLE_PHOTOS])      # (N, 3, 64, 64)
    images = torch.cat([photos, photos.flip(-1)])[:8]
    sizes = {"image_grid": viz.figure_png(viz.image_grid(images, titles=[f"seed {i}" for i in range(8)])),
             "attention": viz.figure_png(viz.attention_overlay(photos[0], torch.rand(8, 8, 8), list("abcdefgh"))),
             "latents": viz.figure_png(viz.latent_channels_grid(torch.randn(20, 4, 8, 8), range(20), num_rows=5,
                                                                 rgb_factors=viz.SD_V1_LATENT_RGB))}
    for name, png in sizes.items():
        assert png.startswith(b"\x89PNG") and len(png) < 150_000, (name, len(png))


# --- viz: static views of the slider and the GIF ----------------------------------------------------------

def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_the_slider_output_carries_a_png_strip(monkeypatch):
    pytest.importorskip("ipywidgets")
    from IPython.core.formatters import DisplayFormatter

    monkeypatch.setattr(viz.animation, "widgets_available", lambda: True)
    box = viz.timestep_slider(torch.rand(12, 3, 8, 8), range(11, -1, -1), static_cols=4)
    data, _ = DisplayFormatter().format(box)                                 # what the kernel sends to Jupyter
    assert set(data) == {"application/vnd.jupyter.widget-view+json", "image/png", "text/plain"}
    strip = decoded(data["image/png"])
    assert strip.format == "PNG" and strip.width > 3 * strip.height          # a strip of 4 frames in a row
    assert data["text/plain"].startswith("Timestep slider over 12 frames, t = 11 to 0")
    assert "t=11, t=7, t=4, t=0" in data["text/plain"]


def test_the_gif_output_carries_a_png_strip_and_html():
    frames = torch.rand(10, 3, 8, 8) * 2 - 1
    gif = viz.show_gif(frames, side=16, timesteps=range(900, -1, -100), static_cols=3)
    from IPython.core.formatters import DisplayFormatter

    data, _ = DisplayFormatter().format(gif)
    assert set(data) == {"text/html", "image/gif", "image/png", "text/plain"}
    animation = decoded(data["image/gif"])
    assert animation.format == "GIF" and animation.n_frames == 10 and animation.size == (16, 16)
    assert data["image/gif"] == base64.b64encode(viz.make_gif(frames, side=16)).decode()
    strip = decoded(data["image/png"])
    assert strip.format == "PNG" and strip.width > 2 * strip.height
    assert f'src="data:image/gif;base64,{data["image/gif"]}"' in data["text/html"] and 'alt="Animated GIF' in data["text/html"]
    assert "t=900, t=500, t=0" in data["text/plain"]
    with pytest.raises(ValueError, match="one timestep per frame"):
        viz.show_gif(frames, timesteps=[1, 2])


def test_execute_py_keeps_the_static_views(monkeypatch):
    """notebooks/execute.py drops a widget's state from the committed notebook: the PNG beside it must stay."""
    pytest.importorskip("ipywidgets")
    nbformat = pytest.importorskip("nbformat")
    sys.path.insert(0, str(REPO / "notebooks"))
    try:
        spec = importlib.util.spec_from_file_location("course_execute", REPO / "notebooks" / "execute.py")
        execute = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(execute)
    finally:
        sys.path.remove(str(REPO / "notebooks"))
    from IPython.core.formatters import DisplayFormatter

    monkeypatch.setattr(viz.animation, "widgets_available", lambda: True)
    slider = DisplayFormatter().format(viz.timestep_slider(torch.rand(3, 3, 4, 4), [2, 1, 0]))[0]
    gif = DisplayFormatter().format(viz.show_gif(torch.rand(3, 3, 4, 4)))[0]
    cell = nbformat.v4.new_code_cell("viz.timestep_slider(...)", outputs=[
        nbformat.v4.new_output("execute_result", data=slider, execution_count=1),
        nbformat.v4.new_output("display_data", data=gif)])
    nb = execute.normalise(nbformat.v4.new_notebook(cells=[cell]), "99")
    kept_slider, kept_gif = nb.cells[0].outputs
    assert set(kept_slider.data) == {"image/png", "text/plain"} and kept_slider.data["image/png"] == slider["image/png"]
    assert set(kept_gif.data) == {"text/html", "image/gif", "image/png", "text/plain"}


# --- course: choosing models and device -------------------------------------------------------------------

@pytest.fixture
def env(monkeypatch):
    for name in ("MINIDIFF_MODELS", "MINIDIFF_DEVICE", "MINIDIFF_DTYPE", "MINIDIFF_DDPM", "MINIDIFF_SD",
                 "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_course_cpu_auto_is_tiny_without_touching_the_network(env, capsys):
    env.setattr(course.torch.cuda, "is_available", lambda: False)
    env.setattr(course, "hub_reachable", lambda *a: pytest.fail("the network was asked on a CPU"))
    s = course.setup()
    assert (s.models, s.device.type, s.dtype, s.ddpm, s.sd) == ("tiny", "cpu", torch.float32, "tiny-ddpm", "tiny-sd")
    printed = capsys.readouterr().out
    assert printed.startswith("minidiff course setup") and "no CUDA GPU found" in printed and "tiny" in printed
    assert s.pick(tiny=8, hub=50) == 8


def test_course_gpu_auto_follows_the_hub(env):
    env.setattr(course.torch.cuda, "is_available", lambda: True)
    env.setattr(course, "hub_reachable", lambda *a: (True, "huggingface.co answered"))
    s = course.choose()
    assert (s.models, s.device.type, s.dtype) == ("hub", "cuda", torch.float16)
    assert (s.ddpm, s.sd) == ("google/ddpm-cat-256", "CompVis/stable-diffusion-v1-4")
    assert s.pick(tiny=8, hub=50) == 50
    env.setattr(course, "hub_reachable", lambda *a: (False, "no answer"))
    s = course.choose()
    assert (s.models, s.dtype) == ("tiny", torch.float32) and any("not reachable" in r for r in s.reasons)


def test_course_local_full_size_folders(env, tmp_path):
    env.setattr(course.torch.cuda, "is_available", lambda: True)
    env.setattr(course, "hub_reachable", lambda *a: pytest.fail("local folders need no network"))
    env.setenv("MINIDIFF_SD", str(tmp_path / "sd"))
    env.setenv("MINIDIFF_DDPM", str(tmp_path / "ddpm"))
    s = course.choose()
    assert s.models == "hub" and s.sd == str(tmp_path / "sd") and s.ddpm == str(tmp_path / "ddpm")
    assert any("MINIDIFF_SD=" in r for r in s.reasons)


def test_course_explicit_choices_and_errors(env):
    env.setattr(course.torch.cuda, "is_available", lambda: False)
    env.setenv("MINIDIFF_MODELS", "hub")
    s = course.choose()
    assert (s.models, s.device.type, s.dtype, s.sd) == ("hub", "cpu", torch.float32, "CompVis/stable-diffusion-v1-4")
    env.setenv("MINIDIFF_MODELS", "big")
    with pytest.raises(ValueError, match=r"MINIDIFF_MODELS='big'.*\['tiny', 'hub', 'auto'\]"):
        course.choose()
    env.setenv("MINIDIFF_MODELS", "tiny")
    env.setenv("MINIDIFF_DEVICE", "cuda")
    with pytest.raises(RuntimeError, match="MINIDIFF_DEVICE=cpu"):
        course.choose()
    env.setenv("MINIDIFF_DEVICE", "cpu")
    env.setenv("MINIDIFF_DTYPE", "float16")
    with pytest.raises(ValueError, match="MINIDIFF_DTYPE=float32"):
        course.choose()


def test_setup_hides_only_the_weight_loading_bar(env):
    logging = pytest.importorskip("transformers.utils.logging")
    if not hasattr(logging, "set_tqdm_hook"):
        pytest.skip("this transformers has no set_tqdm_hook")
    env.setattr(course.torch.cuda, "is_available", lambda: False)
    previous = logging.set_tqdm_hook(None)
    try:
        course.setup()
        loading = logging.tqdm(range(3), desc="Loading weights")
        other = logging.tqdm(range(3), desc="Downloading")
        assert loading.disable and not other.disable
        loading.close()
        other.close()
    finally:
        logging.set_tqdm_hook(previous)


def test_hub_reachable_offline_is_immediate(env):
    env.setenv("HF_HUB_OFFLINE", "1")
    assert course.hub_reachable() == (False, "HF_HUB_OFFLINE is set")
