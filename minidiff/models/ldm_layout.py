"""The original CompVis / LDM single-file layout, mapped onto the diffusers names that minidiff's modules carry.

One file (`sd-v1-4.ckpt`, `v1-5-pruned-emaonly.safetensors`) holds every model under a prefix:

| prefix in the file               | model                     | names after the prefix                         |
|----------------------------------|---------------------------|------------------------------------------------|
| `model.diffusion_model.`         | the UNet                  | LDM's `input_blocks` / `middle_block` / ...    |
| `first_stage_model.`             | the VAE                   | LDM's `encoder.down.0.block.1` / `mid.attn_1`  |
| `cond_stage_model.transformer.`  | SD 1's CLIP text encoder  | transformers' own (`text_model.encoder...`)    |
| `cond_stage_model.model.`        | SD 2's OpenCLIP encoder   | OpenCLIP's (`transformer.resblocks.N.attn`)    |
| `model_ema.`                     | EMA copy of the UNet      | the UNet's LDM name with its dots removed      |

The UNet, block by block (L = layers_per_block, so each level holds L ResNets and then one downsampler):

| LDM (in the file)                          | diffusers / minidiff                                    |
|--------------------------------------------|---------------------------------------------------------|
| `time_embed.0`, `time_embed.2`             | `time_embedding.linear_1`, `.linear_2`                   |
| `input_blocks.0.0`                         | `conv_in`                                               |
| `input_blocks.{1 + b(L+1) + j}.0`          | `down_blocks.{b}.resnets.{j}`                           |
| `input_blocks.{1 + b(L+1) + j}.1`          | `down_blocks.{b}.attentions.{j}`                        |
| `input_blocks.{(b+1)(L+1)}.0.op`           | `down_blocks.{b}.downsamplers.0.conv`                   |
| `middle_block.0`, `.1`, `.2`               | `mid_block.resnets.0`, `.attentions.0`, `.resnets.1`    |
| `output_blocks.{b(L+1) + j}.0`             | `up_blocks.{b}.resnets.{j}` (L+1 ResNets per level)     |
| `output_blocks.{b(L+1) + j}.1`             | `up_blocks.{b}.attentions.{j}`                          |
| `output_blocks.{b(L+1) + L}.{1 or 2}.conv` | `up_blocks.{b}.upsamplers.0.conv` (2 after an attention)|
| `out.0`, `out.2`                           | `conv_norm_out`, `conv_out`                             |

Inside a ResNet: `in_layers.0/2` = `norm1`/`conv1`, `emb_layers.1` = `time_emb_proj`, `out_layers.0/3` =
`norm2`/`conv2`, `skip_connection` = `conv_shortcut`. Inside an attention block the names are the same.
In the VAE, the mid-block attention's q, k, v and proj_out are 1x1 convolutions, (C, C, 1, 1), where
diffusers has linear layers (C, C); its up blocks are numbered from the lowest resolution in diffusers and
from the highest in the file.

Each map below is built from the model's config and goes both ways (loading and saving a single file).
"""

from __future__ import annotations

import re

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
EMA_PREFIX = "model_ema."

UNET_RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                     "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET_NAMES = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(rest: str, names: dict[str, str]) -> str:
    """`conv1.weight` -> `in_layers.2.weight`: rename the leading module name of `rest` if it is in `names`."""
    for old, new in names.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def _layers(config) -> int:
    L = config.layers_per_block
    if not isinstance(L, int):
        if len(set(L)) != 1:
            raise ValueError(f"The LDM layout has the same number of ResNets per level; found layers_per_block={L}.")
        L = L[0]
    return L


def unet_blocks(config) -> list[tuple[str, str, dict]]:
    """(diffusers prefix, LDM prefix, renames inside it) for every block of a UNet2DConditionModel config."""
    L, n = _layers(config), len(config.block_out_channels)
    blocks = [("time_embedding.linear_1", "time_embed.0", {}), ("time_embedding.linear_2", "time_embed.2", {}),
              ("conv_in", "input_blocks.0.0", {}), ("conv_norm_out", "out.0", {}), ("conv_out", "out.2", {}),
              ("mid_block.resnets.0", "middle_block.0", UNET_RESNET_NAMES),
              ("mid_block.attentions.0", "middle_block.1", {}),
              ("mid_block.resnets.1", "middle_block.2", UNET_RESNET_NAMES)]
    for b in range(n):
        for j in range(L):
            i = 1 + b * (L + 1) + j
            blocks += [(f"down_blocks.{b}.resnets.{j}", f"input_blocks.{i}.0", UNET_RESNET_NAMES),
                       (f"down_blocks.{b}.attentions.{j}", f"input_blocks.{i}.1", {})]
        if b < n - 1:
            blocks.append((f"down_blocks.{b}.downsamplers.0.conv", f"input_blocks.{(b + 1) * (L + 1)}.0.op", {}))
    for b in range(n):
        has_attention = config.up_block_types[b].startswith("CrossAttn")
        for j in range(L + 1):
            i = b * (L + 1) + j
            blocks += [(f"up_blocks.{b}.resnets.{j}", f"output_blocks.{i}.0", UNET_RESNET_NAMES),
                       (f"up_blocks.{b}.attentions.{j}", f"output_blocks.{i}.1", {})]
        if b < n - 1:
            blocks.append((f"up_blocks.{b}.upsamplers.0.conv",
                           f"output_blocks.{b * (L + 1) + L}.{2 if has_attention else 1}.conv", {}))
    return blocks


def vae_blocks(config) -> list[tuple[str, str, dict]]:
    """(diffusers prefix, LDM prefix, renames inside it) for every block of an AutoencoderKL config."""
    n = len(config.block_out_channels)
    blocks = [("encoder.conv_norm_out", "encoder.norm_out", {}), ("decoder.conv_norm_out", "decoder.norm_out", {})]
    for part in ("encoder", "decoder"):
        blocks += [(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", VAE_RESNET_NAMES),
                   (f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", VAE_RESNET_NAMES),
                   (f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", VAE_ATTENTION_NAMES)]
    for i in range(n):
        blocks += [(f"encoder.down_blocks.{i}.resnets", f"encoder.down.{i}.block", VAE_RESNET_NAMES),
                   (f"encoder.down_blocks.{i}.downsamplers.0", f"encoder.down.{i}.downsample", {}),
                   (f"decoder.up_blocks.{i}.resnets", f"decoder.up.{n - 1 - i}.block", VAE_RESNET_NAMES),
                   (f"decoder.up_blocks.{i}.upsamplers.0", f"decoder.up.{n - 1 - i}.upsample", {})]
    return blocks


def ldm_name(key: str, blocks: list[tuple[str, str, dict]]) -> str:
    """The LDM name of one diffusers key: the longest block prefix that matches, then the renames inside it."""
    best = None
    for ours, theirs, names in blocks:
        if key.startswith(ours + ".") and (best is None or len(ours) > len(best[0])):
            best = (ours, theirs, names)
    if best is None:
        return key                                   # same name in both layouts (quant_conv, encoder.conv_in, ...)
    ours, theirs, names = best
    rest = key[len(ours) + 1:]
    if names is VAE_RESNET_NAMES and re.match(r"\d+\.", rest):  # `resnets.1.conv_shortcut...`: keep the index
        index, _, rest = rest.partition(".")
        return f"{theirs}.{index}.{_rename(rest, names)}"
    return f"{theirs}.{_rename(rest, names)}"


def _is_vae_attention_matrix(key: str) -> bool:
    return ".mid_block.attentions.0." in key and key.endswith(".weight") and "group_norm" not in key


def from_ldm(model: torch.nn.Module, blocks, weights: dict[str, torch.Tensor], prefix: str,
             source: str) -> dict[str, torch.Tensor]:
    """The state dict `model` expects, taken from `weights` (the file's keys under `prefix`).

    Strict both ways: a key the model needs that the file lacks, or a key under `prefix` that nothing
    takes, is an error that lists them."""
    expected = model.state_dict()
    found, missing = {}, []
    for key, target in expected.items():
        name = prefix + ldm_name(key, blocks)
        if name not in weights:
            missing.append(name)
            continue
        value = weights[name]
        if value.ndim == 4 and target.ndim == 2 and _is_vae_attention_matrix(key):
            value = value[:, :, 0, 0]                # 1x1 conv (C, C, 1, 1) -> linear (C, C)
        found[key] = value
    unused = sorted(k for k in weights if k.startswith(prefix) and k not in
                    {prefix + ldm_name(key, blocks) for key in expected})
    if missing or unused:
        raise ValueError(f"{source}: the {prefix}* weights do not fit a {type(model).__name__} of this config: "
                         f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)}), "
                         f"unused {unused[:5]}{' ...' if len(unused) > 5 else ''} ({len(unused)}). "
                         "Check that the file is a Stable Diffusion v1 / v2 checkpoint (see ldm_layout.py).")
    return found


def to_ldm(model: torch.nn.Module, blocks, prefix: str) -> dict[str, torch.Tensor]:
    """The model's weights under their LDM names (the VAE's attention matrices as 1x1 convolutions)."""
    out = {}
    for key, value in model.state_dict().items():
        if value.ndim == 2 and _is_vae_attention_matrix(key):
            value = value[:, :, None, None]          # linear (C, C) -> 1x1 conv (C, C, 1, 1)
        out[prefix + ldm_name(key, blocks)] = value
    return out


def ema_name(ldm_unet_key: str) -> str:
    """`model.diffusion_model.out.0.weight` -> `model_ema.diffusion_modelout0weight` (the EMA copy's name)."""
    return EMA_PREFIX + "".join(ldm_unet_key.split(".")[1:])


# --- text encoders ----------------------------------------------------------------------------------------

def clip_from_ldm(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD 1: transformers' CLIPTextModel names under `cond_stage_model.transformer.` (older files lack the
    `text_model.` level). `position_ids` is a constant buffer that transformers no longer saves: dropped."""
    out = {}
    for key, value in weights.items():
        if not key.startswith(CLIP_PREFIX) or key.endswith("position_ids"):
            continue
        name = key[len(CLIP_PREFIX):]
        out[name if name.startswith("text_model.") else "text_model." + name] = value
    return out


OPEN_CLIP_NAMES = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                   "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def open_clip_from_ldm(weights: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """SD 2: OpenCLIP ViT-H's text tower -> CLIPTextModel names. SD 2 reads the penultimate layer, so
    diffusers' text encoder has `num_layers` = 23 of the file's 24 blocks; the rest (the last block,
    `text_projection`, `logit_scale`, `attn_mask`) is not used by Stable Diffusion and is dropped."""
    p = OPEN_CLIP_PREFIX
    out = {"text_model.embeddings.token_embedding.weight": weights[p + "token_embedding.weight"],
           "text_model.embeddings.position_embedding.weight": weights[p + "positional_embedding"],
           "text_model.final_layer_norm.weight": weights[p + "ln_final.weight"],
           "text_model.final_layer_norm.bias": weights[p + "ln_final.bias"]}
    for i in range(num_layers):
        theirs, ours = f"{p}transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = weights[f"{theirs}attn.in_proj_{kind}"].chunk(3, dim=0)   # (3D, ...) -> 3 x (D, ...)
            out[f"{ours}self_attn.q_proj.{kind}"] = q
            out[f"{ours}self_attn.k_proj.{kind}"] = k
            out[f"{ours}self_attn.v_proj.{kind}"] = v
            for old, new in OPEN_CLIP_NAMES.items():
                out[f"{ours}{new}.{kind}"] = weights[f"{theirs}{old}.{kind}"]
    return out


def open_clip_unused(weights: dict[str, torch.Tensor], num_layers: int) -> list[str]:
    """Keys under the OpenCLIP prefix that neither `open_clip_from_ldm` takes nor SD 2 is known to drop."""
    used = set(open_clip_to_ldm(open_clip_from_ldm(weights, num_layers), num_layers))
    dropped = tuple(OPEN_CLIP_PREFIX + k for k in ("text_projection", "logit_scale", "attn_mask",
                                                  f"transformer.resblocks.{num_layers}."))
    return sorted(k for k in weights if k.startswith(OPEN_CLIP_PREFIX) and k not in used and not k.startswith(dropped))


def clip_to_ldm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {CLIP_PREFIX + key: value for key, value in state_dict.items()}


def open_clip_to_ldm(state_dict: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """The inverse of `open_clip_from_ldm` for the blocks SD 2 uses (the dropped last block is not rebuilt)."""
    p, s = OPEN_CLIP_PREFIX, state_dict
    out = {p + "token_embedding.weight": s["text_model.embeddings.token_embedding.weight"],
           p + "positional_embedding": s["text_model.embeddings.position_embedding.weight"],
           p + "ln_final.weight": s["text_model.final_layer_norm.weight"],
           p + "ln_final.bias": s["text_model.final_layer_norm.bias"]}
    for i in range(num_layers):
        theirs, ours = f"{p}transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            out[f"{theirs}attn.in_proj_{kind}"] = torch.cat([s[f"{ours}self_attn.{x}_proj.{kind}"] for x in "qkv"])
            for old, new in OPEN_CLIP_NAMES.items():
                out[f"{theirs}{old}.{kind}"] = s[f"{ours}{new}.{kind}"]
    return out
