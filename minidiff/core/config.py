"""Checkpoint configs as small frozen dataclasses.

Every model and scheduler in minidiff has a `Config` dataclass whose fields are the keys of the
checkpoint's `config.json` (or `scheduler_config.json`). This module turns such a JSON dict into that
dataclass, and back.

Two policies, because models and schedulers are used differently:

- Models (`strict=True`): a key the dataclass does not know is refused, and so is a known key whose
  value minidiff does not implement (the dataclass lists the values it builds in `_supported_values`).
  Silently ignoring an option would build a different network than the checkpoint was trained with.
  A model config is a `ModelConfig`: it checks itself when it is made, so a config read from
  config.json, one given as a dict to `from_config` and one written by hand pass the same check.
- Schedulers (`strict=False`): the tutorials build one scheduler from another's config
  (`UniPCMultistepScheduler.from_config(pndm.config)`), so unknown keys are ignored, exactly as
  diffusers does, and the scheduler's own defaults apply where the file is silent.

Keys starting with `_` (`_class_name`, `_diffusers_version`, `_name_or_path`) are bookkeeping and are
always ignored.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, ClassVar


def _freeze(value: Any) -> Any:
    # JSON lists become tuples so the frozen dataclass is hashable and cannot be mutated in place.
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def refuse_unsupported(config: Any) -> None:
    """Refuse every field set to a value minidiff does not build (the class lists those it builds in
    `_supported_values`): the checkpoint format has options (FiLM time conditioning, Fourier time features,
    SDXL's extra embeddings, ...) that minidiff does not implement, and ignoring one would build the wrong thing."""
    supported = getattr(type(config), "_supported_values", {})
    bad = {key: getattr(config, key) for key, allowed in supported.items() if getattr(config, key) not in allowed}
    if bad:
        details = "; ".join(f"{key}={value!r} (minidiff supports {list(supported[key])})" for key, value in bad.items())
        raise ValueError(f"{type(config).__qualname__} does not implement {details}. Set each to a supported "
                         "value, or use diffusers for a checkpoint that needs it.")


class ModelConfig:
    """Base of the model configs (`UNet2DConfig`, `UNet2DConditionConfig`, `AutoencoderKLConfig`).

    A subclass is a frozen dataclass with the keys of the checkpoint's config.json as fields, the values it
    builds in `_supported_values`, and its own structural checks in `check()`. `__post_init__` runs both
    the moment a config is made, whichever way: read from config.json, given as a dict to `from_config`,
    or written by hand (`UNet2DConfig(act_fn="gelu")` raises, it does not build a SiLU network).
    """

    _supported_values: ClassVar[dict] = {}

    def __post_init__(self) -> None:
        # Lists -> tuples, so a config written by hand equals (and hashes like) the one read from JSON.
        # The dataclass is frozen: object.__setattr__ is how its own __post_init__ may set a field.
        for field in dataclasses.fields(self):
            object.__setattr__(self, field.name, _freeze(getattr(self, field.name)))
        refuse_unsupported(self)
        self.check()

    def check(self) -> None:
        """The model's own checks (block types, channel counts); raise ValueError naming the key."""
        raise NotImplementedError(f"{type(self).__qualname__} must define check().")


def check_block_types(config: Any, down_types: tuple[str, ...], up_types: tuple[str, ...]) -> None:
    """One down and one up block per entry of `block_out_channels`, each of a type minidiff builds."""
    name, n = type(config).__qualname__, len(config.block_out_channels)
    if len(config.down_block_types) != n or len(config.up_block_types) != n:
        raise ValueError(
            f"{name}: expected as many down_block_types and up_block_types as block_out_channels ({n}), "
            f"found {len(config.down_block_types)} and {len(config.up_block_types)}. Make the three lists "
            "the same length."
        )
    for key, found, known in (("down_block_types", config.down_block_types, down_types),
                              ("up_block_types", config.up_block_types, up_types)):
        unknown = list(dict.fromkeys(t for t in found if t not in known))   # unique, in order
        if unknown:
            raise ValueError(f"{name} does not implement the block type(s) {unknown} in {key}; minidiff supports "
                             f"{list(known)}. Use only those, or use diffusers for this checkpoint.")


def check_group_norm(config: Any) -> None:
    """`norm_num_groups` is a positive integer that divides every entry of `block_out_channels` (GroupNorm)."""
    name, groups = type(config).__qualname__, config.norm_num_groups
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{name}: expected norm_num_groups to be a positive integer, found {groups!r}.")
    bad = [c for c in config.block_out_channels if c % groups != 0]
    if bad:
        raise ValueError(f"{name}: block_out_channels {bad} are not divisible by norm_num_groups={groups}; "
                         "GroupNorm needs them to be. Change one or the other.")


def config_from_dict(config_class: type, config: dict, *, strict: bool, source: str = "config") -> Any:
    """Build `config_class` (a frozen dataclass) from a checkpoint config dict.

    `source` names where the dict came from (a file path), for error messages.
    """
    if not isinstance(config, dict):
        raise TypeError(f"{source}: expected a dict of config values, found {type(config).__name__}.")
    field_names = {f.name for f in dataclasses.fields(config_class)}
    values = {k: v for k, v in config.items() if not k.startswith("_")}

    unknown = sorted(k for k in values if k not in field_names)
    if unknown and strict:
        raise ValueError(
            f"{source}: {config_class.__qualname__} does not implement the config key(s) {unknown}. "
            f"Known keys: {sorted(field_names)}. Is this config for another model class?"
        )
    values = {k: _freeze(v) for k, v in values.items() if k in field_names}

    missing = [f.name for f in dataclasses.fields(config_class)
               if f.name not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{source}: the config lacks required key(s) {missing} for {config_class.__qualname__}.")
    try:
        config_obj = config_class(**values)          # a ModelConfig checks itself here, in __post_init__
        if not isinstance(config_obj, ModelConfig):  # a scheduler's config is checked here
            refuse_unsupported(config_obj)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e    # the same message, naming the file it came from
    validate = getattr(config_obj, "validate", None)
    if validate is not None:
        validate(source)
    return config_obj


def config_to_dict(config: Any, class_name: str) -> dict:
    """The JSON-able dict of a config dataclass, with `_class_name` as diffusers writes it."""
    out = {"_class_name": class_name}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def read_json(path: str) -> dict:
    """Read a JSON config file with an error that names the file when it is broken."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Expected a config file at {path}, found nothing there.")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}). Re-download or re-save the checkpoint.") from e
