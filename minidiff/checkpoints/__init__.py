"""The tiny checkpoints bundled with minidiff, trained by `minidiff.training` (see each folder's README.md).

    TINY_SD:   a text-to-image latent diffusion model in Stable Diffusion v1's folder layout
               (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/), 64x64 images
    TINY_DDPM: an unconditional pixel DDPM (model_index.json, unet/, scheduler/), 32x32 images

tiny-sd draws one or two coloured shapes on a plain, striped or gradient background, as its caption asks
(16x16 latents, a trained text encoder: the second edition); tiny-ddpm one shape. Pass a folder, or just the name, to any
`from_pretrained`: `minidiff.DiffusionPipeline.from_pretrained("tiny-sd")`,
`minidiff.UNet2DConditionModel.from_pretrained("tiny-sd", subfolder="unet")`; diffusers loads the folders
too: `diffusers.StableDiffusionPipeline.from_pretrained(minidiff.checkpoints.TINY_SD)`.
"""

import os

CHECKPOINTS_DIR = os.path.dirname(os.path.abspath(__file__))
TINY_SD = os.path.join(CHECKPOINTS_DIR, "tiny-sd")
TINY_DDPM = os.path.join(CHECKPOINTS_DIR, "tiny-ddpm")
# A ControlNet and a T2I-Adapter for tiny-sd that read an object's mask (white on black, 64x64):
# StableDiffusionControlNetPipeline / StableDiffusionAdapterPipeline put the object inside it.
TINY_CONTROLNET_MASK = os.path.join(CHECKPOINTS_DIR, "tiny-controlnet-mask")
TINY_T2I_ADAPTER_MASK = os.path.join(CHECKPOINTS_DIR, "tiny-t2i-adapter-mask")
# tiny-sd fine-tuned with extra input channels (scenes.py, one object on a plain background, 64x64):
# StableDiffusionInstructPix2PixPipeline ("make the circle blue") and StableDiffusionDepth2ImgPipeline (depth_map=).
TINY_INSTRUCT_PIX2PIX = os.path.join(CHECKPOINTS_DIR, "tiny-instruct-pix2pix")
TINY_DEPTH2IMG = os.path.join(CHECKPOINTS_DIR, "tiny-depth2img")
