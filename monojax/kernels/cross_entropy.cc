// Softmax cross-entropy and its logit gradient in one pass per row, called from JAX through the
// XLA FFI (monojax/train/cross_entropy.py has the JAX side: the unembedding GEMMs stay in XLA).
//
// One custom call, "monojax_cross_entropy":
//   in : logits [M,V] f32 (aliased to the first output: the gradient is written in place),
//        targets [M] s32, attr nv (columns >= nv are vocabulary padding: never predicted)
//   out: dlogits [M,V] = softmax(z) - onehot(target), loss [M] = logsumexp(z) - logits[target],
//        correct [M] s32 = (argmax z == target), where z = logits with the padding columns
//        shifted by -1e30 exactly as the JAX path masks them (their softmax is 0 for finite logits)
// Non-finite logits give what the JAX formulas give (train/cross_entropy.py `_chunk_terms`, and
// tests/train/test_cross_entropy.py compares every output, padding included): a NaN anywhere in z,
// or a max of ±inf, makes the whole row's loss and dlogits NaN, -inf has probability exactly 0,
// and argmax is jnp.argmax's (the first NaN if any, else the first maximum). The max pass may drop
// a NaN (a vector max returns its second operand when either is NaN), so no pass tests for NaN:
// it propagates through the arithmetic. exp(NaN - mx) is NaN (Exp16 clamps with NaN-propagating
// operand order), so the row sum s is NaN and so are loss and dlogits. Two scalar tests per row
// (a max of ±inf, a NaN s) send only such rows to the argmax scans.
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
// The clamps keep NaN: max/min return their SECOND operand when either is NaN, so x goes second
// (max(x, c) would turn a NaN logit into exp(c), a finite number). Below -104 the result rounds to
// exactly 0 (2^-150 · p, p < 1), so exp(-inf) = 0 as in libm: softmax rows hold exact zeros where
// the JAX path's do (0 · inf = NaN in the dh GEMM, a tiny number · inf would not be).
inline __m512 Exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);
  x = _mm512_min_ps(_mm512_set1_ps(88.72283f), x);
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

constexpr float kPad = -1e30f;  // added to the padding columns, as train/cross_entropy.py does

// jnp.argmax of the row z (z_j = l_j, plus kPad in the padding): the first NaN, else the first
// maximum. Only for rows whose maximum is ±inf (never on the fast path).
int64_t ArgmaxNonFinite(const float* l, int64_t V, int64_t nv, float mx) {
  for (int64_t j = 0; j < V; ++j) {
    if (std::isnan(j < nv ? l[j] : l[j] + kPad)) return j;
  }
  for (int64_t j = 0; j < V; ++j) {
    if ((j < nv ? l[j] : l[j] + kPad) == mx) return j;
  }
  return 0;
}

// One row: l (input) and o (output) may be the same memory.
void Row(const float* l, float* o, int64_t V, int64_t nv, int64_t t, float* loss, int32_t* correct) {
  float mx = -INFINITY;  // max of the non-NaN z (a NaN is caught through the sum below)
  int64_t j = 0;
#ifdef __AVX512F__
  __m512 vm = _mm512_set1_ps(-INFINITY);
  for (; j + 16 <= nv; j += 16) vm = _mm512_max_ps(vm, _mm512_loadu_ps(l + j));
  mx = _mm512_reduce_max_ps(vm);
#endif
  for (; j < nv; ++j) mx = l[j] > mx ? l[j] : mx;
  for (j = nv; j < V; ++j) {  // the padding (a few columns): normally -1e30, far below the max
    const float z = l[j] + kPad;
    mx = z > mx ? z : mx;
  }
  const float tgt = l[t];  // read before the row is overwritten
  int64_t am = 0;  // first index of the maximum, as jnp.argmax (the padding never is the target)
  while (am < nv && !(l[am] == mx)) ++am;
  if (!std::isfinite(mx)) am = ArgmaxNonFinite(l, V, nv, mx);  // now: o may overwrite l below

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
  for (j = nv; j < V; ++j) {
    const float e = std::exp((l[j] + kPad) - mx);
    o[j] = e;
    s += e;
  }
  // s is NaN iff JAX's row is: a NaN in z, or inf - inf at a max of ±inf. With a finite max, o_j
  // (not yet scaled) is NaN exactly where z_j is, so the first NaN is jnp.argmax's answer.
  if (std::isnan(s) && std::isfinite(mx)) {
    for (am = 0; am < V && !std::isnan(o[am]);) ++am;
  }
  const float inv = 1.f / s;
  j = 0;
#ifdef __AVX512F__
  const __m512 vinv = _mm512_set1_ps(inv);
  for (; j + 16 <= V; j += 16) _mm512_storeu_ps(o + j, _mm512_mul_ps(_mm512_loadu_ps(o + j), vinv));
#endif
  for (; j < V; ++j) o[j] *= inv;
  o[t] -= 1.f;
  *loss = mx + std::log(s) - tgt;
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

// Which vector branch this build compiled (monojax/kernels/build.py `compiled_isa`): bit 0
// __AVX512F__ (Exp16 and the 16-wide loops above), bit 1 __AVX2__, bit 2 __FMA__.
extern "C" int MonojaxCrossEntropyIsa() {
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
