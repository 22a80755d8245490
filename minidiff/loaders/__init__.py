"""Loading (and saving) what people download for a fine-tuned concept: Textual Inversion embeddings, LoRA weights,
Custom Diffusion attention weights, in diffusers' file names and the community formats.

Between models and pipelines: loaders change a pipeline's text encoder, tokenizer and UNet in place; the
pipeline's methods (`pipe.load_textual_inversion`, `pipe.load_lora_weights`, ...) delegate here.
"""

from .custom_diffusion import load_attn_procs, save_attn_procs
from .lora import LoRAAdapter, LoRALayer, lora_state_dict
from .textual_inversion import expand_multi_vector_tokens, load_textual_inversion, save_textual_inversion

__all__ = ["LoRAAdapter", "LoRALayer", "expand_multi_vector_tokens", "load_attn_procs", "load_textual_inversion",
           "lora_state_dict", "save_attn_procs", "save_textual_inversion"]
