"""Pipelines: a model, a scheduler and (for Stable Diffusion) a text encoder and VAE, in one sampling loop.

- `DDPMPipeline`: noise -> image in pixel space (google/ddpm-cat-256).          ddpm.py
- `StableDiffusionPipeline`: text -> image in the VAE's latent space.            stable_diffusion.py
- `StableDiffusionImg2ImgPipeline`: text + image -> image.                       img2img.py
- `DiffusionPipeline.from_pretrained(folder)`: the class `model_index.json` names.  base.py
- The checks of every call: numbers before any work, NaN / inf where it first appears.   checks.py
"""

from .base import DiffusionPipeline
from .outputs import ImagePipelineOutput, Intermediates
from .ddpm import DDPMPipeline
from .img2img import StableDiffusionImg2ImgPipeline
from .stable_diffusion import StableDiffusionPipeline
