"""Per-device store of tuned launch configurations: ``autotune/configs/<device-name-slug>.json``.

A store records where it was measured (device, triton/torch/CUDA versions, git commit, command) beside its entries:

    {"schema": 1, "device": "NVIDIA H200", "versions": {"triton": ..., "torch": ..., "cuda": ...},
     "git_commit": ..., "created": ..., "command": ...,
     "kernels": {"block_attention": {"d128-t1-b64-bfloat16": {"config": {...}, "us": 9.1, "default_us": 12.4}}}}

Keys are ``config_key(dim, tokens, batch, dtype)``: a size (head dim for attention, hidden size for the draft head,
vocabulary for verification), the query tokens per sequence (or rows) and the batch, both bucketed to powers of two,
and the dtype. ``lookup`` returns the default config under the interpreter, without CUDA, when the device has no
store, when the store was written by another triton version (configs can stop fitting in shared memory), or when
the key is missing.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import torch

from kernels.backend import interpreting

SCHEMA = 1
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
_ENV_PATH = "FLEXDRAFT_AUTOTUNE_STORE"   # optional: a store file to use instead of the per-device default

_cache: dict[str, dict] = {}            # path -> loaded store ({} when absent or rejected)
_path_override: Path | None = None


# ---- keys ------------------------------------------------------------------------------------------------------
def bucket(n: int) -> int:
    """Smallest power of two >= n (n <= 1 gives 1)."""
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def config_key(dim: int, tokens: int, batch: int, dtype: torch.dtype) -> str:
    return f"d{int(dim)}-t{bucket(tokens)}-b{bucket(batch)}-{dtype_name(dtype)}"


# ---- where the store lives ---------------------------------------------------------------------------------------
def device_slug(name: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown-device"


def current_device_name() -> str | None:
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(torch.cuda.current_device())


def store_path(device_name: str | None = None) -> Path | None:
    """The store file in use: ``set_store_path``, then $FLEXDRAFT_AUTOTUNE_STORE, then the per-device default."""
    if _path_override is not None:
        return _path_override
    if os.environ.get(_ENV_PATH):
        return Path(os.environ[_ENV_PATH])
    name = device_name or current_device_name()
    return None if name is None else CONFIG_DIR / f"{device_slug(name)}.json"


def set_store_path(path: str | Path | None) -> None:
    """Use the store at ``path`` (None: back to the default) and forget what was loaded."""
    global _path_override
    _path_override = None if path is None else Path(path)
    _cache.clear()


def clear_cache() -> None:
    _cache.clear()


# ---- provenance --------------------------------------------------------------------------------------------------
def versions() -> dict:
    import triton
    return {"triton": triton.__version__, "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": sys.version.split()[0]}


def git_commit() -> str:
    """HEAD, with -dirty for uncommitted changes; $FLEXDRAFT_GIT_COMMIT where set (the lent GPU machine's .git is a
    copy from the session's start, so its HEAD is not what runs there: the command names the commit)."""
    if os.environ.get("FLEXDRAFT_GIT_COMMIT"):
        return os.environ["FLEXDRAFT_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=10)
        commit = out.stdout.strip() if out.returncode == 0 else "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10)
        return commit + ("-dirty" if out.returncode == 0 and dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ---- read and write ----------------------------------------------------------------------------------------------
def read_store(path: str | Path) -> dict:
    """The store at ``path`` as a dict; {} when the file does not exist. Raises ValueError on a malformed file."""
    path = Path(path)
    if not path.exists():
        return {}
    with open(path) as f:
        store = json.load(f)
    if not isinstance(store, dict) or store.get("schema") != SCHEMA or not isinstance(store.get("kernels"), dict):
        raise ValueError(f"{path}: not an autotune store of schema {SCHEMA}")
    return store


def write_store(path: str | Path, entries: dict, *, device: str, command: str = "", merge: bool = True) -> Path:
    """Write ``entries`` ({kernel: {key: {"config": {...}, ...}}}) with provenance; merged over the entries already
    in the file when it was measured on the same device with the same triton version."""
    path = Path(path)
    kernels = {}
    if merge:
        try:
            old = read_store(path)
        except (ValueError, json.JSONDecodeError):
            old = {}
        if old.get("device") == device and old.get("versions", {}).get("triton") == versions()["triton"]:
            kernels = old["kernels"]
    for kernel, by_key in entries.items():
        kernels.setdefault(kernel, {}).update(by_key)
    store = {"schema": SCHEMA, "device": device, "versions": versions(), "git_commit": git_commit(),
             "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "command": command or " ".join(sys.argv), "kernels": kernels}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(store, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    _cache.pop(str(path), None)
    return path


def _usable_store(path: Path, device: str | None) -> dict:
    """The store at ``path`` if it was measured here (same device name and triton version), else {}."""
    key = str(path)
    if key in _cache:
        return _cache[key]
    try:
        store = read_store(path)
    except (ValueError, json.JSONDecodeError) as err:
        warnings.warn(f"ignoring autotune store: {err}")
        store = {}
    if store:
        triton_now = versions()["triton"]
        if device is not None and store.get("device") != device:
            warnings.warn(f"ignoring autotune store {path}: measured on {store.get('device')}, this is {device}")
            store = {}
        elif store.get("versions", {}).get("triton") != triton_now:
            warnings.warn(f"ignoring autotune store {path}: triton {store.get('versions', {}).get('triton')} "
                          f"there, {triton_now} here; rerun `flexdraft autotune`")
            store = {}
    _cache[key] = store
    return store


def lookup(kernel: str, key: str, default: dict, device: torch.device | None = None) -> dict:
    """The tuned config for ``kernel`` at ``key``, else ``default`` (a copy either way). Never tuned configs under
    the interpreter or off CUDA: the defaults are the only configs those paths run."""
    if interpreting() or not torch.cuda.is_available() or (device is not None and device.type != "cuda"):
        return dict(default)
    path = store_path()
    if path is None:
        return dict(default)
    entry = _usable_store(path, current_device_name()).get("kernels", {}).get(kernel, {}).get(key)
    if not entry:
        return dict(default)
    return {**default, **entry["config"]}
