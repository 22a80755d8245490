"""Controlled generation: inference-only ways to steer Stable Diffusion, each a short change to the loop of
`minidiff/pipelines/stable_diffusion.py` (see the diffusers guide "Controlled generation").

`attention_maps` captures the UNet's attention maps; it is shared by SAG, Attend-and-Excite and Pix2Pix-Zero.
"""

from .attention_maps import attention_layers, average_maps, capture, token_maps

__all__ = ["attention_layers", "average_maps", "capture", "token_maps"]
