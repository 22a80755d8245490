"""Shared parity harness for the scheduler tests: run a minidiff scheduler and the diffusers scheduler of
the same name side by side, from the same config, with the same fake model and the same random numbers.

Typical use in a test:

    ours, theirs = build_pair(minidiff.DDIMScheduler, diffusers.DDIMScheduler, sd_pndm_config(reference_dir))
    assert_same_schedule(ours, theirs, num_inference_steps=25)
    errs = compare_sampling(ours, theirs, num_inference_steps=25)
    assert errs["final"] < 1e-5 and errs["x0"] < 1e-5

`diffusers` is the oracle here and only here: never import it under `minidiff/`.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import diffusers
import torch

import minidiff
from helpers import rel_err

# --- the real checkpoint configs -------------------------------------------------------------------
# The same values as the files in /work/shared/reference, spelled out so the tests still run without it.
# The files themselves are read through the `reference_dir` fixture (see tests/conftest.py).

# CompVis/stable-diffusion-v1-4/scheduler/scheduler_config.json
SD_PNDM_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

# google/ddpm-cat-256/scheduler_config.json
DDPM_CAT_CONFIG = {
    "_class_name": "DDPMScheduler",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "clip_sample": True,
    "num_train_timesteps": 1000,
    "trained_betas": None,
    "variance_type": "fixed_small",
}


def load_sd_scheduler_config(reference_dir: Path) -> dict:
    """The real SD v1-4 scheduler config (PNDM), read from the reference folder."""
    return json.loads((Path(reference_dir) / "stable-diffusion-v1-4" / "scheduler" / "scheduler_config.json").read_text())


def load_ddpm_cat_scheduler_config(reference_dir: Path) -> dict:
    """The real google/ddpm-cat-256 scheduler config (DDPM), read from the reference folder."""
    return json.loads((Path(reference_dir) / "ddpm-cat-256" / "scheduler_config.json").read_text())


def reference_configs(reference_dir: Path) -> dict[str, dict]:
    """{"sd": ..., "ddpm_cat": ...} read from the files; tests check they equal the dict spellings above."""
    return {"sd": load_sd_scheduler_config(reference_dir), "ddpm_cat": load_ddpm_cat_scheduler_config(reference_dir)}


# Every minidiff scheduler and the diffusers class of the same name (the oracle).
ALL_PAIRS = {
    "ddpm": (minidiff.DDPMScheduler, diffusers.DDPMScheduler),
    "ddim": (minidiff.DDIMScheduler, diffusers.DDIMScheduler),
    "ddim_inverse": (minidiff.DDIMInverseScheduler, diffusers.DDIMInverseScheduler),
    "pndm": (minidiff.PNDMScheduler, diffusers.PNDMScheduler),
    "euler": (minidiff.EulerDiscreteScheduler, diffusers.EulerDiscreteScheduler),
    "euler_a": (minidiff.EulerAncestralDiscreteScheduler, diffusers.EulerAncestralDiscreteScheduler),
    "dpm": (minidiff.DPMSolverMultistepScheduler, diffusers.DPMSolverMultistepScheduler),
    "unipc": (minidiff.UniPCMultistepScheduler, diffusers.UniPCMultistepScheduler),
}


# --- building both ----------------------------------------------------------------------------------
def build_pair(minidiff_cls, diffusers_cls, config: dict, **overrides):
    """(ours, theirs), both built with `from_config(config, **overrides)`: unknown keys are ignored by
    both, exactly as when the tutorials build one scheduler from another's config."""
    ours = minidiff_cls.from_config(dict(config), **overrides)
    theirs = diffusers_cls.from_config(dict(config), **overrides)
    return ours, theirs


def _as_float(x) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def assert_same_schedule(ours, theirs, num_inference_steps: int, check_dtype: bool = True) -> None:
    """After set_timesteps(n): identical `timesteps` (values, and dtype unless told not to) and
    `init_noise_sigma` (to float32 rounding)."""
    ours.set_timesteps(num_inference_steps)
    theirs.set_timesteps(num_inference_steps)
    a, b = ours.timesteps, theirs.timesteps
    assert isinstance(a, torch.Tensor), f"timesteps should be a tensor, found {type(a).__name__}"
    if check_dtype:
        assert a.dtype == b.dtype, f"timesteps dtype {a.dtype} != diffusers' {b.dtype}"
    assert a.shape == b.shape, f"{len(a)} timesteps != diffusers' {len(b)}: {a.tolist()[:8]} vs {b.tolist()[:8]}"
    assert torch.equal(a.to(b.dtype), b), f"timesteps differ: {a.tolist()[:8]}... vs {b.tolist()[:8]}..."
    s_ours, s_theirs = _as_float(ours.init_noise_sigma), _as_float(theirs.init_noise_sigma)
    assert math.isclose(s_ours, s_theirs, rel_tol=1e-6), f"init_noise_sigma {s_ours} != diffusers' {s_theirs}"


# --- the sampling loop ------------------------------------------------------------------------------
def fake_model(x: torch.Tensor, t) -> torch.Tensor:
    """A fixed, smooth stand-in for a denoiser: eps(x, t) = 0.1 x cos(t/100) + a fixed random tensor.

    It depends on both x and t, so a scheduler that feeds the wrong sample or timestep to the model
    (or scales the input wrongly) ends elsewhere."""
    g = torch.Generator().manual_seed(1234)
    fixed = torch.randn(x.shape, generator=g, dtype=torch.float32).to(x.device, x.dtype)
    return 0.1 * x * math.cos(_as_float(t) / 100.0) + fixed


def _accepts(fn, name: str) -> bool:
    params = inspect.signature(fn).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def sample_loop(scheduler, num_inference_steps: int, shape=(1, 3, 8, 8), seed: int = 0, model=fake_model,
                step_kwargs: dict | None = None, set_timesteps: bool = True):
    """The tutorial loop: x_T ~ N(0, init_noise_sigma²), then for t in timesteps: x = step(eps(x_in, t), t, x).

    The step noise is drawn from one torch.Generator seeded with `seed + 1`, passed to `step` where the
    scheduler takes one. Returns (final sample, [pred_original_sample per step or None])."""
    if set_timesteps:
        scheduler.set_timesteps(num_inference_steps)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    x = x * scheduler.init_noise_sigma
    step_generator = torch.Generator().manual_seed(seed + 1)
    kwargs = dict(step_kwargs or {})
    if _accepts(scheduler.step, "generator"):
        kwargs["generator"] = step_generator
    x0_preds = []
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        out = scheduler.step(model(x_in, t), t, x, **kwargs)
        x = out.prev_sample
        x0_preds.append(getattr(out, "pred_original_sample", None))
    return x, x0_preds


def compare_sampling(ours, theirs, num_inference_steps: int, shape=(1, 3, 8, 8), seed: int = 0,
                     step_kwargs: dict | None = None, model=fake_model) -> dict[str, float]:
    """Run the same loop through both; {"final": rel err of the final sample, "x0": the largest rel err
    of pred_original_sample over the steps where both define it (0.0 where neither does)}."""
    a, a_x0 = sample_loop(ours, num_inference_steps, shape, seed, model, step_kwargs)
    b, b_x0 = sample_loop(theirs, num_inference_steps, shape, seed, model, step_kwargs)
    assert torch.isfinite(a).all(), "minidiff's final sample has non-finite values"
    assert torch.isfinite(b).all(), "diffusers' final sample has non-finite values"
    x0_err = 0.0
    for p, q in zip(a_x0, b_x0):
        if p is not None and q is not None:
            x0_err = max(x0_err, rel_err(p, q))
    return {"final": rel_err(a, b), "x0": x0_err}


def compare_add_noise(ours, theirs, timesteps, shape=(4, 3, 8, 8), seed: int = 0) -> float:
    """Rel err of add_noise(x0, noise, timesteps) between the two; `timesteps` has one entry per image."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g)
    noise = torch.randn(shape, generator=g)
    a = ours.add_noise(x0.clone(), noise.clone(), timesteps.clone())
    b = theirs.add_noise(x0.clone(), noise.clone(), timesteps.clone())
    return rel_err(a, b)
