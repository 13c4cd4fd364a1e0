"""Static performance facts of every kernel, read from the compiler without a GPU.

Why this module exists: without a GPU the kernels' speed cannot be measured, but what
decides much of it can be read off the build: registers per thread and spills (ptxas
``-v`` log), shared memory per CTA (the published launch geometry), the CTAs an SM can hold
at once (from those and the architecture's limits), and the instruction mix of the main
loop in the SASS (nvdisasm): for every sparse MMA (``HMMA.SP`` / ``HGMMA.SP``) how many other
instructions the loop issues, and how many of those are integer/logic/compare work of the
kind an in-register projection needs. Tests assert these facts; the table is for README::

    python -m sas_compile.runtime.cuda.static_facts            # markdown, sm_80 and sm_90
    python -m sas_compile.runtime.cuda.static_facts --json

Nothing here is a measured speed.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from . import cubin as cubin_mod
from . import nvrtc_build

__all__ = ["ARCH_LIMITS", "MMA_OPCODES", "PROJECTION_OPCODES", "LOOP_BUDGETS", "LoopBudget", "KernelFacts",
           "LoopFacts", "nvdisasm_path", "sass_by_function", "main_loop", "loop_budget", "loop_violations",
           "occupancy", "parse_ptxas_log", "kernel_facts", "markdown_table", "main"]


@dataclass(frozen=True)
class ArchLimits:
    registers: int          # 32-bit registers per SM
    reg_unit: int           # allocation unit per warp
    smem_sm: int            # shared memory per SM (maximum carve-out)
    smem_block: int         # dynamic shared memory a block may opt in to
    smem_reserved: int      # shared memory the system reserves per block
    smem_unit: int          # allocation granularity
    threads: int            # resident threads per SM
    blocks: int             # resident blocks per SM


# NVIDIA CUDA C++ Programming Guide, compute capability tables (8.0 and 9.0)
ARCH_LIMITS = {
    "sm_80": ArchLimits(65536, 256, 164 * 1024, 163 * 1024, 1024, 128, 2048, 32),
    "sm_90": ArchLimits(65536, 256, 228 * 1024, 227 * 1024, 1024, 128, 2048, 32),
}

MMA_OPCODES = ("HMMA.SP", "HGMMA.SP")
# integer / logic / compare / select work: what computing |x| and 2-bit indices from sign
# bits inside the loop would issue (address arithmetic is IADD3 / IMAD / LEA, not these)
PROJECTION_OPCODES = ("LOP3", "LOP", "PRMT", "SHF", "SHL", "SHR", "SEL", "FSEL", "ISETP", "FSETP", "HSETP2",
                      "HSET2", "PSETP", "BMSK", "SGXT", "BFE", "BFI", "IMNMX", "FMNMX", "HMNMX2", "POPC", "FLO")


def nvdisasm_path() -> str:
    """nvdisasm from the nvidia-cuda-nvdisasm wheel (the 'cuda' extra), else from PATH."""
    try:
        import nvidia

        for root in nvidia.__path__:
            for path in sorted(Path(root).glob("*/bin/nvdisasm")):
                return str(path)
    except ImportError:
        pass
    found = shutil.which("nvdisasm")
    if not found:
        raise FileNotFoundError("nvdisasm not found: install nvidia-cuda-nvdisasm (part of the 'cuda' extra)")
    return found


def sass_by_function(image: bytes) -> Dict[str, List[str]]:
    """``{kernel: SASS lines}`` of a cubin (``nvdisasm -c``)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "module.cubin"
        path.write_bytes(image)
        sass = subprocess.run([nvdisasm_path(), "-c", str(path)], capture_output=True, text=True, check=True).stdout
    functions: Dict[str, List[str]] = {}
    name = None
    for line in sass.splitlines():
        m = re.match(r"\s*\.section\s+\.text\.(\w+),", line)
        if m:
            name = m.group(1)
            functions[name] = []
        elif name is not None:
            functions[name].append(line)
    return functions


_INSTR = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)(.*?);")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_BRANCH_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


@dataclass
class LoopFacts:
    """The main loop of a kernel: the innermost loop holding the most sparse MMAs."""

    instructions: int          # every instruction of the loop body but NOPs
    mma: int                   # sparse MMA instructions
    other: int                 # instructions - mma
    projection_ops: int        # of PROJECTION_OPCODES
    opcodes: Dict[str, int]    # histogram (opcode without modifiers)
    mma_opcode: str            # e.g. HMMA.SP.16832.F32
    wgmma_waits: List[str]     # operands of the loop's WARPGROUP.DEPBAR (wgmma.wait_group) instructions

    @property
    def other_per_mma(self) -> float:
        return self.other / self.mma

    @property
    def projection_per_mma(self) -> float:
        return self.projection_ops / self.mma


def main_loop(lines: Sequence[str]) -> Optional[LoopFacts]:
    """The loop (a backward branch's body) with the most sparse MMAs, the shortest on ties."""
    items: List[Tuple[str, str]] = []  # ("label", name) or ("instr", opcode, text)
    for line in lines:
        m = _LABEL.match(line)
        if m:
            items.append(("label", m.group(1), ""))
            continue
        m = _INSTR.match(line)
        if m:
            items.append(("instr", m.group(2), line))
    label_at = {name: i for i, (kind, name, _) in enumerate(items) if kind == "label"}
    best = None
    for i, (kind, opcode, text) in enumerate(items):
        if kind != "instr" or not opcode.startswith("BRA"):
            continue
        target = _BRANCH_TARGET.search(text)
        if not target or target.group(1) not in label_at or label_at[target.group(1)] >= i:
            continue
        body = [it for it in items[label_at[target.group(1)]:i + 1] if it[0] == "instr" and it[1] != "NOP"]
        mma = [it for it in body if it[1].startswith(MMA_OPCODES)]
        if not mma:
            continue
        key = (len(mma), -len(body))
        if best is None or key > best[0]:
            best = (key, body, mma)
    if best is None:
        return None
    _, body, mma = best
    histogram: Dict[str, int] = {}
    for _, opcode, _ in body:
        base = opcode.split(".")[0]
        histogram[base] = histogram.get(base, 0) + 1
    projection = sum(n for op, n in histogram.items() if op in PROJECTION_OPCODES)
    waits = [text.split("DEPBAR")[1].strip(" ;.LE") for _, opcode, text in body if opcode.startswith("WARPGROUP.DEPBAR")]
    return LoopFacts(len(body), len(mma), len(body) - len(mma), projection, histogram, mma[0][1], waits)


@dataclass(frozen=True)
class LoopBudget:
    """What a kernel's main loop may issue besides its sparse MMAs: other instructions and
    integer/logic/compare ones (PROJECTION_OPCODES), per m16n8k32-sized sparse MMA (an
    HGMMA.SP.64xNx32 counts as N/2 of them)."""

    other_per_mma: float
    projection_per_mma: float
    why: str


# The budgets the tests hold each kernel to. An in-register projection (|x| and 2-bit
# indices from sign bits, as the earlier fused kernel did for every N tile) costs several
# integer/logic instructions per MMA; a loop that only loads fragments and metadata costs a
# fraction of one.
LOOP_BUDGETS = {
    "spmma_128x128": LoopBudget(2.5, 0.5, "warps of 64x64 (128x128 and 128x256 tiles): per 64 MMAs 24 "
                                          "ldmatrix, 4 metadata loads, ~13-26 cp.async with addresses and "
                                          "predicates"),
    "spmma_f32_128x128": LoopBudget(4.5, 1.75, "as 128x128, plus rounding every B element to tf32 "
                                               "(cvt.rna.tf32: an FSETP and an IMAD per element)"),
    "spmma_64x64": LoopBudget(6.0, 1.25, "4 warps of 32x32: the per-k-tile copies are shared by only 16 MMAs"),
    "spmma_f32_64x64": LoopBudget(10.0, 3.5, "as 64x64, plus the tf32 rounding of B"),
    "spwgmma": LoopBudget(1.0, 0.25, "two HGMMA.SP per k-tile and warpgroup; the copies, the metadata load "
                                     "and the descriptors are per k-tile"),
}


def loop_budget(kernel: str) -> Optional[LoopBudget]:
    """The budget of a GEMM kernel's main loop (None for kernels without MMAs)."""
    if kernel.startswith("spwgmma_"):
        return LOOP_BUDGETS["spwgmma"]
    if kernel.startswith("spmma_"):
        tile = "64x64" if "_64x64_" in kernel else "128x128"  # 128x128 and 128x256: 64x64 warp tiles
        key = f"spmma_f32_{tile}" if "_f32_" in kernel else f"spmma_{tile}"
        return LOOP_BUDGETS[key]
    return None


def loop_violations(loop: Optional["LoopFacts"], budget: LoopBudget, equivalents: int = 1) -> List[str]:
    """Why a main loop exceeds its budget (empty: within it)."""
    if loop is None:
        return ["no main loop with sparse MMAs was found in the SASS"]
    problems = []
    mmas = loop.mma * equivalents
    if loop.other / mmas > budget.other_per_mma:
        problems.append(f"{loop.other / mmas:.2f} other instructions per sparse MMA > {budget.other_per_mma}")
    if loop.projection_ops / mmas > budget.projection_per_mma:
        problems.append(f"{loop.projection_ops / mmas:.2f} integer/logic/compare instructions per sparse MMA > "
                        f"{budget.projection_per_mma} (per-MMA projection work in the loop?)")
    return problems


def occupancy(arch: str, threads: int, registers: int, smem: int) -> Tuple[int, str]:
    """``(CTAs per SM, limiting resource)`` of a kernel on ``arch`` (sm_80 or sm_90)."""
    lim = ARCH_LIMITS[arch]
    warps = math.ceil(threads / 32)
    reg_per_warp = math.ceil(max(registers, 1) * 32 / lim.reg_unit) * lim.reg_unit
    by = {
        "registers": (lim.registers // reg_per_warp) // warps,
        "threads": lim.threads // threads,
        "blocks": lim.blocks,
    }
    if smem > lim.smem_block:
        by["shared memory"] = 0
    else:
        per_block = math.ceil((smem + lim.smem_reserved) / lim.smem_unit) * lim.smem_unit
        by["shared memory"] = lim.smem_sm // per_block
    limit = min(by.values())
    return limit, "/".join(k for k, v in by.items() if v == limit)


def parse_ptxas_log(log: str) -> Dict[str, Dict[str, int]]:
    """``{kernel: {registers, spill_stores, spill_loads, stack, static_smem}}`` from ``-Xptxas -v``."""
    out: Dict[str, Dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"(?:Compiling entry function|Function properties for) '?(\w+)'?", line)
        if m:
            current = m.group(1)
            out.setdefault(current, {"registers": 0, "spill_stores": 0, "spill_loads": 0, "stack": 0,
                                     "static_smem": 0})
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            out[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            out[current]["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            out[current]["static_smem"] = int(s.group(1)) if s else 0
    return out


@dataclass
class KernelFacts:
    kernel: str
    module: str
    arch: str          # device architecture (sm_80, sm_90)
    build_arch: str    # what it is compiled for (sm_90a for wgmma)
    threads: int
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    smem: int          # static + dynamic shared memory per CTA, bytes
    ctas_per_sm: int
    limited_by: str
    loop: Optional[LoopFacts]

    @property
    def mma_equivalents(self) -> int:
        """m16n8k32-sized sparse MMAs per MMA instruction (64 x N / (16 x 8) for HGMMA.SP)."""
        if self.loop is None:
            return 0
        m = re.search(r"HGMMA\.SP\.64x(\d+)x", self.loop.mma_opcode)
        return int(m.group(1)) // 2 if m else 1


def kernel_facts(arch: str, modules: Optional[Sequence[str]] = None, use_cache: bool = True) -> List[KernelFacts]:
    """Facts of every kernel of ``modules`` (default: all that build for ``arch``)."""
    facts = []
    for module in modules or nvrtc_build.modules_for(arch):
        result = nvrtc_build.build_module(module, arch, use_cache=use_cache)
        log = parse_ptxas_log(result.log)
        sass = sass_by_function(result.cubin)
        for kernel in nvrtc_build.kernel_names(module):
            threads, dyn = (int.from_bytes(cubin_mod.symbol_bytes(result.cubin, f"{kernel}_launch")[i:i + 4], "little",
                                           signed=True) for i in (0, 4))
            info = log[kernel]
            smem = dyn + info["static_smem"]
            ctas, limit = occupancy(arch, threads, info["registers"], smem)
            facts.append(KernelFacts(kernel, module, arch, result.arch, threads, info["registers"],
                                     info["spill_stores"], info["spill_loads"], info["stack"], smem, ctas, limit,
                                     main_loop(sass[kernel])))
    return facts


def markdown_table(facts: Sequence[KernelFacts]) -> str:
    head = ("| kernel | arch | threads | regs | spills st/ld (B) | smem/CTA (KiB) | CTAs/SM (limit) | "
            "sparse MMAs in main loop | other instrs in loop | other / int-logic per MMA instr | "
            "other / int-logic per m16n8k32 equiv. | loop budget (per equiv.) |")
    rows = [head, "|" + "---|" * 12]
    for f in facts:
        loop = f.loop
        budget = loop_budget(f.kernel)
        if loop is None:
            mma = other = per = equiv = "-"
        else:
            eq = loop.mma * f.mma_equivalents
            mma = f"{loop.mma} x {loop.mma_opcode}"
            other = str(loop.other)
            per = f"{loop.other_per_mma:.2f} / {loop.projection_per_mma:.2f}"
            equiv = f"{loop.other / eq:.2f} / {loop.projection_ops / eq:.2f}"
        allowed = f"<= {budget.other_per_mma} / {budget.projection_per_mma}" if budget else "-"
        rows.append(f"| {f.kernel} | {f.build_arch} | {f.threads} | {f.registers} | {f.spill_stores}/{f.spill_loads} | "
                    f"{f.smem / 1024:.1f} | {f.ctas_per_sm} ({f.limited_by}) | {mma} | {other} | {per} | {equiv} | "
                    f"{allowed} |")
    return "\n".join(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["sm_80", "sm_90"], choices=sorted(ARCH_LIMITS))
    parser.add_argument("--json", action="store_true", help="JSON instead of a markdown table")
    args = parser.parse_args(argv)
    facts = [f for arch in args.arch for f in kernel_facts(arch)]
    if args.json:
        print(json.dumps([dict(asdict(f), loop=asdict(f.loop) if f.loop else None) for f in facts], indent=1))
    else:
        print("Static facts of the sparse kernels (compiler output, no GPU run; not a measured speed).\n")
        print(markdown_table(facts))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
