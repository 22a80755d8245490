"""A scheduler's config: a frozen dataclass that is also a read-only dict, as diffusers' `scheduler.config` is.

Every scheduler's `Config` (DDIMSchedulerConfig, ...) subclasses `SchedulerConfig`. Attribute access
(`scheduler.config.prediction_type`) is the dataclass's; the dict is there because diffusers' `from_config`
takes only a dict, so that a tutorial or a teacher's code can mix the two libraries:

    diffusers.DDIMScheduler.from_config(minidiff_scheduler.config)     # minidiff -> diffusers
    minidiff.DDIMScheduler.from_config(diffusers_scheduler.config)     # diffusers -> minidiff

The dict holds what diffusers' FrozenDict holds: `_class_name`, every field, the given keys this scheduler
ignores (SD's `clip_sample` on PNDM: they reach the next scheduler built from this config) and
`_use_default_values`, the fields left at their defaults, which `from_config` does not pass on
(see `given_values`).

Also here: `trained_betas` in any array form becomes a tuple of floats (hashable, JSON-able), and
`given_values` refuses a config that is clearly a model's (`DDIMScheduler.from_config(pipe.unet.config)`
would otherwise build default betas without a word).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

# Keys every scheduler config has (the β schedule of Ho et al. 2020), and keys only model configs have.
SCHEDULER_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                  "prediction_type", "timestep_spacing", "steps_offset")
MODEL_KEYS = ("block_out_channels", "down_block_types", "up_block_types", "layers_per_block", "latent_channels",
              "cross_attention_dim", "in_channels", "out_channels", "hidden_size", "vocab_size", "architectures")


def trained_betas_tuple(betas) -> tuple[float, ...]:
    """`trained_betas` given as a list, tuple, numpy array or tensor -> a tuple of Python floats, each
    β_t in (0, 1) as a variance schedule must be (Ho et al. 2020, sec. 2). The length is checked against
    num_train_timesteps in `make_betas`."""
    if isinstance(betas, torch.Tensor):
        betas = betas.detach().cpu().double().numpy()
    array = np.asarray(betas)
    if array.ndim != 1 or array.dtype.kind not in "fiu":
        raise ValueError(f"trained_betas must be a 1-D sequence of numbers (β_1..β_T); found {type(betas).__name__} "
                         f"of dtype {array.dtype} and shape {tuple(array.shape)}. Pass a list, array or tensor of floats.")
    bad = np.flatnonzero(~((array > 0) & (array < 1)))
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"trained_betas must each lie in (0, 1) (β_t is a variance, and α_t = 1 - β_t must stay "
                         f"positive); found {array[i]!r} at index {i}.")
    return tuple(float(b) for b in array.astype(np.float64))


class SchedulerConfig(dict):
    """Base of every scheduler's frozen config dataclass; see the module docstring for why it is a dict."""

    def __post_init__(self) -> None:
        # The dataclass is frozen: object.__setattr__ is how its own __post_init__ may set a field.
        if getattr(self, "trained_betas", None) is not None:
            object.__setattr__(self, "trained_betas", trained_betas_tuple(self.trained_betas))
        check_numbers(self)
        self.set_given(None)

    def set_given(self, given: dict | None) -> None:
        """Record which values were given explicitly (None: all of them) and refill the dict to match."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values = {"_class_name": type(self).__name__.removesuffix("Config"), **fields}
        if given is not None:
            values.update({k: v for k, v in given.items() if k not in fields and not k.startswith("_")})
            defaults = [k for k in fields if k not in given]
            if defaults:   # as diffusers: the key is there only when some field was left at its default
                values["_use_default_values"] = defaults
        dict.clear(self)
        dict.update(self, values)

    def refuse_change(self, *args, **kwargs):
        raise TypeError(f"A scheduler's config is frozen ({type(self).__name__}). Build a new scheduler instead: "
                        "SchedulerClass.from_config(scheduler.config, key=value).")

    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = refuse_change

    def __reduce__(self):
        # copy, deepcopy and pickle rebuild the config through __init__: their default, item by item into
        # the dict, would be refused above
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return rebuild_config, (type(self), fields, given_values(self))


def rebuild_config(config_class: type, fields: dict, given: dict) -> SchedulerConfig:
    config = config_class(**fields)
    config.set_given(given)
    return config


def check_numbers(config) -> None:
    """The numbers every scheduler config shares, checked before any schedule is computed."""
    name = type(config).__name__
    T = config.num_train_timesteps
    if isinstance(T, bool) or not isinstance(T, int) or T < 2:
        raise ValueError(f"{name}: num_train_timesteps must be an int >= 2 (the T of training), found {T!r}.")
    offset = getattr(config, "steps_offset", 0)
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"{name}: steps_offset must be an int >= 0 (SD v1 uses 1), found {offset!r}.")
    if config.trained_betas is None and config.beta_schedule in ("linear", "scaled_linear"):
        start, end = config.beta_start, config.beta_end
        numbers = all(isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) for b in (start, end))
        if not numbers or not 0 < start <= end < 1:
            raise ValueError(f"{name}: a {config.beta_schedule} schedule needs 0 < beta_start <= beta_end < 1, "
                             f"found beta_start={start!r}, beta_end={end!r} (SD v1: 0.00085 and 0.012).")


def given_values(config) -> dict:
    """The values a config states explicitly: a dict (a `scheduler_config.json`, or a diffusers scheduler's
    `.config`, whose `_use_default_values` lists the keys it left at defaults), or a minidiff scheduler's
    `.config` (a dict of the same form). A model's config is refused (see `refuse_model_config`)."""
    refuse_model_config(config)
    defaults = set(config.get("_use_default_values", ()))
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in defaults}


def refuse_model_config(config) -> None:
    """Raise for anything but a scheduler's config: a model's config (minidiff's dataclass, diffusers' dict or a
    config.json), a pipeline's model_index.json, or not a config at all."""
    if isinstance(config, dict):
        class_name = config.get("_class_name")
        if isinstance(class_name, str) and not class_name.endswith("Scheduler"):
            found = f"{'an' if class_name[:1] in 'AEIOU' else 'a'} {class_name} config"
        elif any(k in config for k in MODEL_KEYS) and not any(k in config for k in SCHEDULER_KEYS):
            found = f"a model's config (it has {[k for k in MODEL_KEYS if k in config][:3]} and no scheduler key)"
        else:
            return
    elif dataclasses.is_dataclass(config) and not isinstance(config, type):
        found = f"a {type(config).__name__} (a model's config)"
    else:
        raise TypeError(f"from_config expects a scheduler's config (a dict such as scheduler_config.json, or "
                        f"scheduler.config), found {type(config).__name__}.")
    raise ValueError(f"from_config expects a scheduler's config, and this is {found}; pass pipe.scheduler.config, or "
                     "load one with SchedulerClass.from_pretrained(folder, subfolder='scheduler').")
