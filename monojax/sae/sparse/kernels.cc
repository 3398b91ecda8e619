// Sparsity-aware, exact backward pass of a ReLU SAE on CPU, called from JAX through the XLA FFI
// (monojax/sae/sparse/update.py has the maths and the JAX side; cpu-performance.md §3 the design).
//
// One custom call, "monojax_sae_sparse", per SAE (leading batch dims = stacked members, looped):
//   in : pre [B,m] (x_e W_e + b_e, aliased to the output f), xe [B,d] (encoder input), x [B,d]
//        (reconstruction target), W_d [m,d], b_d [d], l1 [m] (per-feature ∂L/∂f offset), attr c
//        (∂L/∂x̂ = c·(x̂ − x))
//   out: f [B,m] = relu(pre), x_hat [B,d], dW_d [m,d] (data term only), dW_e [d,m], db_e [m],
//        colsum [m] = Σ_b f_bi
// Work is proportional to the number of active entries (pre > 0), nothing is truncated:
//   1. rows (parallel over row chunks): compact the row's positive entries, x̂_b by gathering W_d
//      rows, g_b = c(x̂_b − x_b), df_bi = g_b·W_d,i + l1_i, count entries per feature;
//   2. prefix sums -> per-feature (CSR) offsets for every chunk (a parallel counting sort);
//   3. chunks scatter their entries (row, f, df) into the per-feature lists;
//   4. features (parallel over blocks of 16): dW_d,i = Σ f_bi g_b, dW_e[:,i] = Σ df_bi xe_b,
//      db_e,i = Σ df_bi. Each block owns its features, so there are no atomics, and every sum runs
//      in row order: the result does not depend on the number of threads.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// ------------------------------------------------------------------------------------- threads

// Runs fn(i) for i in [0, n). Work items are claimed from a shared counter by the caller and by
// helper tasks, so the loop finishes even if the pool runs no task at all (the FFI allows that);
// a helper that starts after the loop is done finds no item and never touches `fn`.
// MONOJAX_SPARSE_THREADS=N (N >= 1) uses N std::threads instead of XLA's pool (for measuring).
struct Loop {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;
};

template <typename F>
void Drain(Loop* st, int64_t n, F* fn) {
  for (int64_t i; (i = st->next.fetch_add(1)) < n;) {
    (*fn)(i);
    if (st->done.fetch_add(1) + 1 == n) {
      std::lock_guard<std::mutex> lock(st->mu);
      st->cv.notify_all();
    }
  }
}

int EnvThreads() {
  static const int n = [] {
    const char* s = std::getenv("MONOJAX_SPARSE_THREADS");
    return s ? std::atoi(s) : 0;
  }();
  return n;
}

class Par {
 public:
  explicit Par(ffi::ThreadPool* pool) : pool_(pool) {
    std_threads_ = EnvThreads();
    threads_ = std_threads_ > 0 ? std_threads_ : std::max<int64_t>(1, pool_->num_threads());
  }
  int64_t threads() const { return threads_; }

  template <typename F>
  void For(int64_t n, F fn) {
    if (n <= 0) return;
    int64_t helpers = std::min<int64_t>(threads_, n) - 1;
    if (helpers <= 0) {
      for (int64_t i = 0; i < n; ++i) fn(i);
      return;
    }
    auto st = std::make_shared<Loop>();
    F* f = &fn;
    if (std_threads_ > 0) {
      std::vector<std::thread> ts;
      for (int64_t t = 0; t < helpers; ++t) ts.emplace_back([st, n, f] { Drain(st.get(), n, f); });
      Drain(st.get(), n, f);
      for (auto& t : ts) t.join();
      return;
    }
    for (int64_t t = 0; t < helpers; ++t) pool_->Schedule([st, n, f] { Drain(st.get(), n, f); });
    Drain(st.get(), n, f);
    std::unique_lock<std::mutex> lock(st->mu);
    st->cv.wait(lock, [&] { return st->done.load() == n; });
  }

 private:
  ffi::ThreadPool* pool_;
  int64_t threads_;
  int std_threads_;
};

// ------------------------------------------------------------------------------------ workspace

// Scratch reused across calls: fresh multi-MB allocations would be page-faulted in on every step
// (cpu-performance.md §1). Concurrent calls (one per device on a multi-device CPU mesh) each take
// their own workspace from a free list.
struct Chunk {
  std::vector<int32_t> idx;   // active features, row after row
  std::vector<float> fv, dfv; // their f and ∂L/∂f
  std::vector<int64_t> len;   // entries per row
  std::vector<int64_t> pos;   // [m]: entries per feature, then this chunk's write offsets
};

struct Workspace {
  std::vector<Chunk> chunks;
  std::vector<int64_t> fptr;  // [m+1] per-feature offsets into the lists below
  std::vector<int32_t> frow;
  std::vector<float> ff, fdf;
  std::vector<float> g;       // [B,d] ∂L/∂x̂
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

inline void Axpy(float a, const float* __restrict x, float* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) y[j] += a * x[j];
}

inline float Dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += a[j] * b[j];
  return s;
}

// f = relu(pre) written to `f` (may alias `pre`); the positive entries appended to idx/val.
// Returns their number. idx/val need m + 16 free slots (full vectors are stored past the end).
int64_t CompactRow(const float* pre, float* f, int64_t m, int32_t* idx, float* val) {
  int64_t n = 0, j = 0;
#ifdef __AVX512F__
  const __m512 zero = _mm512_setzero_ps();
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (; j + 16 <= m; j += 16) {
    __m512 v = _mm512_loadu_ps(pre + j);
    __mmask16 k = _mm512_cmp_ps_mask(v, zero, _CMP_GT_OQ);
    _mm512_storeu_ps(f + j, _mm512_maskz_mov_ps(k, v));
    if (k) {  // register compress + full store: compress-to-memory is slow on Zen 4
      _mm512_storeu_ps(val + n, _mm512_maskz_compress_ps(k, v));
      __m512i ids = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(j)), iota);
      _mm512_storeu_si512(idx + n, _mm512_maskz_compress_epi32(k, ids));
      n += __builtin_popcount(k);
    }
  }
#endif
  for (; j < m; ++j) {
    float v = pre[j];
    if (v > 0.f) {
      idx[n] = static_cast<int32_t>(j);
      val[n++] = v;
      f[j] = v;
    } else {
      f[j] = 0.f;
    }
  }
  return n;
}

// ---------------------------------------------------------------------------------- one member

struct Member {
  const float *pre, *xe, *x, *wd, *bd, *l1;
  float *f, *xhat, *dwd, *dwe, *dbe, *colsum;
};

constexpr int64_t kFeatBlock = 16;

void RunMember(Par& par, Workspace& ws, const Member& a, int64_t B, int64_t d, int64_t m, float c) {
  const int64_t n_chunks = std::min<int64_t>(B, 8 * par.threads());
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
    int64_t used = 0;
    for (int64_t b = b0; b < b1; ++b) {
      Reserve(ch.idx, used + m + 16);
      Reserve(ch.fv, used + m + 16);
      Reserve(ch.dfv, used + m + 16);
      int32_t* idx = ch.idx.data() + used;
      float* fv = ch.fv.data() + used;
      float* dfv = ch.dfv.data() + used;
      const int64_t n = CompactRow(a.pre + b * m, a.f + b * m, m, idx, fv);
      float* xh = a.xhat + b * d;
      std::memcpy(xh, a.bd, d * sizeof(float));
      for (int64_t k = 0; k < n; ++k) Axpy(fv[k], a.wd + idx[k] * d, xh, d);
      float* gb = g + b * d;
      const float* xb = a.x + b * d;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) gb[j] = c * (xh[j] - xb[j]);
      for (int64_t k = 0; k < n; ++k) {
        dfv[k] = Dot(gb, a.wd + idx[k] * d, d) + a.l1[idx[k]];
        ++ch.pos[idx[k]];
      }
      ch.len[b - b0] = n;
      used += n;
    }
  });

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

  // 4. Features: outer-product sums over each feature's rows; dW_e columns go out 16 at a time
  //    through a small [16, d] tile, so the transposed writes are whole cache lines.
  par.For(n_blocks, [&](int64_t blk) {
    thread_local std::vector<float> tile;
    if (static_cast<int64_t>(tile.size()) < kFeatBlock * d) tile.resize(kFeatBlock * d);
    const int64_t i0 = blk * kFeatBlock, i1 = std::min(m, i0 + kFeatBlock);
    std::fill(tile.begin(), tile.begin() + (i1 - i0) * d, 0.f);
    for (int64_t i = i0; i < i1; ++i) {
      float* accd = a.dwd + i * d;
      float* acce = tile.data() + (i - i0) * d;
      std::fill(accd, accd + d, 0.f);
      float sf = 0.f, sdf = 0.f;
      for (int64_t p = fptr[i]; p < fptr[i + 1]; ++p) {
        const int64_t b = ws.frow[p];
        const float fb = ws.ff[p], dfb = ws.fdf[p];
        sf += fb;
        sdf += dfb;
        const float* gb = g + b * d;
        const float* xb = a.xe + b * d;
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) {
          accd[j] += fb * gb[j];
          acce[j] += dfb * xb[j];
        }
      }
      a.dbe[i] = sdf;
      a.colsum[i] = sf;
    }
    for (int64_t j = 0; j < d; ++j) {
      float* out = a.dwe + j * m + i0;
      for (int64_t i = 0; i < i1 - i0; ++i) out[i] = tile[i * d + j];
    }
  });
}

// Leading dims of `pre` beyond [B, m] are stacked members; every input is broadcast to them by
// JAX (vmap_method="broadcast_all"), so member s simply offsets every buffer.
ffi::Error SaeSparseImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> pre, ffi::Buffer<ffi::F32> xe,
                         ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> wd, ffi::Buffer<ffi::F32> bd,
                         ffi::Buffer<ffi::F32> l1, float c, ffi::ResultBuffer<ffi::F32> f,
                         ffi::ResultBuffer<ffi::F32> xhat, ffi::ResultBuffer<ffi::F32> dwd,
                         ffi::ResultBuffer<ffi::F32> dwe, ffi::ResultBuffer<ffi::F32> dbe,
                         ffi::ResultBuffer<ffi::F32> colsum) {
  auto dims = pre.dimensions();
  if (dims.size() < 2) return ffi::Error::InvalidArgument("pre must be [..., B, m]");
  const int64_t B = dims[dims.size() - 2], m = dims[dims.size() - 1];
  const int64_t d = bd.dimensions().back();
  const int64_t S = B * m > 0 ? static_cast<int64_t>(pre.element_count()) / (B * m) : 0;
  if (xe.element_count() != size_t(S * B * d) || x.element_count() != size_t(S * B * d) ||
      wd.element_count() != size_t(S * m * d) || bd.element_count() != size_t(S * d) ||
      l1.element_count() != size_t(S * m)) {
    return ffi::Error::InvalidArgument("monojax_sae_sparse: inconsistent shapes");
  }
  if (B * m >= (int64_t{1} << 31) - 1) return ffi::Error::InvalidArgument("B*m must fit int32");
  Par par(&pool);
  WorkspaceLease lease;
  for (int64_t s = 0; s < S; ++s) {
    Member a{pre.typed_data() + s * B * m, xe.typed_data() + s * B * d, x.typed_data() + s * B * d,
             wd.typed_data() + s * m * d,  bd.typed_data() + s * d,     l1.typed_data() + s * m,
             f->typed_data() + s * B * m,  xhat->typed_data() + s * B * d, dwd->typed_data() + s * m * d,
             dwe->typed_data() + s * d * m, dbe->typed_data() + s * m,  colsum->typed_data() + s * m};
    RunMember(par, *lease.ws, a, B, d, m, c);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MonojaxSaeSparse, SaeSparseImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // pre
                                  .Arg<ffi::Buffer<ffi::F32>>()  // xe
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // W_d
                                  .Arg<ffi::Buffer<ffi::F32>>()  // b_d
                                  .Arg<ffi::Buffer<ffi::F32>>()  // l1
                                  .Attr<float>("c")
                                  .Ret<ffi::Buffer<ffi::F32>>()  // f
                                  .Ret<ffi::Buffer<ffi::F32>>()  // x_hat
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dW_d
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dW_e
                                  .Ret<ffi::Buffer<ffi::F32>>()  // db_e
                                  .Ret<ffi::Buffer<ffi::F32>>()  // colsum
);
