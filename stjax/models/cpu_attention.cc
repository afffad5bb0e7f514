// Fused ("flash") attention for XLA:CPU, called through the XLA FFI; see cpu_attention.py.
//
// XLA's CPU backend has no fused attention: it writes the full score matrix, runs the softmax
// over it and reads it back, at a third of the speed of a fused kernel. Here scores live only in
// a 48 x 48 tile (32 x 32 where that pads less): queries and keys go in tiles, the softmax is kept
// online (running max and sum per query), and the backward recomputes a tile's probabilities from
// the saved log-sum-exp instead of storing them. Tiles are held transposed (keys x queries), so K, V, dO and the
// outputs are read and written in place, the softmax runs along vectors of queries, and every
// product is one register-blocked micro-kernel (`Gemm`) written with GCC vector extensions: the
// compiler emits the widest vectors of the machine it is built on (built with -march=native).
//
// Layouts (row-major): q (B, L, H, D); k, v (B, S, KV, D) with H a multiple of KV; segments
// (B, L) and (B, S) int32; q_offset a scalar: query i sits at key slot q_offset + i. A query
// sees keys of its own segment and, when causal, at or before its slot. Queries that see no key
// get a zero output and a +inf log-sum-exp (zero gradient).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

constexpr int kMR = 6;     // micro-kernel rows
constexpr int kNR = 16;    // micro-kernel columns (two vectors)
constexpr float kInf = std::numeric_limits<float>::infinity();

inline v8f Load(const float* p) { v8f v; std::memcpy(&v, p, sizeof v); return v; }
inline void Store(float* p, v8f v) { std::memcpy(p, &v, sizeof v); }
inline v8f Splat(float x) { return v8f{x, x, x, x, x, x, x, x}; }

// R rows x kNR columns of c = op(a) @ b, or c += op(a) @ b, the accumulators held in registers.
template <int R, bool kTransA, bool kAccumulate>
inline void MicroKernel(int k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                        int64_t ldc) {
  v8f acc[R][2];
  for (int r = 0; r < R; ++r) {
    acc[r][0] = kAccumulate ? Load(c + r * ldc) : Splat(0.0f);
    acc[r][1] = kAccumulate ? Load(c + r * ldc + 8) : Splat(0.0f);
  }
  for (int p = 0; p < k; ++p) {
    const v8f b0 = Load(b + p * ldb), b1 = Load(b + p * ldb + 8);
    for (int r = 0; r < R; ++r) {
      const v8f x = Splat(kTransA ? a[p * lda + r] : a[r * lda + p]);
      acc[r][0] += x * b0;
      acc[r][1] += x * b1;
    }
  }
  for (int r = 0; r < R; ++r) {
    Store(c + r * ldc, acc[r][0]);
    Store(c + r * ldc + 8, acc[r][1]);
  }
}

// c (m x n) = op(a) (m x k) @ b (k x n), or += with kAccumulate; row-major with leading
// dimensions; op(a) is a, or the transpose of a (k x m) when kTransA. n must be a multiple of kNR.
template <bool kTransA, bool kAccumulate = true>
void Gemm(int m, int n, int k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
          int64_t ldc) {
  for (int i = 0; i < m; i += kMR) {
    const float* ai = kTransA ? a + i : a + i * lda;
    for (int j = 0; j < n; j += kNR) {
      float* cij = c + i * ldc + j;
      switch (std::min(kMR, m - i)) {
        case 6: MicroKernel<6, kTransA, kAccumulate>(k, ai, lda, b + j, ldb, cij, ldc); break;
        case 5: MicroKernel<5, kTransA, kAccumulate>(k, ai, lda, b + j, ldb, cij, ldc); break;
        case 4: MicroKernel<4, kTransA, kAccumulate>(k, ai, lda, b + j, ldb, cij, ldc); break;
        case 3: MicroKernel<3, kTransA, kAccumulate>(k, ai, lda, b + j, ldb, cij, ldc); break;
        case 2: MicroKernel<2, kTransA, kAccumulate>(k, ai, lda, b + j, ldb, cij, ldc); break;
        default: MicroKernel<1, kTransA, kAccumulate>(k, ai, lda, b + j, ldb, cij, ldc); break;
      }
    }
  }
}

// A per-thread buffer of at least `size` floats that keeps its capacity between work items.
float* Scratch(int slot, size_t size) {
  thread_local std::vector<float> buffers[3];
  if (buffers[slot].size() < size) buffers[slot].resize(size);
  return buffers[slot].data();
}

// exp of 8 floats: 2^n * exp(r) with n = round(x / ln 2), Cephes' polynomial (about 1 ulp).
// Inputs below -87 give about 1e-38 instead of 0 (callers zero masked entries themselves).
v8f Exp(v8f x) {
  const v8f lo = Splat(-87.3f), hi = Splat(88.3f);
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const v8f magic = Splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const v8f t = x * Splat(1.44269504088896341f) + magic;
  const v8f n = t - magic;
  const v8i ni = (v8i)t - (v8i)magic;
  const v8f r = x - n * Splat(0.693359375f) - n * Splat(-2.12194440e-4f);
  v8f p = Splat(1.9875691500e-4f);
  p = p * r + Splat(1.3981999507e-3f);
  p = p * r + Splat(8.3334519073e-3f);
  p = p * r + Splat(4.1665795894e-2f);
  p = p * r + Splat(1.6666665459e-1f);
  p = p * r + Splat(5.0000001201e-1f);
  p = p * r * r + r + Splat(1.0f);
  return p * (v8f)((ni + 127) << 23);
}

// Runs fn(i) for i in [0, n) on the caller and the XLA intra-op pool's threads. The caller
// waits for the items, never for helpers to start (a busy pool then just leaves the work to
// the caller); a helper that starts late finds no item left and touches only the shared state.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const F& fn) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto state = std::make_shared<State>();
  auto run = [state, n, f = &fn] {
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      (*f)(i);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule(decltype(run)(run));
  run();
  while (state->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

struct Shape {
  int64_t b, l, s, h, kv, d;
  int64_t group() const { return h / kv; }
  int64_t q_row() const { return h * d; }   // elements between consecutive queries
  int64_t k_row() const { return kv * d; }  // elements between consecutive keys
};

Shape GetShape(ffi::Span<const int64_t> q, ffi::Span<const int64_t> k) {
  return Shape{q[0], q[1], k[1], q[2], k[2], q[3]};
}

ffi::Error CheckShape(const Shape& sh) {
  if (sh.kv <= 0 || sh.h % sh.kv != 0) return ffi::Error::InvalidArgument("query heads must be a multiple of KV heads");
  if (sh.d % kNR != 0) return ffi::Error::InvalidArgument("head size must be a multiple of 16");
  return ffi::Error::Success();
}

// Which queries see which keys in the tile of keys [k0, k0 + kTile) x queries [q0, q0 + kTile).
// Most tiles see everything (one segment, before the causal diagonal, no sequence tail) and
// skip the per-element test.
template <int kTile>
struct TileMask {
  bool all_visible;
  bool visible[kTile][kTile];  // [key][query]

  TileMask(const Shape& sh, const int32_t* seg_q, const int32_t* seg_k, int64_t offset, bool causal,
           int64_t q0, int64_t k0) {
    all_visible = q0 + kTile <= sh.l && k0 + kTile <= sh.s && (!causal || k0 + kTile - 1 <= offset + q0);
    for (int i = 0; all_visible && i < kTile; ++i)
      all_visible = seg_q[q0 + i] == seg_q[q0] && seg_k[k0 + i] == seg_q[q0];
    if (all_visible) return;
    for (int j = 0; j < kTile; ++j) {
      const int64_t kj = k0 + j;
      for (int i = 0; i < kTile; ++i) {
        const int64_t qi = q0 + i;
        visible[j][i] = qi < sh.l && kj < sh.s && seg_q[qi] == seg_k[kj] && (!causal || kj <= offset + qi);
      }
    }
  }

  void Apply(float* scores, int keys) const {  // masked scores become -inf
    if (all_visible) return;
    for (int j = 0; j < keys; ++j)
      for (int i = 0; i < kTile; ++i)
        if (!visible[j][i]) scores[j * kTile + i] = -kInf;
  }
};

// The smallest and largest segment id of slots [start, start + count): a query tile and a key tile
// whose ranges do not meet share no segment, so the pair is skipped (padding given segments of
// its own, see attention.py, costs nothing).
struct SegmentRange {
  int32_t lo, hi;
  SegmentRange(const int32_t* seg, int64_t start, int64_t count) : lo(seg[start]), hi(seg[start]) {
    for (int64_t i = 1; i < count; ++i) {
      lo = std::min(lo, seg[start + i]);
      hi = std::max(hi, seg[start + i]);
    }
  }
  bool Meets(const SegmentRange& other) const { return lo <= other.hi && other.lo <= hi; }
};

// Where the keys seen by queries [q0, q0 + kTile) end: at s, or (causal) after the last query's slot.
template <int kTile>
int64_t KeyEnd(const Shape& sh, int64_t offset, bool causal, int64_t q0) {
  if (!causal) return sh.s;
  return std::clamp<int64_t>(offset + std::min(q0 + kTile, sh.l), 0, sh.s);
}

// A tile of queries [q0, q0 + kTile) of head h, transposed (d x kTile) and scaled; zero past l.
template <int kTile>
void PackTransposed(const Shape& sh, const float* x, int64_t b, int64_t h, int64_t q0, float scale,
                    float* tile) {
  std::fill(tile, tile + sh.d * kTile, 0.0f);
  for (int64_t i = 0; i < kTile && q0 + i < sh.l; ++i) {
    const float* row = x + (b * sh.l + q0 + i) * sh.q_row() + h * sh.d;
    for (int64_t c = 0; c < sh.d; ++c) tile[c * kTile + i] = row[c] * scale;
  }
}

// One work item per (batch, query head, query tile), each writing its own rows of out and lse.
template <int kTile>
void ForwardTiled(ffi::ThreadPool& pool, const Shape& sh, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                  ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> seg_q, ffi::Buffer<ffi::S32> seg_k,
                  int64_t offset, bool causal, float scale, ffi::ResultBuffer<ffi::F32> out,
                  ffi::ResultBuffer<ffi::F32> lse) {
  const int64_t q_tiles = (sh.l + kTile - 1) / kTile;

  ParallelFor(pool, sh.b * sh.h * q_tiles, [&](int64_t item) {
    const int64_t q0 = item % q_tiles * kTile, h = item / q_tiles % sh.h, b = item / q_tiles / sh.h;
    const float* keys = k.typed_data() + b * sh.s * sh.k_row() + h / sh.group() * sh.d;
    const float* values = v.typed_data() + b * sh.s * sh.k_row() + h / sh.group() * sh.d;
    const int32_t* sq = seg_q.typed_data() + b * sh.l;
    const int32_t* sk = seg_k.typed_data() + b * sh.s;
    alignas(32) float m[kTile], l[kTile], alpha[kTile];
    std::fill_n(m, kTile, -kInf);
    std::fill_n(l, kTile, 0.0f);
    float* q_t = Scratch(0, sh.d * kTile);
    float* o_t = Scratch(1, sh.d * kTile);
    float* s = Scratch(2, kTile * kTile);
    std::fill_n(o_t, sh.d * kTile, 0.0f);
    PackTransposed<kTile>(sh, q.typed_data(), b, h, q0, scale, q_t);
    const int64_t key_end = KeyEnd<kTile>(sh, offset, causal, q0);
    const SegmentRange query_segments(sq, q0, std::min<int64_t>(kTile, sh.l - q0));
    for (int64_t k0 = 0; k0 < key_end; k0 += kTile) {
      const int nk = std::min<int64_t>(kTile, sh.s - k0);
      if (!query_segments.Meets(SegmentRange(sk, k0, nk))) continue;
      Gemm<false, false>(nk, kTile, sh.d, keys + k0 * sh.k_row(), sh.k_row(), q_t, kTile, s, kTile);
      TileMask<kTile>(sh, sq, sk, offset, causal, q0, k0).Apply(s, nk);
      // Online softmax, 8 queries at a time: rescale what came before to the new running max.
      for (int i = 0; i < kTile; i += 8) {
        const v8f m_old = Load(m + i);
        v8f mx = m_old;
        for (int j = 0; j < nk; ++j) {
          const v8f x = Load(&s[j * kTile + i]);
          mx = x > mx ? x : mx;
        }
        v8f sum = Splat(0.0f);
        for (int j = 0; j < nk; ++j) {
          const v8f x = Load(&s[j * kTile + i]);
          const v8f p = x == Splat(-kInf) ? Splat(0.0f) : Exp(x - mx);
          Store(&s[j * kTile + i], p);
          sum += p;
        }
        const v8f a = m_old == Splat(-kInf) ? Splat(0.0f) : Exp(m_old - mx);
        Store(alpha + i, a);
        Store(l + i, Load(l + i) * a + sum);
        Store(m + i, mx);
      }
      for (int64_t c = 0; c < sh.d; ++c)
        for (int i = 0; i < kTile; i += 8) Store(&o_t[c * kTile + i], Load(&o_t[c * kTile + i]) * Load(alpha + i));
      Gemm<true>(sh.d, kTile, nk, values + k0 * sh.k_row(), sh.k_row(), s, kTile, o_t, kTile);
    }
    for (int64_t i = 0; i < kTile && q0 + i < sh.l; ++i) {
      const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
      float* dst = out->typed_data() + (b * sh.l + q0 + i) * sh.q_row() + h * sh.d;
      for (int64_t c = 0; c < sh.d; ++c) dst[c] = o_t[c * kTile + i] * inv;
      lse->typed_data()[(b * sh.h + h) * sh.l + q0 + i] = l[i] > 0.0f ? m[i] + std::log(l[i]) : kInf;
    }
  });
}

// Gradients of Forward, given its log-sum-exp and delta = rowsum(d_out * out) per query (B, H, L).
// One work item per (batch, KV head): it owns dk and dv of that head and dq of its query heads,
// so no two threads write the same element.
template <int kTile>
void BackwardTiled(ffi::ThreadPool& pool, const Shape& sh, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> seg_q, ffi::Buffer<ffi::S32> seg_k,
                   int64_t offset, ffi::Buffer<ffi::F32> d_out, ffi::Buffer<ffi::F32> lse,
                   ffi::Buffer<ffi::F32> delta, bool causal, float scale, ffi::ResultBuffer<ffi::F32> dq,
                   ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  const int64_t q_tiles = (sh.l + kTile - 1) / kTile, padded_l = q_tiles * kTile;

  ParallelFor(pool, sh.b * sh.kv, [&](int64_t item) {
    const int64_t b = item / sh.kv, kvh = item % sh.kv, g = sh.group();
    const int64_t k_base = b * sh.s * sh.k_row() + kvh * sh.d;
    const float* keys = k.typed_data() + k_base;
    const float* values = v.typed_data() + k_base;
    float* dkeys = dk->typed_data() + k_base;
    float* dvalues = dv->typed_data() + k_base;
    const int32_t* sq = seg_q.typed_data() + b * sh.l;
    const int32_t* sk = seg_k.typed_data() + b * sh.s;
    // Per query head of the group: queries and d_out transposed in tiles, lse and delta padded
    // (lse +inf past l, so padded queries get zero probability).
    const int64_t tile = sh.d * kTile;
    std::vector<float> q_t(g * q_tiles * tile), do_t(g * q_tiles * tile);
    std::vector<float> lse_p(g * padded_l, kInf), delta_p(g * padded_l, 0.0f);
    for (int64_t gi = 0; gi < g; ++gi) {
      const int64_t h = kvh * g + gi;
      for (int64_t t = 0; t < q_tiles; ++t) {
        PackTransposed<kTile>(sh, q.typed_data(), b, h, t * kTile, scale, &q_t[(gi * q_tiles + t) * tile]);
        PackTransposed<kTile>(sh, d_out.typed_data(), b, h, t * kTile, 1.0f, &do_t[(gi * q_tiles + t) * tile]);
      }
      std::copy_n(lse.typed_data() + (b * sh.h + h) * sh.l, sh.l, &lse_p[gi * padded_l]);
      std::copy_n(delta.typed_data() + (b * sh.h + h) * sh.l, sh.l, &delta_p[gi * padded_l]);
      for (int64_t i = 0; i < sh.l; ++i)
        std::fill_n(dq->typed_data() + (b * sh.l + i) * sh.q_row() + h * sh.d, sh.d, 0.0f);
    }
    for (int64_t j = 0; j < sh.s; ++j) {
      std::fill_n(dkeys + j * sh.k_row(), sh.d, 0.0f);
      std::fill_n(dvalues + j * sh.k_row(), sh.d, 0.0f);
    }
    std::vector<float> p(kTile * kTile), ds(kTile * kTile);  // both keys x queries
    for (int64_t k0 = 0; k0 < sh.s; k0 += kTile) {
      const int nk = std::min<int64_t>(kTile, sh.s - k0);
      const int64_t first_q = causal ? std::max<int64_t>(0, k0 - offset) / kTile * kTile : 0;
      const SegmentRange key_segments(sk, k0, nk);
      for (int64_t gi = 0; gi < g; ++gi) {
        const int64_t h = kvh * g + gi;
        for (int64_t q0 = first_q; q0 < sh.l; q0 += kTile) {
          const int nq = std::min<int64_t>(kTile, sh.l - q0);
          if (!key_segments.Meets(SegmentRange(sq, q0, nq))) continue;
          const int64_t t = gi * q_tiles + q0 / kTile;
          const float* queries = q.typed_data() + (b * sh.l + q0) * sh.q_row() + h * sh.d;
          const float* grads = d_out.typed_data() + (b * sh.l + q0) * sh.q_row() + h * sh.d;
          Gemm<false, false>(nk, kTile, sh.d, keys + k0 * sh.k_row(), sh.k_row(), &q_t[t * tile], kTile, p.data(), kTile);
          TileMask<kTile>(sh, sq, sk, offset, causal, q0, k0).Apply(p.data(), nk);
          Gemm<false, false>(nk, kTile, sh.d, values + k0 * sh.k_row(), sh.k_row(), &do_t[t * tile], kTile, ds.data(),
                             kTile);
          // p = exp(s - lse); ds = scale * p * (dp - delta): the scores were scale * q.k, so both
          // dq = ds k and dk = ds^T q carry the scale once.
          for (int j = 0; j < nk; ++j) {
            for (int i = 0; i < kTile; i += 8) {
              const v8f x = Load(&p[j * kTile + i]);
              const v8f pr = x == Splat(-kInf) ? Splat(0.0f) : Exp(x - Load(&lse_p[gi * padded_l + q0 + i]));
              const v8f dp = Load(&ds[j * kTile + i]) - Load(&delta_p[gi * padded_l + q0 + i]);
              Store(&p[j * kTile + i], pr);
              Store(&ds[j * kTile + i], Splat(scale) * pr * dp);
            }
          }
          Gemm<false>(nk, sh.d, nq, p.data(), kTile, grads, sh.q_row(), dvalues + k0 * sh.k_row(), sh.k_row());
          Gemm<false>(nk, sh.d, nq, ds.data(), kTile, queries, sh.q_row(), dkeys + k0 * sh.k_row(), sh.k_row());
          Gemm<true>(nq, sh.d, nk, ds.data(), kTile, keys + k0 * sh.k_row(), sh.k_row(),
                     dq->typed_data() + (b * sh.l + q0) * sh.q_row() + h * sh.d, sh.q_row());
        }
      }
    }
  });
}

// Tiles of 48 queries and keys, or of 32 where that pads less (Qwen2.5-VL's 64-patch windows).
int TileSize(const Shape& sh) {
  const auto padding = [&](int64_t tile) { return (-sh.l % tile + tile) % tile + (-sh.s % tile + tile) % tile; };
  return padding(32) < padding(48) ? 32 : 48;
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> seg_q, ffi::Buffer<ffi::S32> seg_k,
                   ffi::Buffer<ffi::S32> q_offset, bool causal, float scale,
                   ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse) {
  const Shape sh = GetShape(q.dimensions(), k.dimensions());
  if (auto error = CheckShape(sh); error.failure()) return error;
  const int64_t offset = q_offset.typed_data()[0];
  if (TileSize(sh) == 32) {
    ForwardTiled<32>(pool, sh, q, k, v, seg_q, seg_k, offset, causal, scale, out, lse);
  } else {
    ForwardTiled<48>(pool, sh, q, k, v, seg_q, seg_k, offset, causal, scale, out, lse);
  }
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> seg_q, ffi::Buffer<ffi::S32> seg_k,
                    ffi::Buffer<ffi::S32> q_offset, ffi::Buffer<ffi::F32> d_out, ffi::Buffer<ffi::F32> lse,
                    ffi::Buffer<ffi::F32> delta, bool causal, float scale, ffi::ResultBuffer<ffi::F32> dq,
                    ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  const Shape sh = GetShape(q.dimensions(), k.dimensions());
  if (auto error = CheckShape(sh); error.failure()) return error;
  const int64_t offset = q_offset.typed_data()[0];
  if (TileSize(sh) == 32) {
    BackwardTiled<32>(pool, sh, q, k, v, seg_q, seg_k, offset, d_out, lse, delta, causal, scale, dq, dk, dv);
  } else {
    BackwardTiled<48>(pool, sh, q, k, v, seg_q, seg_k, offset, d_out, lse, delta, causal, scale, dq, dk, dv);
  }
  return ffi::Error::Success();
}

// The inputs both handlers take first: q, k, v, segment_q, segment_k, q_offset.
auto BindAttentionInputs() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::S32>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(StjaxFlashForward, Forward,
                              BindAttentionInputs()
                                  .Attr<bool>("causal")
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>());  // lse

XLA_FFI_DEFINE_HANDLER_SYMBOL(StjaxFlashBackward, Backward,
                              BindAttentionInputs()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // d_out
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()  // delta
                                  .Attr<bool>("causal")
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dk
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dv
