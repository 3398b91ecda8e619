// Softmax cross-entropy and its logit gradient in one pass per row, called from JAX through the
// XLA FFI (monojax/train/cross_entropy.py has the JAX side: the unembedding GEMMs stay in XLA).
//
// One custom call, "monojax_cross_entropy":
//   in : logits [M,V] f32 (aliased to the first output: the gradient is written in place),
//        targets [M] s32, attr nv (columns >= nv are vocabulary padding: never predicted)
//   out: dlogits [M,V] = softmax(logits[:, :nv]) - onehot(target) (0 in the padding),
//        loss [M] = logsumexp - logits[target], correct [M] s32 = (first argmax == target)
// Why: XLA on CPU runs max, exp-sum and the softmax gradient as separate passes over the [M,V]
// logits (1.6 GB at ctx 256 x batch 32 x vocab 50k), and its exp inside a reduction does not
// vectorise (measured: BUILD_NOTES.md, "CPU cross-entropy kernel"). Here a row
// (200 KB at vocab 50k) is read once from memory and its other passes hit the L2 cache.
#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "xla/ffi/api/ffi.h"
#include "parallel.h"

namespace ffi = xla::ffi;

namespace {

#ifdef __AVX512F__
// exp(x) for 16 floats: Cephes' expf (range reduction by ln 2 in two parts, degree-6 polynomial;
// relative error ~1e-7, i.e. within a few ulp of libm), scaled by 2^n with scalef.
inline __m512 Exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.33654f));  // exp(-87.3) ~ 1e-38: the smallest normal
  x = _mm512_min_ps(x, _mm512_set1_ps(88.72283f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}
#endif

// One row: l (input) and o (output) may be the same memory.
void Row(const float* l, float* o, int64_t V, int64_t nv, int64_t t, float* loss, int32_t* correct) {
  float mx = -INFINITY;
  int64_t j = 0;
#ifdef __AVX512F__
  __m512 vm = _mm512_set1_ps(-INFINITY);
  for (; j + 16 <= nv; j += 16) vm = _mm512_max_ps(vm, _mm512_loadu_ps(l + j));
  mx = _mm512_reduce_max_ps(vm);
#endif
  for (; j < nv; ++j) mx = l[j] > mx ? l[j] : mx;
  int64_t am = 0;  // first index of the maximum, as jnp.argmax
  while (am < nv && !(l[am] == mx)) ++am;
  const float tgt = l[t];  // read before the row is overwritten

  float s = 0.f;
  j = 0;
#ifdef __AVX512F__
  const __m512 vmx = _mm512_set1_ps(mx);
  __m512 vs = _mm512_setzero_ps();
  for (; j + 16 <= nv; j += 16) {
    const __m512 e = Exp16(_mm512_sub_ps(_mm512_loadu_ps(l + j), vmx));
    _mm512_storeu_ps(o + j, e);
    vs = _mm512_add_ps(vs, e);
  }
  s = _mm512_reduce_add_ps(vs);
#endif
  for (; j < nv; ++j) {
    const float e = std::exp(l[j] - mx);
    o[j] = e;
    s += e;
  }
  const float inv = 1.f / s;
  j = 0;
#ifdef __AVX512F__
  const __m512 vinv = _mm512_set1_ps(inv);
  for (; j + 16 <= nv; j += 16) _mm512_storeu_ps(o + j, _mm512_mul_ps(_mm512_loadu_ps(o + j), vinv));
#endif
  for (; j < nv; ++j) o[j] *= inv;
  for (j = nv; j < V; ++j) o[j] = 0.f;
  o[t] -= 1.f;
  *loss = mx + std::log(s) - tgt;  // NaN logits give a NaN loss (s is NaN), as in XLA
  *correct = am == t;
}

ffi::Error CrossEntropyImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits, ffi::Buffer<ffi::S32> targets,
                            int64_t nv, ffi::ResultBuffer<ffi::F32> dlogits, ffi::ResultBuffer<ffi::F32> loss,
                            ffi::ResultBuffer<ffi::S32> correct) {
  const auto dims = logits.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("monojax_cross_entropy: logits must be [M, V]");
  const int64_t M = dims[0], V = dims[1];
  if (nv < 1 || nv > V) return ffi::Error::InvalidArgument("monojax_cross_entropy: need 1 <= nv <= V");
  if (static_cast<int64_t>(targets.element_count()) != M) {
    return ffi::Error::InvalidArgument("monojax_cross_entropy: targets must be [M]");
  }
  const float* l = logits.typed_data();
  const int32_t* t = targets.typed_data();
  float* o = dlogits->typed_data();
  float* ls = loss->typed_data();
  int32_t* cs = correct->typed_data();
  for (int64_t r = 0; r < M; ++r) {
    if (t[r] < 0 || t[r] >= nv) return ffi::Error::InvalidArgument("monojax_cross_entropy: target out of range");
  }
  monojax::Par par(&pool);
  const int64_t block = 16;  // rows per work item
  par.For((M + block - 1) / block, [&](int64_t bi) {
    for (int64_t r = bi * block, r1 = std::min(M, r + block); r < r1; ++r) {
      Row(l + r * V, o + r * V, V, nv, t[r], ls + r, cs + r);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MonojaxCrossEntropy, CrossEntropyImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // logits
                                  .Arg<ffi::Buffer<ffi::S32>>()  // targets
                                  .Attr<int64_t>("nv")
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dlogits (aliases logits)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // loss per row
                                  .Ret<ffi::Buffer<ffi::S32>>()  // correct per row
);
