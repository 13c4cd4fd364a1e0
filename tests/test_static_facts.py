"""Static performance facts of every kernel, from NVRTC's ptxas log and nvdisasm's SASS,
for sm_80 and sm_90 (sm_90a for the wgmma kernels): no spills, CTAs per SM from registers,
shared memory and threads, and the instruction mix of the main loop held to a budget that
per-MMA projection work would exceed (a kernel that does it is shown to fail the check).
None of this is a measured speed."""
from __future__ import annotations

import os

import pytest

if not os.environ.get("CI"):  # in CI (CI=true) a missing NVRTC is a failure, not a skip
    pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-python (the 'cuda' extra) is not installed")

from sas_compile.runtime.cuda import nvrtc_build, static_facts  # noqa: E402

ARCHS = ("sm_80", "sm_90")


@pytest.fixture(scope="module", params=ARCHS)
def facts(request):
    return request.param, {f.kernel: f for f in static_facts.kernel_facts(request.param)}


def test_every_kernel_is_covered(facts):
    arch, by_name = facts
    expected = {k for m in nvrtc_build.modules_for(arch) for k in nvrtc_build.kernel_names(m)}
    assert set(by_name) == expected
    assert any(k.startswith("spwgmma_") for k in by_name) == (arch == "sm_90")


def test_no_spills_and_no_local_memory(facts):
    _, by_name = facts
    for f in by_name.values():
        assert (f.spill_stores, f.spill_loads, f.stack) == (0, 0, 0), f


def test_ctas_per_sm(facts):
    arch, by_name = facts
    for name, f in by_name.items():
        if name.startswith("sas_compress_"):
            assert f.ctas_per_sm >= 4, f  # memory-bound: latency hidden by many resident warps
        elif "_128x256_" in name:
            # the 128x256 fp32 accumulators take half of the register file: 1 CTA per SM
            assert f.ctas_per_sm == 1 and "registers" in f.limited_by, f
        elif "_128x128_" in name:
            assert f.ctas_per_sm >= 2, f  # the main tiles
        else:
            assert f.ctas_per_sm >= 4, f  # 64x64
        assert f.smem <= static_facts.ARCH_LIMITS[arch].smem_block, f


# shared memory per CTA by design: stages x (B + A + metadata k-tiles), or the fp32 output
# staging tile when larger; the wgmma kernels add 1 KiB to align their stages to 1 KiB
SMEM_KIB = {"spmma_64x64": 37.5, "spmma_128x128": 75.0, "spmma_128x256": 128.0, "spwgmma_128x128": 101.0,
            "spwgmma_128x256": 165.0, "sas_compress": 0.0}


def test_shared_memory_per_cta(facts):
    _, by_name = facts
    for name, f in by_name.items():
        key = "sas_compress" if name.startswith("sas_compress") else f"{name.split('_')[0]}_{name.split('_')[2]}"
        assert f.smem == SMEM_KIB[key] * 1024, (name, f.smem)


def test_main_loop_within_its_budget(facts):
    _, by_name = facts
    for name, f in by_name.items():
        budget = static_facts.loop_budget(name)
        if budget is None:
            assert f.loop is None, name  # the compress kernel has no MMA
            continue
        assert not static_facts.loop_violations(f.loop, budget, f.mma_equivalents), (name, f.loop)
        if name.startswith("spmma_"):
            assert f.loop.mma_opcode.startswith("HMMA.SP."), f.loop
            mt_nt = 2 * 4 * 2 if "_64x64_" in name else 4 * 8 * 2  # warp tiles 32x32 / 64x64, 2 k-steps
            assert f.loop.mma == mt_nt and f.loop.opcodes.get("LDSM", 0) > 0, f.loop


def test_wgmma_loop_is_pipelined(facts):
    """Two HGMMA.SP per k-tile, one wgmma.wait_group 1: no serialization of the async MMAs."""
    arch, by_name = facts
    if arch != "sm_90":
        return
    result = nvrtc_build.build_module("spwgmma", arch)
    assert "C7514" not in result.log and "C7515" not in result.log and "serialized" not in result.log
    for name, f in by_name.items():
        if name.startswith("spwgmma_"):
            n = int(name.split("_")[2].split("x")[1])
            assert f.loop.mma == 2 and f.loop.mma_opcode.startswith(f"HGMMA.SP.64x{n}x32"), f.loop
            assert f.loop.wgmma_waits == ["gsb0, 0x1"], f.loop.wgmma_waits


PROJECTION_IN_LOOP = r"""
#include "sparse_common.cuh"
// the shape of the earlier fused kernel: every MMA's A registers and metadata computed in
// the loop from the narrow activation's sign bits
extern "C" __global__ void __launch_bounds__(128) projection_in_loop(const u16* x, float* out, int steps) {
    const Lane ln;
    const u32 smem = sas_smem_base();
    for (int i = ln.tid; i < 1024; i += 128) sts32(smem + 4 * i, u32(x[2 * i]) | (u32(x[2 * i + 1]) << 16));
    __syncthreads();
    float acc[4][4] = {};
    for (int s = 0; s < steps; ++s) {
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
            u32 a[4], b[4], nib = 0;
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const u32 w = lds32(smem + 4 * ((ln.lane * 4 + r + s + nt) & 1023));
                a[r] = w & 0x7fff7fffu;
                nib |= (0x8u | ((w >> 15) & 1u) | (((w >> 31) & 1u) << 2)) << (4 * r);
                b[r] = w ^ (nt << 3);
            }
            const u32 meta = (ln.t & 1) ? (nib >> 16) | (nib << 16) : nib;
            mma_sp_16832_f16(acc[nt], a, b, meta);
        }
    }
    for (int nt = 0; nt < 4; ++nt)
        for (int i = 0; i < 4; ++i) out[(ln.tid * 4 + nt) * 4 + i] = acc[nt][i];
}
"""


def test_a_loop_with_per_mma_projection_fails_the_budget():
    result = nvrtc_build.compile_source(PROJECTION_IN_LOOP, "sm_80")
    loop = static_facts.main_loop(static_facts.sass_by_function(result.cubin)["projection_in_loop"])
    assert loop is not None and loop.mma == 4
    problems = static_facts.loop_violations(loop, static_facts.LOOP_BUDGETS["spmma_128x128"])
    assert any("integer/logic" in p for p in problems), (problems, loop.opcodes)


def test_occupancy_arithmetic():
    # 255 registers x 128 threads: 8192 registers per warp after rounding, 8 warps: 2 CTAs
    assert static_facts.occupancy("sm_80", 128, 255, 75 * 1024)[0] == 2
    # 256 threads x 128 registers, 101 KiB: 2 by registers, 2 by shared memory on sm_90
    assert static_facts.occupancy("sm_90", 256, 128, 101 * 1024) == (2, "registers/shared memory")
    # the same shared memory on sm_80 (164 KiB per SM) fits once
    assert static_facts.occupancy("sm_80", 256, 128, 101 * 1024) == (1, "shared memory")
    assert static_facts.occupancy("sm_80", 128, 32, 200 * 1024)[0] == 0  # above the opt-in limit


def test_markdown_table_prints(capsys):
    assert static_facts.main(["--arch", "sm_90"]) == 0
    out = capsys.readouterr().out
    assert "| spwgmma_f16_128x128_sas | sm_90a |" in out and "not a measured speed" in out
