// Hopper (sm_90a) warpgroup-level sparse MMA: wgmma.mma_async.sp with both operands in
// shared memory (matrix descriptors), the fences and the group commit/wait around it. Only
// the spwgmma module includes this header; NVRTC builds it for --gpu-architecture=sm_90a.
// The host emulator implements the same functions (runtime/emulator/sas_emulator.hpp).
#pragma once
#include "sas_ptx.cuh"

#if !defined(SAS_EMULATOR)

// Orders this thread's prior register accesses before the warpgroup's next wgmma.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }

__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }

// Wait until at most N committed wgmma groups of the warpgroup are pending.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Pins an accumulator register in place: no instruction reading or writing it moves across
// this point (used around the wgmma issue and wait, so that ptxas sees no accumulator access
// inside a wgmma pipeline stage and does not serialize the wgmma instructions).
__device__ __forceinline__ void wgmma_fence_operand(float& r) { asm volatile("" : "+f"(r)::"memory"); }

// Makes this thread's generic-proxy shared-memory writes (st.shared, landed cp.async)
// visible to the async proxy that wgmma reads shared memory through.
__device__ __forceinline__ void fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}


// The accumulator registers of one thread as inline-asm operands: 64 for N = 128, 128 for
// N = 256 (the placeholder lists %0.. and the "+f" operand lists match one for one).
#define SAS_WGMMA_ACC64_REGS \
    "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15," \
    "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31," \
    "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47," \
    "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63"
#define SAS_WGMMA_ACC64_OPERANDS \
    "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
    "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
    "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
    "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
    "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
    "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
    "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
    "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#define SAS_WGMMA_ACC128_REGS SAS_WGMMA_ACC64_REGS "," \
    "%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79," \
    "%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95," \
    "%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,%108,%109,%110,%111," \
    "%112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127"
#define SAS_WGMMA_ACC128_OPERANDS SAS_WGMMA_ACC64_OPERANDS, \
    "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), \
    "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), \
    "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), \
    "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), \
    "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), \
    "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), \
    "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), \
    "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])

// D(64xN, f32) += A(64x32, 2:4 sparse, TYPE; K-major in shared memory) * B(32xN, TYPE; K-major
// in shared memory); metadata register of this thread, sparsity selector 0. ACC accumulators
// per thread; DESCS are the placeholders of desc_a, desc_b and meta, PRED that of the
// scale-d flag (always 1: accumulate), which follow the accumulators.
#define SAS_DEFINE_WGMMA_SP(N, TYPE, ACC, DESCS, PRED)                                            \
    __device__ __forceinline__ void wgmma_sp_m64n##N##k32_##TYPE(float (&d)[ACC], u64 desc_a,    \
                                                                 u64 desc_b, u32 meta) {        \
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " PRED ", 0;\n"                          \
                     "wgmma.mma_async.sp.sync.aligned.m64n" #N "k32.f32." #TYPE "." #TYPE " {"  \
                     SAS_WGMMA_ACC##ACC##_REGS "}, " DESCS ", 0, p, 1, 1, 0, 0;\n}\n"            \
                     : SAS_WGMMA_ACC##ACC##_OPERANDS                                            \
                     : "l"(desc_a), "l"(desc_b), "r"(meta), "r"(1));                            \
    }

SAS_DEFINE_WGMMA_SP(128, f16, 64, "%64, %65, %66", "%67")
SAS_DEFINE_WGMMA_SP(128, bf16, 64, "%64, %65, %66", "%67")
SAS_DEFINE_WGMMA_SP(256, f16, 128, "%128, %129, %130", "%131")
SAS_DEFINE_WGMMA_SP(256, bf16, 128, "%128, %129, %130", "%131")

#undef SAS_DEFINE_WGMMA_SP

#endif  // !SAS_EMULATOR
