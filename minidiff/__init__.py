"""minidiff: a small, readable diffusion library, proven equal to diffusers.

Each name below lives in one short file; open it beside the notebooks.
"""

__version__ = "0.1.0"

from .models.unet_2d import UNet2DConfig, UNet2DModel, UNet2DOutput
from .models.vae import AutoencoderKL, AutoencoderKLConfig, AutoencoderKLOutput, DecoderOutput, DiagonalGaussianDistribution

from .models.unet_2d_condition import UNet2DConditionConfig, UNet2DConditionModel, UNet2DConditionOutput
from .models.controlnet import ControlNetConfig, ControlNetModel, ControlNetOutput, MultiControlNetModel
from .models.t2i_adapter import MultiAdapter, T2IAdapter, T2IAdapterConfig

from .schedulers.ddim import DDIMScheduler
from .schedulers.ddim_inverse import DDIMInverseScheduler
from .schedulers.ddpm import DDPMScheduler
from .schedulers.euler import EulerDiscreteScheduler
from .schedulers.euler_ancestral import EulerAncestralDiscreteScheduler
from .schedulers.pndm import PNDMScheduler
from .schedulers.dpmsolver_multistep import DPMSolverMultistepScheduler
from .schedulers.unipc_multistep import UniPCMultistepScheduler

from .pipelines import (DDPMPipeline, DiffusionPipeline, ImagePipelineOutput, Intermediates,
                        StableDiffusionImg2ImgPipeline, StableDiffusionPipeline)

from .control import (SemanticStableDiffusionPipeline, StableDiffusionAttendAndExcitePipeline,
                      StableDiffusionDiffEditPipeline, StableDiffusionInpaintPipeline, StableDiffusionModelEditingPipeline,
                      StableDiffusionPanoramaPipeline, StableDiffusionPix2PixZeroPipeline,
                      StableDiffusionPromptWeightingPipeline, StableDiffusionSAGPipeline)
from .control import StableDiffusionAdapterPipeline, StableDiffusionControlNetPipeline
from .control import StableDiffusionDepth2ImgPipeline, StableDiffusionInstructPix2PixPipeline

from . import checkpoints  # minidiff.checkpoints.TINY_SD / TINY_DDPM: the bundled folders
