// The CPU reference convolutions' lowering and matrix product (core/train/lowering.h).
//
// This file is compiled with -ffp-contract=fast (core/CMakeLists.txt): the product's
// multiply-adds may fuse where the target has FMA. That changes no bit: every product multiplies
// two values that were floats (24-bit significands), so it is exact in double (53 bits), and a
// fused multiply-add rounds exactly where a multiply and an add do. Nothing else here multiplies
// floating-point values.
#include "lowering.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <utility>
#include <vector>

namespace tresor::train::lowering {

namespace {

// The positions [lo, hi) of a grid row of `gw` whose tap `t` reads inside a source row of `sw`:
// 0 <= o·stride − pad + t < sw.
std::pair<size_t, size_t> tap_range(size_t t, size_t stride, size_t pad, size_t sw, size_t gw) {
  if (sw + pad <= t) return {0, 0};
  const size_t lo = t >= pad ? 0 : (pad - t + stride - 1) / stride;
  const size_t hi = std::min(gw, (sw - 1 + pad - t) / stride + 1);
  return {std::min(lo, hi), hi};
}

// Calls fn(row offset in the source plane or SIZE_MAX when the row is outside, first position,
// grid x of that position, count) for each stretch of [p0, p1) that lies in one grid row, for tap
// (tz, ty).
template <typename Fn>
void for_each_row(const Geometry& g, size_t tz, size_t ty, size_t p0, size_t p1, Fn&& fn) {
  const size_t gh = g.grid[1], gw = g.grid[2];
  for (size_t p = p0; p < p1;) {
    const size_t ox = p % gw, row = p / gw, oy = row % gh, oz = row / gh;
    const size_t count = std::min(p1 - p, gw - ox);
    const size_t iz = oz * g.stride + tz, iy = oy * g.stride + ty;  // + pad
    const bool inside = iz >= g.pad && iz - g.pad < g.src[0] && iy >= g.pad && iy - g.pad < g.src[1];
    fn(inside ? ((iz - g.pad) * g.src[1] + (iy - g.pad)) * g.src[2] : SIZE_MAX, p, ox, count);
    p += count;
  }
}

}  // namespace

size_t block_positions(size_t rows, size_t positions) {
  const size_t want = std::clamp<size_t>((size_t{1} << 20) / (sizeof(float) * std::max<size_t>(rows, 1)), 256, 16384);
  return std::max<size_t>(1, std::min(want, positions));
}

namespace {

// Row r of the column matrix for positions [p0, p1) into `out` (p1 − p0 floats).
void column_row(const Geometry& g, const float* src, size_t r, size_t p0, size_t p1, float* out) {
  const size_t taps = g.taps(), k = g.k;
  const size_t c = r / taps, t = r % taps, tz = t / (k * k), ty = (t / k) % k, tx = t % k;
  const float* plane = src + c * g.src_voxels();
  const auto [lo, hi] = tap_range(tx, g.stride, g.pad, g.src[2], g.grid[2]);
  for_each_row(g, tz, ty, p0, p1, [&](size_t offset, size_t p, size_t ox, size_t count) {
    float* o = out + (p - p0);
    if (offset == SIZE_MAX) {
      std::fill_n(o, count, 0.0f);
      return;
    }
    // Zeros left of the source row, its voxels, zeros right of it.
    const size_t end = ox + count, a = std::clamp(lo, ox, end), z = std::clamp(hi, a, end);
    std::fill(o, o + (a - ox), 0.0f);
    const float* row = plane + offset;  // x·stride + tx − pad >= 0 for x >= lo
    if (a < z && g.stride == 1) {
      std::copy_n(row + (a + tx - g.pad), z - a, o + (a - ox));
    } else {
      for (size_t x = a; x < z; ++x) o[x - ox] = row[x * g.stride + tx - g.pad];
    }
    std::fill(o + (z - ox), o + count, 0.0f);
  });
}

}  // namespace

size_t packed_size(size_t kd, size_t n) { return (n + kTile - 1) / kTile * kTile * kd; }

void im2col(const Geometry& g, const float* src, size_t p0, size_t p1, SharedIndex shared, float* out, ThreadPool& pool) {
  const size_t np = p1 - p0, rows = g.rows();
  // One job per 8 rows: each job writes contiguous runs of its own — 8 × 8 floats per position
  // tile, or a whole row tile.
  pool.parallel_for((rows + kTile - 1) / kTile, [&](size_t job) {
    thread_local std::vector<float> lines;  // the job's 8 rows, unpacked
    lines.resize(kTile * np);
    for (size_t i = 0; i < kTile; ++i) {
      const size_t r = job * kTile + i;
      if (r < rows) {
        column_row(g, src, r, p0, p1, lines.data() + i * np);
      } else {
        std::fill_n(lines.data() + i * np, np, 0.0f);
      }
    }
    if (shared == SharedIndex::kPositions) {
      float* tile = out + job * np * kTile;
      for (size_t q = 0; q < np; ++q)
        for (size_t i = 0; i < kTile; ++i) tile[q * kTile + i] = lines[i * np + q];
      return;
    }
    for (size_t i = 0; i < kTile && job * kTile + i < rows; ++i) {
      const size_t r = job * kTile + i;
      const float* line = lines.data() + i * np;
      for (size_t q0 = 0; q0 < np; q0 += kTile) {
        float* o = out + (q0 / kTile * rows + r) * kTile;
        const size_t count = std::min(kTile, np - q0);
        for (size_t j = 0; j < kTile; ++j) o[j] = j < count ? line[q0 + j] : 0.0f;
      }
    }
  });
}

void pack(const float* b, size_t ldb, size_t kd, size_t n, float* out, ThreadPool& pool) {
  const size_t tiles = (n + kTile - 1) / kTile;
  // By blocks of 8 rows of B: per tile, 8 reads of 8 floats along the rows, one write of 64
  // contiguous floats.
  pool.parallel_for((kd + 7) / 8, [&](size_t kb) {
    const size_t k0 = kb * 8, k1 = std::min(kd, k0 + 8);
    for (size_t t = 0; t < tiles; ++t) {
      const size_t cols = std::min(kTile, n - t * kTile);
      for (size_t k = k0; k < k1; ++k) {
        float* o = out + (t * kd + k) * kTile;
        const float* src = b + k * ldb + t * kTile;
        for (size_t j = 0; j < kTile; ++j) o[j] = j < cols ? src[j] : 0.0f;
      }
    }
  });
}

void col2im(const Geometry& g, const double* col, size_t p0, size_t p1, double* dst, ThreadPool& pool) {
  const size_t np = p1 - p0, taps = g.taps(), k = g.k;
  pool.parallel_for(g.channels, [&](size_t c) {
    double* plane = dst + c * g.src_voxels();
    for (size_t t = 0; t < taps; ++t) {
      const size_t tz = t / (k * k), ty = (t / k) % k, tx = t % k;
      const double* in = col + (c * taps + t) * np;
      const auto [lo, hi] = tap_range(tx, g.stride, g.pad, g.src[2], g.grid[2]);
      for_each_row(g, tz, ty, p0, p1, [&](size_t offset, size_t p, size_t ox, size_t count) {
        if (offset == SIZE_MAX) return;
        double* row = plane + offset;
        const double* v = in + (p - p0);  // v[x − ox] for grid x
        for (size_t x = std::max(ox, lo); x < std::min(ox + count, hi); ++x) row[x * g.stride + tx - g.pad] += v[x - ox];
      });
    }
  });
}

namespace {

// The product's blocking. A is packed as doubles in panels of 6 rows, k-major; B as floats in
// tiles of 8 columns, k-major, zero beyond its last column; both contiguous, whatever the
// operands' leading dimensions. A job computes 6 rows × 64 columns of C in a local buffer, a
// tile of 6 × 8 at a time held in registers (12 vectors of 4 doubles), the shared index in blocks
// of 256 so that a tile's slices of A and B stay in the first-level cache. The buffer holds
// doubles between blocks, so the blocking does not change the order of any sum.
constexpr size_t kMr = 6, kNr = kTile, kTilesPerJob = 8, kJobColumns = kNr * kTilesPerJob, kBlock = 256;

using d4 = double __attribute__((vector_size(32)));

// buf[0..6)[0..8·tiles) += Σ_k ap[k][i]·bp[tile][k][j] (buf rows kJobColumns apart). Inlined
// into two builds below; both give the same bits (see the top of this file).
[[gnu::always_inline]] inline void panel_product_body(size_t kd, const double* ap, const float* bp, size_t tiles, double* buf) {
  for (size_t k0 = 0; k0 < kd; k0 += kBlock) {
    const size_t k1 = std::min(kd, k0 + kBlock);
    for (size_t t = 0; t < tiles; ++t) {
      double* c = buf + t * kNr;
      const float* bt = bp + t * kd * kNr;
      d4 acc[kMr][2];
      for (size_t i = 0; i < kMr; ++i) std::memcpy(&acc[i], c + i * kJobColumns, sizeof acc[i]);
      for (size_t k = k0; k < k1; ++k) {
        const float* bk = bt + k * kNr;
        const d4 b0 = {bk[0], bk[1], bk[2], bk[3]}, b1 = {bk[4], bk[5], bk[6], bk[7]};
        const double* a = ap + k * kMr;
        for (size_t i = 0; i < kMr; ++i) {
          acc[i][0] += a[i] * b0;
          acc[i][1] += a[i] * b1;
        }
      }
      for (size_t i = 0; i < kMr; ++i) std::memcpy(c + i * kJobColumns, &acc[i], sizeof acc[i]);
    }
  }
}

// The baseline build: whatever the compile flags allow (SSE2 on x86-64: each 4-double vector as
// two halves).
void panel_product_baseline(size_t kd, const double* ap, const float* bp, size_t tiles, double* buf) { panel_product_body(kd, ap, bp, tiles, buf); }

// The AVX2/FMA build (GCC or clang on x86-64), taken where the CPU reports both extensions.
#if defined(__GNUC__) && defined(__x86_64__)
#define TRESOR_LOWERING_AVX2 1
[[gnu::target("avx2,fma")]] void panel_product_avx2(size_t kd, const double* ap, const float* bp, size_t tiles, double* buf) {
  panel_product_body(kd, ap, bp, tiles, buf);
}
#endif

std::atomic<bool> force_baseline{false};

void panel_product(size_t kd, const double* ap, const float* bp, size_t tiles, double* buf) {
#ifdef TRESOR_LOWERING_AVX2
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2 && !force_baseline.load(std::memory_order_relaxed)) {
    panel_product_avx2(kd, ap, bp, tiles, buf);
    return;
  }
#endif
  panel_product_baseline(kd, ap, bp, tiles, buf);
}

}  // namespace

bool avx2_product() {
#ifdef TRESOR_LOWERING_AVX2
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

void use_baseline_product(bool baseline) { force_baseline.store(baseline, std::memory_order_relaxed); }

void gemm(size_t m, size_t n, size_t kd, const float* a, size_t lda, const float* bp, double* c, size_t ldc, ThreadPool& pool, bool add) {
  if (m == 0 || n == 0) return;
  const size_t panels = (m + kMr - 1) / kMr, tiles = (n + kNr - 1) / kNr, ranges = (tiles + kTilesPerJob - 1) / kTilesPerJob;
  // Packed A lives in a buffer of the calling thread, kept between calls: a fresh allocation
  // comes as new pages from the kernel, whose faults would cost more than the packing. It keeps
  // the largest A the thread has packed (a layer's weights: 22 MB for 320 → 320 channels, 3³).
  thread_local std::vector<double> scratch;
  if (scratch.size() < panels * kd * kMr) scratch.resize(panels * kd * kMr);
  double* const ap = scratch.data();
  pool.parallel_for(panels, [&](size_t pi) {
    double* out = ap + pi * kd * kMr;
    const size_t rows = std::min(kMr, m - pi * kMr);
    const float* src = a + pi * kMr * lda;
    for (size_t k = 0; k < kd; ++k)
      for (size_t i = 0; i < kMr; ++i) out[k * kMr + i] = i < rows ? static_cast<double>(src[i * lda + k]) : 0.0;
  });
  // Jobs in column-range order, so that the panels of one range, one after the other, find its
  // tiles of B in the cache.
  pool.parallel_for(panels * ranges, [&](size_t job) {
    const size_t pi = job % panels, t0 = (job / panels) * kTilesPerJob, job_tiles = std::min(kTilesPerJob, tiles - t0);
    const size_t rows = std::min(kMr, m - pi * kMr), n0 = t0 * kNr, cols = std::min(kJobColumns, n - n0);
    double buf[kMr * kJobColumns];
    for (size_t i = 0; i < kMr; ++i)
      for (size_t j = 0; j < kJobColumns; ++j) buf[i * kJobColumns + j] = add && i < rows && j < cols ? c[(pi * kMr + i) * ldc + n0 + j] : 0.0;
    panel_product(kd, ap + pi * kd * kMr, bp + t0 * kd * kNr, job_tiles, buf);
    for (size_t i = 0; i < rows; ++i) std::copy_n(buf + i * kJobColumns, cols, c + (pi * kMr + i) * ldc + n0);
  });
}

}  // namespace tresor::train::lowering
