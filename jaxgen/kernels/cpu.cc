// jaxgen's XLA:CPU FFI kernels for decode steps (see cpu.py for why), float32:
//   JaxgenCpuGemv: y (M, N) = x (M, K) @ w (K, N) for a few rows M.
//   JaxgenCpuDecodeAttention: one query per (batch, head) against the first `length` slots of a KV cache.
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

}  // namespace

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
