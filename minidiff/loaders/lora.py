"""LoRA (Hu et al. 2021, "Low-Rank Adaptation of Large Language Models", https://arxiv.org/abs/2106.09685).

A LoRA leaves a weight W (out, in) frozen and learns a low-rank change to it, two thin matrices
down (r, in) and up (r columns, out rows), r << in, out:

    h = W x + s · (α / r) · up(down(x))           (Hu et al. 2021, eq. 3; α is kohya's `alpha`, s the user's scale)

so the layer can be merged ("fused") into one matrix with no cost at inference:

    W' = W + s · (α / r) · up @ down               (a conv: down (r, in, kh, kw), up (out, r, 1, 1), flattened)

`LoRALayer` is that sum, written out around the model's own nn.Linear / nn.Conv2d (kept as `base_layer`, as
PEFT names it). The files people download name the same modules in three ways (techniques.md):

    PEFT / diffusers   unet.<module>.lora_A.weight, .lora_B.weight        text_encoder.<module>.lora_A.weight
    diffusers (older)  unet.<module>.lora.down.weight, .lora.up.weight    and <attn>.processor.to_q_lora.down.weight
    kohya / A1111      lora_unet_<module with _ for .>.lora_down.weight, .lora_up.weight, .alpha   lora_te_...

α defaults to r (scale 1) where a file stores none, as in diffusers. Every key is matched to a module of this
UNet or text encoder, and every shape checked, before any layer is changed: a LoRA for another architecture or
with keys that fit nothing is refused with the list.

Where minidiff departs from diffusers 0.42.1 (+ peft): after `fuse_lora(lora_scale=0.7)` and `unfuse_lora()`,
diffusers keeps running the LoRA at 0.7 (peft's scale_layer is not undone), minidiff at the scale it was loaded
with; a LoRA whose keys fit no layer, or an empty one, is refused where diffusers loads nothing with a warning.
"""

from __future__ import annotations

import json
import math
import os
import re

import torch
from torch import nn

from .files import find_weight_file, read_weight_file, safetensors_metadata, save_weight_file

LORA_WEIGHT_NAME = "pytorch_lora_weights.bin"
LORA_WEIGHT_NAME_SAFE = "pytorch_lora_weights.safetensors"
COMPONENTS = ("unet", "text_encoder")
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}
# Old diffusers attention-processor names -> the module they adapt.
OLD_PROCESSOR_NAMES = {"processor.to_q_lora": "to_q", "processor.to_k_lora": "to_k", "processor.to_v_lora": "to_v",
                       "processor.to_out_lora": "to_out.0", "to_q_lora": "q_proj", "to_k_lora": "k_proj",
                       "to_v_lora": "v_proj", "to_out_lora": "out_proj"}


class LoRAAdapter(nn.Module):
    """One LoRA on one layer: down (in -> r) then up (r -> out), scaled by α / r and by the user's weight."""

    def __init__(self, base: nn.Linear | nn.Conv2d, down: torch.Tensor, up: torch.Tensor, alpha: float):
        super().__init__()
        self.rank = down.shape[0]                                            # r
        self.alpha = float(alpha)
        self.adapter_weight = 1.0                                            # s, set_adapters' weight
        self.active = True                                                   # in use (set_adapters chooses)
        if isinstance(base, nn.Linear):
            self.down = nn.Linear(base.in_features, self.rank, bias=False)   # (r, in)
            self.up = nn.Linear(self.rank, base.out_features, bias=False)    # (out, r)
        else:  # down has the base conv's kernel and stride, up is 1x1 (kohya's LoCon, PEFT)
            self.down = nn.Conv2d(base.in_channels, self.rank, base.kernel_size, base.stride, base.padding,
                                  base.dilation, bias=False)                 # (r, in, kh, kw)
            self.up = nn.Conv2d(self.rank, base.out_channels, 1, bias=False)  # (out, r, 1, 1)
        w = base.weight
        with torch.no_grad():
            self.down.weight.copy_(down.reshape(self.down.weight.shape))
            self.up.weight.copy_(up.reshape(self.up.weight.shape))
        self.to(device=w.device, dtype=w.dtype)

    def delta_weight(self, scale: float) -> torch.Tensor:
        """scale · (α / r) · up @ down, in the base weight's shape: (out, in) or (out, in, kh, kw)."""
        up = self.up.weight.flatten(1)                                       # (out, r)
        down = self.down.weight.flatten(1)                                   # (r, in·kh·kw)
        delta = (up @ down).reshape(up.shape[0], *self.down.weight.shape[1:])  # (out, in[, kh, kw])
        return scale * (self.alpha / self.rank) * delta


class LoRALayer(nn.Module):
    """base_layer(x) + Σ_active adapters s · (α / r) · up(down(x)); fused ones are already inside base_layer.weight."""

    def __init__(self, base_layer: nn.Linear | nn.Conv2d):
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.fused_scales: dict[str, float] = {}     # adapter -> the scale it was merged with (unfuse undoes it)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)                                             # W x (+ b)
        for name, adapter in self.adapters.items():
            if adapter.active and name not in self.fused_scales:
                out = out + adapter.adapter_weight * (adapter.alpha / adapter.rank) * adapter.up(adapter.down(x))
        return out

    @torch.no_grad()
    def fuse(self, lora_scale: float) -> None:
        """W <- W + lora_scale · s · (α / r) · up @ down for every active adapter not fused yet."""
        for name, adapter in self.adapters.items():
            if adapter.active and name not in self.fused_scales:
                scale = lora_scale * adapter.adapter_weight
                self.base_layer.weight += adapter.delta_weight(scale)
                self.fused_scales[name] = scale

    @torch.no_grad()
    def unfuse(self) -> None:
        """W <- W - the same deltas: W comes back up to float rounding."""
        for name, scale in self.fused_scales.items():
            self.base_layer.weight -= self.adapters[name].delta_weight(scale)
        self.fused_scales = {}


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """The model's LoRALayers by module name (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)}


def adapter_names(components: dict[str, nn.Module]) -> list[str]:
    """Every adapter loaded into the given models, in the order they were loaded."""
    names = []
    for model in components.values():
        for layer in lora_layers(model).values():
            names += [n for n in layer.adapters if n not in names]
    return names


# --- reading a file into {component: {module: {"down", "up", "alpha"}}} -------------------------------------------
def parse_key(key: str, kohya_names: dict[str, tuple[str, str]]) -> tuple[str, str, str] | None:
    """A file key -> (component, module name, "down" | "up" | "alpha"), or None when it fits no known form."""
    # 1. kohya: the module's name with _ for ., then .lora_down.weight / .lora_up.weight / .alpha
    flat, _, part = key.partition(".")
    if flat in kohya_names:
        kind = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(part)
        return kohya_names[flat] + (kind,) if kind else None
    # 2. PEFT and diffusers: [unet. | text_encoder.]<module>.<lora part>
    match = re.fullmatch(r"(?:(unet|text_encoder)\.)?(.+?)\.(lora_A\.weight|lora_B\.weight|lora\.down\.weight|"
                         r"lora\.up\.weight|lora_linear_layer\.down\.weight|lora_linear_layer\.up\.weight|"
                         r"down\.weight|up\.weight|alpha)", key)
    if match is None:
        return None
    component, module, part = match.groups()
    kind = "alpha" if part == "alpha" else "down" if ("lora_A" in part or "down" in part) else "up"
    if part in ("down.weight", "up.weight"):       # only the old processor names end so: ...to_q_lora.down.weight
        old = next((old for old in OLD_PROCESSOR_NAMES if module.endswith(old)), None)
        if old is None:
            return None
        module = module[: -len(old)] + OLD_PROCESSOR_NAMES[old]
    component = component or ("text_encoder" if module.startswith("text_model.") else "unet")
    return component, module, kind


def kohya_table(components: dict[str, nn.Module]) -> dict[str, tuple[str, str]]:
    """kohya's flat names, read off the models themselves: lora_unet_<a_b_c> -> ("unet", "a.b.c")."""
    table = {}
    for prefix, component in KOHYA_PREFIXES.items():
        if component in components:
            for name in layer_names(components[component]):
                table[prefix + name.replace(".", "_")] = (component, name)
    return table


def layer_names(model: nn.Module) -> list[str]:
    """The Linear and Conv2d layers a LoRA may adapt (a LoRALayer counts as its layer, its insides do not)."""
    names, wrapped = [], ()
    for name, module in model.named_modules():
        if name.startswith(wrapped):
            continue
        if isinstance(module, LoRALayer):
            wrapped += (name + ".",)
        if isinstance(module, (nn.Linear, nn.Conv2d, LoRALayer)):
            names.append(name)
    return names


def read_lora(pretrained_model_name_or_path_or_dict, weight_name: str | None = None, subfolder: str | None = None):
    """-> (state dict, where it came from, α / r from diffusers' safetensors metadata or None)."""
    if isinstance(pretrained_model_name_or_path_or_dict, dict):
        return dict(pretrained_model_name_or_path_or_dict), "the given LoRA state dict", None
    path = find_weight_file(pretrained_model_name_or_path_or_dict, (LORA_WEIGHT_NAME_SAFE, LORA_WEIGHT_NAME),
                            weight_name, subfolder, "LoRA weights")
    metadata = safetensors_metadata(path).get("lora_adapter_metadata")
    return read_weight_file(path), path, json.loads(metadata) if metadata else None


def metadata_alpha(metadata: dict | None, component: str, module: str, rank: int) -> float:
    """α of one module from diffusers' `lora_adapter_metadata` ({"unet.lora_alpha": 8, "unet.alpha_pattern": ...})."""
    if not metadata or f"{component}.lora_alpha" not in metadata:
        return float(rank)                                                   # no α stored: α = r, scale 1
    for pattern, alpha in (metadata.get(f"{component}.alpha_pattern") or {}).items():
        if module == pattern or module.endswith("." + pattern):
            return float(alpha)
    return float(metadata[f"{component}.lora_alpha"])


def check_lora(state_dict: dict, components: dict[str, nn.Module], source: str, metadata: dict | None = None):
    """Match every key to a module and check every shape -> {(component, module): (down, up, alpha)}.

    Raises one error listing every key that fits nothing and every shape that does not fit this model."""
    kohya_names = kohya_table(components)
    grouped: dict[tuple[str, str], dict] = {}
    unknown, wrong = [], []
    for key, value in state_dict.items():
        parsed = parse_key(key, kohya_names)
        if parsed is None or parsed[0] not in components or not isinstance(value, torch.Tensor):
            unknown.append(key)
            continue
        component, module, kind = parsed
        grouped.setdefault((component, module), {})[kind] = value
    found = {}
    layers = {component: set(layer_names(model)) for component, model in components.items()}
    for (component, module), parts in grouped.items():
        if module not in layers[component]:
            what = "no such layer"
            try:
                what = f"a {type(components[component].get_submodule(module)).__name__}, not a Linear or Conv2d"
            except AttributeError:
                pass
            unknown.append(f"{component}.{module} ({what})")
            continue
        base = components[component].get_submodule(module)
        base = base.base_layer if isinstance(base, LoRALayer) else base
        if "down" not in parts or "up" not in parts:
            unknown.append(f"{component}.{module} (has {sorted(parts)}; a LoRA layer needs both down and up)")
            continue
        down, up = parts["down"], parts["up"]
        r = down.shape[0]
        if isinstance(base, nn.Linear):
            expected_down, expected_up = (r, base.in_features), (base.out_features, r)
        else:
            expected_down, expected_up = (r, base.in_channels, *base.kernel_size), (base.out_channels, r, 1, 1)
        if tuple(down.shape) != expected_down or tuple(up.shape) != expected_up:
            wrong.append(f"{component}.{module}: down {tuple(down.shape)}, up {tuple(up.shape)}; this model needs "
                         f"down {expected_down}, up {expected_up}")
            continue
        alpha = float(parts["alpha"]) if "alpha" in parts else metadata_alpha(metadata, component, module, r)
        if not (torch.isfinite(down).all() and torch.isfinite(up).all() and math.isfinite(alpha)):
            wrong.append(f"{component}.{module}: NaN or inf in its weights or alpha (a damaged file)")
            continue
        found[(component, module)] = (down, up, alpha)
    if unknown or wrong:
        def show(items):
            return "\n    ".join(items[:10]) + (f"\n    ... ({len(items)} in all)" if len(items) > 10 else "")

        lines = [f"{source} does not fit this pipeline's {' and '.join(components)}:"]
        if unknown:
            lines.append(f"  keys that fit no layer ({len(unknown)}):\n    {show(unknown)}")
        if wrong:
            lines.append(f"  wrong shapes or values ({len(wrong)}):\n    {show(wrong)}")
        lines.append("Expected a LoRA for Stable Diffusion v1 in the PEFT/diffusers (unet.<layer>.lora_A.weight) "
                     "or kohya (lora_unet_<layer>.lora_down.weight, .alpha) format; check that it was trained for "
                     "this base model (SD v1 vs SD 2 / SDXL).")
        raise ValueError("\n".join(lines))
    if not found:
        raise ValueError(f"{source} holds no LoRA weights (it is empty). Expected keys such as "
                         "unet.<layer>.lora_A.weight or lora_unet_<layer>.lora_down.weight.")
    return found


def load_lora_weights(components: dict[str, nn.Module], pretrained_model_name_or_path_or_dict,
                      adapter_name: str | None = None, weight_name: str | None = None,
                      subfolder: str | None = None) -> str:
    """Wrap each layer a LoRA names in a LoRALayer (or add an adapter to it); returns the adapter's name.

    As in diffusers, the adapter loaded last is the one in use: `set_adapters` combines several."""
    state_dict, source, metadata = read_lora(pretrained_model_name_or_path_or_dict, weight_name, subfolder)
    loaded = adapter_names(components)
    adapter_name = adapter_name if adapter_name is not None else f"default_{len(loaded)}"
    if adapter_name in loaded:
        raise ValueError(f"An adapter named {adapter_name!r} is already loaded ({loaded}). Pass another "
                         "adapter_name=, or unload_lora_weights() first.")
    for component, model in components.items():
        fused = [n for n, m in model.named_modules() if getattr(m, "fused", False)]
        if fused:
            raise ValueError(f"The {component} has fused q/k/v projections ({fused[0]}, ...): a LoRA cannot be "
                             "added to them. Call pipe.unfuse_qkv_projections() first.")
    found = check_lora(state_dict, components, source, metadata)
    for (component, module), (down, up, alpha) in found.items():
        model = components[component]
        layer = model.get_submodule(module)
        if not isinstance(layer, LoRALayer):
            parent_name, _, child = module.rpartition(".")
            layer = LoRALayer(layer)
            setattr(model.get_submodule(parent_name), child, layer)
        layer.adapters[adapter_name] = LoRAAdapter(layer.base_layer, down, up, alpha)
    use_adapters(components, [adapter_name], [1.0])
    return adapter_name


def fuse_lora(components: dict[str, nn.Module], lora_scale: float = 1.0) -> None:
    for model in components.values():
        for layer in lora_layers(model).values():
            layer.fuse(lora_scale)


def unfuse_lora(components: dict[str, nn.Module]) -> None:
    for model in components.values():
        for layer in lora_layers(model).values():
            layer.unfuse()


def unload_lora_weights(components: dict[str, nn.Module]) -> None:
    """Put every base layer back. Fused adapters stay in the weights, as in diffusers: unfuse_lora() first to
    get the plain model back."""
    for model in components.values():
        for module, layer in lora_layers(model).items():
            parent_name, _, child = module.rpartition(".")
            setattr(model.get_submodule(parent_name), child, layer.base_layer)


def set_adapters(components: dict[str, nn.Module], names: list[str], weights: list[float]) -> None:
    """Use the named adapters, each scaled by its weight s, and switch the others off (unfused layers only)."""
    loaded = adapter_names(components)
    missing = [n for n in names if n not in loaded]
    if missing:
        raise ValueError(f"No adapter named {missing}; loaded: {loaded}.")
    if any(layer.fused_scales for model in components.values() for layer in lora_layers(model).values()):
        raise ValueError("The LoRA weights are fused: set_adapters would not change them. Call unfuse_lora() first.")
    use_adapters(components, names, weights)


def use_adapters(components: dict[str, nn.Module], names: list[str], weights: list[float]) -> None:
    for model in components.values():
        for layer in lora_layers(model).values():
            for name, adapter in layer.adapters.items():
                adapter.active = name in names
                adapter.adapter_weight = weights[names.index(name)] if adapter.active else 1.0


def lora_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """One adapter of `model` in PEFT names, {<module>.lora_A.weight: down, <module>.lora_B.weight: up}, with α / r
    folded into lora_B, so that diffusers (which takes α = r when no α is stored) computes the same layer."""
    out = {}
    for module, layer in lora_layers(model).items():
        names = list(layer.adapters)
        name = adapter_name if adapter_name is not None else (names[0] if names else None)
        if name in layer.adapters:
            adapter = layer.adapters[name]
            out[f"{module}.lora_A.weight"] = adapter.down.weight.detach().clone()
            out[f"{module}.lora_B.weight"] = adapter.up.weight.detach() * (adapter.alpha / adapter.rank)
    return out


def save_lora_weights(save_directory, unet_lora_layers: dict | None = None, text_encoder_lora_layers: dict | None = None,
                      weight_name: str | None = None, safe_serialization: bool = True) -> str:
    """diffusers' file: {"unet.<module>.lora_A.weight": ..., "text_encoder.<module>.lora_B.weight": ...}."""
    if not unet_lora_layers and not text_encoder_lora_layers:
        raise ValueError("Nothing to save: pass unet_lora_layers= and/or text_encoder_lora_layers= (e.g. "
                         "minidiff.loaders.lora_state_dict(pipe.unet)).")
    state_dict = {}
    for prefix, layers in (("unet", unet_lora_layers), ("text_encoder", text_encoder_lora_layers)):
        state_dict.update({f"{prefix}.{k}": v for k, v in (layers or {}).items()})
    weight_name = weight_name or (LORA_WEIGHT_NAME_SAFE if safe_serialization else LORA_WEIGHT_NAME)
    return save_weight_file(state_dict, os.fspath(save_directory), weight_name, safe_serialization)
