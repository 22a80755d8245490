"""Finding checkpoint files: a local folder, a bundled tiny checkpoint, or a Hugging Face hub repo.

A name is resolved in this order:
1. an existing local folder (`"./my-model"`),
2. a checkpoint bundled with minidiff (`"tiny-ddpm"`, `"tiny-sd"`; see `minidiff.checkpoints`),
3. a hub repo id (`"google/ddpm-cat-256"`), fetched with `huggingface_hub` into the standard HF cache.
   Only the files that are needed are downloaded; `HF_HUB_OFFLINE=1` or `local_files_only=True` use
   the cache alone.
"""

from __future__ import annotations

import importlib
import os

BUNDLED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints")  # minidiff/checkpoints
BUNDLED_NAMES = ("tiny-ddpm", "tiny-sd")

OFFLINE_HELP = (
    "To work offline, pass a local folder in the hub layout, use a bundled checkpoint "
    f"({', '.join(repr(n) for n in BUNDLED_NAMES)}), or download the repo once where the hub is reachable "
    "and set HF_HUB_OFFLINE=1 to use the cached copy."
)


def bundled_path(name: str) -> str | None:
    """The folder of a bundled checkpoint (`"tiny-sd"`), or None when `name` is not one."""
    if name in BUNDLED_NAMES:
        path = os.path.join(BUNDLED_DIR, name)
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"{name!r} is a bundled minidiff checkpoint but {path} does not exist: this install of "
                "minidiff was built without its checkpoints. Reinstall minidiff (pip install -e .)."
            )
        return path
    return None


def _is_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def resolve_file(
    name_or_path: str,
    filename: str,
    subfolder: str | None = None,
    cache_dir: str | None = None,
    local_files_only: bool | None = None,
    required: bool = True,
) -> str | None:
    """The local path of `subfolder/filename` inside a folder, bundled checkpoint or hub repo.

    Returns None when the file does not exist and `required` is False.
    """
    name_or_path = os.fspath(name_or_path)
    folder = name_or_path if os.path.isdir(name_or_path) else bundled_path(name_or_path)
    if folder is not None:
        if subfolder:
            folder = os.path.join(folder, subfolder)
            if not os.path.isdir(folder):
                present = sorted(os.listdir(os.path.dirname(folder)))
                raise FileNotFoundError(
                    f"Expected a subfolder {subfolder!r} in {os.path.dirname(folder)}, found only {present}. "
                    "Check the subfolder= argument."
                )
        path = os.path.join(folder, filename)
        if os.path.isfile(path):
            return path
        if not required:
            return None
        raise FileNotFoundError(
            f"Expected {filename} in {folder}, found {sorted(os.listdir(folder))}. "
            "Is this the right folder (or subfolder=) for this model?"
        )

    if not _is_repo_id(name_or_path):
        raise FileNotFoundError(
            f"{name_or_path!r} is neither an existing folder, a bundled checkpoint {list(BUNDLED_NAMES)}, "
            "nor a hub repo id of the form 'owner/name'."
        )
    return _hub_download(name_or_path, filename, subfolder, cache_dir, local_files_only, required)


def _network_errors() -> tuple[type[BaseException], ...]:
    """OSError, plus the transport errors of the HTTP client huggingface_hub uses (httpx's are not OSErrors)."""
    errors = [OSError]
    for client in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(client).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _hub_download(repo_id, filename, subfolder, cache_dir, local_files_only, required):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    offline = bool(local_files_only) or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    where = f"{repo_id}/{subfolder + '/' if subfolder else ''}{filename}"
    not_local = f"There is no local folder {repo_id!r}, so it was looked up as a hub repo id. "
    try:
        return hf_hub_download(repo_id, filename, subfolder=subfolder, cache_dir=cache_dir,
                               local_files_only=offline)
    except LocalEntryNotFoundError as e:  # before EntryNotFoundError, its base class
        if not required and offline:
            return None
        reason = ("working offline (HF_HUB_OFFLINE or local_files_only) and the file is not in the cache"
                  if offline else "the hub could not be reached and the file is not in the cache")
        raise OSError(f"{not_local}Could not get {where}: {reason}. {OFFLINE_HELP}") from e
    except EntryNotFoundError:
        if not required:
            return None
        raise FileNotFoundError(f"The hub repo {repo_id} has no file {where}. Check subfolder= and the repo id.")
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(f"{not_local}The hub has no repo {repo_id!r} (or it is private). "
                                "Check the id or the path.") from e
    except _network_errors() as e:  # connection errors, timeouts
        raise OSError(f"{not_local}Could not get {where}: the hub could not be reached ({type(e).__name__}: {e}). "
                      f"{OFFLINE_HELP}") from e
