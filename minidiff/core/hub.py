"""Finding checkpoint files: a local folder, a bundled tiny checkpoint, or a Hugging Face hub repo.

A name is resolved in this order:
1. an existing local folder (`"./my-model"`),
2. a checkpoint bundled with minidiff (`"tiny-ddpm"`, `"tiny-sd"`; see `minidiff.checkpoints`),
3. a hub repo id (`"google/ddpm-cat-256"`), fetched with `huggingface_hub` into the standard HF cache.
   Only the files that are needed are downloaded; `HF_HUB_OFFLINE=1` or `local_files_only=True` use
   the cache alone.

A name that looks like a local path (`"./my-modle"`, `"runs/unet/final"`, `"outputs/unet"` where `outputs/`
exists) or like a bundled name with a typo (`"tiny_sd"`) is never sent to the hub: a failed hub lookup
retries for about 30 s before it gives up, and its error would talk about the network, not the typo.
"""

from __future__ import annotations

import difflib
import importlib
import os

BUNDLED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints")  # minidiff/checkpoints
BUNDLED_NAMES = ("tiny-ddpm", "tiny-sd")
BUNDLED_NAMES += ("tiny-controlnet-mask", "tiny-t2i-adapter-mask")  # for tiny-sd: the object drawn in a mask
BUNDLED_NAMES += ("tiny-instruct-pix2pix", "tiny-depth2img")         # tiny-sd fine-tuned with 8 / 5 input channels

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


def is_offline(local_files_only: bool | None = None) -> bool:
    """True when the hub must not be asked: local_files_only=True or HF_HUB_OFFLINE=1 (as huggingface_hub reads it)."""
    return bool(local_files_only) or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _is_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def not_found_message(name: str) -> str | None:
    """Why `name` (no existing folder, no bundled name) is not sent to the hub, or None when it may be a repo id.

    A local-looking path: it starts with ./ ../ / ~, has two or more separators, or its first part is an
    existing folder ("outputs/unet" beside an outputs/ folder). A name without "/" cannot be a repo id.
    """
    if os.path.isfile(os.path.expanduser(name)):
        return (f"{name!r} is a file, but from_pretrained reads a folder in the hub layout (config.json and "
                "diffusion_pytorch_model.safetensors, or a pipeline's model_index.json and subfolders): pass the folder "
                "that holds it. For one original Stable Diffusion checkpoint file (.safetensors / .ckpt), use "
                "minidiff.StableDiffusionPipeline.from_single_file.")
    head = name.split("/")[0]
    local = (name.startswith((".", "/", "~")) or name.count("/") >= 2 or os.sep != "/" and os.sep in name
             or ("/" in name and os.path.isdir(head)))
    if _is_repo_id(name) and not local:
        return None
    message = (f"{name!r} is neither an existing folder, a bundled checkpoint {list(BUNDLED_NAMES)}, nor a hub repo "
               "id of the form 'owner/name'")
    close = difflib.get_close_matches(name.lower().replace("_", "-"), BUNDLED_NAMES, n=1, cutoff=0.75)
    if close:
        return f"{message}. Did you mean the bundled checkpoint {close[0]!r}?"
    if not local:
        return f"{message}. Check the spelling of the folder, or pass a hub id like 'google/ddpm-cat-256'."
    # The deepest parent folder that exists, and what it holds, points at the typo.
    path = os.path.abspath(os.path.expanduser(name))
    parent = os.path.dirname(path)
    while not os.path.isdir(parent):
        parent = os.path.dirname(parent)
    entries = sorted(os.listdir(parent))
    shown = ", ".join(entries[:20]) + (f", ... ({len(entries)} in all)" if len(entries) > 20 else "")
    return (f"{message}: it looks like a local path, so it was not looked up on the hub. There is no {path}; its "
            f"closest existing parent {parent} holds [{shown}]. Check the path.")


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
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"Expected a folder path, a bundled checkpoint name {list(BUNDLED_NAMES)} or a hub repo id "
                        f"'owner/name'; found {type(name_or_path).__name__} {name_or_path!r}.")
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

    message = not_found_message(name_or_path)
    if message is not None:
        raise FileNotFoundError(message)
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

    offline = is_offline(local_files_only)
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
