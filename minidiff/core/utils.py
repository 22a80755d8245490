"""Small helpers shared by the models, schedulers and pipelines."""

from __future__ import annotations

import torch


def randn_tensor(shape, generator=None, device=None, dtype=None) -> torch.Tensor:
    """Gaussian noise of `shape`, drawn exactly as diffusers draws it, so equal seeds give equal images.

    - `generator` may be one `torch.Generator` or a list with one per batch element; with a list, element i
      is drawn from generator i alone, so image i of a batch equals the image made alone with generator i.
    - Noise is drawn on the generator's device and then moved: a CPU generator gives the same noise
      whether the model runs on the CPU or a GPU.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"Got a list of {len(generator)} generators for a batch of {shape[0]}; "
                             "pass one generator per image.")
        gen_device = generator[0].device
        parts = [torch.randn((1, *shape[1:]), generator=g, device=gen_device, dtype=dtype) for g in generator]
        return torch.cat(parts, dim=0).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


def parse_device(name: str) -> torch.device:
    """A `--device` value -> torch.device: "auto" (CUDA when PyTorch sees a GPU, else the CPU), "cpu", "cuda" or
    "cuda:N"; a ValueError naming what was expected for anything else, or for a GPU that is not there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N' ({e}).") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} was asked for, but PyTorch sees no CUDA GPU. Use --device cpu.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: PyTorch sees {torch.cuda.device_count()} GPU(s), numbered from 0. "
                         "Pass one of those, or --device cuda.")
    return device
