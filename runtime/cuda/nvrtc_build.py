"""NVRTC build of the ``.cu`` kernels in this folder, with an on-disk cubin cache.

Why this module exists: the kernels are compiled for the GPU's own architecture at first
use (no nvcc needed at install time), and a second process must not pay that again. The
cache key is the hash of every ``.cu``/``.cuh`` source here, the arch, the options and the
NVRTC version; the cache lives under ``$SAS_COMPILE_CACHE`` or ``~/.cache/sas_compile``.

Modules: ``sas_compress`` (S(x) -> compressed operand), ``spmma`` (mma.sp GEMM, any sm_80+
arch) and ``spwgmma`` (wgmma.mma_async.sp GEMM, built for ``sm_90a`` only: it runs on sm_90
devices). :func:`module_of` maps a kernel to its module explicitly.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = [
    "KERNEL_DIR",
    "MODULES",
    "BuildResult",
    "CudaBuildError",
    "cache_dir",
    "source_hash",
    "nvrtc_version",
    "build_module",
    "compile_all",
    "kernel_names",
    "module_of",
    "modules_for",
    "build_arch",
    "compile_source",
]

KERNEL_DIR = Path(__file__).resolve().parent
MODULES = ("sas_compress", "spmma", "spwgmma")  # one .cu file, one cubin, several kernels each
# modules that need an architecture-specific target: module -> {device arch: build arch}
ARCH_SPECIFIC = {"spwgmma": {"sm_90": "sm_90a"}}
_KERNEL_MACROS = r"(?:COMPRESS|SPMMA|SPWGMMA)_KERNEL"
DEFAULT_OPTIONS = ("-std=c++17", "-lineinfo")
_ARCH_RE = re.compile(r"^(sm|compute)_(\d+)[a-z]?$")


class CudaBuildError(RuntimeError):
    """NVRTC could not build a kernel module; the message carries the compiler log."""


@dataclass(frozen=True)
class BuildResult:
    """One compiled module: its cubin and the NVRTC/ptxas log (``-Xptxas -v`` output)."""

    module: str
    arch: str
    cubin: bytes
    log: str


def cache_dir() -> Path:
    """Where cubins (and the emulator's library) are cached."""
    root = os.environ.get("SAS_COMPILE_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "sas_compile"


def source_hash() -> str:
    """SHA-256 over every kernel source in this folder (names and contents)."""
    h = hashlib.sha256()
    for path in sorted(KERNEL_DIR.glob("*.cu*")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _nvrtc():
    try:
        from cuda.bindings import nvrtc
    except ImportError as e:  # pragma: no cover - depends on the install
        raise CudaBuildError(
            "cuda.bindings.nvrtc is not importable: install the 'cuda' extra "
            "(pip install 'sas-compile[cuda]')"
        ) from e
    return nvrtc


def _check(result, call: str):
    """cuda-python returns (status, *values): raise naming `call` unless status is success."""
    status, *values = result if isinstance(result, tuple) else (result,)
    if int(status) != 0:
        raise CudaBuildError(f"{call} failed with {status!r}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def nvrtc_version() -> Tuple[int, int]:
    """(major, minor) of the NVRTC library in use."""
    return tuple(_check(_nvrtc().nvrtcVersion(), "nvrtcVersion"))


def _normalize_arch(arch: str) -> str:
    m = _ARCH_RE.match(arch)
    if not m or int(m.group(2)) < 80:
        raise ValueError(
            f"arch={arch!r} is not supported: the sparse kernels need mma.sp, "
            "i.e. 'sm_80' or newer (for example 'sm_80', 'sm_86', 'sm_89', 'sm_90')"
        )
    return "sm_" + arch.split("_", 1)[1]


def _device_arch(arch: str) -> str:
    """The device architecture of an arch name: 'sm_90a' -> 'sm_90'."""
    return _normalize_arch(arch).rstrip("a")


def modules_for(arch: str) -> Tuple[str, ...]:
    """The modules that build (and run) for a device of this architecture."""
    dev = _device_arch(arch)
    return tuple(m for m in MODULES if m not in ARCH_SPECIFIC or dev in ARCH_SPECIFIC[m])


def build_arch(module: str, arch: str) -> str:
    """The ``--gpu-architecture`` a module is compiled with for a device of ``arch``."""
    dev = _device_arch(arch)
    if module in ARCH_SPECIFIC:
        if dev not in ARCH_SPECIFIC[module]:
            raise ValueError(
                f"module {module!r} runs only on {sorted(ARCH_SPECIFIC[module])} (it uses "
                f"architecture-specific instructions); arch={arch!r}"
            )
        return ARCH_SPECIFIC[module][dev]
    return dev


def _options(arch: str, extra: Sequence[str]) -> List[str]:
    return [
        f"--gpu-architecture={arch}",
        f"--include-path={KERNEL_DIR}",
        "--ptxas-options=-v",
        *DEFAULT_OPTIONS,
        *extra,
    ]


def _compile(module: str, arch: str, options: List[str], source: Optional[bytes] = None) -> BuildResult:
    nvrtc = _nvrtc()
    path = KERNEL_DIR / f"{module}.cu"
    text = path.read_bytes() if source is None else source
    prog = _check(nvrtc.nvrtcCreateProgram(text, path.name.encode(), 0, [], []),
                  "nvrtcCreateProgram")
    try:
        status = nvrtc.nvrtcCompileProgram(prog, len(options), [o.encode() for o in options])[0]
        size = _check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
        log_buf = b" " * size
        _check(nvrtc.nvrtcGetProgramLog(prog, log_buf), "nvrtcGetProgramLog")
        log = log_buf.rstrip(b"\x00").decode(errors="replace")
        if int(status) != 0:
            raise CudaBuildError(
                f"nvrtcCompileProgram failed for {path.name} ({arch}) with {status!r}:\n{log}"
            )
        size = _check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
        cubin = b" " * size
        _check(nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    return BuildResult(module, arch, bytes(cubin), log)


def build_module(module: str, arch: str = "sm_80", *, extra_options: Sequence[str] = (),
                 use_cache: bool = True) -> BuildResult:
    """Compile ``<module>.cu`` for ``arch`` (cached on disk) and return cubin and log."""
    if module not in MODULES:
        raise ValueError(f"unknown kernel module {module!r}; known modules: {list(MODULES)}")
    arch = build_arch(module, arch)
    options = _options(arch, extra_options)
    key = hashlib.sha256(
        "\0".join([source_hash(), module, arch, *options, repr(nvrtc_version())]).encode()
    ).hexdigest()[:32]
    cubin_path = cache_dir() / "cubin" / f"{module}-{arch}-{key}.cubin"
    log_path = cubin_path.with_suffix(".log")
    if use_cache and cubin_path.exists() and log_path.exists():
        return BuildResult(module, arch, cubin_path.read_bytes(), log_path.read_text())
    result = _compile(module, arch, options)
    if use_cache:
        _atomic_write(cubin_path, result.cubin)
        _atomic_write(log_path, result.log.encode())
    return result


def compile_source(source: str, arch: str = "sm_80", name: str = "probe") -> BuildResult:
    """Compile a kernel source that is not one of the modules (no cache), with the modules'
    options and include path: for tests of the build and of the static checks."""
    arch = _normalize_arch(arch)
    return _compile(name, arch, _options(arch, ()), source.encode())


def _atomic_write(path: Path, data: bytes) -> None:
    # concurrent processes may build the same key: write aside, then rename
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def compile_all(arch: str = "sm_80", *, use_cache: bool = True,
                with_logs: bool = False) -> Dict[str, bytes]:
    """Every kernel module's cubin for a device of ``arch``: ``{module name: cubin bytes}``
    (``spwgmma`` only for sm_90, built as sm_90a).

    With ``with_logs`` the values are :class:`BuildResult` (cubin plus ptxas log) instead.
    """
    modules = modules_for(arch)
    with ThreadPoolExecutor(max_workers=min(len(modules), os.cpu_count() or 1)) as pool:
        results = list(pool.map(lambda m: build_module(m, arch, use_cache=use_cache), modules))
    return {r.module: (r if with_logs else r.cubin) for r in results}


def kernel_names(module: Optional[str] = None) -> List[str]:
    """The ``extern "C"`` kernel names defined in the module sources (all modules by default)."""
    names = []
    for mod in MODULES if module is None else (module,):
        text = (KERNEL_DIR / f"{mod}.cu").read_text()
        names += re.findall(r"^" + _KERNEL_MACROS + r"\((\w+),", text, flags=re.M)
    return names


_MODULE_OF: Dict[str, str] = {}


def module_of(kernel: str) -> str:
    """The module (``.cu`` file, cubin) that defines ``kernel``."""
    if not _MODULE_OF:
        for mod in MODULES:
            for name in kernel_names(mod):
                _MODULE_OF[name] = mod
    try:
        return _MODULE_OF[kernel]
    except KeyError:
        raise KeyError(f"kernel {kernel!r} is defined in none of the modules {list(MODULES)}") from None
