"""Controlled generation: inference-only ways to steer Stable Diffusion, each a short change to the loop of
`minidiff/pipelines/stable_diffusion.py` (the techniques of the diffusers guide "Controlled generation").

| file                   | technique                                                 | pipeline                                  |
|------------------------|-----------------------------------------------------------|-------------------------------------------|
| `prompt_weighting.py`  | `(word:1.3)` weights on token embeddings, prompt blending | `StableDiffusionPromptWeightingPipeline`  |
| `inpaint.py`           | inpainting with the base model (masked latent blending)   | `StableDiffusionInpaintPipeline`          |
| `sega.py`              | Semantic Guidance (Brack et al. 2023)                     | `SemanticStableDiffusionPipeline`         |
| `sag.py`               | Self-Attention Guidance (Hong et al. 2023)                | `StableDiffusionSAGPipeline`              |
| `panorama.py`          | MultiDiffusion panoramas (Bar-Tal et al. 2023)            | `StableDiffusionPanoramaPipeline`         |
| `attend_and_excite.py` | Attend-and-Excite (Chefer et al. 2023)                    | `StableDiffusionAttendAndExcitePipeline`  |
| `inversion.py`         | DDIM inversion (Song et al. 2021; Mokady et al. 2022)     | `ddim_invert`                             |
| `diffedit.py`          | DiffEdit (Couairon et al. 2022)                           | `StableDiffusionDiffEditPipeline`         |
| `pix2pix_zero.py`      | Pix2Pix-Zero (Parmar et al. 2023)                         | `StableDiffusionPix2PixZeroPipeline`      |
| `model_editing.py`     | TIME, text-to-image model editing (Orgad et al. 2023)     | `StableDiffusionModelEditingPipeline`     |
| `controlnet.py`        | ControlNet (Zhang et al. 2023)                            | `StableDiffusionControlNetPipeline`       |
| `t2i_adapter.py`       | T2I-Adapter (Mou et al. 2023)                             | `StableDiffusionAdapterPipeline`          |
| `instruct_pix2pix.py`  | InstructPix2Pix, edit by instruction (Brooks et al. 2023) | `StableDiffusionInstructPix2PixPipeline`  |
| `depth2img.py`         | depth-to-image, stable-diffusion-2-depth (MiDaS / DPT)    | `StableDiffusionDepth2ImgPipeline`        |

`conditions.py` makes their condition images (Canny edges, masks, depth maps) without OpenCV.
`attention_maps.py` captures the UNet's attention maps; SAG, Attend-and-Excite and Pix2Pix-Zero use it.
Every pipeline loads from the same folder as `StableDiffusionPipeline` (`X.from_pretrained("tiny-sd")`).
"""

from .attention_maps import attention_layers, average_maps, capture, layer_size, token_maps
from .prompt_weighting import (StableDiffusionPromptWeightingPipeline, apply_token_weights, blend_prompt_embeddings,
                               parse_prompt_weights, prompt_token_weights, weighted_prompt_embeddings)
from .inpaint import StableDiffusionInpaintPipeline
from .sega import SemanticStableDiffusionPipeline, SemanticStableDiffusionPipelineOutput
from .sag import StableDiffusionSAGPipeline, StableDiffusionSAGPipelineOutput, gaussian_blur_2d, sag_mask
from .panorama import StableDiffusionPanoramaPipeline
from .attend_and_excite import (AttendAndExciteOutput, StableDiffusionAttendAndExcitePipeline, attend_and_excite_loss,
                                gaussian_kernel, max_attention_per_token)
from .inversion import InversionOutput, ddim_invert, relative_error
from .diffedit import DiffEditInversionPipelineOutput, StableDiffusionDiffEditPipeline
from .pix2pix_zero import Pix2PixZeroOutput, StableDiffusionPix2PixZeroPipeline
from .model_editing import StableDiffusionModelEditingPipeline, align_tokens
from .conditions import canny, condition_tensor, depth_to_image, mask_to_image
from .controlnet import StableDiffusionControlNetPipeline
from .t2i_adapter import StableDiffusionAdapterPipeline
from .instruct_pix2pix import StableDiffusionInstructPix2PixPipeline
from .depth2img import StableDiffusionDepth2ImgPipeline
