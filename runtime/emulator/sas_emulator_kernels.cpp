// The host build of the CUDA kernels: the .cu files of runtime/cuda compiled verbatim with
// the emulated primitives of sas_emulator.hpp (selected in sas_ptx.cuh by SAS_EMULATOR).
// Python (runtime/emulator/driver.py) finds each kernel and its `<name>_launch` geometry by
// symbol name and runs it through sas_emu_launch_kernel, the emulator's cuLaunchKernel.
#define SAS_EMULATOR 1
#include "sas_emulator.hpp"

#include <cstddef>

#include "sas_gemm.cu"
#include "sws_gemm.cu"

static int report(const std::string& message, char* error, int error_len) {
    if (message.empty()) return 0;
    if (error_len > 0) {
        std::strncpy(error, message.c_str(), size_t(error_len - 1));
        error[error_len - 1] = '\0';
    }
    return 1;
}

// cuLaunchKernel's contract, as the driver implements it for these kernels: argument i is
// read from the address in kernel_params[i]; every kernel takes one GemmParams by value, so
// its bytes are copied from kernel_params[0] at launch. runtime/emulator/driver.py calls
// this with exactly what runtime/cuda/launch.py hands the real driver.
extern "C" int sas_emu_launch_kernel(void (*kernel)(GemmParams), unsigned grid_x, unsigned grid_y,
                                     unsigned grid_z, unsigned block_x, unsigned block_y,
                                     unsigned block_z, unsigned smem_bytes, void** kernel_params,
                                     void** extra, char* error, int error_len) {
    if (kernel_params == nullptr || kernel_params[0] == nullptr)
        return report("kernelParams is null: every kernel takes one GemmParams argument", error, error_len);
    if (extra != nullptr) return report("extra must be null (arguments travel in kernelParams)", error, error_len);
    if (grid_z != 1 || block_y != 1 || block_z != 1)
        return report("the kernels use a 2-D grid of 1-D blocks: grid z and block y, z must be 1", error,
                      error_len);
    GemmParams params;
    std::memcpy(&params, kernel_params[0], sizeof params);
    std::string message;
    try {
        message = sas_emu::launch(kernel, params, int(grid_x), int(grid_y), int(block_x), int(smem_bytes));
    } catch (const std::exception& e) {
        message = std::string("emulator exception: ") + e.what();
    }
    return report(message, error, error_len);
}

// sizeof(GemmParams) and the offset of each field, for the check of the ctypes mirror.
extern "C" const int sas_emu_gemm_params_layout[11] = {
    int(sizeof(GemmParams)),         int(offsetof(GemmParams, a)),  int(offsetof(GemmParams, b)),
    int(offsetof(GemmParams, meta)), int(offsetof(GemmParams, bias)), int(offsetof(GemmParams, out)),
    int(offsetof(GemmParams, R)),    int(offsetof(GemmParams, N)),  int(offsetof(GemmParams, K)),
    int(offsetof(GemmParams, Kp)),   int(offsetof(GemmParams, flags)),
};

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
    return report(sas_emu::launch(mma_sp_probe_f16, probe, 1, 1, 32, 16), error, error_len);
}
