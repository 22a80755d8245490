"""The base class of every minidiff pipeline: loading a pipeline folder, `.to(device)`, the progress bar,
the fast-path and memory switches, and the per-step record.

`DiffusionPipeline.from_pretrained(folder)` reads the folder's `model_index.json` and returns the pipeline
class it names (`"_class_name": "StableDiffusionPipeline"`). That class is found among the subclasses of
`DiffusionPipeline`, i.e. every pipeline Python has imported: `import minidiff` imports all of them (the
pipelines here and the techniques of `minidiff/control`), so no table of pipelines has to be kept, and this
file imports nothing above it. The components are loaded by `loading.py`.
"""

from __future__ import annotations

import os
import warnings

import torch
from tqdm.auto import tqdm

from ..blocks.layers import Attention
from ..core.config import read_json
from ..core.hub import bundled_path
from ..models.modeling import DTYPE_NAMES, as_torch_dtype
from ..models.vae import AutoencoderKL
from .checks import FiniteWatch
from .loading import DROPPED_KEYWORDS, NOT_LOADED, download_components, find_model_index, load_component
from .outputs import record_step


def subclasses(cls: type) -> list[type]:
    """Every subclass of `cls` that Python has imported, at any depth."""
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *subclasses(sub)]
    return found


# --- the base class -----------------------------------------------------------------------------------
class DiffusionPipeline:
    """Base of minidiff's pipelines. `DiffusionPipeline.from_pretrained(folder)` returns the pipeline
    class that the folder's `model_index.json` names."""

    component_names: tuple[str, ...] = ()
    # The model_index.json class a component must have, where another one would load but fail at the first
    # call (DDPMPipeline.from_pretrained of a Stable Diffusion folder: its unet is a UNet2DConditionModel).
    component_classes: dict[str, str] = {}

    def __init__(self):
        self._progress_bar_config = {}
        self._offload_device = None   # set by enable_model_cpu_offload()
        self._finite_watch = None     # set at step 0 of every sampling loop by record_step()

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
        torch_dtype = as_torch_dtype(torch_dtype)   # before any file is read
        find = dict(cache_dir=cache_dir, local_files_only=local_files_only)
        index_path = find_model_index(path_or_repo_id, cache_dir, local_files_only)
        local = os.path.isdir(path_or_repo_id) or bundled_path(path_or_repo_id) is not None
        index = read_json(index_path)
        pipeline_cls = cls._pipeline_class(index, index_path)

        for name, value in components.items():
            if name not in pipeline_cls.component_names and name not in NOT_LOADED + DROPPED_KEYWORDS:
                # diffusers' loading options that minidiff does not take (revision=, dtype=, device_map=, ...) end
                # up here too: say which options there are, so that a typo or a diffusers habit is not a mystery.
                raise TypeError(
                    f"{pipeline_cls.__name__}.from_pretrained got an unknown component {name}=; "
                    f"its components are {list(pipeline_cls.component_names)}, and its options torch_dtype=, "
                    "variant=, use_safetensors=, cache_dir=, local_files_only=."
                    + (" (dtype= is diffusers' newer name for torch_dtype=.)" if name == "dtype" else "")
                )
            if name == "image_encoder" and value is not None and name not in pipeline_cls.component_names:
                raise TypeError(f"{pipeline_cls.__name__} has no image encoder (IP-Adapter is not part of minidiff); "
                                "image_encoder=None is accepted, as in diffusers.")
            if isinstance(value, type) and name != "scheduler":   # the scheduler's own message: its setter
                raise TypeError(
                    f"{name}= got the class {value.__name__} itself; pass a loaded component, e.g. "
                    f"{value.__name__}.from_pretrained({path_or_repo_id!r}, subfolder={name!r})."
                )
        missing = [n for n in pipeline_cls.component_names if n not in index and n not in components]
        if missing:
            raise ValueError(
                f"{index_path} names no {missing}, which {pipeline_cls.__name__} needs "
                f"(found {sorted(k for k in index if not k.startswith('_'))}). Pass them as keyword arguments."
            )
        to_load = [n for n in pipeline_cls.component_names if n not in components]
        pipeline_cls.check_component_classes(index, index_path, to_load)
        folder = os.path.dirname(index_path)
        if not local:
            folder = download_components(path_or_repo_id, index, to_load, variant, use_safetensors, **find)

        # The safety checker's parts are dropped, unless the pipeline has a component of that name itself
        # (Depth2Image's feature_extractor is its depth estimator's image processor).
        not_loaded = [n for n in NOT_LOADED if n not in pipeline_cls.component_names]
        parts = dict(components)
        for name in [*not_loaded, *DROPPED_KEYWORDS]:
            if name not in pipeline_cls.component_names:
                parts.pop(name, None)
        for name in to_load:
            library_and_class = index[name]
            parts[name] = load_component(folder, name, library_and_class, torch_dtype, variant, use_safetensors)

        skipped = [n for n in not_loaded if index.get(n) and index[n][0] is not None and n not in components]
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
        known = {sub.__name__: sub for sub in subclasses(DiffusionPipeline) if sub.__module__.startswith("minidiff.")}
        if name not in known:
            raise ValueError(
                f"{index_path} names the pipeline class {name!r}; minidiff has {sorted(known)}. "
                "Load it with one of those classes' from_pretrained, or check the folder."
            )
        return known[name]

    def check_component_types(self, **parts) -> None:
        """In the constructor: refuse a component of the wrong kind (a UNet2DConditionModel in a DDPMPipeline,
        the VAE passed as the unet) here, not as a TypeError deep inside the first call. By class name, so that
        diffusers' model of the same class is accepted too; None is left to the caller."""
        for name, part in parts.items():
            expected = self.component_classes.get(name)
            if expected is None or part is None:
                continue
            if isinstance(part, type):
                raise TypeError(f"{name} must be a loaded {expected}; found the class {part.__name__} itself. Load one, "
                                f"e.g. {part.__name__}.from_pretrained(folder, subfolder={name!r}).")
            if expected not in [c.__name__ for c in type(part).__mro__]:
                raise TypeError(f"{type(self).__name__}'s {name} must be an instance of {expected}; found "
                                f"{type(part).__name__}. "
                                f"Check the order of the arguments, or pass them by name "
                                f"({', '.join(f'{n}=...' for n in self.component_names)}).")

    @classmethod
    def check_component_classes(cls, index: dict, index_path: str, names: list[str]) -> None:
        """Refuse a folder whose components this class cannot run, before anything is loaded."""
        for name in names:
            expected = cls.component_classes.get(name)
            found = index[name][1] if isinstance(index[name], (list, tuple)) and len(index[name]) == 2 else None
            if expected is not None and found is not None and found != expected:   # a malformed entry: load_component
                folder_class = index.get("_class_name")
                load = "minidiff.DiffusionPipeline.from_pretrained, which picks the folder's class"
                if folder_class:
                    load = f"minidiff.{folder_class}.from_pretrained (or {load})"
                raise ValueError(
                    f"{index_path} is a {folder_class or 'pipeline'} folder: its {name} is a {found}, but "
                    f"{cls.__name__} needs a {expected}. Load it with {load}, or pick a folder made for "
                    f"{cls.__name__}."
                )

    # --- components ------------------------------------------------------------------------------
    @property
    def scheduler(self):
        return self._scheduler

    @scheduler.setter
    def scheduler(self, scheduler) -> None:
        # A property, so that `pipe.scheduler = DDIMScheduler` (the class) fails here, not at the first call
        # with "set_timesteps() missing 1 required positional argument".
        if isinstance(scheduler, type):
            raise TypeError(
                f"scheduler must be a scheduler instance; found the class {scheduler.__name__} itself. Pass an "
                f"instance, e.g. {scheduler.__name__}.from_config(pipe.scheduler.config)."
            )
        if not (callable(getattr(scheduler, "set_timesteps", None)) and callable(getattr(scheduler, "step", None))):
            raise TypeError(
                f"scheduler must be a scheduler with set_timesteps() and step(), e.g. "
                f"minidiff.DDIMScheduler.from_config(pipe.scheduler.config); found {type(scheduler).__name__}."
            )
        self._scheduler = scheduler

    @property
    def components(self) -> dict:
        """{name: component}, so that `OtherPipeline(**pipe.components)` shares the loaded models."""
        return {name: getattr(self, name) for name in self.component_names}

    def models(self) -> list[torch.nn.Module]:
        return [c for c in self.components.values() if isinstance(c, torch.nn.Module)]

    def to(self, device: str | torch.device | torch.dtype | None = None, dtype: torch.dtype | None = None):
        """Move every model: `pipe.to("cuda")`, `pipe.to(torch.float16)`, `pipe.to("cuda", torch.float16)`.
        A dtype may also be named as in from_pretrained's torch_dtype: `pipe.to("bfloat16")`.

        float16 and bfloat16 also run on the CPU: PyTorch 2.13 has CPU kernels for every layer used here
        in both. bfloat16 ran as fast as float32 there when measured; float16 convolutions are very slow
        (see `warn_if_slow`).
        """
        # "float16" would otherwise reach torch as a device string ("Invalid device string: 'float16'").
        if isinstance(device, torch.dtype) or isinstance(device, str) and device.removeprefix("torch.") in DTYPE_NAMES:
            device, dtype = None, device
        dtype = as_torch_dtype(dtype)
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

    # --- per-step visibility and the non-finite check ----------------------------------------------
    def record_step(self, i, t, sample, model_output, step_output, callback, intermediates) -> None:
        """Check step i for NaN / inf (see checks.FiniteWatch), then hand it to `callback(i, t, latents, x0)` and
        store it in `intermediates` (see outputs.py). Every sampling loop calls this after each step."""
        if i == 0 or getattr(self, "_finite_watch", None) is None:   # a new loop
            self._finite_watch = FiniteWatch(sample.device)
            self._finite_watch.check(sample, i, t, "start")
        self._finite_watch.check(model_output, i, t, "unet")
        self._finite_watch.check(step_output.prev_sample, i, t, "scheduler")
        record_step(self.scheduler, i, t, sample, model_output, step_output, callback, intermediates)

    def check_steps_finite(self) -> None:
        """After a sampling loop: raise for the first non-finite step, where the checks waited (on a GPU)."""
        if getattr(self, "_finite_watch", None) is not None:
            self._finite_watch.raise_if_any()
