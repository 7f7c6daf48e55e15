// One Med-NCA level's forward step as ONE XLA FFI call on CPU (nca_jax/fused.py builds, loads
// and calls it; issue 17, goal 2).
//
// state (G, B, H, W, 16), fire mask (G, B, H, W) of 0/1 -> new state (G, B, H, W, 16). G groups
// (e.g. the 10 samples of a variance) each have their own batch-norm statistics over (B, H, W).
// Per group: (1) reflect-pad the state; (2) per image row, both 3x3 convolutions (16 -> 32) into
// a feature buffer [state | conv0 | conv1] (48 per cell) and that row's sum and X^T X; (3) the
// batch norm folded into dense_in from the features' mean and covariance (the dense_in and conv
// biases cancel in the norm, so they are not inputs); (4) per image row, the MLP on the fired
// cells only and the update. Every product is an AVX-512 register-blocked loop over data that
// stays in cache; nothing per cell but the 48 features is written to memory.
//
// The threads are OpenMP's (OMP_NUM_THREADS, default one per core); G groups run one after
// another, each group's rows split among the threads.
// Build: g++ -O3 -march=native -fopenmp -std=c++17 -shared -fPIC -I$(jax.ffi.include_dir())
#include <immintrin.h>
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int C = 16;    // state channels
constexpr int P = 32;    // both convolutions' outputs
constexpr int F = 48;    // features per cell
constexpr int HID = 128; // hidden units

// MR consecutive cells of one output row: out[m][0:32] = sum over 3x3 taps and 16 channels.
// sp points at padded cell (i, j0) (the tap (0, 0) of cell j0); wp = W + 2.
template <int MR>
inline void conv_tile(const float* sp, int wp, const float* K, float* out) {
  __m512 a0[MR], a1[MR];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m) a0[m] = a1[m] = _mm512_setzero_ps();
  for (int di = 0; di < 3; ++di) {
    for (int dj = 0; dj < 3; ++dj) {
      const float* a = sp + (di * wp + dj) * C;
      const float* k = K + (di * 3 + dj) * C * P;
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) {
        const __m512 b0 = _mm512_loadu_ps(k + c * P), b1 = _mm512_loadu_ps(k + c * P + 16);
#pragma GCC unroll 16
        for (int m = 0; m < MR; ++m) {
          const __m512 x = _mm512_set1_ps(a[m * C + c]);
          a0[m] = _mm512_fmadd_ps(x, b0, a0[m]);
          a1[m] = _mm512_fmadd_ps(x, b1, a1[m]);
        }
      }
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m) {
    _mm512_storeu_ps(out + m * F + C, a0[m]);
    _mm512_storeu_ps(out + m * F + C + 16, a1[m]);
  }
}

// S[i0:i0+8][16*jb0 : 16*(jb0+NB)] += sum over n rows of X (stride F) of x[i] * x[j].
template <int NB>
inline void cov_chunk(const float* X, int n, int i0, int jb0, float* S) {
  __m512 acc[8][NB];
#pragma GCC unroll 8
  for (int r = 0; r < 8; ++r)
#pragma GCC unroll 3
    for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_setzero_ps();
  for (int t = 0; t < n; ++t) {
    const float* x = X + t * F;
    __m512 xv[NB];
#pragma GCC unroll 3
    for (int b = 0; b < NB; ++b) xv[b] = _mm512_loadu_ps(x + (jb0 + b) * 16);
#pragma GCC unroll 8
    for (int r = 0; r < 8; ++r) {
      const __m512 a = _mm512_set1_ps(x[i0 + r]);
#pragma GCC unroll 3
      for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_fmadd_ps(a, xv[b], acc[r][b]);
    }
  }
  for (int r = 0; r < 8; ++r)
    for (int b = 0; b < NB; ++b) {
      float* s = S + (i0 + r) * F + (jb0 + b) * 16;
      _mm512_storeu_ps(s, _mm512_add_ps(_mm512_loadu_ps(s), acc[r][b]));
    }
}

// The upper triangle (j >= i) of X^T X for n rows, and the column sums.
inline void row_stats(const float* X, int n, float* S, float* sum) {
  cov_chunk<3>(X, n, 0, 0, S);
  cov_chunk<3>(X, n, 8, 0, S);
  cov_chunk<2>(X, n, 16, 1, S);
  cov_chunk<2>(X, n, 24, 1, S);
  cov_chunk<1>(X, n, 32, 2, S);
  cov_chunk<1>(X, n, 40, 2, S);
  __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0;
  for (int t = 0; t < n; ++t) {
    s0 = _mm512_add_ps(s0, _mm512_loadu_ps(X + t * F));
    s1 = _mm512_add_ps(s1, _mm512_loadu_ps(X + t * F + 16));
    s2 = _mm512_add_ps(s2, _mm512_loadu_ps(X + t * F + 32));
  }
  _mm512_storeu_ps(sum, _mm512_add_ps(_mm512_loadu_ps(sum), s0));
  _mm512_storeu_ps(sum + 16, _mm512_add_ps(_mm512_loadu_ps(sum + 16), s1));
  _mm512_storeu_ps(sum + 32, _mm512_add_ps(_mm512_loadu_ps(sum + 32), s2));
}

// 6 cells' hidden layer: h[m] = relu(x[m] @ Wf + c), in two halves of 64 units.
constexpr int MT = 6;
inline void mlp1_tile(const float* const* xs, const float* Wf, const float* cb, float* h) {
  for (int half = 0; half < 2; ++half) {
    const int o = half * 64;
    __m512 acc[MT][4];
#pragma GCC unroll 6
    for (int m = 0; m < MT; ++m)
#pragma GCC unroll 4
      for (int b = 0; b < 4; ++b) acc[m][b] = _mm512_loadu_ps(cb + o + 16 * b);
#pragma GCC unroll 4
    for (int k = 0; k < F; ++k) {
      __m512 w[4];
#pragma GCC unroll 4
      for (int b = 0; b < 4; ++b) w[b] = _mm512_loadu_ps(Wf + k * HID + o + 16 * b);
#pragma GCC unroll 6
      for (int m = 0; m < MT; ++m) {
        const __m512 x = _mm512_set1_ps(xs[m][k]);
#pragma GCC unroll 4
        for (int b = 0; b < 4; ++b) acc[m][b] = _mm512_fmadd_ps(x, w[b], acc[m][b]);
      }
    }
    const __m512 z = _mm512_setzero_ps();
#pragma GCC unroll 6
    for (int m = 0; m < MT; ++m)
#pragma GCC unroll 4
      for (int b = 0; b < 4; ++b)
        _mm512_storeu_ps(h + m * HID + o + 16 * b, _mm512_max_ps(acc[m][b], z));
  }
}

// n (<= 24) cells' update: out[m] = h[m] @ W2 (128 x 16), added to the state rows dst[m].
template <int MR>
inline void mlp2_tile(const float* h, const float* W2, float* const* dst) {
  __m512 acc[MR];
#pragma GCC unroll 24
  for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_ps();
#pragma GCC unroll 2
  for (int j = 0; j < HID; ++j) {
    const __m512 w = _mm512_loadu_ps(W2 + j * C);
#pragma GCC unroll 24
    for (int m = 0; m < MR; ++m) acc[m] = _mm512_fmadd_ps(_mm512_set1_ps(h[m * HID + j]), w, acc[m]);
  }
#pragma GCC unroll 24
  for (int m = 0; m < MR; ++m) _mm512_storeu_ps(dst[m], _mm512_add_ps(_mm512_loadu_ps(dst[m]), acc[m]));
}

struct Scratch {
  std::unique_ptr<float[]> pad, feats;
  size_t pad_n = 0, feats_n = 0;
  float* get_pad(size_t n) {
    if (n > pad_n) pad.reset(new float[n]), pad_n = n;
    return pad.get();
  }
  float* get_feats(size_t n) {
    if (n > feats_n) feats.reset(new float[n]), feats_n = n;
    return feats.get();
  }
};

// Reflect index for -1 and n.
inline int reflect(int i, int n) { return i < 0 ? -i : (i >= n ? 2 * n - 2 - i : i); }

void group_step(const float* state, const float* mask, int B, int H, int W, const float* K,
                const float* W1, const float* scale, const float* shift, const float* W2,
                float eps, float* out, Scratch& scr) {
  const int wp = W + 2, hp = H + 2;
  const size_t n = size_t(B) * H * W;
  float* pad = scr.get_pad(size_t(B) * hp * wp * C);
  float* feats = scr.get_feats(n * F);
  std::vector<double> Sd(F * F, 0.0), sumd(F, 0.0);

#pragma omp parallel
  {
    // (1) reflect padding, one padded row per iteration
#pragma omp for schedule(static)
    for (int r = 0; r < B * hp; ++r) {
      const int b = r / hp, ip = r % hp, i = reflect(ip - 1, H);
      const float* src = state + (size_t(b) * H + i) * W * C;
      float* dst = pad + size_t(r) * wp * C;
      std::memcpy(dst + C, src, size_t(W) * C * sizeof(float));
      std::memcpy(dst, src + C, C * sizeof(float));
      std::memcpy(dst + (W + 1) * C, src + (W - 2) * C, C * sizeof(float));
    }
    // (2) convolutions and statistics, one image row per iteration
    alignas(64) float S[F * F];
    alignas(64) float sum[F];
    std::vector<double> Sl(F * F, 0.0), suml(F, 0.0);
#pragma omp for schedule(static)
    for (int r = 0; r < B * H; ++r) {
      const int b = r / H, i = r % H;
      const float* sp = pad + (size_t(b) * hp + i) * wp * C;
      float* X = feats + size_t(r) * W * F;
      for (int j = 0; j < W; ++j)
        std::memcpy(X + j * F, state + (size_t(r) * W + j) * C, C * sizeof(float));
      int j = 0;
      for (; j + 12 <= W; j += 12) conv_tile<12>(sp + j * C, wp, K, X + j * F);
      for (; j + 4 <= W; j += 4) conv_tile<4>(sp + j * C, wp, K, X + j * F);
      for (; j < W; ++j) conv_tile<1>(sp + j * C, wp, K, X + j * F);
      std::memset(S, 0, sizeof(S));
      std::memset(sum, 0, sizeof(sum));
      row_stats(X, W, S, sum);
      for (int a = 0; a < F; ++a) {
        suml[a] += sum[a];
        for (int c = a; c < F; ++c) Sl[a * F + c] += S[a * F + c];
      }
    }
#pragma omp critical
    {
      for (int a = 0; a < F * F; ++a) Sd[a] += Sl[a];
      for (int a = 0; a < F; ++a) sumd[a] += suml[a];
    }
  }

  // (3) the norm folded into dense_in: hidden = relu(x @ Wf + c)
  double m[F], cov[F][F];
  for (int a = 0; a < F; ++a) m[a] = sumd[a] / double(n);
  for (int a = 0; a < F; ++a)
    for (int c = 0; c < F; ++c) {
      const int lo = a < c ? a : c, hi = a < c ? c : a;
      cov[a][c] = Sd[lo * F + hi] / double(n) - m[a] * m[c];
    }
  alignas(64) float Wf[F * HID];
  alignas(64) float cb[HID];
  for (int u = 0; u < HID; ++u) {
    double v = 0.0;
    for (int a = 0; a < F; ++a) {
      double t = 0.0;
      for (int c = 0; c < F; ++c) t += cov[a][c] * W1[c * HID + u];
      v += W1[a * HID + u] * t;
    }
    const double g = scale[u] / std::sqrt((v > 0.0 ? v : 0.0) + eps);
    double mu = 0.0;
    for (int a = 0; a < F; ++a) {
      Wf[a * HID + u] = float(W1[a * HID + u] * g);
      mu += m[a] * double(Wf[a * HID + u]);
    }
    cb[u] = float(shift[u] - mu);
  }

  // (4) MLP on the fired cells, and the update
#pragma omp parallel
  {
    alignas(64) float h[24 * HID];
    const float* xs[24];
    float* dst[24];
#pragma omp for schedule(static)
    for (int r = 0; r < B * H; ++r) {
      const float* X = feats + size_t(r) * W * F;
      const float* mrow = mask + size_t(r) * W;
      float* orow = out + size_t(r) * W * C;
      std::memcpy(orow, state + size_t(r) * W * C, size_t(W) * C * sizeof(float));
      int j = 0;
      while (j < W) {
        int cnt = 0;
        for (; j < W && cnt < 24; ++j)
          if (mrow[j] > 0.5f) xs[cnt] = X + j * F, dst[cnt] = orow + j * C, ++cnt;
        if (cnt == 0) break;
        const int full = (cnt + MT - 1) / MT * MT;
        for (int t = cnt; t < full; ++t) xs[t] = xs[cnt - 1];
        for (int t = 0; t < full; t += MT) mlp1_tile(xs + t, Wf, cb, h + t * HID);
        switch (cnt) {
#define CASE(k) \
  case k:       \
    mlp2_tile<k>(h, W2, dst); \
    break;
          CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8) CASE(9) CASE(10)
          CASE(11) CASE(12) CASE(13) CASE(14) CASE(15) CASE(16) CASE(17) CASE(18) CASE(19)
          CASE(20) CASE(21) CASE(22) CASE(23) CASE(24)
#undef CASE
        }
      }
    }
  }
}

ffi::Error StepImpl(ffi::Buffer<ffi::F32> state, ffi::Buffer<ffi::F32> mask,
                    ffi::Buffer<ffi::F32> kernel, ffi::Buffer<ffi::F32> w1,
                    ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> shift,
                    ffi::Buffer<ffi::F32> w2, ffi::Buffer<ffi::F32> epsb,
                    ffi::ResultBuffer<ffi::F32> out) {
  auto d = state.dimensions();
  if (d.size() != 5 || d[4] != C)
    return ffi::Error::InvalidArgument("nca_step_fwd: state must be (G, B, H, W, 16)");
  const int64_t G = d[0], B = d[1], H = d[2], W = d[3];
  if (H < 2 || W < 2) return ffi::Error::InvalidArgument("nca_step_fwd: H and W must be >= 2");
  if (mask.element_count() != size_t(G * B * H * W))
    return ffi::Error::InvalidArgument("nca_step_fwd: mask must be (G, B, H, W)");
  if (kernel.element_count() != 9 * C * P || w1.element_count() != F * HID ||
      scale.element_count() != HID || shift.element_count() != HID ||
      w2.element_count() != HID * C)
    return ffi::Error::InvalidArgument("nca_step_fwd: parameter shapes do not match 16/128");
  if (epsb.element_count() != 1)
    return ffi::Error::InvalidArgument("nca_step_fwd: eps must be one float");
  const float eps = epsb.typed_data()[0];
  thread_local Scratch scr;
  const size_t per = size_t(B * H * W);
  for (int64_t g = 0; g < G; ++g)
    group_step(state.typed_data() + g * per * C, mask.typed_data() + g * per, int(B), int(H),
               int(W), kernel.typed_data(), w1.typed_data(), scale.typed_data(),
               shift.typed_data(), w2.typed_data(), eps, out->typed_data() + g * per * C, scr);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NcaStepFwd, StepImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
