// Every inline-PTX instruction the SAS / SWS kernels use, each behind one small
// __device__ function. Why: the host emulator (runtime/emulator/sas_emulator.hpp)
// provides C++ implementations of exactly these functions, so the kernel bodies are
// compiled verbatim by NVRTC and by the host C++ compiler.
#pragma once

typedef unsigned int u32;
typedef unsigned short u16;

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

// Per-block dynamic shared memory (sized at launch).
__device__ __forceinline__ unsigned char* sas_shared_memory() { return sas_dynamic_smem; }

__device__ __forceinline__ u32 sas_smem_addr(const void* p) {
    return static_cast<u32>(__cvta_generic_to_shared(p));
}

// 16-byte global->shared async copy; src_bytes < 16 zero-fills the rest (0 = all zeros).
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"(sas_smem_addr(smem_dst)), "l"(gmem_src), "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Wait until at most N committed groups of this thread are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" :: "n"(N)); }

// fp32 -> tf32 bit pattern, round to nearest, ties away from zero (what the reference rounds with).
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

__device__ __forceinline__ u32 sas_shfl_xor(u32 v, int lane_mask) {
    return __shfl_xor_sync(0xffffffffu, v, lane_mask);
}

__device__ __forceinline__ bool sas_warp_all(bool pred) { return __all_sync(0xffffffffu, pred); }

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
