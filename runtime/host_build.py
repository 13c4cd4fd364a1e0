"""Shared libraries built at first use with the host compiler and cached on disk.

Why one module: the emulator (C++, the CUDA kernels' own sources) and the host kernels (C)
are both compiled on the user's machine, keyed by their sources, the compiler and its flags,
and must appear atomically to concurrent processes; this is that mechanism, once.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterable, Optional, Sequence

__all__ = ["find_compiler", "cached_library_path", "build_library"]


def find_compiler(env_var: str, names: Sequence[str]) -> Optional[str]:
    """The first of ``$env_var`` and ``names`` found on PATH (its full path), else None."""
    for name in (os.environ.get(env_var), *names):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cached_library_path(kind: str, prefix: str, compiler: str, flags: Sequence[str], sources: Iterable[Path],
                        extra: str = "") -> Path:
    """Where the library built from ``sources`` with ``compiler`` and ``flags`` is cached
    (``extra``: anything else the build depends on, e.g. the CPU for ``-march=native``)."""
    from .cuda.nvrtc_build import cache_dir

    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    h = hashlib.sha256()
    for path in sources:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    h.update("\0".join([compiler, version, *flags, extra]).encode())
    return cache_dir() / kind / f"{prefix}-{h.hexdigest()[:32]}.so"


def build_library(cmd: Sequence[str], target: Path, what: str) -> None:
    """Run ``cmd`` followed by ``-o <temporary>`` and move the result to ``target`` atomically (a
    concurrent process never loads a half-written library); RuntimeError naming ``what`` with
    the compiler's message when it fails. No partial file is left behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
    os.close(fd)
    full = [*cmd, "-o", tmp]
    try:
        done = subprocess.run(full, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"building {what} failed ({' '.join(full)}):\n{done.stderr.strip()[:2000]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
