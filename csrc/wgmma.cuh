// Hopper warpgroup MMA (wgmma.mma_async, sm_90a): D (64 x N, fp32) += A (64 x 16) B (16 x N) for
// the 128 threads of a warpgroup, B (and A, or A from registers) read from shared memory by the
// tensor cores through 64-bit matrix descriptors. A warp's mma.sync loads its B fragments from
// shared memory itself (ldmatrix), so four warps read every B element four times; one wgmma
// reads it once for the warpgroup.
//
// Register layouts (PTX ISA "Register Fragments", CUTLASS CLayout_64xN = ALayout_64x16): warp w of
// the warpgroup holds rows 16w .. 16w + 15 of D and of a register A, each in mma.sync m16n8k16's
// C / A fragment layout (flash::acc_col / acc_row), D's n8 tiles in order: d[4n + e] = c[n][e].
// So the flash kernels' accumulators, masking, softmax and acc_to_a work unchanged.
//
// Shared-memory tiles use the no-swizzle canonical layout: 8 x 8 "core matrices" of 16-bit
// elements, each 128 contiguous bytes (8 rows of 16 bytes), core (r / 8, c / 8) of an R x C tile
// at ((r / 8) (C / 8) + c / 8) 128 bytes (core_offset). In the descriptor, SBO is the byte
// distance between core matrices along M / N and LBO along K (PTX canonical layouts: K-major
// ((8,m),(T,2k)):((1T,SBO),(1,LBO)), MN-major ((T,1,m),(8,k)):((1,T,SBO),(1T,LBO))). A tile with
// C contiguous columns is K-major for an operand whose K runs along C (Q, K in Q K^T) and
// MN-major for one whose K runs along R (V in P V: tnspB).
//
// Asynchrony: wgmma.fence before the first wgmma that reads registers other instructions wrote;
// commit_group / wait_group<0>, after which the registers may be read (operand_fence keeps the
// compiler from moving their uses above the wait). Shared memory written through the generic
// proxy (stores, cp.async) must be followed by fence.proxy.async (async_proxy_fence) before the
// barrier that publishes it to the wgmmas.
//
// With SOLA_HOST_EMULATION the same calls run on the emulator (scripts/cuda_emulator/emu.h), which
// reads shared memory through the decoded descriptors.
#pragma once

#include <cstdint>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "common.h"

// wgmma exists in sm_90a code only (the `a` target: nvcc defines __CUDA_ARCH_FEAT_SM90_ALL).
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SOLA_WGMMA_DEVICE 1
#endif

namespace sola {
namespace wgmma {

// Element offset of (r, c) in a tile of kCols columns (a multiple of 8) in core-matrix layout.
template <int kCols>
SOLA_HD constexpr int core_offset(int r, int c) {
  return ((r >> 3) * (kCols >> 3) + (c >> 3)) * 64 + (r & 7) * 8 + (c & 7);
}

// Byte address of p in the shared-memory window (the emulator: offset in its dynamic smem).
SOLA_HD uint32_t smem_address(const void* p) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
#elif defined(SOLA_HOST_EMULATION)
  return static_cast<uint32_t>(static_cast<const unsigned char*>(p) - ::emu::dynamic_smem());
#else
  return 0;
#endif
}

// Matrix descriptor, no swizzle (bits 62-63 = 0, base offset 0): start address, LBO, SBO, each
// as (bytes & 0x3FFFF) >> 4 in bits 0-13, 16-29, 32-45.
SOLA_HD uint64_t descriptor(const void* start, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  auto enc = [](uint32_t x) { return static_cast<uint64_t>((x & 0x3FFFFu) >> 4); };
  return enc(smem_address(start)) | enc(lbo_bytes) << 16 | enc(sbo_bytes) << 32;
}

// Operand of a tile of kCols columns (core-matrix layout) starting at element (r0, c0):
// K along the columns (K-major: Q, K of Q K^T) or along the rows (MN-major: V of P V).
template <int kCols, typename T>
SOLA_HD uint64_t k_along_cols(const T* tile, int r0, int c0) {
  return descriptor(tile + core_offset<kCols>(r0, c0), 128, kCols / 8 * 128);
}
template <int kCols, typename T>
SOLA_HD uint64_t k_along_rows(const T* tile, int r0, int c0) {
  return descriptor(tile + core_offset<kCols>(r0, c0), kCols / 8 * 128, 128);
}

SOLA_HD void fence() {
#if defined(SOLA_WGMMA_DEVICE)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

SOLA_HD void commit() {
#if defined(SOLA_WGMMA_DEVICE)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#elif defined(SOLA_HOST_EMULATION)
  ::emu::wgmma_commit();
#endif
}

// Waits until at most kPending committed groups are in flight.
template <int kPending>
SOLA_HD void wait() {
#if defined(SOLA_WGMMA_DEVICE)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
#elif defined(SOLA_HOST_EMULATION)
  ::emu::wgmma_wait(kPending);
#endif
}

// Generic-proxy writes to shared memory (stores, cp.async) become visible to wgmma's reads.
SOLA_HD void async_proxy_fence() {
#if defined(SOLA_WGMMA_DEVICE)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#elif defined(SOLA_HOST_EMULATION)
  ::emu::async_proxy_fence();
#endif
}

// Keeps the compiler from moving reads or writes of x across a wgmma issue / wait.
template <int kN>
SOLA_HD void operand_fence(float (&x)[kN]) {
#if defined(SOLA_WGMMA_DEVICE)
#pragma unroll
  for (int i = 0; i < kN; ++i) asm volatile("" : "+f"(x[i])::"memory");
#endif
}
template <int kN>
SOLA_HD void operand_fence(uint32_t (&x)[kN]) {
#if defined(SOLA_WGMMA_DEVICE)
#pragma unroll
  for (int i = 0; i < kN; ++i) asm volatile("" : "+r"(x[i])::"memory");
#endif
}

// The instructions, one macro per shape (inline asm wants its operand lists spelled out).
#define SOLA_WGMMA_SS_32(TYPE)                                                        \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"                                       \
               "wgmma.mma_async.sync.aligned.m64n32k16.f32." TYPE "." TYPE " {"                        \
               "%0, %1, %2, %3, %4, %5, %6, %7,"                                                              \
               "%8, %9, %10, %11, %12, %13, %14, %15"                                                         \
               "}, %16, %17, p, 1, 1, 0, 0;\n}\n"                                                             \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
                 "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]) \
               : "l"(a), "l"(b), "r"(scale_d))

#define SOLA_WGMMA_SS_64(TYPE)                                                        \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                       \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " {"                        \
               "%0, %1, %2, %3, %4, %5, %6, %7,"                                                              \
               "%8, %9, %10, %11, %12, %13, %14, %15,"                                                        \
               "%16, %17, %18, %19, %20, %21, %22, %23,"                                                      \
               "%24, %25, %26, %27, %28, %29, %30, %31"                                                       \
               "}, %32, %33, p, 1, 1, 0, 0;\n}\n"                                                             \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
                 "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
                 "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
                 "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]) \
               : "l"(a), "l"(b), "r"(scale_d))

#define SOLA_WGMMA_SS_128(TYPE)                                                        \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                       \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " {"                        \
               "%0, %1, %2, %3, %4, %5, %6, %7,"                                                              \
               "%8, %9, %10, %11, %12, %13, %14, %15,"                                                        \
               "%16, %17, %18, %19, %20, %21, %22, %23,"                                                      \
               "%24, %25, %26, %27, %28, %29, %30, %31,"                                                      \
               "%32, %33, %34, %35, %36, %37, %38, %39,"                                                      \
               "%40, %41, %42, %43, %44, %45, %46, %47,"                                                      \
               "%48, %49, %50, %51, %52, %53, %54, %55,"                                                      \
               "%56, %57, %58, %59, %60, %61, %62, %63"                                                       \
               "}, %64, %65, p, 1, 1, 0, 0;\n}\n"                                                             \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
                 "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
                 "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
                 "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
                 "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
                 "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
                 "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
                 "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
               : "l"(a), "l"(b), "r"(scale_d))

#define SOLA_WGMMA_RS_32(TYPE)                                                        \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"                                       \
               "wgmma.mma_async.sync.aligned.m64n32k16.f32." TYPE "." TYPE " {"                        \
               "%0, %1, %2, %3, %4, %5, %6, %7,"                                                              \
               "%8, %9, %10, %11, %12, %13, %14, %15"                                                         \
               "}, {%16, %17, %18, %19}, %20, p, 1, 1, 1;\n}\n"                                               \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
                 "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]) \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d))

#define SOLA_WGMMA_RS_64(TYPE)                                                        \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                       \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " {"                        \
               "%0, %1, %2, %3, %4, %5, %6, %7,"                                                              \
               "%8, %9, %10, %11, %12, %13, %14, %15,"                                                        \
               "%16, %17, %18, %19, %20, %21, %22, %23,"                                                      \
               "%24, %25, %26, %27, %28, %29, %30, %31"                                                       \
               "}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"                                               \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
                 "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
                 "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
                 "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]) \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d))

#define SOLA_WGMMA_RS_128(TYPE)                                                        \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                       \
               "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " {"                        \
               "%0, %1, %2, %3, %4, %5, %6, %7,"                                                              \
               "%8, %9, %10, %11, %12, %13, %14, %15,"                                                        \
               "%16, %17, %18, %19, %20, %21, %22, %23,"                                                      \
               "%24, %25, %26, %27, %28, %29, %30, %31,"                                                      \
               "%32, %33, %34, %35, %36, %37, %38, %39,"                                                      \
               "%40, %41, %42, %43, %44, %45, %46, %47,"                                                      \
               "%48, %49, %50, %51, %52, %53, %54, %55,"                                                      \
               "%56, %57, %58, %59, %60, %61, %62, %63"                                                       \
               "}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"                                               \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
                 "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
                 "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
                 "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
                 "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
                 "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
                 "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
                 "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d))

// d (64 x kN, this thread's kN / 2 values) = (scale_d ? d : 0) + A B; A and B from shared memory,
// both K-major (no transpose).
template <typename T, int kN>
SOLA_HD void mma_ss(float (&d)[kN / 2], uint64_t a, uint64_t b, int scale_d) {
#if defined(SOLA_WGMMA_DEVICE)
  static_assert(kN == 32 || kN == 64 || kN == 128, "wgmma N: 32, 64 or 128");
  if constexpr (std::is_same_v<T, c10::Half>) {
    if constexpr (kN == 32) SOLA_WGMMA_SS_32("f16");
    else if constexpr (kN == 64) SOLA_WGMMA_SS_64("f16");
    else SOLA_WGMMA_SS_128("f16");
  } else {
    if constexpr (kN == 32) SOLA_WGMMA_SS_32("bf16");
    else if constexpr (kN == 64) SOLA_WGMMA_SS_64("bf16");
    else SOLA_WGMMA_SS_128("bf16");
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // the launchers pick the wgmma kernels only where sm_90a code was compiled
#elif defined(SOLA_HOST_EMULATION)
  ::emu::wgmma<T, kN>(d, nullptr, a, b, scale_d, false);
#endif
}

// d = (scale_d ? d : 0) + A B with A from registers (this thread's m16n8k16 A fragment of its
// warp's 16 rows) and B from shared memory, MN-major (transposed: K along the tile's rows).
// The registers of a must stay unchanged until the wait (operand_fence after it).
template <typename T, int kN>
SOLA_HD void mma_rs(float (&d)[kN / 2], const uint32_t (&a)[4], uint64_t b, int scale_d) {
#if defined(SOLA_WGMMA_DEVICE)
  static_assert(kN == 32 || kN == 64 || kN == 128, "wgmma N: 32, 64 or 128");
  if constexpr (std::is_same_v<T, c10::Half>) {
    if constexpr (kN == 32) SOLA_WGMMA_RS_32("f16");
    else if constexpr (kN == 64) SOLA_WGMMA_RS_64("f16");
    else SOLA_WGMMA_RS_128("f16");
  } else {
    if constexpr (kN == 32) SOLA_WGMMA_RS_32("bf16");
    else if constexpr (kN == 64) SOLA_WGMMA_RS_64("bf16");
    else SOLA_WGMMA_RS_128("bf16");
  }
#elif defined(__CUDA_ARCH__)
  __trap();
#elif defined(SOLA_HOST_EMULATION)
  ::emu::wgmma<T, kN>(d, a, 0, b, scale_d, true);
#endif
}

}  // namespace wgmma
}  // namespace sola

#undef SOLA_WGMMA_SS_32
#undef SOLA_WGMMA_SS_64
#undef SOLA_WGMMA_SS_128
#undef SOLA_WGMMA_RS_32
#undef SOLA_WGMMA_RS_64
#undef SOLA_WGMMA_RS_128
