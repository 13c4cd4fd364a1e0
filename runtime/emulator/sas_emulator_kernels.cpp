// The host build of the CUDA kernels: the .cu files of runtime/cuda compiled verbatim with
// the emulated primitives of sas_emulator.hpp (selected in sas_ptx.cuh by SAS_EMULATOR).
// Every kernel registers itself (name, host function, parameter struct); Python
// (runtime/emulator/driver.py) finds a kernel and its `<name>_launch` geometry by symbol name
// and runs it through sas_emu_launch_kernel, the emulator's cuLaunchKernel.
#define SAS_EMULATOR 1
#include "sas_ptx.cuh"

#include <cstddef>

#include "sas_compress.cu"
#include "spmma.cu"
#include "spwgmma.cu"

static int report(const std::string& message, char* error, int error_len) {
    if (message.empty()) return 0;
    if (error_len > 0) {
        std::strncpy(error, message.c_str(), size_t(error_len - 1));
        error[error_len - 1] = '\0';
    }
    return 1;
}

static const sas_emu::KernelEntry* find_kernel(const void* function) {
    for (const sas_emu::KernelEntry& e : sas_emu::registry())
        if (e.function == function) return &e;
    return nullptr;
}

// cuLaunchKernel's contract, as the driver implements it for these kernels: argument i is
// read from the address in kernel_params[i]; every kernel takes one struct by value, so its
// sizeof(struct) bytes are copied from kernel_params[0] at launch (the struct type is the
// kernel's, from the registry). runtime/emulator/driver.py calls this with exactly what
// runtime/cuda/launch.py hands the real driver.
extern "C" int sas_emu_launch_kernel(void* kernel, unsigned grid_x, unsigned grid_y, unsigned grid_z,
                                     unsigned block_x, unsigned block_y, unsigned block_z, unsigned smem_bytes,
                                     void** kernel_params, void** extra, char* error, int error_len) {
    const sas_emu::KernelEntry* entry = find_kernel(kernel);
    if (entry == nullptr) return report("not a registered kernel of the emulator library", error, error_len);
    if (kernel_params == nullptr || kernel_params[0] == nullptr)
        return report(std::string("kernelParams is null: ") + entry->name + " takes one " + entry->param_type +
                          " argument",
                      error, error_len);
    if (extra != nullptr) return report("extra must be null (arguments travel in kernelParams)", error, error_len);
    if (grid_z != 1 || block_y != 1 || block_z != 1)
        return report("the kernels use a 2-D grid of 1-D blocks: grid z and block y, z must be 1", error,
                      error_len);
    std::string message;
    try {
        message = entry->run(entry->function, kernel_params[0], int(grid_x), int(grid_y), int(block_x),
                             int(smem_bytes));
    } catch (const std::exception& e) {
        message = std::string("emulator exception: ") + e.what();
    }
    return report(message, error, error_len);
}

// ---- what the tests read: kernels, parameter structs, shared-memory statistics --------------
extern "C" int sas_emu_kernel_count() { return int(sas_emu::registry().size()); }
extern "C" const char* sas_emu_kernel_name(int i) { return sas_emu::registry()[size_t(i)].name; }
extern "C" const char* sas_emu_kernel_param_type(int i) { return sas_emu::registry()[size_t(i)].param_type; }
extern "C" int sas_emu_kernel_param_size(int i) { return sas_emu::registry()[size_t(i)].param_size; }

#define SAS_FIELD(S, F) int(offsetof(S, F))
// sizeof(struct) followed by the offset of every field in declaration order; -1 if unknown.
extern "C" int sas_emu_struct_layout(const char* name, int* out, int capacity) {
    std::vector<int> layout;
    if (std::strcmp(name, "SpGemmParams") == 0) {
        layout = {int(sizeof(SpGemmParams)),        SAS_FIELD(SpGemmParams, a_vals), SAS_FIELD(SpGemmParams, a_meta),
                  SAS_FIELD(SpGemmParams, b),       SAS_FIELD(SpGemmParams, bias),   SAS_FIELD(SpGemmParams, out),
                  SAS_FIELD(SpGemmParams, rows_a),  SAS_FIELD(SpGemmParams, rows_b), SAS_FIELD(SpGemmParams, k),
                  SAS_FIELD(SpGemmParams, b_ld),    SAS_FIELD(SpGemmParams, a_ld),   SAS_FIELD(SpGemmParams, ktiles),
                  SAS_FIELD(SpGemmParams, b_ktiles), SAS_FIELD(SpGemmParams, ldo),   SAS_FIELD(SpGemmParams, flags)};
    } else if (std::strcmp(name, "CompressParams") == 0) {
        layout = {int(sizeof(CompressParams)),         SAS_FIELD(CompressParams, x),
                  SAS_FIELD(CompressParams, vals),     SAS_FIELD(CompressParams, meta),
                  SAS_FIELD(CompressParams, R),        SAS_FIELD(CompressParams, K),
                  SAS_FIELD(CompressParams, rows_pad), SAS_FIELD(CompressParams, ktiles),
                  SAS_FIELD(CompressParams, a_ld),     SAS_FIELD(CompressParams, flags)};
    } else {
        return -1;
    }
    const int n = std::min<int>(capacity, int(layout.size()));
    for (int i = 0; i < n; ++i) out[i] = layout[size_t(i)];
    return int(layout.size());
}
#undef SAS_FIELD

// Shared-memory accesses of the last launch: per kind (ld.shared, st.shared, ldmatrix,
// cp.async), warp instructions, wavefronts, and wavefronts of a conflict-free access.
extern "C" void sas_emu_smem_stats(long long* out, char* example, int example_len) {
    std::lock_guard<std::mutex> lock(sas_emu::last_stats_mutex);
    for (int k = 0; k < sas_emu::kSmemKinds; ++k) {
        out[3 * k] = sas_emu::last_stats.instructions[k];
        out[3 * k + 1] = sas_emu::last_stats.wavefronts[k];
        out[3 * k + 2] = sas_emu::last_stats.ideal[k];
    }
    report(sas_emu::last_stats.example, example, example_len);
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
    return report(sas_emu::launch(mma_sp_probe_f16, probe, 1, 1, 32, 16), error, error_len);
}

// ---- test hook: one warpgroup, one wgmma.mma_async.sp.m64nNk32 with both operands in shared
// memory. The caller lays out the shared-memory image and computes the descriptors (start
// addresses relative to a 1 KiB aligned origin) and each thread's metadata register from
// the PTX ISA's tables; the hook adds the origin, issues the instruction and returns every
// thread's raw accumulator registers, which the caller maps to D by the ISA's D layout.
struct WgmmaProbe {
    const unsigned char* image;  // shared-memory image, placed at the 1 KiB aligned origin
    int image_bytes;             // a multiple of 16
    u64 desc_a, desc_b;          // start addresses relative to the origin
    const u32* meta;             // [128] metadata register of each thread
    float* d;                    // [128][n / 2] accumulators: in = C, out = D
    int n;                       // 128 or 256
    int bf16;                    // element type: float16 (0) or bfloat16 (1)
    int omit;                    // deliberate mistakes: 1 fence.proxy.async, 2 wgmma.fence, 4 wait_group
};

template <int N>
static void wgmma_probe_issue(const WgmmaProbe& p, float (&acc)[N / 2], u64 da, u64 db, u32 meta) {
    if (p.bf16) {
        if constexpr (N == 128) wgmma_sp_m64n128k32_bf16(acc, da, db, meta);
        else wgmma_sp_m64n256k32_bf16(acc, da, db, meta);
    } else {
        if constexpr (N == 128) wgmma_sp_m64n128k32_f16(acc, da, db, meta);
        else wgmma_sp_m64n256k32_f16(acc, da, db, meta);
    }
}

template <int N>
static void wgmma_sp_probe(const WgmmaProbe p) {
    const int tid = threadIdx.x;
    const u32 origin = (sas_smem_base() + 1023u) & ~1023u;
    for (int i = tid * 16; i < p.image_bytes; i += 128 * 16) {
        u32x4 v;
        std::memcpy(&v, p.image + i, 16);
        sts128(origin + u32(i), v);
    }
    if (!(p.omit & 1)) fence_proxy_async();
    __syncthreads();
    float acc[N / 2];
    for (int i = 0; i < N / 2; ++i) acc[i] = p.d[tid * (N / 2) + i];
    const u64 shift = origin >> 4;  // the start address field counts 16-byte units
    if (!(p.omit & 2)) wgmma_fence();
    wgmma_probe_issue<N>(p, acc, p.desc_a + shift, p.desc_b + shift, p.meta[tid]);
    wgmma_commit();
    if (!(p.omit & 4)) wgmma_wait<0>();
    for (int i = 0; i < N / 2; ++i) p.d[tid * (N / 2) + i] = acc[i];
}

extern "C" int sas_emu_wgmma_probe(const unsigned char* image, int image_bytes, u64 desc_a, u64 desc_b,
                                   const u32* meta, float* d, int n, int bf16, int omit, char* error,
                                   int error_len) {
    const WgmmaProbe probe{image, image_bytes, desc_a, desc_b, meta, d, n, bf16, omit};
    if (image_bytes % 16 != 0 || (n != 128 && n != 256))
        return report("wgmma probe: image_bytes must be a multiple of 16 and n 128 or 256", error, error_len);
    const int smem = image_bytes + 1024;
    if (n == 128) return report(sas_emu::launch(wgmma_sp_probe<128>, probe, 1, 1, 128, smem), error, error_len);
    return report(sas_emu::launch(wgmma_sp_probe<256>, probe, 1, 1, 128, smem), error, error_len);
}

// ---- test hook: a warp-wide shared access whose lanes are `stride` bytes apart, so that a
// test can see the bank-conflict counter count conflicts (stride 128: 32-way) and none
// (stride 4). Kind 0: ld.shared of `bytes` (4, 8, 16), kind 1: ldmatrix.x4.
struct BankProbe {
    int stride, bytes, kind;
};

static void bank_probe(const BankProbe p) {
    const u32 base = (sas_smem_base() + 127u) & ~127u;
    const u32 addr = base + u32(threadIdx.x % 32) * u32(p.stride);
    if (p.kind == 1) {
        u32 r[4];
        ldmatrix_x4(r, addr);
    } else if (p.bytes == 4) {
        (void)lds32(addr);
    } else if (p.bytes == 8) {
        (void)lds64(addr);
    } else {
        (void)lds128(addr);
    }
}

extern "C" int sas_emu_bank_probe(int stride, int bytes, int kind, char* error, int error_len) {
    const BankProbe probe{stride, bytes, kind};
    return report(sas_emu::launch(bank_probe, probe, 1, 1, 32, 32 * stride + 256), error, error_len);
}
