"""Pictures for the notebook course, one file per kind of picture:

| file           | what it draws                                                                   |
|----------------|---------------------------------------------------------------------------------|
| `figures.py`   | image grids, one image per timestep, heat maps, line plots (and the figure size) |
| `latents.py`   | latent channels per timestep, the linear latent -> RGB preview and its fit       |
| `schedules.py` | ᾱ / SNR / σ of the training and sampling schedules, where samplers put their t   |
| `attention.py` | attention maps laid over the image                                              |
| `animation.py` | a timestep slider (ipywidgets), GIFs, an HTML animation                          |

Every function returns something small to show (a matplotlib Figure, a widget, an IPython Image).
`minidiff.viz.NAME` works for every name below.
"""

from ..core.photos import SAMPLE_PHOTOS, sample_photo
from .figures import DPI, MAX_PANELS, PANEL, heatmap, image_grid, line_plot, pick_steps, plt, steps_grid, to_images, to_uint8
from .latents import SD_V1_LATENT_RGB, fit_latent_rgb, fit_latent_rgb_to_vae, latent_channels_grid, latents_to_rgb
from .schedules import FIGSIZE, plot_sampling_schedules, plot_timesteps, plot_training_schedules
from .attention import aggregate_cross_attention, attention_overlay
from .animation import animation_html, make_gif, show_gif, timestep_slider, widgets_available
