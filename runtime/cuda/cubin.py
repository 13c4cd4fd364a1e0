"""Reading a cubin (an ELF64 file) without a GPU: symbols, their bytes, kernel sections.

Why this module exists: what the driver will see at launch (each kernel's published
``<name>_launch`` geometry, its parameter block) can be checked on a machine with no GPU
by reading the cubin NVRTC produced, independently of the emulator's build of the same
source.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Dict, List

__all__ = ["Section", "Symbol", "sections", "symbols", "symbol_bytes", "kernel_parameters"]

_ELF_MAGIC = b"\x7fELF"


@dataclass(frozen=True)
class Section:
    name: str
    type: int
    offset: int
    size: int


@dataclass(frozen=True)
class Symbol:
    name: str
    value: int
    size: int
    section: int


def _check(image: bytes) -> None:
    if image[:4] != _ELF_MAGIC or image[4] != 2 or image[5] != 1:
        raise ValueError("not a little-endian ELF64 image (a cubin)")


def sections(image: bytes) -> List[Section]:
    """The section headers of an ELF64 image, names resolved."""
    _check(image)
    shoff, = struct.unpack_from("<Q", image, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", image, 0x3A)
    raw = [struct.unpack_from("<IIQQQQIIQQ", image, shoff + i * shentsize) for i in range(shnum)]
    names_offset = raw[shstrndx][4]

    def name(at: int) -> str:
        end = image.index(b"\0", names_offset + at)
        return image[names_offset + at:end].decode()

    return [Section(name(r[0]), r[1], r[4], r[5]) for r in raw]


def symbols(image: bytes) -> Dict[str, Symbol]:
    """``{name: Symbol}`` from the image's ``.symtab``."""
    secs = sections(image)
    symtab = next((s for s in secs if s.name == ".symtab"), None)
    strtab = next((s for s in secs if s.name == ".strtab"), None)
    if symtab is None or strtab is None:
        return {}
    out = {}
    for i in range(symtab.size // 24):
        st_name, _info, _other, shndx, value, size = struct.unpack_from("<IBBHQQ", image, symtab.offset + 24 * i)
        end = image.index(b"\0", strtab.offset + st_name)
        name = image[strtab.offset + st_name:end].decode()
        if name:
            out[name] = Symbol(name, value, size, shndx)
    return out


def symbol_bytes(image: bytes, name: str) -> bytes:
    """The initial bytes of a global data symbol (its value is an offset in its section)."""
    sym = symbols(image).get(name)
    if sym is None:
        raise KeyError(f"symbol {name!r} is not in the cubin")
    sec = sections(image)[sym.section]
    if sym.value + sym.size > sec.size:
        raise ValueError(f"symbol {name!r} lies outside its section {sec.name}")
    return image[sec.offset + sym.value:sec.offset + sym.value + sym.size]


_EIFMT_SVAL = 4  # a sized value; the other formats (no value, byte, half) take 4 bytes
_EIATTR_KPARAM_INFO = 0x17


def kernel_parameters(image: bytes, kernel: str) -> List[tuple]:
    """``[(ordinal, offset, size_bytes)]`` of a kernel's parameters, from ``.nv.info.<kernel>``.

    This is what the driver copies from ``kernelParams[ordinal]`` at launch.
    """
    sec = next((s for s in sections(image) if s.name == f".nv.info.{kernel}"), None)
    if sec is None:
        raise KeyError(f"kernel {kernel!r} has no .nv.info section in the cubin")
    data = image[sec.offset:sec.offset + sec.size]
    params, i = [], 0
    while i < len(data):
        fmt, attr = data[i], data[i + 1]
        if fmt == _EIFMT_SVAL:
            size, = struct.unpack_from("<H", data, i + 2)
            payload, i = data[i + 4:i + 4 + size], i + 4 + size
        else:  # NVAL, BVAL and HVAL entries all take 4 bytes
            payload, i = data[i + 2:i + 4], i + 4
        if fmt == _EIFMT_SVAL and attr == _EIATTR_KPARAM_INFO:
            _index, ordinal, offset, packed = struct.unpack_from("<IHHI", payload)
            params.append((ordinal, offset, packed >> 18))
    return sorted(params)
