"""Loading a pipeline folder: its components, each with the class that `model_index.json` names.

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

import torch

from .. import schedulers
from ..core.compat import transformers_dtype_kwargs
from ..core.hub import OFFLINE_HELP, bundled_path, is_offline, resolve_file
from ..models.controlnet import ControlNetModel
from ..models.t2i_adapter import T2IAdapter
from ..models.unet_2d import UNet2DModel
from ..models.unet_2d_condition import UNet2DConditionModel
from ..models.vae import AutoencoderKL

MODEL_INDEX_NAME = "model_index.json"

# Components that diffusers' Stable Diffusion folders name but minidiff does not load.
NOT_LOADED = ("safety_checker", "feature_extractor")
# Keywords of diffusers' from_pretrained for those parts, accepted and dropped as in the constructors
# (`safety_checker=None, requires_safety_checker=False` is what the tutorials write).
DROPPED_KEYWORDS = ("requires_safety_checker", "image_encoder")


# model_index.json class name -> the minidiff class that loads it. The transformers classes are
# imported only when a Stable Diffusion folder is loaded (importing transformers takes seconds).
MODEL_CLASSES = {
    "UNet2DModel": UNet2DModel,
    "UNet2DConditionModel": UNet2DConditionModel,
    "AutoencoderKL": AutoencoderKL,
    "ControlNetModel": ControlNetModel,   # the controlnet of StableDiffusionControlNetPipeline folders
    "T2IAdapter": T2IAdapter,             # the adapter of StableDiffusionAdapterPipeline folders
}
TRANSFORMERS_CLASSES = ("CLIPTextModel", "CLIPTokenizer", "DPTForDepthEstimation", "DPTImageProcessor",
                        "DPTFeatureExtractor")
# stable-diffusion-2-depth's model_index.json names DPTFeatureExtractor, which transformers 5 removed; its successor
# DPTImageProcessor reads the same preprocessor_config.json.
RENAMED_TRANSFORMERS_CLASSES = {"DPTFeatureExtractor": "DPTImageProcessor"}

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


def find_model_index(path_or_repo_id: str, cache_dir: str | None = None, local_files_only: bool | None = None) -> str:
    """The path of a pipeline's model_index.json (a local folder, a bundled name, or a hub repo, downloaded or
    cached), or an error that says which of those it is not, and whether this runs offline."""
    index_path = resolve_file(path_or_repo_id, MODEL_INDEX_NAME, required=False, cache_dir=cache_dir,
                              local_files_only=local_files_only)
    if index_path is not None:
        return index_path
    local = os.path.isdir(path_or_repo_id) or bundled_path(path_or_repo_id) is not None
    if not local and is_offline(local_files_only):
        # Offline, a file missing from the cache and a file missing from the repo look the same.
        raise OSError(
            f"There is no local folder {path_or_repo_id!r}, so it was looked up as a hub repo id, but this runs "
            f"offline (HF_HUB_OFFLINE=1 or local_files_only=True) and the cache"
            f"{' ' + cache_dir if cache_dir else ''} holds no {MODEL_INDEX_NAME} of {path_or_repo_id}: the "
            f"repo was never downloaded here (or is not a pipeline). {OFFLINE_HELP}"
        )
    raise FileNotFoundError(
        f"Expected a {MODEL_INDEX_NAME} in {path_or_repo_id}, found none: this is not a pipeline "
        "folder in the hub layout. To load one model, use e.g. "
        "minidiff.UNet2DModel.from_pretrained(path, subfolder='unet')."
    )


def load_component(folder: str, name: str, library_and_class, torch_dtype, variant, use_safetensors):
    if not (isinstance(library_and_class, (list, tuple)) and len(library_and_class) == 2):
        raise ValueError(f"{folder}/{MODEL_INDEX_NAME} gives {name} = {library_and_class!r}; expected a pair "
                         f"[library, class], e.g. [\"diffusers\", \"UNet2DConditionModel\"]. Fix the file, or pass "
                         f"{name}= yourself.")
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
        import transformers

        class_name = RENAMED_TRANSFORMERS_CLASSES.get(class_name, class_name)
        # Only the class this folder names: importing DPTImageProcessor makes transformers warn about torchvision,
        # which a pipeline without a depth model has no reason to print.
        component_cls = getattr(transformers, class_name)
        path = os.path.join(folder, name)
        # transformers' errors on a broken file (e.g. "incomplete metadata" for a truncated safetensors) do not
        # say which file or component they are about; this one does.
        try:
            if class_name in ("CLIPTokenizer", "DPTImageProcessor"):
                return component_cls.from_pretrained(path)
            model_cls = component_cls                                      # CLIPTextModel or DPTForDepthEstimation
            dtype = transformers_dtype_kwargs(torch_dtype or torch.float32)  # dtype= or torch_dtype=, by version
            return model_cls.from_pretrained(path, **dtype, variant=variant, use_safetensors=use_safetensors).eval()
        except Exception as e:
            files = sorted(os.listdir(path)) if os.path.isdir(path) else "no such folder"
            raise OSError(f"Could not load the {name} ({class_name}) from {path} (files: {files}): "
                          f"{type(e).__name__}: {e}. A file there is missing, truncated or corrupt: download or save "
                          "it again.") from e
    if class_name not in MODEL_CLASSES:
        raise ValueError(
            f"{folder}/{MODEL_INDEX_NAME} names {name} = {library}.{class_name}; minidiff can load "
            f"{sorted([*MODEL_CLASSES, *TRANSFORMERS_CLASSES])}. Pass {name}= yourself."
        )
    return MODEL_CLASSES[class_name].from_pretrained(folder, subfolder=subfolder, torch_dtype=torch_dtype,
                                                     variant=variant, use_safetensors=use_safetensors)


def download_components(repo_id, index, names, variant, use_safetensors, cache_dir, local_files_only) -> str:
    """Download only what `names` need from a hub repo (no safety checker: 1.2 GB saved); return the folder.

    Weights are taken as safetensors where the repo has them, else as the older .bin files.
    """
    from huggingface_hub import snapshot_download

    offline = is_offline(local_files_only)
    suffix = f".{variant}" if variant else ""

    def weight_files(fmt):
        files = []
        for name in names:
            library, _ = index[name]
            if name in ("scheduler", "tokenizer", "feature_extractor"):   # configs only, no weights
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
        lacking = [n for n in names if n not in ("scheduler", "tokenizer", "feature_extractor")
                   and not _has_weights(folder, n, first)]
        if lacking and use_safetensors is None:  # an older repo with .bin files only
            folder = snapshot_download(repo_id, allow_patterns=patterns + weight_files("bin"),
                                       cache_dir=cache_dir, local_files_only=offline)
    except OSError as e:
        raise OSError(f"Could not download the pipeline {repo_id} ({type(e).__name__}: {e}). {OFFLINE_HELP}") from e
    return folder


def _has_weights(folder: str, name: str, fmt: str) -> bool:
    where = os.path.join(folder, name) if os.path.isdir(os.path.join(folder, name)) else folder
    return any(f.endswith("." + fmt) for f in os.listdir(where))
