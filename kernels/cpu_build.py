"""Generated C for the CPU kernels (``kernels/cpu_matmul.py``, ``kernels/cpu_rowwise.py``,
``kernels/cpu_attention.py``), compiled once per source text with the system C compiler into the cache and loaded with
ctypes; ``Library`` builds one on first use and remembers a failed build.

The file name carries a digest of the source, the flags and the compiler, so a changed generator builds afresh, and
the build writes to a temporary name before an atomic rename, so a concurrent build never loads half a file.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_dir() -> Path:
    from flexdraft.assets import cache_dir as flexdraft_cache
    return flexdraft_cache() / "kernels"


def compile_library(stem: str, text: str, flags: list[str]) -> ctypes.CDLL:
    """``text`` compiled with ``flags`` into ``<cache>/kernels/<stem>-<digest>.so`` (unless already there), loaded.
    Raises RuntimeError when there is no compiler or it fails."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    digest = hashlib.sha256((text + " ".join(flags) + compiler).encode()).hexdigest()[:16]
    target = cache_dir() / f"{stem}-{digest}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            c_file, so_file = Path(tmp) / f"{stem}.c", Path(tmp) / f"{stem}.so"
            c_file.write_text(text)
            done = subprocess.run([compiler, *flags, str(c_file), "-o", str(so_file)], capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{compiler} failed: {done.stderr.strip().splitlines()[-1:] or done.returncode}")
            os.replace(so_file, target)
    return ctypes.CDLL(str(target))


class Library:
    """A compiled library, built on first use by ``build``; a failed build is remembered (``why_not``) rather than
    retried, so callers ask ``available()`` once per call and fall back to their torch references."""

    def __init__(self, build: Callable[[], ctypes.CDLL]):
        self.build, self.lib, self.why_not = build, None, None

    def get(self) -> ctypes.CDLL:
        """The library (built now if it has not been); raises RuntimeError or OSError where building fails."""
        if self.lib is None:
            self.lib = self.build()
        return self.lib

    def available(self) -> bool:
        if self.lib is None and self.why_not is None:
            try:
                self.get()
            except (RuntimeError, OSError) as exc:
                self.why_not = str(exc)
        return self.lib is not None
