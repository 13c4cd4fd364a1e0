// Every PTX instruction and memory access the sparse kernels use, each behind one small
// __device__ function. Why: the host emulator (runtime/emulator/sas_emulator.hpp) provides
// C++ implementations of exactly these functions, so the kernel bodies are compiled
// verbatim by NVRTC and by the host C++ compiler.
//
// Shared memory is addressed ONLY through 32-bit shared-window addresses (what
// `cvta.to.shared` gives) and the ld/st/ldmatrix/cp.async wrappers below: a kernel cannot
// touch shared memory behind the emulator's back, so the emulator sees (and checks the
// bounds and bank conflicts of) every shared-memory access.
#pragma once

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

struct alignas(16) u32x4 {
    u32 x, y, z, w;
};
struct alignas(8) u32x2 {
    u32 x, y;
};

#if defined(SAS_EMULATOR)
#include "sas_emulator.hpp"
#else

// ordered_metadata is the recommended form from PTX ISA 8.5 (CUDA 12.5) on.
#if (__CUDACC_VER_MAJOR__ > 12) || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 5)
#define SAS_MMA_SP "mma.sp::ordered_metadata.sync.aligned."
#else
#define SAS_MMA_SP "mma.sp.sync.aligned."
#endif

extern __shared__ __align__(16) unsigned char sas_dynamic_smem[];

// ---- shared memory ---------------------------------------------------------------------
// Shared-window address of the block's dynamic shared memory.
__device__ __forceinline__ u32 sas_smem_base() {
    return static_cast<u32>(__cvta_generic_to_shared(sas_dynamic_smem));
}

__device__ __forceinline__ u32 lds32(u32 addr) {
    u32 v;
    asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(addr));
    return v;
}
__device__ __forceinline__ u32x2 lds64(u32 addr) {
    u32x2 v;
    asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "r"(addr));
    return v;
}
__device__ __forceinline__ u32x4 lds128(u32 addr) {
    u32x4 v;
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "r"(addr));
    return v;
}
__device__ __forceinline__ void sts16(u32 addr, u16 v) {
    asm volatile("st.shared.u16 [%0], %1;\n" ::"r"(addr), "h"(v) : "memory");
}
__device__ __forceinline__ void sts32(u32 addr, u32 v) {
    asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}
__device__ __forceinline__ void sts64(u32 addr, u32x2 v) {
    asm volatile("st.shared.v2.u32 [%0], {%1, %2};\n" ::"r"(addr), "r"(v.x), "r"(v.y) : "memory");
}
__device__ __forceinline__ void sts128(u32 addr, u32x4 v) {
    asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(v.x), "r"(v.y), "r"(v.z),
                 "r"(v.w)
                 : "memory");
}

// Four 8x8 b16 matrices: lanes 8j..8j+7 give the row addresses of matrix j; lane l receives
// row l/4, 32-bit column l%4 of matrix j in r[j] (PTX ISA, ldmatrix).
__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// 16-byte global->shared async copy; src_bytes < 16 zero-fills the rest (0 = all zeros).
__device__ __forceinline__ void cp_async_16(u32 smem_dst, const void* gmem_src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_dst), "l"(gmem_src),
                 "r"(src_bytes)
                 : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Wait until at most N committed groups of this thread are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void sas_syncwarp() { __syncwarp(); }

// ---- global memory ----------------------------------------------------------------------
__device__ __forceinline__ u32x4 ldg128(const void* p) { return *static_cast<const u32x4*>(p); }
__device__ __forceinline__ u32x2 ldg64(const void* p) { return *static_cast<const u32x2*>(p); }
__device__ __forceinline__ void stg128(void* p, u32x4 v) { *static_cast<u32x4*>(p) = v; }
__device__ __forceinline__ void stg32(void* p, u32 v) { *static_cast<u32*>(p) = v; }

// ---- conversions --------------------------------------------------------------------------
// fp32 -> tf32 bit pattern, round to nearest, ties away from zero.
__device__ __forceinline__ u32 cvt_rna_tf32(float x) {
    u32 r;
    asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
    return r;
}

__device__ __forceinline__ u16 f32_to_f16_rn(float x) {
    u16 r;
    asm("cvt.rn.f16.f32 %0, %1;\n" : "=h"(r) : "f"(x));
    return r;
}

__device__ __forceinline__ float f16_to_f32(u16 h) {
    float r;
    asm("cvt.f32.f16 %0, %1;\n" : "=f"(r) : "h"(h));
    return r;
}

__device__ __forceinline__ u16 f32_to_bf16_rn(float x) {
    u16 r;
    asm("cvt.rn.bf16.f32 %0, %1;\n" : "=h"(r) : "f"(x));
    return r;
}

__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(u32(h) << 16); }

__device__ __forceinline__ float sas_bits_to_float(u32 b) { return __uint_as_float(b); }
__device__ __forceinline__ u32 sas_float_to_bits(float f) { return __float_as_uint(f); }

// ---- sparse tensor cores (sm_80+) ----------------------------------------------------------
// D = A(16x32, 2:4 sparse, f16) * B(32x8) + C, fp32 accumulate, sparsity selector 0.
__device__ __forceinline__ void mma_sp_16832_f16(float d[4], const u32 a[4], const u32 b[4], u32 meta) {
    asm volatile(SAS_MMA_SP "m16n8k32.row.col.f32.f16.f16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]),
                   "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(meta));
}

__device__ __forceinline__ void mma_sp_16832_bf16(float d[4], const u32 a[4], const u32 b[4], u32 meta) {
    asm volatile(SAS_MMA_SP "m16n8k32.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]),
                   "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(meta));
}

// D = A(16x16, 1:2 sparse, tf32) * B(16x8) + C, fp32 accumulate, sparsity selector 0.
__device__ __forceinline__ void mma_sp_16816_tf32(float d[4], const u32 a[4], const u32 b[4], u32 meta) {
    asm volatile(SAS_MMA_SP "m16n8k16.row.col.f32.tf32.tf32.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]),
                   "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(meta));
}

#endif  // SAS_EMULATOR
