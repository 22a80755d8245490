"""Custom Diffusion (Kumari et al. 2023, "Multi-Concept Customization of Text-to-Image Diffusion",
https://arxiv.org/abs/2212.04488): a concept as new cross-attention key/value projections plus a new word.

The text reaches the image only through the cross-attention layers (attn2), as keys K = W_k c and values
V = W_v c of the text embeddings c. Custom Diffusion fine-tunes W_k and W_v of every attn2 (sec. 3.2: they
change most in fine-tuning; about 5% of the UNet's weights) and learns a modifier token `<new1>` by Textual
Inversion. Its `--freeze_model crossattn` option also trains W_q and the output projection.

diffusers' training script saves (techniques.md, "Custom Diffusion"):

    pytorch_custom_diffusion_weights.bin (or .safetensors)
        down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_custom_diffusion.weight  (inner, D)
        ...attn2.processor.to_v_custom_diffusion.weight        [to_q_custom_diffusion.weight, to_out_custom_diffusion.0.*]
        ...attn1.processor: {}                                 (the .bin only: self-attention layers left alone)
    <new1>.bin (or .safetensors)  {"<new1>": (D,)}             -> load_textual_inversion

Each learned matrix replaces the weight of the layer it was trained for (the file's copies take no bias, like
to_k / to_v), so loading is a checked copy into attn2.to_k / to_v. `save_attn_procs` writes every attn2's to_k /
to_v the same way, so a concept fine-tuned in minidiff loads in diffusers.

They are functions of the UNet, `load_attn_procs(pipe.unet, path)`, not methods of it: minidiff's models sit below
the loaders and do not import them. Where diffusers 0.42.1 differs (checked in tests/test_custom_diffusion.py):
- `pipe.unet.load_attn_procs(path, weight_name=...)` builds the processors but installs them only when the
  private `_pipeline=` is given (diffusers issue 9320): called as its docstring shows, it silently changes nothing.
- without weight_name= it looks for pytorch_lora_weights.*; minidiff looks for pytorch_custom_diffusion_weights.*.
- its own .safetensors files lack the {} of the self-attention layers, and it then refuses them (a processor count
  mismatch); minidiff reads both.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .files import find_weight_file, read_weight_file, save_weight_file

CUSTOM_DIFFUSION_WEIGHT_NAME = "pytorch_custom_diffusion_weights.bin"
CUSTOM_DIFFUSION_WEIGHT_NAME_SAFE = "pytorch_custom_diffusion_weights.safetensors"
# The file's name for a learned copy -> the attention layer's parameter it replaces.
TRAINED_COPIES = {
    "to_k_custom_diffusion.weight": "to_k.weight",
    "to_v_custom_diffusion.weight": "to_v.weight",
    "to_q_custom_diffusion.weight": "to_q.weight",
    "to_out_custom_diffusion.0.weight": "to_out.0.weight",
    "to_out_custom_diffusion.0.bias": "to_out.0.bias",
}


def custom_diffusion_updates(unet: nn.Module, state_dict: dict, source: str) -> dict[str, torch.Tensor]:
    """Check a Custom Diffusion state dict against `unet` -> {unet parameter name: new value}, or one error."""
    params = dict(unet.named_parameters())
    updates, unknown, wrong = {}, [], []
    for key, value in state_dict.items():
        layer, sep, copy = key.partition(".processor.")
        if isinstance(value, dict) and not value and key.endswith(".processor"):
            continue                                 # {} marks a layer that Custom Diffusion left as it was
        target = f"{layer}.{TRAINED_COPIES.get(copy, '?')}"
        if not sep or copy not in TRAINED_COPIES or target not in params or not isinstance(value, torch.Tensor):
            unknown.append(key)
        elif value.shape != params[target].shape:
            wrong.append(f"{key}: {tuple(value.shape)}, the UNet's {target} is {tuple(params[target].shape)}")
        else:
            updates[target] = value
    if unknown or wrong or not updates:
        lines = [f"{source} is not a Custom Diffusion file for this UNet:"]
        if unknown:
            lines.append(f"  keys that fit no attention layer ({len(unknown)}): {unknown[:6]}")
        if wrong:
            lines.append(f"  wrong shapes ({len(wrong)}): {wrong[:6]}")
        if not (unknown or wrong):
            lines.append("  it holds no learned weights")
        lines.append("Expected keys such as down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor."
                     "to_k_custom_diffusion.weight, trained on this base model. A LoRA goes to load_lora_weights.")
        raise ValueError("\n".join(lines))
    return updates


def load_attn_procs(unet: nn.Module, pretrained_model_name_or_path_or_dict, weight_name: str | None = None,
                    subfolder: str | None = None) -> list[str]:
    """Copy Custom Diffusion's learned projections into `unet`'s attention layers; returns the parameters changed.

    Like diffusers' `unet.load_attn_procs(path, weight_name="pytorch_custom_diffusion_weights.bin")`."""
    if isinstance(pretrained_model_name_or_path_or_dict, dict):
        state_dict, source = pretrained_model_name_or_path_or_dict, "the given state dict"
    else:
        source = find_weight_file(pretrained_model_name_or_path_or_dict,
                                  (CUSTOM_DIFFUSION_WEIGHT_NAME_SAFE, CUSTOM_DIFFUSION_WEIGHT_NAME), weight_name,
                                  subfolder, "Custom Diffusion weights")
        state_dict = read_weight_file(source)
    updates = custom_diffusion_updates(unet, state_dict, source)
    fused = [name for name, m in unet.named_modules() if getattr(m, "fused", False)]
    if fused:
        raise ValueError(f"The UNet's q/k/v projections are fused ({fused[0]}, ...): their fused copies would keep "
                         "the old weights. Call pipe.unfuse_qkv_projections() before load_attn_procs.")
    params = dict(unet.named_parameters())
    with torch.no_grad():
        for name, value in updates.items():
            params[name].copy_(value)                # cast to the UNet's dtype and device
    return sorted(updates)


def save_attn_procs(unet: nn.Module, save_directory, weight_name: str | None = None, safe_serialization: bool = True,
                    train_q_out: bool = False) -> str:
    """Write every cross-attention layer's to_k / to_v (and to_q / to_out with train_q_out) in diffusers' names.

    The pickled .bin (safe_serialization=False) also marks each self-attention layer with {} as diffusers does,
    which diffusers' load_attn_procs needs to count its layers; safetensors cannot hold those."""
    state_dict = {}
    for name, module in unet.named_modules():
        if name.endswith(".attn2"):
            copies = TRAINED_COPIES if train_q_out else dict(list(TRAINED_COPIES.items())[:2])
            for copy, param in copies.items():
                state_dict[f"{name}.processor.{copy}"] = module.get_parameter(param).detach().cpu().clone()
        elif name.endswith(".attn1") and not safe_serialization:
            state_dict[f"{name}.processor"] = {}
    if not state_dict:
        raise ValueError("This UNet has no cross-attention layers (attn2): there is nothing of Custom Diffusion to save.")
    weight_name = weight_name or (CUSTOM_DIFFUSION_WEIGHT_NAME_SAFE if safe_serialization else CUSTOM_DIFFUSION_WEIGHT_NAME)
    return save_weight_file(state_dict, os.fspath(save_directory), weight_name, safe_serialization)
