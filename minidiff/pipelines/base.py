"""What every minidiff pipeline shares: loading a pipeline folder, `.to(device)`, the progress bar, the output.

A pipeline folder in the hub layout (google/ddpm-cat-256, CompVis/stable-diffusion-v1-4) holds
`model_index.json`, which names the pipeline class and, for each component, its library and class:

    {"_class_name": "StableDiffusionPipeline",
     "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
     "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
     "tokenizer": ["transformers", "CLIPTokenizer"], "safety_checker": [...], "feature_extractor": [...]}

Each component lives in the subfolder of its name (`unet/`), or at the root of the folder when that
subfolder does not exist (google/ddpm-cat-256 is laid out flat). minidiff looks every class name up in
the explicit tables below and loads the component with that class. The safety checker and its feature
extractor are not part of minidiff: they are skipped, with one warning.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

import numpy as np
import PIL.Image
import torch
from tqdm.auto import tqdm

from .. import schedulers
from ..config import read_json
from ..schedulers.base import x0_and_eps
from ..hub import OFFLINE_HELP, bundled_path, resolve_file
from ..layers import Attention
from ..unet_2d import UNet2DModel
from ..unet_2d_condition import UNet2DConditionModel
from ..vae import AutoencoderKL

MODEL_INDEX_NAME = "model_index.json"

# Components that diffusers' Stable Diffusion folders name but minidiff does not load.
NOT_LOADED = ("safety_checker", "feature_extractor")

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


# model_index.json class name -> the minidiff class that loads it. The two transformers classes are
# imported only when a Stable Diffusion folder is loaded (importing transformers takes seconds).
MODEL_CLASSES = {
    "UNet2DModel": UNet2DModel,
    "UNet2DConditionModel": UNet2DConditionModel,
    "AutoencoderKL": AutoencoderKL,
}
TRANSFORMERS_CLASSES = ("CLIPTextModel", "CLIPTokenizer")

# A folder's scheduler `_class_name` -> the minidiff scheduler that reads its scheduler_config.json.
SCHEDULER_CLASSES = {
    "DDPMScheduler": schedulers.DDPMScheduler,
    "DDIMScheduler": schedulers.DDIMScheduler,
    "DDIMInverseScheduler": schedulers.DDIMInverseScheduler,
    "PNDMScheduler": schedulers.PNDMScheduler,
    "EulerDiscreteScheduler": schedulers.EulerDiscreteScheduler,
    "EulerAncestralDiscreteScheduler": schedulers.EulerAncestralDiscreteScheduler,
    "DPMSolverMultistepScheduler": schedulers.DPMSolverMultistepScheduler,
    "UniPCMultistepScheduler": schedulers.UniPCMultistepScheduler,
}


def pipeline_classes() -> dict[str, type]:
    """model_index.json `_class_name` -> minidiff pipeline class."""
    # Imported here because these modules import this one.
    from ..control import PIPELINES as CONTROL_PIPELINES
    from .ddpm import DDPMPipeline
    from .img2img import StableDiffusionImg2ImgPipeline
    from .stable_diffusion import StableDiffusionPipeline

    return {
        "DDPMPipeline": DDPMPipeline,
        "StableDiffusionPipeline": StableDiffusionPipeline,
        "StableDiffusionImg2ImgPipeline": StableDiffusionImg2ImgPipeline,
        **{cls.__name__: cls for cls in CONTROL_PIPELINES},   # minidiff/control: the same folders, other loops
    }


# --- what a call returns ----------------------------------------------------------------------------
@dataclass
class Intermediates:
    """Everything the sampler saw, step by step, so a notebook can show the latents at each timestep.

    Step i runs at timestep `timesteps[i]`; `latents[i]` is the sample after that step and `x0[i]` the
    model's estimate of the clean sample x_0 at that step. Each tensor is (B, C, h, w), a detached copy
    kept on the pipeline's device (moving it to the CPU here would stall the GPU at every step).
    """

    initial_latents: torch.Tensor | None = None
    timesteps: list[torch.Tensor] = field(default_factory=list)
    latents: list[torch.Tensor] = field(default_factory=list)
    x0: list[torch.Tensor] = field(default_factory=list)


@dataclass
class ImagePipelineOutput:
    """`images`: a list of PIL images, a (B, H, W, 3) float array in [0, 1] (`"np"`), a (B, 3, H, W) tensor in
    [0, 1] (`"pt"`) or the final latents (`"latent"`). `intermediates`: filled by `return_intermediates=True`."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    intermediates: Intermediates | None = None


def check_output_type(output_type: str, allowed: tuple[str, ...] = OUTPUT_TYPES) -> None:
    if output_type not in allowed:
        raise ValueError(f"output_type must be one of {list(allowed)}; found {output_type!r}.")


def check_generator(generator, batch_size: int) -> None:
    """One torch.Generator, None, or a list with exactly one generator per image."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch_size:
            raise ValueError(
                f"Got a list of {len(generator)} generators for {batch_size} images (prompts x "
                "num_images_per_prompt). Pass one generator per image, or a single generator."
            )
        gens = list(generator)
    else:
        gens = [] if generator is None else [generator]
    for g in gens:
        if not isinstance(g, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or a list of them; found {type(g).__name__}.")


def postprocess(image: torch.Tensor, output_type: str):
    """(B, C, H, W) in [-1, 1] -> the requested output type, exactly as diffusers' image processor does."""
    image = (image / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return image
    image = image.cpu().permute(0, 2, 3, 1).float().numpy()          # (B, C, H, W) -> (B, H, W, C)
    if output_type == "np":
        return image
    pixels = (image * 255).round().astype("uint8")
    if pixels.shape[-1] == 1:
        return [PIL.Image.fromarray(p[..., 0], mode="L") for p in pixels]
    return [PIL.Image.fromarray(p) for p in pixels]


def predict_x0(scheduler, sample: torch.Tensor, model_output: torch.Tensor, t) -> torch.Tensor:
    """x_0 from the model output at timestep t, for schedulers whose step() returns no x_0 (PNDM,
    DPM-Solver, UniPC). They all work on the variance-preserving x_t of Ho et al. 2020, eq. 4:

        x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε   =>   x_0 = (x_t - sqrt(1 - ᾱ_t) ε) / sqrt(ᾱ_t)
    """
    t = t.long() if isinstance(t, torch.Tensor) else int(t)
    # Indexing with the tensor t keeps the computation on the device: no GPU sync.
    alpha_bar_t = scheduler.alphas_cumprod.to(device=sample.device, dtype=sample.dtype)[t]
    prediction_type = getattr(scheduler.config, "prediction_type", "epsilon")
    return x0_and_eps(prediction_type, model_output, sample, alpha_bar_t)[0]


# --- the base class -----------------------------------------------------------------------------------
class DiffusionPipeline:
    """Base of minidiff's pipelines. `DiffusionPipeline.from_pretrained(folder)` returns the pipeline
    class that the folder's `model_index.json` names."""

    component_names: tuple[str, ...] = ()

    def __init__(self):
        self._progress_bar_config = {}
        self._offload_device = None   # set by enable_model_cpu_offload()

    # --- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str,
        torch_dtype: torch.dtype | None = None,
        variant: str | None = None,
        use_safetensors: bool | None = None,
        cache_dir: str | None = None,
        local_files_only: bool | None = None,
        **components,
    ):
        """Load every component of a pipeline folder, bundled checkpoint ("tiny-sd") or hub repo id.

        `components` replaces a component instead of loading it (`scheduler=my_scheduler`);
        `safety_checker=None` and `feature_extractor=None` are accepted as in diffusers.
        """
        find = dict(cache_dir=cache_dir, local_files_only=local_files_only)
        index_path = resolve_file(path_or_repo_id, MODEL_INDEX_NAME, required=False, **find)
        if index_path is None:
            raise FileNotFoundError(
                f"Expected a {MODEL_INDEX_NAME} in {path_or_repo_id}, found none: this is not a pipeline "
                "folder in the hub layout. To load one model, use e.g. "
                "minidiff.UNet2DModel.from_pretrained(path, subfolder='unet')."
            )
        index = read_json(index_path)
        pipeline_cls = cls._pipeline_class(index, index_path)

        for name in components:
            if name not in pipeline_cls.component_names and name not in NOT_LOADED:
                raise TypeError(
                    f"{pipeline_cls.__name__}.from_pretrained got an unknown component {name}=; "
                    f"its components are {list(pipeline_cls.component_names)}."
                )
        missing = [n for n in pipeline_cls.component_names if n not in index and n not in components]
        if missing:
            raise ValueError(
                f"{index_path} names no {missing}, which {pipeline_cls.__name__} needs "
                f"(found {sorted(k for k in index if not k.startswith('_'))}). Pass them as keyword arguments."
            )
        to_load = [n for n in pipeline_cls.component_names if n not in components]
        folder = os.path.dirname(index_path)
        if not os.path.isdir(path_or_repo_id) and bundled_path(path_or_repo_id) is None:
            folder = _download_components(path_or_repo_id, index, to_load, variant, use_safetensors, **find)

        parts = dict(components)
        for name in NOT_LOADED:
            parts.pop(name, None)
        for name in to_load:
            library_and_class = index[name]
            parts[name] = _load_component(folder, name, library_and_class, torch_dtype, variant, use_safetensors)

        skipped = [n for n in NOT_LOADED if index.get(n) and index[n][0] is not None and n not in components]
        if skipped:
            warnings.warn(
                f"{index_path} names a {' and a '.join(skipped)}: minidiff does not load them "
                "(no NSFW filter is applied to the images).",
                stacklevel=2,
            )
        return pipeline_cls(**parts)

    @classmethod
    def _pipeline_class(cls, index: dict, index_path: str) -> type:
        if cls is not DiffusionPipeline:
            # StableDiffusionImg2ImgPipeline.from_pretrained(a text-to-image folder) is fine: same parts.
            return cls
        name = index.get("_class_name")
        known = pipeline_classes()
        if name not in known:
            raise ValueError(
                f"{index_path} names the pipeline class {name!r}; minidiff has {sorted(known)}. "
                "Load it with one of those classes' from_pretrained, or check the folder."
            )
        return known[name]

    # --- device, dtype, progress bar -------------------------------------------------------------
    @property
    def components(self) -> dict:
        """{name: component}, so that `OtherPipeline(**pipe.components)` shares the loaded models."""
        return {name: getattr(self, name) for name in self.component_names}

    def models(self) -> list[torch.nn.Module]:
        return [c for c in self.components.values() if isinstance(c, torch.nn.Module)]

    def to(self, device: str | torch.device | torch.dtype | None = None, dtype: torch.dtype | None = None):
        """Move every model: `pipe.to("cuda")`, `pipe.to(torch.float16)`, `pipe.to("cuda", torch.float16)`.

        float16 and bfloat16 also run on the CPU: PyTorch 2.13 has CPU kernels for every layer used here
        in both. bfloat16 ran as fast as float32 there when measured; float16 convolutions are very slow
        (see `warn_if_slow`).
        """
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        for model in self.models():
            model.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        """Where the sampling runs: the UNet's device, or the GPU of enable_model_cpu_offload()."""
        if getattr(self, "_offload_device", None) is not None:
            return self._offload_device
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def warn_if_slow(self) -> None:
        """float16 runs on the CPU, so it is not refused, but a float16 convolution there took about 300x as
        long as in float32 when measured (PyTorch 2.13, a 128-channel 3x3 conv at 64x64, one thread)."""
        if self.device.type == "cpu" and self.dtype == torch.float16:
            warnings.warn("This pipeline runs in float16 on the CPU, where convolutions are hundreds of times "
                          "slower than in float32. Use pipe.to(torch.float32) (or torch.bfloat16) on the CPU, "
                          "or pipe.to('cuda').", stacklevel=3)

    def set_progress_bar_config(self, **kwargs) -> None:
        """Options for tqdm, e.g. `disable=True` to turn the progress bar off (as in diffusers)."""
        self._progress_bar_config = kwargs

    def progress_bar(self, iterable):
        return tqdm(iterable, **self._progress_bar_config)

    # --- fast paths (issue 7): each is one switch; the sampling code above and below stays the same --------
    def compile_unet(self, mode: str = "reduce-overhead", fullgraph: bool = True, **options) -> None:
        """`torch.compile` the UNet's forward (Inductor kernels; with mode="reduce-overhead" also CUDA graphs,
        which replay a whole UNet step as one launch). The first call compiles (one to two minutes for SD's
        UNet on a GPU) and a new image size or batch size compiles again. The UNet's code and keys do not change."""
        self.unet.compile(mode=mode, fullgraph=fullgraph, **options)

    def enable_channels_last(self) -> None:
        """The UNet's weights, and so its activations, in channels-last (NHWC) memory layout, the layout of
        cuDNN's fastest convolution kernels on tensor cores. Same results up to rounding."""
        self.unet.to(memory_format=torch.channels_last)

    def fuse_qkv_projections(self) -> None:
        """In every attention layer, one matmul for q, k, v (self-attention) and one for k, v (cross-attention);
        see `Attention.fuse_projections`. For inference: undo with `unfuse_qkv_projections()` before training."""
        for model in self.models():
            for module in model.modules():
                if isinstance(module, Attention):
                    module.fuse_projections()

    def unfuse_qkv_projections(self) -> None:
        for model in self.models():
            for module in model.modules():
                if isinstance(module, Attention):
                    module.unfuse_projections()

    def enable_vae_slicing(self) -> None:
        """Decode (and encode) the images of a batch one at a time: less memory for large batches, same images."""
        self._vae("enable_vae_slicing").enable_slicing()

    def disable_vae_slicing(self) -> None:
        self._vae("disable_vae_slicing").disable_slicing()

    def enable_vae_tiling(self) -> None:
        """Decode (and encode) images larger than 512x512 in overlapping tiles: the memory of one tile for
        any size; the seams are blended (see `AutoencoderKL.enable_tiling`)."""
        self._vae("enable_vae_tiling").enable_tiling()

    def disable_vae_tiling(self) -> None:
        self._vae("disable_vae_tiling").disable_tiling()

    def _vae(self, what: str):
        if not isinstance(getattr(self, "vae", None), AutoencoderKL):
            raise AttributeError(f"{type(self).__name__} has no VAE: {what}() is for the Stable Diffusion pipelines.")
        return self.vae

    def enable_model_cpu_offload(self, device: str | torch.device = "cuda") -> None:
        """Keep the models on the CPU and move each one to `device` only while it runs: the text encoder, then
        the UNet, then the VAE. The GPU holds one model at a time (SD v1 in fp16: the UNet's 1.7 GB instead of
        all 2.1 GB, plus activations), for a GPU with little memory; each call copies each model over once."""
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                "enable_model_cpu_offload() moves each model to the GPU while it runs, but PyTorch sees no CUDA GPU "
                "here. On a CPU-only machine leave it off: the models already run on the CPU."
            )
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())   # "cuda" -> "cuda:0", as parameters report it
        self.disable_model_cpu_offload()
        self._offload_device = device
        self._offload_hooks = []
        for model in self.models():
            model.to("cpu")
            # Before the model runs, and before any of its direct children: the VAE is used through
            # vae.decode() / vae.encode(), which call its children (post_quant_conv, decoder), never forward().
            for module in (model, *model.children()):
                hook = module.register_forward_pre_hook(lambda *_, model=model: self._move_for_offload(model))
                self._offload_hooks.append(hook)

    def disable_model_cpu_offload(self) -> None:
        """Remove the offload hooks; the models stay where they are (move them with `.to(...)`)."""
        for hook in getattr(self, "_offload_hooks", []):
            hook.remove()
        self._offload_hooks = []
        self._offload_device = None

    def _move_for_offload(self, model: torch.nn.Module) -> None:
        """`model` is about to run: every other model back to the CPU first, then `model` to the GPU."""
        if next(model.parameters()).device == self._offload_device:
            return
        for other in self.models():
            if other is not model and next(other.parameters()).device != torch.device("cpu"):
                other.to("cpu")
        model.to(self._offload_device)

    # --- per-step visibility ---------------------------------------------------------------------
    def record_step(self, i, t, sample, model_output, step_output, callback, intermediates) -> None:
        """Hand step i to `callback(i, t, latents, x0)` and store it in `intermediates` (either may be None)."""
        if callback is None and intermediates is None:
            return
        x0 = step_output.pred_original_sample
        if x0 is None:
            x0 = predict_x0(self.scheduler, sample, model_output, t)
        latents = step_output.prev_sample
        if callback is not None:
            callback(i, t, latents, x0)
        if intermediates is not None:
            intermediates.timesteps.append(t)
            intermediates.latents.append(latents.detach().clone())
            intermediates.x0.append(x0.detach().clone())


# --- loading one component ----------------------------------------------------------------------------
def _load_component(folder: str, name: str, library_and_class, torch_dtype, variant, use_safetensors):
    library, class_name = library_and_class
    # google/ddpm-cat-256 keeps its UNet and scheduler at the root of the repo, not in unet/ and scheduler/.
    subfolder = name if os.path.isdir(os.path.join(folder, name)) else None
    if name == "scheduler":
        if class_name not in SCHEDULER_CLASSES:
            raise ValueError(
                f"{folder}/{MODEL_INDEX_NAME} names the scheduler {class_name!r}; minidiff has "
                f"{sorted(SCHEDULER_CLASSES)}. Pass scheduler=OneOfThose.from_pretrained(folder, subfolder='scheduler')."
            )
        return SCHEDULER_CLASSES[class_name].from_pretrained(folder, subfolder=subfolder)

    if class_name in TRANSFORMERS_CLASSES:
        from transformers import CLIPTextModel, CLIPTokenizer

        path = os.path.join(folder, name)
        if class_name == "CLIPTokenizer":
            return CLIPTokenizer.from_pretrained(path)
        return CLIPTextModel.from_pretrained(path, dtype=torch_dtype or torch.float32, variant=variant,
                                            use_safetensors=use_safetensors).eval()
    if class_name not in MODEL_CLASSES:
        raise ValueError(
            f"{folder}/{MODEL_INDEX_NAME} names {name} = {library}.{class_name}; minidiff can load "
            f"{sorted([*MODEL_CLASSES, *TRANSFORMERS_CLASSES])}. Pass {name}= yourself."
        )
    return MODEL_CLASSES[class_name].from_pretrained(folder, subfolder=subfolder, torch_dtype=torch_dtype,
                                                     variant=variant, use_safetensors=use_safetensors)


def _download_components(repo_id, index, names, variant, use_safetensors, cache_dir, local_files_only) -> str:
    """Download only what `names` need from a hub repo (no safety checker: 1.2 GB saved); return the folder.

    Weights are taken as safetensors where the repo has them, else as the older .bin files.
    """
    from huggingface_hub import snapshot_download

    offline = bool(local_files_only) or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    suffix = f".{variant}" if variant else ""

    def weight_files(fmt):
        files = []
        for name in names:
            library, _ = index[name]
            if name in ("scheduler", "tokenizer"):
                continue
            base = "model" if library == "transformers" else "diffusion_pytorch_model"
            files += [f"{name}/{base}{suffix}.{fmt}", f"{base}{suffix}.{fmt}"]  # subfolder, or flat repo root
        return files

    patterns = [MODEL_INDEX_NAME, "config.json", "scheduler_config.json"]
    for name in names:
        patterns += [f"{name}/*.json", f"{name}/*.txt"]  # configs; the tokenizer's vocab and merges
    first = "bin" if use_safetensors is False else "safetensors"
    try:
        folder = snapshot_download(repo_id, allow_patterns=patterns + weight_files(first),
                                   cache_dir=cache_dir, local_files_only=offline)
        lacking = [n for n in names if n not in ("scheduler", "tokenizer") and not _has_weights(folder, n, first)]
        if lacking and use_safetensors is None:  # an older repo with .bin files only
            folder = snapshot_download(repo_id, allow_patterns=patterns + weight_files("bin"),
                                       cache_dir=cache_dir, local_files_only=offline)
    except OSError as e:
        raise OSError(f"Could not download the pipeline {repo_id} ({type(e).__name__}: {e}). {OFFLINE_HELP}") from e
    return folder


def _has_weights(folder: str, name: str, fmt: str) -> bool:
    where = os.path.join(folder, name) if os.path.isdir(os.path.join(folder, name)) else folder
    return any(f.endswith("." + fmt) for f in os.listdir(where))
