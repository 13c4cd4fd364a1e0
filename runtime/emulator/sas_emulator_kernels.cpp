// The host build of the CUDA kernels: the .cu files of runtime/cuda compiled verbatim with
// the emulated primitives of sas_emulator.hpp (selected in sas_ptx.cuh by SAS_EMULATOR).
// Python (runtime/emulator/__init__.py) finds each kernel and its `<name>_launch`
// geometry by symbol name and runs it through sas_emu_launch.
#define SAS_EMULATOR 1
#include "sas_emulator.hpp"

#include "sas_gemm.cu"
#include "sws_gemm.cu"

extern "C" int sas_emu_launch(void (*kernel)(GemmParams), const GemmParams* params, int grid_x,
                              int grid_y, int threads, int smem_bytes, char* error, int error_len) {
    std::string message;
    try {
        message = sas_emu::launch(kernel, *params, grid_x, grid_y, threads, smem_bytes);
    } catch (const std::exception& e) {
        message = std::string("emulator exception: ") + e.what();
    }
    if (message.empty()) return 0;
    if (error_len > 0) {
        std::strncpy(error, message.c_str(), size_t(error_len - 1));
        error[error_len - 1] = '\0';
    }
    return 1;
}

// ---- test hook: one warp, one mma.sp.m16n8k32 f16, fragments loaded as in LLVM's
// mlir/test/Integration/Dialect/SparseTensor/GPU/CUDA/sparse-mma-2-4-f16.mlir, so a
// known-answer test checks the emulator's own reading of the metadata layout.
struct MmaProbe {
    const u16* a;     // [16][16] compressed f16 values
    const u16* meta;  // [16][2] metadata, 8 two-bit indices per uint16
    const u16* b;     // [8][32] f16, B stored column-major (row n = column n of B)
    float* c;         // [16][8] output
};

static void mma_sp_probe_f16(const MmaProbe p) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3, pair = lane & 1;
    const u32 meta = u32(p.meta[g * 2 + pair]) | (u32(p.meta[(g + 8) * 2 + pair]) << 16);
    auto a2 = [&](int row, int col) { return u32(p.a[row * 16 + col]) | (u32(p.a[row * 16 + col + 1]) << 16); };
    auto b2 = [&](int n, int k) { return u32(p.b[n * 32 + k]) | (u32(p.b[n * 32 + k + 1]) << 16); };
    const u32 a[4] = {a2(g, 2 * t), a2(g + 8, 2 * t), a2(g, 2 * t + 8), a2(g + 8, 2 * t + 8)};
    const u32 b[4] = {b2(g, 2 * t), b2(g, 2 * t + 8), b2(g, 2 * t + 16), b2(g, 2 * t + 24)};
    float d[4] = {0.f, 0.f, 0.f, 0.f};
    mma_sp_16832_f16(d, a, b, meta);
    p.c[g * 8 + 2 * t] = d[0];
    p.c[g * 8 + 2 * t + 1] = d[1];
    p.c[(g + 8) * 8 + 2 * t] = d[2];
    p.c[(g + 8) * 8 + 2 * t + 1] = d[3];
}

extern "C" int sas_emu_mma_probe_f16(const u16* a, const u16* meta, const u16* b, float* c, char* error,
                                     int error_len) {
    const MmaProbe probe{a, meta, b, c};
    const std::string message = sas_emu::launch(mma_sp_probe_f16, probe, 1, 1, 32, 16);
    if (message.empty()) return 0;
    std::strncpy(error, message.c_str(), size_t(error_len - 1));
    error[error_len - 1] = '\0';
    return 1;
}
