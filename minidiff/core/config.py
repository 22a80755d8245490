"""Checkpoint configs as small frozen dataclasses.

Every model and scheduler in minidiff has a `Config` dataclass whose fields are the keys of the
checkpoint's `config.json` (or `scheduler_config.json`). This module turns such a JSON dict into that
dataclass, and back.

Two policies, because models and schedulers are used differently:

- Models (`strict=True`): a key the dataclass does not know is refused, and so is a known key whose
  value minidiff does not implement (the dataclass lists those in `_unsupported`). Silently ignoring
  an option would build a different network than the checkpoint was trained with.
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
from typing import Any


def _freeze(value: Any) -> Any:
    # JSON lists become tuples so the frozen dataclass is hashable and cannot be mutated in place.
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


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

    # Options that exist in the checkpoint format but that minidiff does not implement: each is
    # accepted only at the value minidiff supports.
    supported = getattr(config_class, "_supported_values", {})
    bad = {k: values[k] for k, allowed in supported.items() if k in values and values[k] not in allowed}
    if bad and strict:
        details = "; ".join(f"{k}={v!r} (minidiff supports {list(supported[k])})" for k, v in bad.items())
        raise ValueError(f"{source}: {config_class.__qualname__} does not implement {details}.")

    missing = [f.name for f in dataclasses.fields(config_class)
               if f.name not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{source}: the config lacks required key(s) {missing} for {config_class.__qualname__}.")
    config_obj = config_class(**values)
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
