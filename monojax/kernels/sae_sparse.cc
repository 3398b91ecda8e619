// Sparsity-aware, exact backward pass of a ReLU SAE on CPU, called from JAX through the XLA FFI
// (monojax/sae/sparse/update.py has the maths and the JAX side; docs/cpu-notes.md §3 the design).
//
// One custom call, "monojax_sae_sparse", per SAE (leading batch dims = stacked members, looped):
//   in : xw [B,m] (= xe W_e), b_e [m], xe [B,d] (encoder input), x [B,d] (reconstruction target),
//        W_d [m,d], b_d [d], l1 [m] (per-feature ∂L/∂f offset), attr c (∂L/∂x̂ = c·(x̂ − x))
//   out: x_hat [B,d], dW_d [m,d] (data term only), dW_e [d,m], db_e [m], colsum [m] = Σ_b f_bi,
//        count [m] (int32) = #{b: f_bi > 0}
// pre = xw + b_e is formed here, row by row, as XLA forms it (one f32 add: the same bits), and
// f = relu(pre) is not written: [B,m] passes over memory are what this step is made of.
// Work is proportional to the number of listed entries (pre > 0 or NaN), nothing is truncated:
//   1. rows (parallel over row chunks): compact the row's listed entries, x̂_b by gathering W_d
//      rows, g_b = c(x̂_b − x_b), df_bi = g_b·W_d,i + l1_i, count entries per feature;
//   2. prefix sums -> per-feature (CSR) offsets for every chunk (a parallel counting sort);
//   3. chunks scatter their entries (row, f, df) into the per-feature lists;
//   4. features (parallel over blocks of 64): dW_d,i = Σ f_bi g_b, dW_e[:,i] = Σ df_bi xe_b,
//      db_e,i = Σ df_bi. Each block owns its features, so there are no atomics, and every sum runs
//      in row order: the result does not depend on the number of threads.
// Non-finite values: every output is NaN (and ±inf) where the dense GEMMs' is (sae/sparse/update.py
// runs those when W_d is not finite; W_d is assumed finite here), at no cost on finite data:
//   - a NaN pre is listed with f = NaN (relu keeps NaN) and df = 0 (relu' is 0 there, as in JAX),
//     so x̂_b, g_b and the sums NaN it touches are NaN; `count` counts f > 0 only, as core does;
//   - the dense GEMMs also multiply the row's unlisted features by g_b and xe_b (0·g_b, xe_b·0),
//     which is NaN where those are not finite. A row whose g_b is not finite (NaN/inf in x or b_d,
//     a NaN pre, f = inf: tested by one fused 0·g sum per row) adds 0·g_b and xe_b·0 to every
//     dW_d row and dW_e column when all its non-finite values are NaN (NaN + anything is NaN, so
//     this is exact), or, with a ±inf (where f·inf is ±inf but 0·inf is NaN), lists every
//     feature of the row with f = relu(pre), as the GEMMs compute it.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "parallel.h"

namespace ffi = xla::ffi;

namespace {

using monojax::Par;

// ------------------------------------------------------------------------------------ workspace

// Scratch reused across calls: fresh multi-MB allocations would be page-faulted in on every step
// (docs/cpu-notes.md §1). Concurrent calls (one per device on a multi-device CPU mesh) each take
// their own workspace from a free list.
struct Chunk {
  std::vector<int32_t> idx;   // active features, row after row
  std::vector<float> fv, dfv; // their f and ∂L/∂f
  std::vector<int64_t> len;   // entries per row
  std::vector<int64_t> pos;   // [m]: entries per feature, then this chunk's write offsets
  bool flagged = false;       // a row with non-finite g (NonFiniteRow) ...
  bool poisoned = false;      // ... that added to pg, pxe
  std::vector<float> pg, pxe; // [d] Σ 0·g_b, Σ 0·xe_b over the poisoning rows
};

struct Workspace {
  std::vector<Chunk> chunks;
  std::vector<int64_t> fptr;  // [m+1] per-feature offsets into the lists below
  std::vector<int32_t> frow;
  std::vector<float> ff, fdf;
  std::vector<float> g;       // [B,d] ∂L/∂x̂
  std::vector<float> pg, pxe; // [d] the chunks' pg, pxe summed
};

std::mutex g_ws_mu;
std::vector<std::unique_ptr<Workspace>> g_ws_free;

struct WorkspaceLease {
  std::unique_ptr<Workspace> ws;
  WorkspaceLease() {
    std::lock_guard<std::mutex> lock(g_ws_mu);
    if (g_ws_free.empty()) {
      ws = std::make_unique<Workspace>();
    } else {
      ws = std::move(g_ws_free.back());
      g_ws_free.pop_back();
    }
  }
  ~WorkspaceLease() {
    std::lock_guard<std::mutex> lock(g_ws_mu);
    g_ws_free.push_back(std::move(ws));
  }
};

template <typename T>
void Reserve(std::vector<T>& v, size_t n) {  // grow only, keeping contents (never shrinks)
  if (v.size() < n) v.resize(std::max(n, v.size() + v.size() / 2));
}

// ---------------------------------------------------------------------------------- vector ops

// The gathers below are bound by memory latency: their rows are picked at random from a few MB
// (W_d, or g and xe), so the hardware prefetcher only helps within a row. Taking kGroup rows per
// pass over the d-vector keeps kGroup streams of misses in flight and cuts the accumulator's
// traffic by kGroup (software prefetching measured slower).
constexpr int kGroup = 8;

// y += Σ_k a[k] · u[idx[k]·d : +d]   (and z += Σ_k c[k] · v[idx[k]·d : +d] when v is given)
template <int G, bool kTwo>
inline void GatherAxpyG(const float* a, const float* c, const int32_t* idx, const float* u, const float* v,
                        float* __restrict y, float* __restrict z, int64_t d) {
  const float* us[G];
  const float* vs[G];
  float as[G], cs[G];
  for (int r = 0; r < G; ++r) {
    us[r] = u + idx[r] * d, as[r] = a[r];
    if (kTwo) vs[r] = v + idx[r] * d, cs[r] = c[r];
  }
#pragma omp simd
  for (int64_t j = 0; j < d; ++j) {
    float sy = 0.f, sz = 0.f;
    for (int r = 0; r < G; ++r) {
      sy += as[r] * us[r][j];
      if (kTwo) sz += cs[r] * vs[r][j];
    }
    y[j] += sy;
    if (kTwo) z[j] += sz;
  }
}

template <bool kTwo>
inline void GatherAxpy(int64_t n, const float* a, const float* c, const int32_t* idx, const float* u,
                       const float* v, float* y, float* z, int64_t d) {
  int64_t k = 0;
  for (; k + kGroup <= n; k += kGroup) GatherAxpyG<kGroup, kTwo>(a + k, c + k, idx + k, u, v, y, z, d);
  for (; k + 4 <= n; k += 4) GatherAxpyG<4, kTwo>(a + k, c + k, idx + k, u, v, y, z, d);
  for (; k < n; ++k) GatherAxpyG<1, kTwo>(a + k, c + k, idx + k, u, v, y, z, d);
}

// out[k] = g · u[idx[k]·d : +d] + add[idx[k]]; G sums in vector registers (GCC vector types, so
// this also builds without AVX-512), reduced at the end.
typedef float V16 __attribute__((vector_size(64)));

inline V16 Load16(const float* p) {
  V16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <int G>
inline void GatherDotG(const int32_t* idx, const float* u, const float* __restrict g, const float* add,
                       float* out, int64_t d) {
  const float* us[G];
  for (int r = 0; r < G; ++r) us[r] = u + idx[r] * d;
  V16 acc[G] = {};
  int64_t j = 0;
  for (; j + 16 <= d; j += 16) {
    const V16 gj = Load16(g + j);
    for (int r = 0; r < G; ++r) acc[r] += gj * Load16(us[r] + j);
  }
  for (int r = 0; r < G; ++r) {
    float s = 0.f;
    for (int l = 0; l < 16; ++l) s += acc[r][l];
    for (int64_t t = j; t < d; ++t) s += g[t] * us[r][t];
    out[r] = s + add[idx[r]];
  }
}

inline void GatherDot(int64_t n, const int32_t* idx, const float* u, const float* g, const float* add, float* out,
                      int64_t d) {
  int64_t k = 0;
  for (; k + kGroup <= n; k += kGroup) GatherDotG<kGroup>(idx + k, u, g, add, out + k, d);
  for (; k + 4 <= n; k += 4) GatherDotG<4>(idx + k, u, g, add, out + k, d);
  for (; k < n; ++k) GatherDotG<1>(idx + k, u, g, add, out + k, d);
}

// Appends the entries of pre = xw[0:m] + be[0:m] that are > 0 or NaN (!(pre <= 0): one compare,
// as for > 0) to idx/val and returns their number. idx/val need m + 16 free slots (whole vectors
// are stored past the end).
int64_t CompactRow(const float* xw, const float* be, int64_t m, int32_t* idx, float* val) {
  int64_t n = 0, j = 0;
#ifdef __AVX512F__
  const __m512 zero = _mm512_setzero_ps();
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (; j + 16 <= m; j += 16) {
    __m512 v = _mm512_add_ps(_mm512_loadu_ps(xw + j), _mm512_loadu_ps(be + j));
    __mmask16 k = _mm512_cmp_ps_mask(v, zero, _CMP_NLE_UQ);  // pre > 0 or NaN
    if (k) {  // compress in registers + full store (compress-to-memory is slow on Zen 4)
      _mm512_storeu_ps(val + n, _mm512_maskz_compress_ps(k, v));
      __m512i ids = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(j)), iota);
      _mm512_storeu_si512(idx + n, _mm512_maskz_compress_epi32(k, ids));
      n += __builtin_popcount(k);
    }
  }
#endif
  for (; j < m; ++j) {
    float v = xw[j] + be[j];
    if (!(v <= 0.f)) {
      idx[n] = static_cast<int32_t>(j);
      val[n++] = v;
    }
  }
  return n;
}

// The bf16-screened variant ("monojax_sae_sparse_screened"): xw holds the encoder GEMM with bf16
// inputs (f32 accumulation), within margin_bi = kx_b·wn_i + bslack_i of the f32 GEMM's value
// (sae/sparse/update.py derives it). Appends the candidates, features whose xw + b_e is not
// <= −margin (NaN included), to idx; the caller recomputes their pre-activation in f32.
int64_t ScreenRow(const float* xw, const float* be, const float* wn, const float* bslack, float kx, int64_t m,
                  int32_t* idx) {
  int64_t n = 0, j = 0;
#ifdef __AVX512F__
  const __m512 neg_kx = _mm512_set1_ps(-kx);
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (; j + 16 <= m; j += 16) {
    __m512 v = _mm512_add_ps(_mm512_loadu_ps(xw + j), _mm512_loadu_ps(be + j));
    // −margin = −kx·wn − bslack (an upper bound's negation: rounding only loosens it, see update.py)
    __m512 thr = _mm512_sub_ps(_mm512_mul_ps(neg_kx, _mm512_loadu_ps(wn + j)), _mm512_loadu_ps(bslack + j));
    __mmask16 k = _mm512_cmp_ps_mask(v, thr, _CMP_NLE_UQ);  // not (v <= −margin), NaN included
    if (k) {
      __m512i ids = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(j)), iota);
      _mm512_storeu_si512(idx + n, _mm512_maskz_compress_epi32(k, ids));
      n += __builtin_popcount(k);
    }
  }
#endif
  for (; j < m; ++j) {
    const float v = xw[j] + be[j];
    if (!(v <= -kx * wn[j] - bslack[j])) idx[n++] = static_cast<int32_t>(j);
  }
  return n;
}

// A row whose g_b = ∂L/∂x̂_b is not finite (never on the fast path; see the top of this file).
// Returns the row's new number of entries (all m features when g_b or xe_b holds a ±inf).
int64_t NonFiniteRow(Chunk& ch, const float* xw, const float* be, int64_t m, const float* gb, const float* xeb,
                     int64_t d, int64_t n, int32_t* idx, float* fv) {
  ch.flagged = true;
  bool inf = false;
  for (int64_t j = 0; j < d; ++j) inf |= std::isinf(gb[j]) || std::isinf(xeb[j]);
  if (inf) {
    for (int64_t i = 0; i < m; ++i) {
      const float v = xw[i] + be[i];
      idx[i] = static_cast<int32_t>(i);
      fv[i] = v <= 0.f ? 0.f : v;  // relu, NaN kept
    }
    return m;
  }
  if (!ch.poisoned) {
    ch.poisoned = true;
    ch.pg.assign(d, 0.f);
    ch.pxe.assign(d, 0.f);
  }
  for (int64_t j = 0; j < d; ++j) {
    ch.pg[j] += 0.f * gb[j];
    ch.pxe[j] += 0.f * xeb[j];
  }
  return n;
}

// ---------------------------------------------------------------------------------- one member

struct Member {
  const float *xw, *be, *xe, *x, *wd, *bd, *l1;
  float *xhat, *dwd, *dwe, *dbe, *colsum;
  int32_t* count;
  // Screened variant only (wet == nullptr otherwise): W_e transposed [m,d], ‖xe_b‖·κ [B], ‖W_e[:,i]‖
  // [m], per-feature absolute slack [m] (see ScreenRow).
  const float *wet = nullptr, *kxn = nullptr, *wn = nullptr, *bslack = nullptr;
};

constexpr int64_t kFeatBlock = 64;

void RunMember(Par& par, Workspace& ws, const Member& a, int64_t B, int64_t d, int64_t m, float c) {
  const int64_t n_chunks = std::max<int64_t>(1, std::min<int64_t>(B, 8 * par.threads()));
  const int64_t rows_per = (B + n_chunks - 1) / n_chunks;
  if (static_cast<int64_t>(ws.chunks.size()) < n_chunks) ws.chunks.resize(n_chunks);
  Reserve(ws.g, B * d);
  float* g = ws.g.data();

  // 1. Rows: compaction, decoder forward, ∂L/∂x̂ and ∂L/∂f over each row's active list.
  par.For(n_chunks, [&](int64_t ci) {
    Chunk& ch = ws.chunks[ci];
    const int64_t b0 = ci * rows_per, b1 = std::min(B, b0 + rows_per);
    ch.len.assign(std::max<int64_t>(b1 - b0, 0), 0);
    ch.pos.assign(m, 0);
    ch.flagged = ch.poisoned = false;
    int64_t used = 0;
    for (int64_t b = b0; b < b1; ++b) {
      Reserve(ch.idx, used + m + 16);
      Reserve(ch.fv, used + m + 16);
      Reserve(ch.dfv, used + m + 16);
      int32_t* idx = ch.idx.data() + used;
      float* fv = ch.fv.data() + used;
      float* dfv = ch.dfv.data() + used;
      const float* xwb = a.xw + b * m;
      int64_t n;
      if (a.wet == nullptr) {
        n = CompactRow(xwb, a.be, m, idx, fv);
      } else {  // candidates from the bf16 GEMM, then their pre-activations in f32, kept if > 0 or NaN
        const int64_t nc = ScreenRow(xwb, a.be, a.wn, a.bslack, a.kxn[b], m, idx);
        GatherDot(nc, idx, a.wet, a.xe + b * d, a.be, fv, d);
        n = 0;
        for (int64_t k = 0; k < nc; ++k) {
          if (!(fv[k] <= 0.f)) idx[n] = idx[k], fv[n++] = fv[k];
        }
      }
      float* xh = a.xhat + b * d;
      std::memcpy(xh, a.bd, d * sizeof(float));
      GatherAxpy<false>(n, fv, nullptr, idx, a.wd, nullptr, xh, nullptr, d);
      float* gb = g + b * d;
      const float* xb = a.x + b * d;
      float bad = 0.f;  // Σ 0·g_bj: NaN iff some g_bj is not finite
#pragma omp simd reduction(+ : bad)
      for (int64_t j = 0; j < d; ++j) {
        gb[j] = c * (xh[j] - xb[j]);
        bad += 0.f * gb[j];
      }
      const bool nonfinite = bad != bad;
      if (nonfinite) {
        if (a.wet != nullptr) {  // the all-feature case needs every f32 pre-activation of the row
          thread_local std::vector<float> exact, zeros;
          thread_local std::vector<int32_t> all;
          Reserve(exact, m), Reserve(all, m);
          zeros.assign(m, 0.f);
          for (int64_t i = 0; i < m; ++i) all[i] = static_cast<int32_t>(i);
          GatherDot(m, all.data(), a.wet, a.xe + b * d, zeros.data(), exact.data(), d);
          xwb = exact.data();
        }
        n = NonFiniteRow(ch, xwb, a.be, m, gb, a.xe + b * d, d, n, idx, fv);
      }
      GatherDot(n, idx, a.wd, gb, a.l1, dfv, d);
      if (nonfinite) {
        for (int64_t k = 0; k < n; ++k) dfv[k] = fv[k] > 0.f ? dfv[k] : 0.f;  // relu' = 0 at NaN and <= 0
      }
      for (int64_t k = 0; k < n; ++k) ++ch.pos[idx[k]];
      ch.len[b - b0] = n;
      used += n;
    }
  });

  // Non-finite rows: the poison vectors summed over chunks (see NonFiniteRow).
  bool flagged = false, poisoned = false;
  for (int64_t ci = 0; ci < n_chunks; ++ci) {
    flagged |= ws.chunks[ci].flagged;
    if (!ws.chunks[ci].poisoned) continue;
    if (!poisoned) {
      poisoned = true;
      ws.pg.assign(d, 0.f);
      ws.pxe.assign(d, 0.f);
    }
    for (int64_t j = 0; j < d; ++j) ws.pg[j] += ws.chunks[ci].pg[j], ws.pxe[j] += ws.chunks[ci].pxe[j];
  }
  const float* pg = poisoned ? ws.pg.data() : nullptr;
  const float* pxe = poisoned ? ws.pxe.data() : nullptr;

  // 2. Offsets: feature i's list holds chunk 0's entries, then chunk 1's, ... (row order).
  Reserve(ws.fptr, m + 1);
  int64_t* fptr = ws.fptr.data();
  const int64_t n_blocks = (m + kFeatBlock - 1) / kFeatBlock;
  par.For(n_blocks, [&](int64_t blk) {
    for (int64_t i = blk * kFeatBlock; i < std::min(m, (blk + 1) * kFeatBlock); ++i) {
      int64_t run = 0;
      for (int64_t ci = 0; ci < n_chunks; ++ci) {
        int64_t cnt = ws.chunks[ci].pos[i];
        ws.chunks[ci].pos[i] = run;
        run += cnt;
      }
      fptr[i + 1] = run;
    }
  });
  fptr[0] = 0;
  for (int64_t i = 0; i < m; ++i) fptr[i + 1] += fptr[i];
  const int64_t nnz = fptr[m];
  Reserve(ws.frow, nnz);
  Reserve(ws.ff, nnz);
  Reserve(ws.fdf, nnz);

  // 3. Scatter each chunk's entries into the per-feature lists.
  par.For(n_chunks, [&](int64_t ci) {
    Chunk& ch = ws.chunks[ci];
    const int64_t b0 = ci * rows_per;
    int64_t e = 0;
    for (int64_t r = 0; r < static_cast<int64_t>(ch.len.size()); ++r) {
      for (int64_t end = e + ch.len[r]; e < end; ++e) {
        const int32_t i = ch.idx[e];
        const int64_t p = fptr[i] + ch.pos[i]++;
        ws.frow[p] = static_cast<int32_t>(b0 + r);
        ws.ff[p] = ch.fv[e];
        ws.fdf[p] = ch.dfv[e];
      }
    }
  });

  // 4. Features: outer-product sums over each feature's rows. dW_e [d, m] columns go out through a
  //    [64, d] tile: each of its d rows gets 64 contiguous floats (narrower tiles measured slower,
  //    BUILD_NOTES.md "Sparse SAE update": every row of dW_e is its own 4 KB page, so narrow writes
  //    are TLB misses).
  par.For(n_blocks, [&](int64_t blk) {
    thread_local std::vector<float> tile;
    if (static_cast<int64_t>(tile.size()) < kFeatBlock * d) tile.resize(kFeatBlock * d);
    const int64_t i0 = blk * kFeatBlock, i1 = std::min(m, i0 + kFeatBlock);
    for (int64_t i = i0; i < i1; ++i) {
      float* accd = a.dwd + i * d;
      float* acce = tile.data() + (i - i0) * d;
      if (poisoned) {
        std::copy(pg, pg + d, accd);
        std::copy(pxe, pxe + d, acce);
      } else {
        std::fill(accd, accd + d, 0.f);
        std::fill(acce, acce + d, 0.f);
      }
      const int64_t p0 = fptr[i], n = fptr[i + 1] - p0;
      GatherAxpy<true>(n, ws.ff.data() + p0, ws.fdf.data() + p0, ws.frow.data() + p0, g, a.xe, accd, acce, d);
      float sf = 0.f, sdf = 0.f;
      for (int64_t p = p0; p < p0 + n; ++p) sf += ws.ff[p], sdf += ws.fdf[p];
      int64_t fired = n;
      if (flagged) {  // NaN (and, in all-feature rows, f = 0) entries are listed but did not fire
        fired = 0;
        for (int64_t p = p0; p < p0 + n; ++p) fired += ws.ff[p] > 0.f;
      }
      a.dbe[i] = sdf;
      a.colsum[i] = sf;
      a.count[i] = static_cast<int32_t>(fired);
    }
    for (int64_t j = 0; j < d; ++j) {
      float* out = a.dwe + j * m + i0;
      for (int64_t i = 0; i < i1 - i0; ++i) out[i] = tile[i * d + j];
    }
  });
}

// Leading dims of `xw` beyond [B, m] are stacked members; every input is broadcast to them by
// JAX (vmap_method="broadcast_all"), so member s simply offsets every buffer.
using In = ffi::Buffer<ffi::F32>;
using Out = ffi::ResultBuffer<ffi::F32>;

ffi::Error Run(ffi::ThreadPool& pool, In& xw, In& be, In& xe, In& x, In& wd, In& bd, In& l1, float c, Out& xhat,
               Out& dwd, Out& dwe, Out& dbe, Out& colsum, ffi::ResultBuffer<ffi::S32>& count, const In* wet,
               const In* kxn, const In* wn, const In* bslack) {
  auto dims = xw.dimensions();
  if (dims.size() < 2) return ffi::Error::InvalidArgument("xw must be [..., B, m]");
  const int64_t B = dims[dims.size() - 2], m = dims[dims.size() - 1];
  const int64_t d = bd.dimensions().back();
  const int64_t S = B * m > 0 ? static_cast<int64_t>(xw.element_count()) / (B * m) : 0;
  if (xe.element_count() != size_t(S * B * d) || x.element_count() != size_t(S * B * d) ||
      wd.element_count() != size_t(S * m * d) || bd.element_count() != size_t(S * d) ||
      l1.element_count() != size_t(S * m) || be.element_count() != size_t(S * m)) {
    return ffi::Error::InvalidArgument("monojax_sae_sparse: inconsistent shapes");
  }
  if (wet != nullptr && (wet->element_count() != size_t(S * m * d) || kxn->element_count() != size_t(S * B) ||
                         wn->element_count() != size_t(S * m) || bslack->element_count() != size_t(S * m))) {
    return ffi::Error::InvalidArgument("monojax_sae_sparse_screened: inconsistent shapes");
  }
  Par par(&pool);
  WorkspaceLease lease;
  for (int64_t s = 0; s < S; ++s) {
    Member a{xw.typed_data() + s * B * m,   be.typed_data() + s * m,         xe.typed_data() + s * B * d,
             x.typed_data() + s * B * d,    wd.typed_data() + s * m * d,     bd.typed_data() + s * d,
             l1.typed_data() + s * m,       xhat->typed_data() + s * B * d,  dwd->typed_data() + s * m * d,
             dwe->typed_data() + s * d * m, dbe->typed_data() + s * m,       colsum->typed_data() + s * m,
             count->typed_data() + s * m};
    if (wet != nullptr) {
      a.wet = wet->typed_data() + s * m * d, a.kxn = kxn->typed_data() + s * B;
      a.wn = wn->typed_data() + s * m, a.bslack = bslack->typed_data() + s * m;
    }
    RunMember(par, *lease.ws, a, B, d, m, c);
  }
  return ffi::Error::Success();
}

ffi::Error SaeSparseImpl(ffi::ThreadPool pool, In xw, In be, In xe, In x, In wd, In bd, In l1, float c, Out xhat,
                         Out dwd, Out dwe, Out dbe, Out colsum, ffi::ResultBuffer<ffi::S32> count) {
  return Run(pool, xw, be, xe, x, wd, bd, l1, c, xhat, dwd, dwe, dbe, colsum, count, nullptr, nullptr, nullptr,
             nullptr);
}

ffi::Error SaeSparseScreenedImpl(ffi::ThreadPool pool, In xw, In be, In xe, In x, In wd, In bd, In l1, In wet,
                                 In kxn, In wn, In bslack, float c, Out xhat, Out dwd, Out dwe, Out dbe, Out colsum,
                                 ffi::ResultBuffer<ffi::S32> count) {
  return Run(pool, xw, be, xe, x, wd, bd, l1, c, xhat, dwd, dwe, dbe, colsum, count, &wet, &kxn, &wn, &bslack);
}

}  // namespace

// Which vector branch this build compiled (monojax/kernels/build.py `compiled_isa`): bit 0
// __AVX512F__ (CompactRow's compress loop), bit 1 __AVX2__, bit 2 __FMA__.
extern "C" int MonojaxSaeSparseIsa() {
  int isa = 0;
#ifdef __AVX512F__
  isa |= 1;
#endif
#ifdef __AVX2__
  isa |= 2;
#endif
#ifdef __FMA__
  isa |= 4;
#endif
  return isa;
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(MonojaxSaeSparse, SaeSparseImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<In>()  // xw
                                  .Arg<In>()  // b_e
                                  .Arg<In>()  // xe
                                  .Arg<In>()  // x
                                  .Arg<In>()  // W_d
                                  .Arg<In>()  // b_d
                                  .Arg<In>()  // l1
                                  .Attr<float>("c")
                                  .Ret<In>()  // x_hat
                                  .Ret<In>()  // dW_d
                                  .Ret<In>()  // dW_e
                                  .Ret<In>()  // db_e
                                  .Ret<In>()  // colsum
                                  .Ret<ffi::Buffer<ffi::S32>>()  // count
);

XLA_FFI_DEFINE_HANDLER_SYMBOL(MonojaxSaeSparseScreened, SaeSparseScreenedImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<In>()  // xw: the bf16-input GEMM (f32 accumulation)
                                  .Arg<In>()  // b_e
                                  .Arg<In>()  // xe
                                  .Arg<In>()  // x
                                  .Arg<In>()  // W_d
                                  .Arg<In>()  // b_d
                                  .Arg<In>()  // l1
                                  .Arg<In>()  // W_e transposed [m, d]
                                  .Arg<In>()  // κ·‖xe_b‖ [B]
                                  .Arg<In>()  // ‖W_e[:, i]‖ [m]
                                  .Arg<In>()  // absolute slack [m]
                                  .Attr<float>("c")
                                  .Ret<In>()  // x_hat
                                  .Ret<In>()  // dW_d
                                  .Ret<In>()  // dW_e
                                  .Ret<In>()  // db_e
                                  .Ret<In>()  // colsum
                                  .Ret<ffi::Buffer<ffi::S32>>()  // count
);
