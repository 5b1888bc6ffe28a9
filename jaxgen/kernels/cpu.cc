// jaxgen's XLA:CPU FFI kernels for decode steps (see cpu.py for why), float32:
//   JaxgenCpuGemv: y (M, N) = x (M, K) @ w (K, N) for a few rows M.
//   JaxgenCpuDecodeAttention: one query per (batch, head) against the first `length` slots of a KV cache.
//   JaxgenCpuAttention: softmax(q k^T * scale) v for many queries per (batch, head), with a mask over keys only.
//   JaxgenCpuBlasGemm: y = op(x) @ op(w) through a CBLAS sgemm handed over by `JaxgenSetBlas` (numpy's OpenBLAS).
//
// At a few rows a matmul is bound by reading w once. The kernel reads w as one sequential stream per thread: the
// K rows of w are split into contiguous parts (one per thread), each part read row after row into its own (M, N)
// partial result (kept in L1 / L2), and the partials summed at the end.
// Work sharing never blocks on an idle pool: the calling thread claims parts itself until none are left and only
// waits for parts another thread has already started.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float vf16 __attribute__((vector_size(64)));  // 16 floats: AVX-512, 2 x AVX2 or 4 x NEON registers

inline vf16 load16(const float* p) {
  vf16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store16(float* p, vf16 v) { std::memcpy(p, &v, sizeof(v)); }

typedef int32_t vi16 __attribute__((vector_size(64)));

// exp(x) for x <= 0 (softmax after subtracting the row maximum), ~2 ulp: x = n ln2 + r, |r| <= ln2 / 2, a degree-6
// polynomial for exp(r), 2^n put into the exponent bits. Below -87 (and at -inf) the result is exactly 0.
inline vf16 ExpNonPositive(vf16 x) {
  const vf16 clamped = x < -87.f ? vf16{} - 87.f : x;
  const vf16 shifter = vf16{} + 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer in the low mantissa bits
  const vf16 t = clamped * 1.44269504f + shifter;
  const vf16 n = t - shifter;
  const vf16 r = (clamped - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  vf16 p = vf16{} + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const vi16 bits = (vi16)p + (((vi16)t - (vi16)shifter) << 23);
  const vf16 result = (vf16)bits;
  return x < -87.f ? vf16{} : result;
}

// ---- register-tiled matmul piece (BLIS style): C tile (kTileRows x 32) = A rows (kTileRows x depth, row stride lda)
// x B panel (depth x 32, k-major). A's values are broadcast, B's read as two 16-float vectors: 2 x kTileRows
// accumulators stay in registers (24 of AVX-512's 32 at 12 rows).
constexpr int kTileRows = 12;
constexpr int kTileCols = 32;

inline void TileProduct(int64_t depth, const float* __restrict a, int64_t lda, const float* __restrict b, float* c,
                        int64_t ldc) {
  vf16 acc[kTileRows][2];
#pragma GCC unroll 16
  for (int i = 0; i < kTileRows; ++i) acc[i][0] = acc[i][1] = vf16{};
  for (int64_t k = 0; k < depth; ++k) {
    const vf16 b0 = load16(b + k * kTileCols), b1 = load16(b + k * kTileCols + 16);
#pragma GCC unroll 16
    for (int i = 0; i < kTileRows; ++i) {
      const float ai = a[i * lda + k];
      acc[i][0] += ai * b0;
      acc[i][1] += ai * b1;
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < kTileRows; ++i) {
    store16(c + i * ldc, acc[i][0]);
    store16(c + i * ldc + 16, acc[i][1]);
  }
}

inline int64_t RoundUp(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

constexpr int kMaxRows = 8;

// out (R, n) = x[:, k0:k1] @ w[k0:k1, :] for R <= kMaxRows rows of x (row stride k_total). w is read row after row,
// four rows at a time, each row whole: one sequential stream (column blocks walking down w would jump a page per
// row, which the hardware prefetcher does not follow). The R x n partial sums stay in L1 / L2.
template <int R>
void PartialProduct(const float* x, int64_t k_total, const float* w, int64_t n, int64_t k0, int64_t k1,
                    float* out, int64_t out_stride) {
  for (int r = 0; r < R; ++r) std::memset(out + r * out_stride, 0, sizeof(float) * n);
  const int64_t vec_end = n - n % 16;
  int64_t k = k0;
  for (; k < k1; k += 4) {
    const int rows_here = static_cast<int>(std::min<int64_t>(4, k1 - k));
    float a[R][4] = {};
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < rows_here; ++i) a[r][i] = x[r * k_total + k + i];
    const float* w0 = w + k * n;
    const float* w1 = rows_here > 1 ? w0 + n : w0;  // missing rows read row k again with a zero factor
    const float* w2 = rows_here > 2 ? w0 + 2 * n : w0;
    const float* w3 = rows_here > 3 ? w0 + 3 * n : w0;
    for (int64_t j = 0; j < vec_end; j += 16) {
      const vf16 v0 = load16(w0 + j), v1 = load16(w1 + j), v2 = load16(w2 + j), v3 = load16(w3 + j);
      for (int r = 0; r < R; ++r) {
        float* o = out + r * out_stride + j;
        store16(o, load16(o) + a[r][0] * v0 + a[r][1] * v1 + a[r][2] * v2 + a[r][3] * v3);
      }
    }
    for (int64_t j = vec_end; j < n; ++j)
      for (int r = 0; r < R; ++r)
        out[r * out_stride + j] += a[r][0] * w0[j] + a[r][1] * w1[j] + a[r][2] * w2[j] + a[r][3] * w3[j];
  }
}

void PartialRows(int rows, const float* x, int64_t k_total, const float* w, int64_t n, int64_t k0, int64_t k1,
                 float* out, int64_t out_stride) {
  for (int r0 = 0; r0 < rows; r0 += kMaxRows) {
    const float* xr = x + r0 * k_total;
    float* o = out + r0 * out_stride;
    switch (std::min(kMaxRows, rows - r0)) {
      case 1: PartialProduct<1>(xr, k_total, w, n, k0, k1, o, out_stride); break;
      case 2: PartialProduct<2>(xr, k_total, w, n, k0, k1, o, out_stride); break;
      case 3: PartialProduct<3>(xr, k_total, w, n, k0, k1, o, out_stride); break;
      case 4: PartialProduct<4>(xr, k_total, w, n, k0, k1, o, out_stride); break;
      case 5: PartialProduct<5>(xr, k_total, w, n, k0, k1, o, out_stride); break;
      case 6: PartialProduct<6>(xr, k_total, w, n, k0, k1, o, out_stride); break;
      case 7: PartialProduct<7>(xr, k_total, w, n, k0, k1, o, out_stride); break;
      default: PartialProduct<8>(xr, k_total, w, n, k0, k1, o, out_stride); break;
    }
  }
}

struct Shared {
  std::atomic<int> next{0};
  std::atomic<int> done{0};
};

// Runs part(p) for p in [0, parts) on the calling thread and the pool: the caller claims parts itself until none
// are left and then only waits for parts another thread already started, so an idle or busy pool never blocks it.
template <typename Part>
void RunParts(ffi::ThreadPool& pool, int parts, Part part) {
  if (parts <= 1) {
    part(0);
    return;
  }
  auto shared = std::make_shared<Shared>();
  auto run = [shared, parts, part]() {
    for (int p; (p = shared->next.fetch_add(1)) < parts;) {
      part(p);
      shared->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int t = 1; t < parts; ++t) pool.Schedule(std::function<void()>(run));
  run();
  while (shared->done.load(std::memory_order_acquire) < parts) std::this_thread::yield();
}

ffi::Error Gemv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0]) {
    return ffi::Error::InvalidArgument("jaxgen_cpu_gemv: x (M, K) and w (K, N) expected");
  }
  const int rows = static_cast<int>(xd[0]);
  const int64_t k = xd[1], n = wd[1];
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  // one part per thread, each at least 64 rows of w (below that the hand-off costs more than it saves)
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, k / 64)));
  // part 0 writes y, part p > 0 its own slice of `partials` (kept alive by the tasks that may start late)
  auto partials = std::make_shared<std::vector<float>>(static_cast<size_t>(parts - 1) * rows * n);
  RunParts(pool, parts, [=](int p) {
    const int64_t k0 = k * p / parts, k1 = k * (p + 1) / parts;
    float* out = p == 0 ? yp : partials->data() + static_cast<size_t>(p - 1) * rows * n;
    PartialRows(rows, xp, k, wp, n, k0, k1, out, n);
  });
  for (int p = 1; p < parts; ++p) {
    const float* src = partials->data() + static_cast<size_t>(p - 1) * rows * n;
    for (int64_t i = 0; i < rows * n; ++i) yp[i] += src[i];
  }
  return ffi::Error::Success();
}

// out (B, 1, N, H) = softmax(q k[:, :, :length]^T * scale) v[:, :, :length] per (batch, head); q (B, 1, N, H),
// k, v (B, N, S, H) (jaxgen's KVCache layout). Slots at or after `length` are never read: the same result as
// attending over all S slots with them masked out (they get exactly zero weight there), for less memory read.
ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                           ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> length, ffi::ResultBuffer<ffi::F32> out,
                           float scale) {
  const auto qd = q.dimensions();
  const auto kd = k.dimensions();
  const auto vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || qd[1] != 1 || qd[0] != kd[0] || qd[2] != kd[1] ||
      qd[3] != kd[3] || vd[0] != kd[0] || vd[1] != kd[1] || vd[2] != kd[2] || vd[3] != kd[3]) {
    return ffi::Error::InvalidArgument("jaxgen_cpu_decode_attention: q (B, 1, N, H), k = v (B, N, S, H) expected");
  }
  const int64_t pairs = kd[0] * kd[1], slots = kd[2], h = kd[3];
  const int64_t len = std::max<int64_t>(1, std::min<int64_t>(slots, length.typed_data()[0]));
  const float* qp = q.typed_data();
  const float* kp = k.typed_data();
  const float* vp = v.typed_data();
  float* op = out->typed_data();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int parts = static_cast<int>(std::min<int64_t>(threads, pairs));
  RunParts(pool, parts, [=](int p) {
    std::vector<float> weights(len);
    for (int64_t i = pairs * p / parts; i < pairs * (p + 1) / parts; ++i) {
      const float* qi = qp + i * h;  // (B, 1, N, H): pair i = b * N + n
      const float* ki = kp + i * slots * h;
      const float* vi = vp + i * slots * h;
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t s = 0; s < len; ++s) {
        float dot = 0.f;
        for (int64_t d = 0; d < h; ++d) dot += qi[d] * ki[s * h + d];
        weights[s] = dot * scale;
        top = std::max(top, weights[s]);
      }
      float total = 0.f;
      for (int64_t s = 0; s < len; ++s) {
        weights[s] = std::exp(weights[s] - top);
        total += weights[s];
      }
      float* oi = op + i * h;
      for (int64_t d = 0; d < h; ++d) oi[d] = 0.f;
      for (int64_t s = 0; s < len; ++s) {
        const float w = weights[s];
        for (int64_t d = 0; d < h; ++d) oi[d] += w * vi[s * h + d];
      }
      const float inv = 1.f / total;
      for (int64_t d = 0; d < h; ++d) oi[d] *= inv;
    }
  });
  return ffi::Error::Success();
}

// out (B, T, N, H) = softmax(q k^T * scale) v per (batch, head); q (B, T, N, H), k, v (B, S, N, H); keys with
// keep[b, s] == 0 get the lowest finite logit (jaxgen's masking: a fully masked row comes out uniform, not NaN).
// Per (batch, head) pair: k^T and v packed once into 32-column panels, then for every 12 queries the logits
// (12 x S) as register tiles, an exact softmax over each row in L1 / L2, and the probabilities x v as register tiles.
// Whole pairs go to threads, so nothing is shared; no (T, S) logits ever reach memory.
ffi::Error Attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                     ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> keep, ffi::ResultBuffer<ffi::F32> out,
                     float scale) {
  const auto qd = q.dimensions();
  const auto kd = k.dimensions();
  const auto vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || qd[0] != kd[0] || qd[2] != kd[2] || qd[3] != kd[3] ||
      vd[0] != kd[0] || vd[1] != kd[1] || vd[2] != kd[2] || vd[3] != kd[3] || kd[1] < 1 ||
      keep.dimensions().size() != 2 || keep.dimensions()[0] != kd[0] || keep.dimensions()[1] != kd[1]) {
    return ffi::Error::InvalidArgument(
        "jaxgen_cpu_attention: q (B, T, N, H), k = v (B, S, N, H), keep (B, S) expected");
  }
  const int64_t batch = qd[0], queries = qd[1], heads = qd[2], h = qd[3], keys = kd[1];
  const int64_t keys_pad = RoundUp(keys, kTileCols), h_pad = RoundUp(h, kTileCols);
  const float* qp = q.typed_data();
  const float* kp = k.typed_data();
  const float* vp = v.typed_data();
  const float* keep_p = keep.typed_data();
  float* op = out->typed_data();
  const int64_t pairs = batch * heads;
  const float lowest = std::numeric_limits<float>::lowest();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int parts = static_cast<int>(std::min<int64_t>(threads, pairs));
  RunParts(pool, parts, [=](int part) {
    std::vector<float> kt(h * keys_pad), vpack(keys_pad * h_pad), qtile(kTileRows * h),
        logits(kTileRows * keys_pad), otile(kTileRows * h_pad), keep_row(keys_pad, 0.f);
    for (int64_t pair = pairs * part / parts; pair < pairs * (part + 1) / parts; ++pair) {
      const int64_t b = pair / heads, n = pair % heads;
      const float* kb = kp + (b * keys * heads + n) * h;  // key s at kb + s * heads * h
      const float* vb = vp + (b * keys * heads + n) * h;
      std::copy(keep_p + b * keys, keep_p + (b + 1) * keys, keep_row.begin());  // padding keys stay 0 (dropped)
      // k^T panels: panel j holds keys [32 j, 32 j + 32) as (h, 32); v panels: columns [32 c, 32 c + 32) as (S, 32)
      for (int64_t s0 = 0; s0 < keys_pad; s0 += kTileCols) {
        float* panel = kt.data() + s0 * h;
        for (int64_t j = 0; j < kTileCols; ++j) {
          const int64_t s = s0 + j;
          for (int64_t d = 0; d < h; ++d) panel[d * kTileCols + j] = s < keys ? kb[s * heads * h + d] : 0.f;
        }
      }
      for (int64_t c0 = 0; c0 < h_pad; c0 += kTileCols) {
        float* panel = vpack.data() + c0 * keys_pad;
        for (int64_t s = 0; s < keys_pad; ++s)
          for (int64_t j = 0; j < kTileCols; ++j)
            panel[s * kTileCols + j] = (s < keys && c0 + j < h) ? vb[s * heads * h + c0 + j] : 0.f;
      }
      for (int64_t t0 = 0; t0 < queries; t0 += kTileRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kTileRows, queries - t0));
        const float* qb = qp + ((b * queries + t0) * heads + n) * h;  // query t0 + i at qb + i * heads * h
        for (int i = 0; i < kTileRows; ++i)
          for (int64_t d = 0; d < h; ++d) qtile[i * h + d] = i < rows ? qb[i * heads * h + d] * scale : 0.f;
        for (int64_t s0 = 0; s0 < keys_pad; s0 += kTileCols)
          TileProduct(h, qtile.data(), h, kt.data() + s0 * h, logits.data() + s0, keys_pad);
        float inv_total[kTileRows];
        for (int i = 0; i < kTileRows; ++i) {
          float* row = logits.data() + i * keys_pad;
          vf16 top16 = vf16{} + lowest;
          for (int64_t s = 0; s < keys_pad; s += 16) {
            const vf16 x = load16(keep_row.data() + s) != 0.f ? load16(row + s) : vf16{} + lowest;
            store16(row + s, x);
            top16 = x > top16 ? x : top16;
          }
          float top = top16[0];
          for (int j = 1; j < 16; ++j) top = std::max(top, top16[j]);
          vf16 sum16 = vf16{};
          for (int64_t s = 0; s < keys_pad; s += 16) {
            const vf16 e = ExpNonPositive(load16(row + s) - top);
            store16(row + s, e);
            sum16 += e;
          }
          float total = 0.f;
          for (int j = 0; j < 16; ++j) total += sum16[j];
          for (int64_t s = keys; s < keys_pad; ++s) {  // padding is no key, even where every real key is masked
            total -= row[s];
            row[s] = 0.f;
          }
          inv_total[i] = 1.f / total;
        }
        for (int64_t c0 = 0; c0 < h_pad; c0 += kTileCols)
          TileProduct(keys, logits.data(), keys_pad, vpack.data() + c0 * keys_pad, otile.data() + c0, h_pad);
        float* ob = op + ((b * queries + t0) * heads + n) * h;
        for (int i = 0; i < rows; ++i)
          for (int64_t d = 0; d < h; ++d) ob[i * heads * h + d] = otile[i * h_pad + d] * inv_total[i];
      }
    }
  });
  return ffi::Error::Success();
}

// ---- BLAS: a CBLAS sgemm with 64-bit integers (OpenBLAS's INTERFACE64 build that numpy ships) and OpenBLAS's
// per-thread thread count, both set once from Python. The product is split over XLA's pool here, each part one
// single-threaded sgemm, so BLAS never starts threads of its own next to XLA's.
typedef void (*SgemmFn)(int layout, int trans_a, int trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                        const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);
typedef int (*SetThreadsLocalFn)(int threads);
std::atomic<SgemmFn> g_sgemm{nullptr};
std::atomic<SetThreadsLocalFn> g_set_threads_local{nullptr};
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

// y (M, N) = op(x) @ op(w): op(x) = x (M, K) or x^T of x (K, M); op(w) = w (K, N) or w^T of w (N, K).
ffi::Error BlasGemm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                    ffi::ResultBuffer<ffi::F32> y, bool transpose_x, bool transpose_w) {
  const SgemmFn sgemm = g_sgemm.load();
  const SetThreadsLocalFn set_threads = g_set_threads_local.load();
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (sgemm == nullptr || set_threads == nullptr) return ffi::Error::Internal("jaxgen_cpu_blas_gemm: no BLAS set");
  if (xd.size() != 2 || wd.size() != 2) return ffi::Error::InvalidArgument("jaxgen_cpu_blas_gemm: 2-D operands");
  const int64_t m = transpose_x ? xd[1] : xd[0], k = transpose_x ? xd[0] : xd[1];
  const int64_t n = transpose_w ? wd[0] : wd[1];
  if ((transpose_w ? wd[1] : wd[0]) != k) return ffi::Error::InvalidArgument("jaxgen_cpu_blas_gemm: inner sizes");
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // split the wider of M and N into one block per thread (blocks of at least 64, multiples of 16)
  const bool split_n = n >= m;
  const int64_t extent = split_n ? n : m;
  const int parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, extent / 64)));
  RunParts(pool, parts, [=](int p) {
    const int64_t units = (extent + 15) / 16;
    const int64_t b0 = std::min(extent, units * p / parts * 16), b1 = std::min(extent, units * (p + 1) / parts * 16);
    if (b1 <= b0) return;
    set_threads(1);
    if (split_n) {
      const float* wb = transpose_w ? wp + b0 * k : wp + b0;
      sgemm(kRowMajor, transpose_x ? kTrans : kNoTrans, transpose_w ? kTrans : kNoTrans, m, b1 - b0, k, 1.f, xp,
            transpose_x ? m : k, wb, transpose_w ? k : n, 0.f, yp + b0, n);
    } else {
      const float* xb = transpose_x ? xp + b0 : xp + b0 * k;
      sgemm(kRowMajor, transpose_x ? kTrans : kNoTrans, transpose_w ? kTrans : kNoTrans, b1 - b0, n, k, 1.f, xb,
            transpose_x ? m : k, wp, transpose_w ? k : n, 0.f, yp + b0 * n, n);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

extern "C" void JaxgenSetBlas(void* sgemm, void* set_threads_local) {
  g_sgemm.store(reinterpret_cast<SgemmFn>(sgemm));
  g_set_threads_local.store(reinterpret_cast<SetThreadsLocalFn>(set_threads_local));
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxgenCpuBlasGemm, BlasGemm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transpose_x")
                                  .Attr<bool>("transpose_w"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxgenCpuAttention, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxgenCpuGemv, Gemv,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxgenCpuDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
