"""Pictures for the notebook course, one file per kind of picture:

| file           | what it draws                                                                   |
|----------------|---------------------------------------------------------------------------------|
| `figures.py`   | image grids, one image per timestep, heat maps, line plots (and the figure size) |
| `latents.py`   | latent channels per timestep, the linear latent -> RGB preview and its fit       |
| `schedules.py` | ᾱ / SNR / σ of the training and sampling schedules, where samplers put their t   |
| `attention.py` | attention maps laid over the image                                              |
| `animation.py` | a timestep slider (ipywidgets), GIFs, an HTML animation, each with a PNG strip   |

Every function returns something small to show (a matplotlib Figure, a widget, a GIF), legible everywhere:
`DPI`, `FONT` and `TITLE_FONT` (figures.py) set the resolution and text size of every figure; maps have a
colour bar and a perceptual colour map (viridis / magma, RdBu_r centred on 0; rainbow maps such as jet are
refused); a figure's text form describes it; widgets and GIFs carry a PNG for viewers without them.
`minidiff.viz.NAME` works for every name below.
"""

from ..core.photos import SAMPLE_PHOTOS, sample_photo
from .figures import (DPI, FONT, MAX_PANELS, PANEL, TITLE_FONT, DescribedFigure, check_cmap, figure_png, heatmap,
                      image_grid, line_plot, new_figure, pick_steps, plt, steps_grid, to_images, to_uint8)
from .latents import SD_V1_LATENT_RGB, fit_latent_rgb, fit_latent_rgb_to_vae, latent_channels_grid, latents_to_rgb
from .schedules import FIGSIZE, plot_sampling_schedules, plot_timesteps, plot_training_schedules
from .attention import aggregate_cross_attention, attention_overlay
from .animation import AnimatedGif, animation_html, frame_strip, make_gif, show_gif, timestep_slider, widgets_available
