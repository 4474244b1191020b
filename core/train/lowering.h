// core/train/lowering.h — the CPU reference convolutions as matrix products (internal to
// tresor_train; docs/training.md §2). A convolution's taps are lowered to a column matrix
// (im2col), multiplied by the weights, and a transposed convolution's products are scattered
// back (col2im). Every product is of two floats, exact in double, and every sum runs in an order
// fixed by the shapes alone: results do not depend on the thread count, and a fused
// multiply-add gives the same bits as a multiply and an add.
#pragma once

#include <array>
#include <cstddef>

#include "tresor/thread_pool.h"

namespace tresor::train::lowering {

/// The geometry shared by both lowerings: a source of `channels` planes of `src` voxels, read (or
/// written) at the taps of the positions of `grid`: position o and tap t along an axis meet
/// source voxel o·stride − pad + t. Rows of the column matrix are (channel, tz, ty, tx).
struct Geometry {
  size_t channels = 0;
  std::array<size_t, 3> src{};   // d, h, w of the source
  std::array<size_t, 3> grid{};  // d, h, w of the positions
  size_t k = 1, stride = 1, pad = 0;

  size_t taps() const { return k * k * k; }
  size_t rows() const { return channels * taps(); }
  size_t positions() const { return grid[0] * grid[1] * grid[2]; }
  size_t src_voxels() const { return src[0] * src[1] * src[2]; }
};

/// How many positions one column block holds for `rows` rows: about 1 MiB of floats, at least 256
/// and at most 16384 positions, at most the whole grid. Shapes alone decide it.
size_t block_positions(size_t rows, size_t positions);

/// The matrix products' right operand B (kd × n) is packed: tiles of 8 columns, each kd rows of 8
/// contiguous floats (k-major), columns beyond n zero. packed_size(kd, n) floats.
inline constexpr size_t kTile = 8;
size_t packed_size(size_t kd, size_t n);

/// The column matrix: col[r][p] = src[c][position p's tap t] for r = (c, t) and positions p in
/// [p0, p1), 0 where the tap falls outside the source (zero padding), written packed as the B of a
/// product that sums over its rows (kRows: B = col, rows() × (p1 − p0), for weights × columns) or
/// over its positions (kPositions: B = colᵀ, (p1 − p0) × rows(), for a gradient × columnsᵀ).
enum class SharedIndex { kRows, kPositions };
void im2col(const Geometry& g, const float* src, size_t p0, size_t p1, SharedIndex shared, float* out, ThreadPool& pool);

/// Packs a row-major B (kd × n, rows ldb apart).
void pack(const float* b, size_t ldb, size_t kd, size_t n, float* out, ThreadPool& pool);

/// The adjoint of im2col on a plain row-major column matrix (rows() × (p1 − p0) doubles):
/// dst[c][position p's tap t] += col[r][p − p0] for the taps inside the source, each destination
/// voxel adding this block's terms in tap order, then position order (over a layer: blocks in
/// order, so the whole order is fixed by the shapes).
void col2im(const Geometry& g, const double* col, size_t p0, size_t p1, double* dst, ThreadPool& pool);

/// C[i][j] += Σ_k A[i][k]·B[k][j] for i < m, j < n, k ascending for every element (C = the sum
/// from zero when `add` is false: C's old values are then not read); A row-major floats with
/// leading dimension lda, B packed (above), C row-major doubles with ldc.
void gemm(size_t m, size_t n, size_t kd, const float* a, size_t lda, const float* packed_b, double* c, size_t ldc, ThreadPool& pool, bool add = true);

/// The product has two builds where the compiler can make them (GCC on x86-64): one for AVX2 and
/// FMA, taken where the CPU has both (avx2_product()), and the baseline. They give the same bits;
/// use_baseline_product(true) makes every later product, in every thread, take the baseline (for
/// the test that compares them), false restores the choice by the CPU.
bool avx2_product();
void use_baseline_product(bool baseline);

}  // namespace tresor::train::lowering
