// jaxgen's XLA:CPU FFI kernels for decode steps (see cpu.py for why), float32:
//   JaxgenCpuGemv: y (M, N) = x (M, K) @ w (K, N) for a few rows M.
//   JaxgenCpuGemmWt: y (M, N) = x (M, K) @ wt (N, K)^T for a dozen or two rows M (out-major kernels).
//   JaxgenCpuDecodeAttention: one query per (batch, head) against the first `length` slots of a KV cache.
//   JaxgenCpuAttention(+Backward): softmax(q k^T * scale) v for many queries per (batch, head), with a mask over
//     keys only, over chunks of queries that each see a prefix of the keys (block-causal), and its gradients.
//   JaxgenCpuTopKValues: the k largest values of each row, descending (lax.top_k's values) by selection, not sort.
//   JaxgenCpuBlasGemm: y = op(x) @ op(w) through a CBLAS sgemm handed over by `JaxgenSetBlas` (numpy's OpenBLAS).
//   JaxgenCpuGroupNorm: GroupNorm over NHWC, optionally followed by SiLU, reading x twice.
//   JaxgenCpuWinogradConv3: a 3x3 convolution (stride 1, padding 1, NHWC) by Winograd's F(4x4, 3x3), optionally of
//     the input upsampled x2 (nearest).
//
// At a few rows a matmul is bound by reading w once. The kernel reads w as one sequential stream per thread: the
// K rows of w are split into contiguous parts (one per thread), each part read row after row into its own (M, N)
// partial result (kept in L1 / L2), and the partials summed at the end.
// Work sharing never blocks on an idle pool: the calling thread claims parts itself until none are left and only
// waits for parts another thread has already started. The decode kernels share work with helper threads of their
// own that spin briefly between calls (`DecodeHelpers`).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <limits>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// One native SIMD register of floats. A vector type wider than the target's registers has no register mode in GCC:
// every value of it lives on the stack (a 16-float type on the AVX2-only AMD EPYC VM ran the attention tiles at
// 1.8 GFLOP/s), so the width follows the instruction set the kernels are built for (-march=native).
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;  // SSE2 / NEON
#endif
typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline vf loadv(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void storev(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }

inline float SumLanes(vf v) {
  float total = 0.f;
  for (int j = 0; j < kLanes; ++j) total += v[j];
  return total;
}

inline float MaxLanes(vf v) {
  float top = v[0];
  for (int j = 1; j < kLanes; ++j) top = std::max(top, v[j]);
  return top;
}

// exp of x clamped to [-87, 88] by the caller, ~2 ulp: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial for
// exp(r), 2^n put into the exponent bits (n in [-126, 127]: a normal float).
inline vf ExpInRange(vf clamped) {
  const vf shifter = vf{} + 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer in the low mantissa bits
  const vf t = clamped * 1.44269504f + shifter;
  const vf n = t - shifter;
  const vf r = (clamped - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  vf p = vf{} + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const vi bits = (vi)p + (((vi)t - (vi)shifter) << 23);
  return (vf)bits;
}

// exp(x) for x <= 0 (softmax after subtracting the row maximum). Below -87 (and at -inf) the result is exactly 0.
inline vf ExpNonPositive(vf x) {
  const vf result = ExpInRange(x < -87.f ? vf{} - 87.f : x);
  return x < -87.f ? vf{} : result;
}

// ---- register-tiled matmul piece (BLIS style): C tile (kTileRows x kTileCols) = A (kTileRows x depth) x B panel
// (depth x kTileCols, k-major). A is read in place: row i at a + i * lda (kColumns = false) or, transposed, element
// (i, k) at a[k * lda + i] (kColumns = true). A's values are broadcast, B's read as two vectors: the 2 x kTileRows
// accumulators, B's two vectors and a broadcast stay in registers (27 of AVX-512's or NEON's 32 at 12 rows, 15 of
// AVX2's 16 at 6).
#if defined(__AVX512F__) || defined(__aarch64__)
constexpr int kTileRows = 12;
#else
constexpr int kTileRows = 6;
#endif
constexpr int kTileCols = 2 * kLanes;

// acc (R x 2 vectors) += A (R x depth) x B (depth x kTileCols, row k at b + k * ldb): the register loop shared by
// TileProduct (packed panels, ldb = kTileCols) and ChunkTile (weights read in place, ldb = their row length).
template <int R, bool kColumns = false>
inline void TileAccumulate(vf (&acc)[R][2], int64_t depth, const float* __restrict a, int64_t lda,
                           const float* __restrict b, int64_t ldb) {
  for (int64_t k = 0; k < depth; ++k) {
    const vf b0 = loadv(b + k * ldb), b1 = loadv(b + k * ldb + kLanes);
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      const float ai = kColumns ? a[k * lda + i] : a[i * lda + k];
      acc[i][0] += ai * b0;
      acc[i][1] += ai * b1;
    }
  }
}

template <bool kColumns = false>
inline void TileProduct(int64_t depth, const float* __restrict a, int64_t lda, const float* __restrict b, float* c,
                        int64_t ldc) {
  vf acc[kTileRows][2];
#pragma GCC unroll 16
  for (int i = 0; i < kTileRows; ++i) acc[i][0] = acc[i][1] = vf{};
  TileAccumulate<kTileRows, kColumns>(acc, depth, a, lda, b, kTileCols);
#pragma GCC unroll 16
  for (int i = 0; i < kTileRows; ++i) {
    storev(c + i * ldc, acc[i][0]);
    storev(c + i * ldc + kLanes, acc[i][1]);
  }
}

inline int64_t RoundUp(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

constexpr int kMaxRows = 8;

// out (R, n) = x[:, k0:k1] @ w[k0:k1, :] for R <= kMaxRows rows of x (row stride k_total). w is read row after row,
// four rows at a time, each row whole: one sequential stream (column blocks walking down w would jump a page per
// row, which the hardware prefetcher does not follow). The R x n partial sums stay in L1 / L2.
// Each iteration also asks for the lines of w 16 rows further down: more of them in flight than the hardware
// prefetcher keeps at the start of a call (RAR-B's decode reads ~100 matrices of 2-9 MB per token; 768 x 2304 at
// 4 rows: 0.41 -> 0.33 ms, 3072 x 768: 0.50 -> 0.43 ms).
constexpr int64_t kPrefetchRows = 16;

template <int R>
void PartialProduct(const float* x, int64_t k_total, const float* w, int64_t n, int64_t k0, int64_t k1,
                    float* out, int64_t out_stride) {
  for (int r = 0; r < R; ++r) std::memset(out + r * out_stride, 0, sizeof(float) * n);
  const int64_t vec_end = n - n % kLanes;
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
    const bool prefetch = k + kPrefetchRows + 4 <= k1;
    // two vectors of columns per iteration: eight independent w loads in flight (3-5 % faster than one at a time)
    int64_t j = 0;
    for (; j + 2 * kLanes <= vec_end; j += 2 * kLanes) {
      if (prefetch) {
        const float* p = w0 + kPrefetchRows * n + j;
        for (int i = 0; i < 4; ++i) {
          __builtin_prefetch(p + i * n);
          __builtin_prefetch(p + i * n + kLanes);
        }
      }
      const vf v0 = loadv(w0 + j), v1 = loadv(w1 + j), v2 = loadv(w2 + j), v3 = loadv(w3 + j);
      const vf u0 = loadv(w0 + j + kLanes), u1 = loadv(w1 + j + kLanes), u2 = loadv(w2 + j + kLanes),
                 u3 = loadv(w3 + j + kLanes);
      for (int r = 0; r < R; ++r) {
        float* o = out + r * out_stride + j;
        storev(o, loadv(o) + a[r][0] * v0 + a[r][1] * v1 + a[r][2] * v2 + a[r][3] * v3);
        storev(o + kLanes, loadv(o + kLanes) + a[r][0] * u0 + a[r][1] * u1 + a[r][2] * u2 + a[r][3] * u3);
      }
    }
    for (; j < vec_end; j += kLanes) {
      const vf v0 = loadv(w0 + j), v1 = loadv(w1 + j), v2 = loadv(w2 + j), v3 = loadv(w3 + j);
      for (int r = 0; r < R; ++r) {
        float* o = out + r * out_stride + j;
        storev(o, loadv(o) + a[r][0] * v0 + a[r][1] * v1 + a[r][2] * v2 + a[r][3] * v3);
      }
    }
    for (int64_t j = vec_end; j < n; ++j)
      for (int r = 0; r < R; ++r)
        out[r * out_stride + j] += a[r][0] * w0[j] + a[r][1] * w1[j] + a[r][2] * w2[j] + a[r][3] * w3[j];
  }
}

void PartialRows(int rows, const float* x, int64_t k_total, const float* w, int64_t n, int64_t k0, int64_t k1,
                 float* out, int64_t out_stride) {  // rows <= kMaxRows
  switch (rows) {
    case 1: PartialProduct<1>(x, k_total, w, n, k0, k1, out, out_stride); break;
    case 2: PartialProduct<2>(x, k_total, w, n, k0, k1, out, out_stride); break;
    case 3: PartialProduct<3>(x, k_total, w, n, k0, k1, out, out_stride); break;
    case 4: PartialProduct<4>(x, k_total, w, n, k0, k1, out, out_stride); break;
    case 5: PartialProduct<5>(x, k_total, w, n, k0, k1, out, out_stride); break;
    case 6: PartialProduct<6>(x, k_total, w, n, k0, k1, out, out_stride); break;
    case 7: PartialProduct<7>(x, k_total, w, n, k0, k1, out, out_stride); break;
    default: PartialProduct<8>(x, k_total, w, n, k0, k1, out, out_stride); break;
  }
}

// More than kMaxRows rows (up to a few dozen): a pass per 8 rows straight down w would read w from memory once per
// pass. Instead w goes by chunks of kChunkBytes (its rows [kc, kc1) x this thread's columns, kept in L2), and every
// tile of up to kTileRows rows of x runs over the chunk with its accumulators in registers (TileAccumulate), the
// output tile loaded and stored once per chunk: w streams from memory once whatever the rows. The chunk's sums are
// added to the output apart (blocked summation, errors as BLAS's).
constexpr int64_t kChunkBytes = 192 << 10;

// The rows of the next chunk this tile asks for while it runs (the tiles of a chunk share them).
struct ChunkPrefetch {
  int64_t lo, hi, ahead;  // rows [lo, hi) + ahead, where they exist (< k_total)
};

template <int R>
void ChunkTile(const float* x, int64_t k_total, const float* w, int64_t n, int64_t kc, int64_t kc1, int64_t j0,
               int64_t j1, float* out, int64_t out_stride, bool accumulate, ChunkPrefetch fetch) {
  const int64_t fetch_hi = std::min(fetch.hi, k_total - fetch.ahead);
  int64_t j = j0;
  for (; j + kTileCols <= j1; j += kTileCols) {
    for (int64_t k = fetch.lo; k < fetch_hi; ++k) {
      __builtin_prefetch(w + (k + fetch.ahead) * n + j);
      __builtin_prefetch(w + (k + fetch.ahead) * n + j + kLanes);
    }
    vf acc[R][2];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = vf{};
    TileAccumulate<R>(acc, kc1 - kc, x + kc, k_total, w + kc * n + j, n);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      float* o = out + r * out_stride + j;
      storev(o, accumulate ? loadv(o) + acc[r][0] : acc[r][0]);
      storev(o + kLanes, accumulate ? loadv(o + kLanes) + acc[r][1] : acc[r][1]);
    }
  }
  for (; j < j1; ++j)
    for (int r = 0; r < R; ++r) {
      float total = 0.0f;
      for (int64_t k = kc; k < kc1; ++k) total += x[r * k_total + k] * w[k * n + j];
      out[r * out_stride + j] = accumulate ? out[r * out_stride + j] + total : total;
    }
}

// ChunkTile for any rows <= R (the last tile of x).
template <int R>
void ChunkTileRows(int rows, const float* x, int64_t k_total, const float* w, int64_t n, int64_t kc, int64_t kc1,
                   int64_t j0, int64_t j1, float* out, int64_t out_stride, bool accumulate, ChunkPrefetch fetch) {
  if constexpr (R > 1) {
    if (rows < R) {
      ChunkTileRows<R - 1>(rows, x, k_total, w, n, kc, kc1, j0, j1, out, out_stride, accumulate, fetch);
      return;
    }
  }
  ChunkTile<R>(x, k_total, w, n, kc, kc1, j0, j1, out, out_stride, accumulate, fetch);
}

// out[:, j0:j1] = x @ w[:, j0:j1] over all of K, for any rows.
void ChunkedColumns(int rows, const float* x, int64_t k_total, const float* w, int64_t n, int64_t j0, int64_t j1,
                    float* out, int64_t out_stride) {
  const int64_t chunk = std::max<int64_t>(4, kChunkBytes / (sizeof(float) * std::max<int64_t>(1, j1 - j0)));
  const int tiles = (rows + kTileRows - 1) / kTileRows;
  for (int64_t kc = 0; kc < k_total; kc += chunk) {
    const int64_t kc1 = std::min(k_total, kc + chunk);
    for (int t = 0; t < tiles; ++t) {
      const int r0 = t * kTileRows;
      const ChunkPrefetch fetch{kc + (kc1 - kc) * t / tiles, kc + (kc1 - kc) * (t + 1) / tiles, chunk};
      ChunkTileRows<kTileRows>(std::min(kTileRows, rows - r0), x + r0 * k_total, k_total, w, n, kc, kc1, j0, j1,
                               out + r0 * out_stride, out_stride, kc > 0, fetch);
    }
  }
}

struct Shared {
  std::atomic<int> next{0};
  std::atomic<int> done{0};
};

// What each participating thread runs: claim parts until none are left (the shared state outlives late starters).
template <typename Part>
auto ClaimLoop(std::shared_ptr<Shared> shared, int parts, Part part) {
  return [shared, parts, part]() {
    for (int p; (p = shared->next.fetch_add(1)) < parts;) {
      part(p);
      shared->done.fetch_add(1, std::memory_order_release);
    }
  };
}

// Runs part(p) for p in [0, parts) on the calling thread and the pool: the caller claims parts itself until none
// are left and then only waits for parts another thread already started, so an idle or busy pool never blocks it.
template <typename Part>
void RunParts(ffi::ThreadPool& pool, int parts, Part part) {
  if (parts <= 1) {
    part(0);
    return;
  }
  auto shared = std::make_shared<Shared>();
  auto run = ClaimLoop(shared, parts, part);
  for (int t = 1; t < parts; ++t) pool.Schedule(std::function<void()>(run));
  run();
  while (shared->done.load(std::memory_order_acquire) < parts) std::this_thread::yield();
}

// Decode steps call the small kernels (Gemv, DecodeAttention) ~100 times per token, each 0.05-0.5 ms of work. Handing
// half of it to XLA's pool costs ~5 us to schedule and ~10-20 us until a sleeping pool thread starts: 15-25 % of
// such a call (RAR-B's decode read its weights at 18-22 GB/s per call, against 26 GB/s with a waiting helper).
// `DecodeHelpers` keeps its own helper threads (one per extra pool thread) that spin for kSpinMicros after each job
// before they sleep, so back-to-back calls hand over in well under a microsecond. They take jobs only from one
// caller at a time; a concurrent caller uses XLA's pool instead. Parts are claimed as in RunParts, so a late or
// missing helper (e.g. after fork) only means the caller does more of them.
constexpr int64_t kSpinMicros = 200;

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

class DecodeHelpers {
 public:
  // The process-wide helpers, sized once from the first caller's pool (never destroyed: they may outlive statics).
  static DecodeHelpers& Get(int64_t threads) {
    static DecodeHelpers* helpers = new DecodeHelpers(static_cast<int>(std::max<int64_t>(0, threads - 1)));
    return *helpers;
  }

  template <typename Part>
  void Run(ffi::ThreadPool& pool, int parts, Part part) {
    if (parts <= 1 || count_ == 0 || !submit_.try_lock()) {
      RunParts(pool, parts, part);
      return;
    }
    auto shared = std::make_shared<Shared>();
    auto run = std::make_shared<std::function<void()>>(ClaimLoop(shared, parts, part));
    std::atomic_store(&job_, run);
    generation_.fetch_add(1);
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lock(sleep_mutex_);
      wake_.notify_all();
    }
    (*run)();
    while (shared->done.load(std::memory_order_acquire) < parts) CpuRelax();
    submit_.unlock();
  }

 private:
  explicit DecodeHelpers(int count) : count_(count) {
    for (int i = 0; i < count; ++i) std::thread([this] { Loop(); }).detach();
  }

  void Loop() {
    uint64_t seen = generation_.load();
    for (;;) {
      const auto start = std::chrono::steady_clock::now();
      int polls = 0;
      while (generation_.load() == seen) {
        CpuRelax();
        if (++polls % 64 == 0 &&
            std::chrono::steady_clock::now() - start > std::chrono::microseconds(kSpinMicros)) {
          std::unique_lock<std::mutex> lock(sleep_mutex_);
          sleepers_.fetch_add(1);
          wake_.wait(lock, [&] { return generation_.load() != seen; });
          sleepers_.fetch_sub(1);
        }
      }
      seen = generation_.load();
      if (auto job = std::atomic_load(&job_)) (*job)();
    }
  }

  const int count_;
  std::mutex submit_;
  std::atomic<uint64_t> generation_{0};
  std::shared_ptr<std::function<void()>> job_;
  std::atomic<int> sleepers_{0};
  std::mutex sleep_mutex_;
  std::condition_variable wake_;
};

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
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (rows > kMaxRows) {  // one block of columns (a multiple of the tile's) per thread, no partial sums to add
    const int64_t step = kTileCols;
    const int parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, n / step)));
    DecodeHelpers::Get(threads).Run(pool, parts, [=](int p) {
      const int64_t j0 = n / step * p / parts * step, j1 = p + 1 == parts ? n : n / step * (p + 1) / parts * step;
      ChunkedColumns(rows, xp, k, wp, n, j0, j1, yp, n);
    });
    return ffi::Error::Success();
  }
  // one part per thread, each at least 64 rows of w (below that the hand-off costs more than it saves)
  const int parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, k / 64)));
  // part 0 writes y, part p > 0 its own slice of `partials` (kept alive by the tasks that may start late)
  auto partials = std::make_shared<std::vector<float>>(static_cast<size_t>(parts - 1) * rows * n);
  DecodeHelpers::Get(threads).Run(pool, parts, [=](int p) {
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

// y (M, N) = x (M, K) @ wt (N, K)^T for a dozen or two rows (`jaxgen.nn.kernel_layout`'s out-major kernels: MAR's
// diffusion head at 12-28 rows per DDPM step). XLA's dot reads such a kernel at ~13 GB/s; here each thread streams
// its contiguous block of wt rows once, kCols rows (kCols x K floats, kept in L1) against every kRows-row tile of x
// (in L2): kRows x kCols register accumulators along K, summed across their lanes at the end.
#if defined(__AVX512F__) || defined(__aarch64__)
constexpr int kWtCols = 6;  // 24 accumulators + 6 wt + 1 x of the 32 registers
#else
constexpr int kWtCols = 2;  // AVX2's 16 registers: 8 accumulators + 2 wt + 1 x
#endif
constexpr int kWtRows = 4;

template <int R, int C>
void WtTile(const float* x, const float* wt, int64_t k, float* y, int64_t n) {
  vf acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = vf{};
  const int64_t vec_end = k - k % kLanes;
  for (int64_t i = 0; i < vec_end; i += kLanes) {
    vf w[C];
    for (int c = 0; c < C; ++c) w[c] = loadv(wt + c * k + i);
    for (int r = 0; r < R; ++r) {
      const vf xv = loadv(x + r * k + i);
      for (int c = 0; c < C; ++c) acc[r][c] += xv * w[c];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      float total = SumLanes(acc[r][c]);
      for (int64_t i = vec_end; i < k; ++i) total += x[r * k + i] * wt[c * k + i];
      y[r * n + c] = total;
    }
  }
}

template <int C>
void WtColumns(int rows, const float* x, const float* wt, int64_t k, float* y, int64_t n) {
  int r = 0;
  for (; r + kWtRows <= rows; r += kWtRows) WtTile<kWtRows, C>(x + r * k, wt, k, y + r * n, n);
  switch (rows - r) {
    case 1: WtTile<1, C>(x + r * k, wt, k, y + r * n, n); break;
    case 2: WtTile<2, C>(x + r * k, wt, k, y + r * n, n); break;
    case 3: WtTile<3, C>(x + r * k, wt, k, y + r * n, n); break;
    default: break;
  }
}

ffi::Error GemmWt(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> wt,
                  ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto wd = wt.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1]) {
    return ffi::Error::InvalidArgument("jaxgen_cpu_gemm_wt: x (M, K) and wt (N, K) expected");
  }
  const int rows = static_cast<int>(xd[0]);
  const int64_t k = xd[1], n = wd[0];
  const float *xp = x.typed_data(), *wp = wt.typed_data();
  float* yp = y->typed_data();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, n / 64)));
  DecodeHelpers::Get(threads).Run(pool, parts, [=](int p) {
    const int64_t units = n / kWtCols;  // whole column groups per part; the last part takes the remainder
    const int64_t c0 = units * p / parts * kWtCols, c1 = p + 1 == parts ? n : units * (p + 1) / parts * kWtCols;
    int64_t c = c0;
    for (; c + kWtCols <= c1; c += kWtCols) WtColumns<kWtCols>(rows, xp, wp + c * k, k, yp + c, n);
    for (; c < c1; ++c) WtColumns<1>(rows, xp, wp + c * k, k, yp + c, n);
  });
  return ffi::Error::Success();
}

// out (B, 1, N, H) = softmax(q k[:, :, :length]^T * scale) v[:, :, :length] per (batch, head); q (B, 1, N, H),
// k, v (B, N, S, H) (jaxgen's KVCache layout). Slots at or after `length` are never read: the same result as
// attending over all S slots with them masked out (they get exactly zero weight there), for less memory read.
constexpr int64_t kAheadSlots = 8;
constexpr int kVBlock = 8;  // 8 vectors: H = 128 in one pass with AVX-512, 64 with AVX2

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
  const int64_t len_pad = RoundUp(len, kLanes), h_vec = h - h % kLanes;
  // Software prefetch kAheadSlots slots ahead along one chain: this pair's keys, then its values, then the next
  // pair's keys: each pair's k and v are short streams (RAR-B: ~33 KB each on average), which the hardware prefetcher
  // would ramp up anew for every one.
  const int64_t lines = (h * static_cast<int64_t>(sizeof(float)) + 63) / 64;
  auto fetch = [=](const float* row) {
    for (int64_t l = 0; l < lines; ++l) __builtin_prefetch(row + l * 16);
  };
  DecodeHelpers::Get(threads).Run(pool, parts, [=](int p) {
    std::vector<float> weights(len_pad);
    const int64_t first = pairs * p / parts, last = pairs * (p + 1) / parts;
    for (int64_t i = first; i < last; ++i) {
      const float* qi = qp + i * h;  // (B, 1, N, H): pair i = b * N + n
      const float* ki = kp + i * slots * h;
      const float* vi = vp + i * slots * h;
      // q . k per slot: kLanes lanes of products summed across H, then across lanes (a scalar sum over H would be one
      // dependent chain of H additions per slot)
      vf top_v = vf{} - std::numeric_limits<float>::infinity();
      for (int64_t s = 0; s < len; ++s) {
        const float* ks = ki + s * h;
        const int64_t ahead = s + kAheadSlots;
        fetch(ahead < len ? ks + kAheadSlots * h : vi + (ahead - len) * h);
        vf acc = vf{};
        for (int64_t d = 0; d < h_vec; d += kLanes) acc += loadv(qi + d) * loadv(ks + d);
        float dot = SumLanes(acc);
        for (int64_t d = h_vec; d < h; ++d) dot += qi[d] * ks[d];
        weights[s] = dot * scale;
      }
      // padding logits -inf: ExpNonPositive makes them exactly 0
      for (int64_t s = len; s < len_pad; ++s) weights[s] = -std::numeric_limits<float>::infinity();
      for (int64_t s = 0; s < len_pad; s += kLanes) {
        const vf x = loadv(weights.data() + s);
        top_v = x > top_v ? x : top_v;
      }
      const float top = MaxLanes(top_v);
      vf sum_v = vf{};
      for (int64_t s = 0; s < len_pad; s += kLanes) {
        const vf e = ExpNonPositive(loadv(weights.data() + s) - top);
        storev(weights.data() + s, e);
        sum_v += e;
      }
      const float inv = 1.f / SumLanes(sum_v);
      float* oi = op + i * h;
      // weights x v: up to kVBlock vectors of output columns in registers while the slots are read in order (one
      // sequential pass over v for H <= kVBlock * kLanes)
      const float* next_k = i + 1 < last ? kp + (i + 1) * slots * h : nullptr;
      for (int64_t d0 = 0; d0 < h_vec; d0 += kVBlock * kLanes) {
        const int nv = static_cast<int>(std::min<int64_t>(kVBlock, (h_vec - d0) / kLanes));
        vf acc[kVBlock] = {};
        for (int64_t s = 0; s < len; ++s) {
          const int64_t ahead = s + kAheadSlots;
          if (d0 == 0) {
            if (ahead < len) fetch(vi + ahead * h);
            else if (next_k && ahead - len < len) fetch(next_k + (ahead - len) * h);
          }
          const float* vs = vi + s * h + d0;
          const float ws = weights[s];
#pragma GCC unroll 8
          for (int t = 0; t < kVBlock; ++t)
            if (t < nv) acc[t] += ws * loadv(vs + t * kLanes);
        }
        for (int t = 0; t < nv; ++t) storev(oi + d0 + t * kLanes, acc[t] * inv);
      }
      for (int64_t d = h_vec; d < h; ++d) {
        float acc = 0.f;
        for (int64_t s = 0; s < len; ++s) acc += weights[s] * vi[s * h + d];
        oi[d] = acc * inv;
      }
    }
  });
  return ffi::Error::Success();
}

// out (..., k) = the k largest of x (..., V) per row, descending: lax.top_k's values. Per row an O(V) selection
// (nth_element) and a sort of the k selected, on integer keys in IEEE total order (NaN above +inf, as XLA orders
// them), instead of XLA:CPU's sort-based top_k over the whole row.
inline int32_t OrderKey(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof(i));
  return i < 0 ? i ^ 0x7fffffff : i;
}

inline float FromOrderKey(int32_t key) {
  const int32_t i = key < 0 ? key ^ 0x7fffffff : key;
  float f;
  std::memcpy(&f, &i, sizeof(f));
  return f;
}

ffi::Error TopKValues(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions();
  const auto od = out->dimensions();
  if (xd.size() < 1 || xd.size() != od.size() || od.back() < 1 || od.back() > xd.back()) {
    return ffi::Error::InvalidArgument("jaxgen_cpu_top_k_values: x (..., V) and out (..., k), 1 <= k <= V expected");
  }
  const int64_t v = xd.back(), k = od.back();
  const int64_t rows = x.element_count() / v;
  const float* xp = x.typed_data();
  float* op = out->typed_data();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, rows)));
  RunParts(pool, parts, [=](int p) {
    std::vector<int32_t> keys(v);
    for (int64_t r = rows * p / parts; r < rows * (p + 1) / parts; ++r) {
      const float* row = xp + r * v;
      for (int64_t i = 0; i < v; ++i) keys[i] = OrderKey(row[i]);
      std::nth_element(keys.begin(), keys.begin() + (k - 1), keys.end(), std::greater<int32_t>());
      std::sort(keys.begin(), keys.begin() + k, std::greater<int32_t>());
      float* o = op + r * k;
      for (int64_t i = 0; i < k; ++i) o[i] = FromOrderKey(keys[i]);
    }
  });
  return ffi::Error::Success();
}

// ---- GroupNorm, optionally followed by SiLU, over NHWC float32 viewed as x (B, P, C): per (batch, group) the mean
// and biased variance over P pixels x C / G channels, y = (x - mean) * rsqrt(var + eps) * scale + bias, then (silu)
// y / (1 + exp(-y)) as torch's SiLU. XLA:CPU reads x three times (two reductions, then the normalisation) at
// ~10 GB/s; here x is read twice in all and y written once. Statistics per block of kNormPixels pixels: the block's
// per-channel mean, then its sum of squared deviations from that mean (the second pass finds the block in L2), the
// blocks and then a group's channels merged with Chan's formula in double. So no one-pass sum of squares loses the
// variance to cancellation; the summation order differs from the two-pass reference only.

// exp(x) for any float x, x clamped to [-87, 88] (so exp(-y) of y < -88 is ~1.6e38, not inf: SiLU gives ~-5e-37
// there instead of -0).
inline vf ExpClamped(vf x) {
  const vf lo = vf{} - 87.f, hi = vf{} + 88.f;
  return ExpInRange(x < lo ? lo : (x > hi ? hi : x));
}

constexpr int64_t kNormPixels = 256;

struct Moments {  // count, mean, sum of squared deviations
  double n = 0, mean = 0, m2 = 0;
  void Merge(double nb, double mean_b, double m2_b) {
    if (nb == 0) return;
    const double total = n + nb, delta = mean_b - mean;
    mean += delta * nb / total;
    m2 += m2_b + delta * delta * n * nb / total;
    n = total;
  }
};

ffi::Error GroupNormSilu(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                         ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y, float eps, int64_t groups,
                         bool silu) {
  const auto xd = x.dimensions();
  if (xd.size() < 2 || groups < 1 || xd.back() % groups != 0 || scale.element_count() != xd.back() ||
      bias.element_count() != xd.back() || y->element_count() != x.element_count()) {
    return ffi::Error::InvalidArgument(
        "jaxgen_cpu_group_norm: x (B, ..., C) with C divisible by groups, scale and bias (C,) expected");
  }
  const int64_t batch = xd[0], c = xd.back(), pixels = x.element_count() / (batch * c), per_group = c / groups;
  const float *xp = x.typed_data(), *scale_p = scale.typed_data(), *bias_p = bias.typed_data();
  float* yp = y->typed_data();
  const int64_t blocks = (pixels + kNormPixels - 1) / kNormPixels, tasks = batch * blocks;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // per (batch, block) and channel: the block's mean and sum of squared deviations
  std::vector<float> block_mean(tasks * c), block_m2(tasks * c);
  float *mean_p = block_mean.data(), *m2_p = block_m2.data();
  const int stat_parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, tasks)));
  RunParts(pool, stat_parts, [=](int p) {
    for (int64_t t = tasks * p / stat_parts; t < tasks * (p + 1) / stat_parts; ++t) {
      const int64_t b = t / blocks, p0 = (t % blocks) * kNormPixels, p1 = std::min(pixels, p0 + kNormPixels);
      const float* xb = xp + (b * pixels + p0) * c;
      float *mean = mean_p + t * c, *m2 = m2_p + t * c;
      const float inv = 1.f / static_cast<float>(p1 - p0);
      std::fill_n(mean, c, 0.f);
      std::fill_n(m2, c, 0.f);
      for (int64_t i = 0; i < p1 - p0; ++i) {
        const float* row = xb + i * c;
        int64_t j = 0;
        for (; j + kLanes <= c; j += kLanes) storev(mean + j, loadv(mean + j) + loadv(row + j));
        for (; j < c; ++j) mean[j] += row[j];
      }
      for (int64_t j = 0; j < c; ++j) mean[j] *= inv;
      for (int64_t i = 0; i < p1 - p0; ++i) {
        const float* row = xb + i * c;
        int64_t j = 0;
        for (; j + kLanes <= c; j += kLanes) {
          const vf d = loadv(row + j) - loadv(mean + j);
          storev(m2 + j, loadv(m2 + j) + d * d);
        }
        for (; j < c; ++j) {
          const float d = row[j] - mean[j];
          m2[j] += d * d;
        }
      }
    }
  });
  // per (batch, channel): the multiplier and offset of y = x * a + o
  std::vector<float> mul(batch * c), add(batch * c);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t g = 0; g < groups; ++g) {
      Moments group;
      for (int64_t j = g * per_group; j < (g + 1) * per_group; ++j) {
        Moments channel;
        for (int64_t k = 0; k < blocks; ++k) {
          const int64_t t = b * blocks + k, n = std::min(pixels, (k + 1) * kNormPixels) - k * kNormPixels;
          channel.Merge(static_cast<double>(n), block_mean[t * c + j], block_m2[t * c + j]);
        }
        group.Merge(channel.n, channel.mean, channel.m2);
      }
      const double rstd = 1.0 / std::sqrt(group.m2 / group.n + static_cast<double>(eps));
      for (int64_t j = g * per_group; j < (g + 1) * per_group; ++j) {
        const double a = rstd * scale_p[j];
        mul[b * c + j] = static_cast<float>(a);
        add[b * c + j] = static_cast<float>(bias_p[j] - group.mean * a);
      }
    }
  }
  const float *mul_p = mul.data(), *add_p = add.data();
  const int64_t rows = batch * pixels;
  const int parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, rows / 64)));
  RunParts(pool, parts, [=](int p) {
    for (int64_t r = rows * p / parts; r < rows * (p + 1) / parts; ++r) {
      const float *row = xp + r * c, *a = mul_p + (r / pixels) * c, *o = add_p + (r / pixels) * c;
      float* out = yp + r * c;
      int64_t j = 0;
      for (; j + kLanes <= c; j += kLanes) {
        vf v = loadv(row + j) * loadv(a + j) + loadv(o + j);
        if (silu) v = v / (vf{} + 1.f + ExpClamped(-v));
        storev(out + j, v);
      }
      for (; j < c; ++j) {
        float v = row[j] * a[j] + o[j];
        if (silu) v = v / (1.f + std::exp(std::min(-v, 88.f)));
        out[j] = v;
      }
    }
  });
  return ffi::Error::Success();
}

// ---- attention over (B, T, N, H) queries and (B, S, N, H) keys / values, one (batch, head) pair per task.
// Row r of a pair's (T or S, H) operand lies at base + r * stride (stride = N * H).

// Transposed panels: panel p (h x kTileCols) holds rows [kTileCols p, kTileCols (p + 1)) of src (h values each),
// zero past `rows`.
void PackTransposed(const float* src, int64_t rows, int64_t stride, int64_t h, int64_t rows_pad, float* dst) {
  for (int64_t r0 = 0; r0 < rows_pad; r0 += kTileCols) {
    float* panel = dst + r0 * h;
    for (int64_t j = 0; j < kTileCols; ++j) {
      if (r0 + j < rows) {
        const float* row = src + (r0 + j) * stride;
        for (int64_t d = 0; d < h; ++d) panel[d * kTileCols + j] = row[d];
      } else {
        for (int64_t d = 0; d < h; ++d) panel[d * kTileCols + j] = 0.f;
      }
    }
  }
}

// Column panels: panel c (rows_pad x kTileCols) holds columns [kTileCols c, kTileCols (c + 1)) of src times `mul`,
// zero outside.
void PackColumns(const float* src, int64_t rows, int64_t stride, int64_t h, int64_t rows_pad, int64_t h_pad,
                 float mul, float* dst) {
  for (int64_t c0 = 0; c0 < h_pad; c0 += kTileCols) {
    float* panel = dst + c0 * rows_pad;
    for (int64_t r = 0; r < rows_pad; ++r)
      for (int64_t j = 0; j < kTileCols; ++j)
        panel[r * kTileCols + j] = (r < rows && c0 + j < h) ? src[r * stride + c0 + j] * mul : 0.f;
  }
}

// `rows` query rows (row stride h) times `mul`, zero-padded to a full tile of kTileRows x h.
void CopyTile(const float* src, int rows, int64_t stride, int64_t h, float mul, float* tile) {
  for (int i = 0; i < kTileRows; ++i)
    for (int64_t d = 0; d < h; ++d) tile[i * h + d] = i < rows ? src[i * stride + d] * mul : 0.f;
}

// Logit rows (kTileRows x keys_pad, row stride `stride`) -> softmax probabilities in place: keys with keep == 0 get
// the lowest finite logit (jaxgen's masking: a fully masked row is uniform over the real keys, not NaN); padding
// keys [keys, keys_pad) get exactly 0.
void SoftmaxRows(float* logits, int64_t keys, int64_t keys_pad, int64_t stride, const float* keep) {
  const float lowest = std::numeric_limits<float>::lowest();
  vi lanes;
  for (int j = 0; j < kLanes; ++j) lanes[j] = j;
  for (int i = 0; i < kTileRows; ++i) {
    float* row = logits + i * stride;
    vf top_v = vf{} + lowest;
    for (int64_t s = 0; s < keys_pad; s += kLanes) {
      // masked and padding keys out of the maximum (padding may hold keys a chunk does not see: a far larger
      // logit there would cost the visible ones their precision)
      const vi visible = (loadv(keep + s) != 0.f) & (lanes + static_cast<int32_t>(s) < static_cast<int32_t>(keys));
      const vf x = visible ? loadv(row + s) : vf{} + lowest;
      storev(row + s, x);
      top_v = x > top_v ? x : top_v;
    }
    const float top = MaxLanes(top_v);
    vf sum_v = vf{};
    for (int64_t s = 0; s < keys_pad; s += kLanes) {
      const vf e = ExpNonPositive(loadv(row + s) - top);
      storev(row + s, e);
      sum_v += e;
    }
    float total = SumLanes(sum_v);
    for (int64_t s = keys; s < keys_pad; ++s) {  // padding is no key, even where every real key is masked
      total -= row[s];
      row[s] = 0.f;
    }
    const float inv = 1.f / total;
    for (int64_t s = 0; s < keys_pad; s += kLanes) storev(row + s, loadv(row + s) * inv);
  }
}

struct AttentionShape {
  int64_t batch, queries, heads, h, keys, h_pad;
  int64_t pairs() const { return batch * heads; }
  int64_t q_offset(int64_t b, int64_t n, int64_t t) const { return ((b * queries + t) * heads + n) * h; }
  int64_t k_offset(int64_t b, int64_t n) const { return (b * keys * heads + n) * h; }
  int64_t stride() const { return heads * h; }
};

// Which queries attend to which keys: chunk c holds queries [its begin, q_ends[c]) (the first begins at q_begin,
// each next one where the previous ends), which see keys [0, k_ends[c]). A plain call is one chunk: queries [0, T),
// keys [0, S); VAR's block-causal scales are chunks whose keys end where their queries do. The outputs `out` / dout
// hold the window's rows only: (B, q_ends.back() - q_begin, N, H).
struct Window {
  int64_t q_begin;
  ffi::Span<const int64_t> q_ends, k_ends;
  int64_t rows() const { return q_ends.back() - q_begin; }
  int64_t keys() const { return k_ends.back(); }
  int64_t chunk_begin(size_t c) const { return c == 0 ? q_begin : q_ends[c - 1]; }
  int64_t w_offset(const AttentionShape& sh, int64_t b, int64_t n, int64_t t) const {  // row t of the window
    return ((b * rows() + t) * sh.heads + n) * sh.h;
  }
};

ffi::Error CheckAttention(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k, ffi::Buffer<ffi::F32>& v,
                          ffi::Buffer<ffi::F32>& keep, const Window& w,
                          std::initializer_list<const ffi::Buffer<ffi::F32>*> window_rows, AttentionShape* shape) {
  const auto qd = q.dimensions();
  const auto kd = k.dimensions();
  const auto vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || qd[0] != kd[0] || qd[2] != kd[2] || qd[3] != kd[3] ||
      vd[0] != kd[0] || vd[1] != kd[1] || vd[2] != kd[2] || vd[3] != kd[3] || kd[1] < 1 ||
      keep.dimensions().size() != 2 || keep.dimensions()[0] != kd[0] || keep.dimensions()[1] != kd[1]) {
    return ffi::Error::InvalidArgument(
        "jaxgen_cpu_attention: q (B, T, N, H), k = v (B, S, N, H), keep (B, S) expected");
  }
  bool ok = w.q_ends.size() >= 1 && w.q_ends.size() == w.k_ends.size() && w.q_begin >= 0;
  for (size_t c = 0; ok && c < w.q_ends.size(); ++c) {
    ok = w.chunk_begin(c) < w.q_ends[c] && w.q_ends[c] <= qd[1] && w.k_ends[c] >= 1 && w.k_ends[c] <= kd[1] &&
         (c == 0 || w.k_ends[c] >= w.k_ends[c - 1]);
  }
  if (!ok) {
    return ffi::Error::InvalidArgument(
        "jaxgen_cpu_attention: chunks need increasing query ends <= T and non-decreasing key ends in [1, S]");
  }
  for (const auto* rows : window_rows) {  // the window's rows: the output, and the output's cotangent
    const auto d = rows->dimensions();
    if (d.size() != 4 || d[0] != qd[0] || d[1] != w.rows() || d[2] != qd[2] || d[3] != qd[3])
      return ffi::Error::InvalidArgument("jaxgen_cpu_attention: out / dout (B, window rows, N, H) expected");
  }
  *shape = {qd[0], qd[1], qd[2], qd[3], kd[1], RoundUp(qd[3], kTileCols)};
  return ffi::Error::Success();
}

// out (B, W, N, H) = softmax(q k^T * scale, keys with keep[b, s] == 0 masked) v per (batch, head), for the queries
// and keys of `Window` w. Per pair: k^T and v packed once into kTileCols-column panels, then for every kTileRows
// queries of a chunk the logits (kTileRows x its keys) as register tiles, the softmax over each row in L1 / L2, and
// the probabilities x v as register tiles: no (T, S) logits ever reach memory. Whole pairs go to threads, so nothing
// is shared.
ffi::Error Attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                     ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> keep, ffi::ResultBuffer<ffi::F32> out,
                     float scale, int64_t q_begin, ffi::Span<const int64_t> q_ends,
                     ffi::Span<const int64_t> k_ends) {
  AttentionShape sh;
  const Window w{q_begin, q_ends, k_ends};
  if (auto error = CheckAttention(q, k, v, keep, w, {&(*out)}, &sh); error.failure()) return error;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data(), *keep_p = keep.typed_data();
  float* op = out->typed_data();
  const int64_t keys = w.keys(), keys_pad = RoundUp(keys, kTileCols);
  const int parts = static_cast<int>(std::min<int64_t>(std::max<int64_t>(1, pool.num_threads()), sh.pairs()));
  RunParts(pool, parts, [=](int part) {
    std::vector<float> kt(sh.h * keys_pad), vcols(keys_pad * sh.h_pad), qtile(kTileRows * sh.h),
        probs(kTileRows * keys_pad), otile(kTileRows * sh.h_pad), keep_row(keys_pad, 0.f);
    for (int64_t pair = sh.pairs() * part / parts; pair < sh.pairs() * (part + 1) / parts; ++pair) {
      const int64_t b = pair / sh.heads, n = pair % sh.heads;
      std::copy(keep_p + b * sh.keys, keep_p + b * sh.keys + keys, keep_row.begin());  // padding stays 0
      PackTransposed(kp + sh.k_offset(b, n), keys, sh.stride(), sh.h, keys_pad, kt.data());
      PackColumns(vp + sh.k_offset(b, n), keys, sh.stride(), sh.h, keys_pad, sh.h_pad, 1.f, vcols.data());
      for (size_t c = 0; c < w.q_ends.size(); ++c) {
        const int64_t chunk_keys = w.k_ends[c], chunk_pad = RoundUp(chunk_keys, kTileCols);
        for (int64_t t0 = w.chunk_begin(c); t0 < w.q_ends[c]; t0 += kTileRows) {
          const int rows = static_cast<int>(std::min<int64_t>(kTileRows, w.q_ends[c] - t0));
          CopyTile(qp + sh.q_offset(b, n, t0), rows, sh.stride(), sh.h, scale, qtile.data());
          for (int64_t s0 = 0; s0 < chunk_pad; s0 += kTileCols)
            TileProduct(sh.h, qtile.data(), sh.h, kt.data() + s0 * sh.h, probs.data() + s0, chunk_pad);
          SoftmaxRows(probs.data(), chunk_keys, chunk_pad, chunk_pad, keep_row.data());
          for (int64_t c0 = 0; c0 < sh.h_pad; c0 += kTileCols)
            TileProduct(chunk_keys, probs.data(), chunk_pad, vcols.data() + c0 * keys_pad, otile.data() + c0,
                        sh.h_pad);
          float* ob = op + w.w_offset(sh, b, n, t0 - w.q_begin);
          for (int i = 0; i < rows; ++i)
            std::copy(otile.data() + i * sh.h_pad, otile.data() + i * sh.h_pad + sh.h, ob + i * sh.stride());
        }
      }
    }
  });
  return ffi::Error::Success();
}

// Gradients of `Attention` (dq, dk, dv) from q, k, v, keep, its output and the output's cotangent, per pair:
// P recomputed tile by tile as in the forward pass, dP = dout v^T, dS = P (dP - rowsum(dout * out)),
// dq = dS k * scale; then dk = dS^T (q * scale) and dv = P^T dout over the pair's whole P and dS (W x keys each, zero
// past each chunk's keys, kept per thread), read column-wise in place, each key tile from the first query that sees
// it. dq is zero outside the window, dk and dv past its last key.
ffi::Error AttentionBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                             ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> keep, ffi::Buffer<ffi::F32> out,
                             ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq,
                             ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv, float scale,
                             int64_t q_begin, ffi::Span<const int64_t> q_ends, ffi::Span<const int64_t> k_ends) {
  AttentionShape sh;
  const Window w{q_begin, q_ends, k_ends};
  if (auto error = CheckAttention(q, k, v, keep, w, {&out, &dout}, &sh); error.failure()) return error;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data(), *keep_p = keep.typed_data();
  const float *op = out.typed_data(), *dop = dout.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  const int64_t rows_w = w.rows(), keys = w.keys(), keys_pad = RoundUp(keys, kTileCols);
  // a chunk's last tile of kTileRows may run past the window; key tiles of kTileRows may read up to
  // kTileRows - 1 columns past keys_pad
  const int64_t p_size = (rows_w + kTileRows) * keys_pad + kTileRows;
  const int parts = static_cast<int>(std::min<int64_t>(std::max<int64_t>(1, pool.num_threads()), sh.pairs()));
  RunParts(pool, parts, [=](int part) {
    std::vector<float> kt(sh.h * keys_pad), vt(sh.h * keys_pad), kcols(keys_pad * sh.h_pad),
        qcols(rows_w * sh.h_pad), docols(rows_w * sh.h_pad), qtile(kTileRows * sh.h), dotile(kTileRows * sh.h),
        probs(p_size, 0.f), dscores(p_size, 0.f), gtile(kTileRows * sh.h_pad), keep_row(keys_pad, 0.f);
    for (int64_t pair = sh.pairs() * part / parts; pair < sh.pairs() * (part + 1) / parts; ++pair) {
      const int64_t b = pair / sh.heads, n = pair % sh.heads, st = sh.stride();
      const float *kb = kp + sh.k_offset(b, n), *vb = vp + sh.k_offset(b, n);
      std::copy(keep_p + b * sh.keys, keep_p + b * sh.keys + keys, keep_row.begin());
      PackTransposed(kb, keys, st, sh.h, keys_pad, kt.data());
      PackTransposed(vb, keys, st, sh.h, keys_pad, vt.data());
      PackColumns(kb, keys, st, sh.h, keys_pad, sh.h_pad, 1.f, kcols.data());
      PackColumns(qp + sh.q_offset(b, n, w.q_begin), rows_w, st, sh.h, rows_w, sh.h_pad, scale, qcols.data());
      PackColumns(dop + w.w_offset(sh, b, n, 0), rows_w, st, sh.h, rows_w, sh.h_pad, 1.f, docols.data());
      for (int64_t t = 0; t < sh.queries; ++t) {  // rows outside the window get no gradient
        if (t < w.q_begin || t >= w.q_ends.back()) std::fill_n(dqp + sh.q_offset(b, n, t), sh.h, 0.f);
      }
      for (size_t c = 0; c < w.q_ends.size(); ++c) {
        const int64_t chunk_keys = w.k_ends[c], chunk_pad = RoundUp(chunk_keys, kTileCols);
        for (int64_t t0 = w.chunk_begin(c); t0 < w.q_ends[c]; t0 += kTileRows) {
          const int rows = static_cast<int>(std::min<int64_t>(kTileRows, w.q_ends[c] - t0));
          const int64_t r0 = t0 - w.q_begin;  // the tile's first row in the window
          float* p = probs.data() + r0 * keys_pad;
          float* ds = dscores.data() + r0 * keys_pad;
          CopyTile(qp + sh.q_offset(b, n, t0), rows, st, sh.h, scale, qtile.data());
          CopyTile(dop + w.w_offset(sh, b, n, r0), rows, st, sh.h, 1.f, dotile.data());
          for (int64_t s0 = 0; s0 < chunk_pad; s0 += kTileCols) {
            TileProduct(sh.h, qtile.data(), sh.h, kt.data() + s0 * sh.h, p + s0, keys_pad);
            TileProduct(sh.h, dotile.data(), sh.h, vt.data() + s0 * sh.h, ds + s0, keys_pad);
          }
          SoftmaxRows(p, chunk_keys, chunk_pad, keys_pad, keep_row.data());
          for (int i = 0; i < kTileRows; ++i) {
            float* pi = p + i * keys_pad;
            float* dsi = ds + i * keys_pad;
            std::fill(pi + chunk_pad, pi + keys_pad, 0.f);  // keys this chunk does not see
            std::fill(dsi + chunk_pad, dsi + keys_pad, 0.f);
            if (i >= rows) {  // padding queries: no gradient (and nothing for dk / dv to pick up)
              std::fill(pi, pi + chunk_pad, 0.f);
              std::fill(dsi, dsi + chunk_pad, 0.f);
              continue;
            }
            const float* oi = op + w.w_offset(sh, b, n, r0 + i);
            const float* doi = dop + w.w_offset(sh, b, n, r0 + i);
            float dot = 0.f;
            for (int64_t d = 0; d < sh.h; ++d) dot += oi[d] * doi[d];
            for (int64_t s = 0; s < chunk_pad; s += kLanes) {  // masked logits are constants: no gradient
              const vf g = loadv(pi + s) * (loadv(dsi + s) - dot);
              storev(dsi + s, loadv(keep_row.data() + s) != 0.f ? g : vf{});
            }
          }
          for (int64_t c0 = 0; c0 < sh.h_pad; c0 += kTileCols)
            TileProduct(chunk_keys, ds, keys_pad, kcols.data() + c0 * keys_pad, gtile.data() + c0, sh.h_pad);
          float* dqb = dqp + sh.q_offset(b, n, t0);
          for (int i = 0; i < rows; ++i)
            for (int64_t d = 0; d < sh.h; ++d) dqb[i * st + d] = gtile[i * sh.h_pad + d] * scale;
        }
      }
      size_t first_chunk = 0;  // the first chunk that sees key tile s0 (key ends do not decrease)
      for (int64_t s0 = 0; s0 < keys; s0 += kTileRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kTileRows, keys - s0));
        while (w.k_ends[first_chunk] <= s0) ++first_chunk;
        const int64_t r_first = w.chunk_begin(first_chunk) - w.q_begin;
        for (int which = 0; which < 2; ++which) {  // dk = dS^T (q * scale), dv = P^T dout
          const float* a = (which == 0 ? dscores.data() : probs.data()) + r_first * keys_pad + s0;
          const float* cols = (which == 0 ? qcols.data() : docols.data()) + r_first * kTileCols;
          for (int64_t c0 = 0; c0 < sh.h_pad; c0 += kTileCols)
            TileProduct<true>(rows_w - r_first, a, keys_pad, cols + c0 * rows_w, gtile.data() + c0, sh.h_pad);
          float* gb = (which == 0 ? dkp : dvp) + sh.k_offset(b, n) + s0 * st;
          for (int i = 0; i < rows; ++i)
            std::copy(gtile.data() + i * sh.h_pad, gtile.data() + i * sh.h_pad + sh.h, gb + i * st);
        }
      }
      for (int64_t s = keys; s < sh.keys; ++s) {  // keys no chunk sees
        std::fill_n(dkp + sh.k_offset(b, n) + s * st, sh.h, 0.f);
        std::fill_n(dvp + sh.k_offset(b, n) + s * st, sh.h, 0.f);
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


// ---- 3x3 convolution (stride 1, zero padding 1, NHWC) by Winograd's minimal filtering F(4x4, 3x3) (Lavin & Gray):
// each 4x4 block of outputs ("tile") comes from the 6x6 input patch around it as A^T [U . (B^T d B)] A, where
// U = G g G^T (36 x C x O, transformed once by the caller) -- 36 products per 16 outputs instead of 144. The
// element-wise products over channels become 36 matrix products (tiles x C) @ (C x O) per block of tiles. A block's
// transformed inputs and products (~3 MB) stay in the thread's cache: input transform -> 36 products -> output
// transform, one block after another, each thread claiming blocks. In float32 the result differs from a direct
// conv by ~1e-5 of its scale (larger terms are summed), within every parity tolerance.
// B^T's rows: (4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0), (0, -2, -1, 2, 1, 0),
// (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1); A^T's: (1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0),
// (0, 1, -1, 8, -8, 1).
template <typename V>
inline void WinoInputRows(const V (&d)[6], V (&r)[6]) {  // r = B^T d along one axis
  r[0] = 4.f * d[0] - 5.f * d[2] + d[4];
  r[1] = -4.f * (d[1] + d[2]) + d[3] + d[4];
  r[2] = 4.f * (d[1] - d[2]) - d[3] + d[4];
  r[3] = 2.f * (d[3] - d[1]) - d[2] + d[4];
  r[4] = 2.f * (d[1] - d[3]) - d[2] + d[4];
  r[5] = 4.f * d[1] - 5.f * d[3] + d[5];
}

template <typename V>
inline void WinoOutputRows(const V (&m)[6], V (&o)[4]) {  // o = A^T m along one axis
  const V p12 = m[1] + m[2], d12 = m[1] - m[2], p34 = m[3] + m[4], d34 = m[3] - m[4];
  o[0] = m[0] + p12 + p34;
  o[1] = d12 + 2.f * d34;
  o[2] = p12 + 4.f * p34;
  o[3] = d12 + 8.f * d34 + m[5];
}

struct WinoShape {
  int64_t batch, h, w, c, o, th, tw;
  int up;  // 1: the input is x upsampled x2 (nearest), read in place from x (h / 2, w / 2)
  int64_t tiles() const { return batch * th * tw; }
};

// V[t][i][ch] for the tiles g0 .. g0 + n of x, channels [j, j + width) (a vector of floats, or one float).
template <typename V, typename Load>
inline void WinoInputTile(const WinoShape& s, const float* x, int64_t g, int64_t i, int64_t n, int64_t j,
                          float* v, Load load) {
  const int64_t b = g / (s.th * s.tw), ti = (g / s.tw) % s.th, tj = g % s.tw;
  V rows[6][6];
  for (int r = 0; r < 6; ++r) {
    const int64_t y = 4 * ti - 1 + r;
    V d[6];
    for (int q = 0; q < 6; ++q) {
      const int64_t xx = 4 * tj - 1 + q;
      d[q] = (y >= 0 && y < s.h && xx >= 0 && xx < s.w)
                 ? load(x + ((b * (s.h >> s.up) + (y >> s.up)) * (s.w >> s.up) + (xx >> s.up)) * s.c + j)
                 : V{};
    }
    WinoInputRows(d, rows[r]);
  }
  for (int q = 0; q < 6; ++q) {
    V col[6], out[6];
    for (int r = 0; r < 6; ++r) col[r] = rows[r][q];
    WinoInputRows(col, out);
    for (int a = 0; a < 6; ++a) {
      float* dst = v + ((a * 6 + q) * n + i) * s.c + j;
      if constexpr (sizeof(V) == sizeof(float)) *dst = out[a]; else storev(dst, out[a]);
    }
  }
}

template <typename V, typename Load>
inline void WinoOutputTile(const WinoShape& s, const float* m, const float* bias, int64_t g, int64_t i, int64_t n,
                           int64_t j, float* y, Load load) {
  const int64_t b = g / (s.th * s.tw), ti = (g / s.tw) % s.th, tj = g % s.tw;
  V rows[4][6];
  for (int q = 0; q < 6; ++q) {
    V col[6], out[4];
    for (int a = 0; a < 6; ++a) col[a] = load(m + ((a * 6 + q) * n + i) * s.o + j);
    WinoOutputRows(col, out);
    for (int p = 0; p < 4; ++p) rows[p][q] = out[p];
  }
  const V bias_j = load(bias + j);
  for (int p = 0; p < 4; ++p) {
    V out[4];
    WinoOutputRows(rows[p], out);
    for (int q = 0; q < 4; ++q) {
      float* dst = y + ((b * s.h + 4 * ti + p) * s.w + 4 * tj + q) * s.o + j;
      if constexpr (sizeof(V) == sizeof(float)) *dst = out[q] + bias_j; else storev(dst, out[q] + bias_j);
    }
  }
}

constexpr int64_t kWinoBlockBytes = 3 << 20;  // a block's transformed inputs + products (L2 / near L3)

ffi::Error WinogradConv3(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> u,
                         ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y, bool upsample) {
  const SgemmFn sgemm = g_sgemm.load();
  const SetThreadsLocalFn set_threads = g_set_threads_local.load();
  const auto xd = x.dimensions();
  const auto ud = u.dimensions();
  if (sgemm == nullptr || set_threads == nullptr) return ffi::Error::Internal("jaxgen_cpu_winograd_conv3: no BLAS");
  const int shift = upsample ? 1 : 0;
  const int64_t h = xd.size() == 4 ? xd[1] << shift : 0, w = xd.size() == 4 ? xd[2] << shift : 0;
  if (xd.size() != 4 || ud.size() != 3 || ud[0] != 36 || ud[1] != xd[3] || h % 4 != 0 || w % 4 != 0 ||
      bias.element_count() != ud[2] || y->element_count() != xd[0] * h * w * ud[2]) {
    return ffi::Error::InvalidArgument(
        "jaxgen_cpu_winograd_conv3: x (B, H, W, C) with H, W divisible by 4 (after the upsampling), u (36, C, O), "
        "bias (O,) expected");
  }
  const WinoShape s{xd[0], h, w, xd[3], ud[2], h / 4, w / 4, shift};
  const float *xp = x.typed_data(), *up = u.typed_data(), *bp = bias.typed_data();
  float* yp = y->typed_data();
  const int64_t per_tile = 36 * (s.c + s.o) * static_cast<int64_t>(sizeof(float));
  const int64_t n_block = std::max<int64_t>(16, std::min<int64_t>(256, kWinoBlockBytes / per_tile));
  const int64_t blocks = (s.tiles() + n_block - 1) / n_block;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // the register tiles (12 rows x 32 columns with AVX-512, U[t] read in place from L2) beat OpenBLAS's sgemm on
  // these products of a few dozen rows: 2 x 256 x 256 x 160 -> 160 in 76 against 84 ms; 64 x 64 x 320: 22 / 29 ms
  const bool register_tiles = s.o % kTileCols == 0;
  std::atomic<int64_t> next{0};
  auto vec = [](const float* p) { return loadv(p); };
  auto one = [](const float* p) { return *p; };
  RunParts(pool, static_cast<int>(std::min<int64_t>(threads, blocks)), [&](int) {
    if (!register_tiles) set_threads(1);
    thread_local std::vector<float> scratch;
    scratch.resize(36 * n_block * (s.c + s.o));
    float* v = scratch.data();
    float* m = v + 36 * n_block * s.c;
    for (int64_t blk; (blk = next.fetch_add(1)) < blocks;) {
      const int64_t g0 = blk * n_block, n = std::min(n_block, s.tiles() - g0);
      for (int64_t i = 0; i < n; ++i) {
        int64_t j = 0;
        for (; j + kLanes <= s.c; j += kLanes) WinoInputTile<vf>(s, xp, g0 + i, i, n, j, v, vec);
        for (; j < s.c; ++j) WinoInputTile<float>(s, xp, g0 + i, i, n, j, v, one);
      }
      for (int t = 0; t < 36; ++t) {
        const float *vt = v + t * n * s.c, *ut = up + t * s.c * s.o;
        if (register_tiles) {
          ChunkedColumns(static_cast<int>(n), vt, s.c, ut, s.o, 0, s.o, m + t * n * s.o, s.o);
        } else {
          sgemm(kRowMajor, kNoTrans, kNoTrans, n, s.o, s.c, 1.f, vt, s.c, ut, s.o, 0.f, m + t * n * s.o, s.o);
        }
      }
      for (int64_t i = 0; i < n; ++i) {
        int64_t j = 0;
        for (; j + kLanes <= s.o; j += kLanes) WinoOutputTile<vf>(s, m, bp, g0 + i, i, n, j, yp, vec);
        for (; j < s.o; ++j) WinoOutputTile<float>(s, m, bp, g0 + i, i, n, j, yp, one);
      }
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxgenCpuAttentionBackward, AttentionBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("q_begin")
                                  .Attr<ffi::Span<const int64_t>>("q_ends")
                                  .Attr<ffi::Span<const int64_t>>("k_ends"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxgenCpuAttention, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("q_begin")
                                  .Attr<ffi::Span<const int64_t>>("q_ends")
                                  .Attr<ffi::Span<const int64_t>>("k_ends"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxgenCpuGemmWt, GemmWt,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

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

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxgenCpuGroupNorm, GroupNormSilu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps")
                                  .Attr<int64_t>("groups")
                                  .Attr<bool>("silu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxgenCpuWinogradConv3, WinogradConv3,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("upsample"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxgenCpuTopKValues, TopKValues,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
