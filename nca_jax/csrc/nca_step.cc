// One Med-NCA level's step as ONE XLA FFI call on CPU (NcaStepFwd), and its backward as another
// (NcaStepBwd, below group_step_bwd); nca_jax/fused.py builds, loads and calls them (issue 17,
// goals 1 and 2).
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
#include <algorithm>
#include <memory>
#include <string>
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
  std::unique_ptr<float[]> buf[4];
  size_t n[4] = {0, 0, 0, 0};
  float* get(int k, size_t want) {
    if (want > n[k]) buf[k].reset(new float[want]), n[k] = want;
    return buf[k].get();
  }
};

// Reflect index for -1 and n.
inline int reflect(int i, int n) { return i < 0 ? -i : (i >= n ? 2 * n - 2 - i : i); }

// Passes (1) and (2) of a group: the reflect-padded state into pad (B, H+2, W+2, C), the
// features [state | conv0 | conv1] into feats (B H W, F), and their sums and the upper
// triangle of X^T X (double) into sumd (F) and Sd (F, F).
void features(const float* state, int B, int H, int W, const float* K, float* pad, float* feats,
              double* Sd, double* sumd) {
  const int wp = W + 2, hp = H + 2;
  std::fill(Sd, Sd + F * F, 0.0);
  std::fill(sumd, sumd + F, 0.0);
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int r = 0; r < B * hp; ++r) {
      const int b = r / hp, ip = r % hp, i = reflect(ip - 1, H);
      const float* src = state + (size_t(b) * H + i) * W * C;
      float* dst = pad + size_t(r) * wp * C;
      std::memcpy(dst + C, src, size_t(W) * C * sizeof(float));
      std::memcpy(dst, src + C, C * sizeof(float));
      std::memcpy(dst + (W + 1) * C, src + (W - 2) * C, C * sizeof(float));
    }
    alignas(64) float S[F * F];  // float sums of >= 256 cells, then into the doubles
    alignas(64) float sum[F];
    std::memset(S, 0, sizeof(S));
    std::memset(sum, 0, sizeof(sum));
    std::vector<double> Sl(F * F, 0.0), suml(F, 0.0);
    int pending = 0;
    auto flush = [&]() {
      for (int a = 0; a < F; ++a) {
        suml[a] += sum[a];
        for (int c = a; c < F; ++c) Sl[a * F + c] += S[a * F + c];
      }
      std::memset(S, 0, sizeof(S));
      std::memset(sum, 0, sizeof(sum));
      pending = 0;
    };
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
      row_stats(X, W, S, sum);
      pending += W;
      if (pending >= 256) flush();
    }
    flush();
#pragma omp critical
    {
      for (int a = 0; a < F * F; ++a) Sd[a] += Sl[a];
      for (int a = 0; a < F; ++a) sumd[a] += suml[a];
    }
  }
}

// (3) The batch norm folded into dense_in from the features' statistics over n cells:
// relu(x @ Wf + cb) is the normalised, scaled, shifted and rectified hidden layer.
struct Fold {
  double m[F], cov[F][F], rstd[HID], a[HID];
  alignas(64) double cw[F * HID];  // cov @ W1
  alignas(64) float Wf[F * HID];
  alignas(64) float cb[HID];
};

void fold(const double* Sd, const double* sumd, size_t n, const float* W1, const float* scale,
          const float* shift, float eps, Fold& fd) {
  for (int a = 0; a < F; ++a) fd.m[a] = sumd[a] / double(n);
  for (int a = 0; a < F; ++a)
    for (int c = 0; c < F; ++c) {
      const int lo = a < c ? a : c, hi = a < c ? c : a;
      fd.cov[a][c] = Sd[lo * F + hi] / double(n) - fd.m[a] * fd.m[c];
    }
  // every loop below runs over u innermost: contiguous, vectorised (these run once per step
  // on one thread while the other threads wait)
  std::fill(fd.cw, fd.cw + F * HID, 0.0);
  for (int a = 0; a < F; ++a)
    for (int c = 0; c < F; ++c) {
      const double k = fd.cov[a][c];
      for (int u = 0; u < HID; ++u) fd.cw[a * HID + u] += k * W1[c * HID + u];
    }
  double v[HID] = {};
  for (int a = 0; a < F; ++a)
    for (int u = 0; u < HID; ++u) v[u] += W1[a * HID + u] * fd.cw[a * HID + u];
  for (int u = 0; u < HID; ++u) fd.rstd[u] = 1.0 / std::sqrt((v[u] > 0.0 ? v[u] : 0.0) + eps);
  for (int u = 0; u < HID; ++u) {
    const double g = scale[u] * fd.rstd[u];
    fd.a[u] = g;
    double mu = 0.0;
    for (int a = 0; a < F; ++a) {
      fd.Wf[a * HID + u] = float(W1[a * HID + u] * g);
      mu += fd.m[a] * double(fd.Wf[a * HID + u]);
    }
    fd.cb[u] = float(shift[u] - mu);
  }
}

// Up to 24 fired cells of image row r from column j on: their feature rows and indices.
inline int gather_fired(const float* mrow, int W, int& j, const float* X, const float** xs,
                        int* idx) {
  int cnt = 0;
  for (; j < W && cnt < 24; ++j)
    if (mrow[j] > 0.5f) xs[cnt] = X + j * F, idx[cnt] = j, ++cnt;
  if (cnt > 0) {
    const int full = (cnt + MT - 1) / MT * MT;
    for (int t = cnt; t < full; ++t) xs[t] = xs[cnt - 1];
  }
  return cnt;
}

void group_step(const float* state, const float* mask, int B, int H, int W, const float* K,
                const float* W1, const float* scale, const float* shift, const float* W2,
                float eps, float* out, Scratch& scr) {
  const size_t n = size_t(B) * H * W;
  float* pad = scr.get(0, size_t(B) * (H + 2) * (W + 2) * C);
  float* feats = scr.get(1, n * F);
  std::vector<double> Sd(F * F), sumd(F);
  features(state, B, H, W, K, pad, feats, Sd.data(), sumd.data());
  auto fd = std::make_unique<Fold>();
  fold(Sd.data(), sumd.data(), n, W1, scale, shift, eps, *fd);
  const float* Wf = fd->Wf;
  const float* cb = fd->cb;

  // (4) MLP on the fired cells, and the update
#pragma omp parallel
  {
    alignas(64) float h[24 * HID];
    const float* xs[24];
    float* dst[24];
    int idx[24];
#pragma omp for schedule(static)
    for (int r = 0; r < B * H; ++r) {
      const float* X = feats + size_t(r) * W * F;
      const float* mrow = mask + size_t(r) * W;
      float* orow = out + size_t(r) * W * C;
      std::memcpy(orow, state + size_t(r) * W * C, size_t(W) * C * sizeof(float));
      int j = 0;
      while (j < W) {
        const int cnt = gather_fired(mrow, W, j, X, xs, idx);
        if (cnt == 0) break;
        for (int t = 0; t < cnt; ++t) dst[t] = orow + idx[t] * C;
        const int full = (cnt + MT - 1) / MT * MT;
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

// ---------------------------------------------------------------------------------------------
// The backward of group_step: given g = dL/d(new state), dL/d(state) and the gradients of the
// kernel's weights. It recomputes the forward's features and statistics (passes 1-3), then
//  (B2) on the fired cells: relu(pre) again, dW2 += relu(pre)^T g, dpre = (g @ W2^T) [pre > 0],
//       the sums xc^T dpre and dpre (xc = x - mean: the centred features), and the rows
//       dpre @ Wf^T into dfeat (0 on the cells that did not fire);
//  (B3) the norm's gradients from those sums (the folded form of mlp.py's `_stats_grads`),
//       dfeat += xc @ dcov2 - row on every cell, the state's own share of dfeat and g into
//       dstate, and the convolutions' kernel gradient from the padded state and dfeat[16:48];
//  (B4) dfeat[16:48] back through the convolutions into the padded grid (a gather over the
//       three rows above, no two threads writing one cell), and the padding's reflection
//       folded back into dstate.

// dpre[m] = (g[m] @ W2^T) where r[m] > 0 else 0, for 2 cells (W2T is (C, HID)).
inline void dpre_pair(const float* g0, const float* g1, const float* W2T, const float* r0,
                      const float* r1, float* d0, float* d1) {
  __m512 a0[8], a1[8];
#pragma GCC unroll 8
  for (int b = 0; b < 8; ++b) a0[b] = a1[b] = _mm512_setzero_ps();
#pragma GCC unroll 4
  for (int c = 0; c < C; ++c) {
    const __m512 x0 = _mm512_set1_ps(g0[c]), x1 = _mm512_set1_ps(g1[c]);
#pragma GCC unroll 8
    for (int b = 0; b < 8; ++b) {
      const __m512 w = _mm512_loadu_ps(W2T + c * HID + 16 * b);
      a0[b] = _mm512_fmadd_ps(x0, w, a0[b]);
      a1[b] = _mm512_fmadd_ps(x1, w, a1[b]);
    }
  }
  const __m512 z = _mm512_setzero_ps();
#pragma GCC unroll 8
  for (int b = 0; b < 8; ++b) {
    const __mmask16 k0 = _mm512_cmp_ps_mask(_mm512_loadu_ps(r0 + 16 * b), z, _CMP_GT_OQ);
    const __mmask16 k1 = _mm512_cmp_ps_mask(_mm512_loadu_ps(r1 + 16 * b), z, _CMP_GT_OQ);
    _mm512_storeu_ps(d0 + 16 * b, _mm512_maskz_mov_ps(k0, a0[b]));
    _mm512_storeu_ps(d1 + 16 * b, _mm512_maskz_mov_ps(k1, a1[b]));
  }
}

// dst[m][0:48] = dpre[m] @ WfT (HID, F), for MR cells.
template <int MR>
inline void dx_tile(const float* dpre, const float* WfT, float* const* dst) {
  __m512 acc[MR][3];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = acc[m][2] = _mm512_setzero_ps();
#pragma GCC unroll 2
  for (int u = 0; u < HID; ++u) {
    const __m512 w0 = _mm512_loadu_ps(WfT + u * F), w1 = _mm512_loadu_ps(WfT + u * F + 16),
                 w2 = _mm512_loadu_ps(WfT + u * F + 32);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m512 x = _mm512_set1_ps(dpre[m * HID + u]);
      acc[m][0] = _mm512_fmadd_ps(x, w0, acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(x, w1, acc[m][1]);
      acc[m][2] = _mm512_fmadd_ps(x, w2, acc[m][2]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
    for (int k = 0; k < 3; ++k) _mm512_storeu_ps(dst[m] + 16 * k, acc[m][k]);
}

// out[m] = dx[m] - row + (x[m] - mu) @ D (F, F), for MR consecutive cells (stride F), in place.
template <int MR>
inline void dcov_tile(const float* X, const float* mu, const float* D, const float* row,
                      float* io) {
  __m512 acc[MR][3];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
    for (int k = 0; k < 3; ++k)
      acc[m][k] = _mm512_sub_ps(_mm512_loadu_ps(io + m * F + 16 * k), _mm512_loadu_ps(row + 16 * k));
#pragma GCC unroll 2
  for (int f = 0; f < F; ++f) {
    const __m512 d0 = _mm512_loadu_ps(D + f * F), d1 = _mm512_loadu_ps(D + f * F + 16),
                 d2 = _mm512_loadu_ps(D + f * F + 32);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m512 x = _mm512_set1_ps(X[m * F + f] - mu[f]);
      acc[m][0] = _mm512_fmadd_ps(x, d0, acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(x, d1, acc[m][1]);
      acc[m][2] = _mm512_fmadd_ps(x, d2, acc[m][2]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
    for (int k = 0; k < 3; ++k) _mm512_storeu_ps(io + m * F + 16 * k, acc[m][k]);
}

// MR consecutive padded cells of padded row ip: out[m][0:16] = sum over the taps (di, dj) whose
// output cell (ip - di, jp - dj) lies in the image of KT[di][dj] (P, C) applied to that cell's
// dconv. dcz: one image's dconv (H, W + 4, P), zero in its two columns each side.
template <int MR>
inline void tconv_tile(const float* dcz, int ip, int H, int W, int jp0, const float* KT,
                       float* out) {
  __m512 acc[MR];
#pragma GCC unroll 12
  for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_ps();
  for (int di = 0; di < 3; ++di) {
    const int i = ip - di;
    if (i < 0 || i >= H) continue;
    for (int dj = 0; dj < 3; ++dj) {
      const float* a = dcz + (size_t(i) * (W + 4) + (jp0 - dj + 2)) * P;
      const float* k = KT + (di * 3 + dj) * P * C;
#pragma GCC unroll 4
      for (int p = 0; p < P; ++p) {
        const __m512 kv = _mm512_loadu_ps(k + p * C);
#pragma GCC unroll 12
        for (int m = 0; m < MR; ++m) acc[m] = _mm512_fmadd_ps(_mm512_set1_ps(a[m * P + p]), kv, acc[m]);
      }
    }
  }
#pragma GCC unroll 12
  for (int m = 0; m < MR; ++m) _mm512_storeu_ps(out + m * C, acc[m]);
}

struct Grads {  // one group's outputs
  float *dstate, *dK, *dW1, *dscale, *dshift, *dW2;
};

void group_step_bwd(const float* state, const float* mask, const float* gout, int B, int H,
                    int W, const float* K, const float* W1, const float* scale,
                    const float* shift, const float* W2, float eps, Grads o, Scratch& scr) {
  const int wp = W + 2, hp = H + 2;
  const size_t n = size_t(B) * H * W;
  float* pad = scr.get(0, size_t(B) * hp * wp * C);
  float* feats = scr.get(1, n * F);
  float* dfeat = scr.get(2, n * F);
  float* dcz = scr.get(3, size_t(B) * H * (W + 4) * P);
  std::vector<double> Sd(F * F), sumd(F);
  features(state, B, H, W, K, pad, feats, Sd.data(), sumd.data());
  auto fd = std::make_unique<Fold>();
  fold(Sd.data(), sumd.data(), n, W1, scale, shift, eps, *fd);
  const float* Wf = fd->Wf;
  const float* cb = fd->cb;
  alignas(64) float mu[F];
  for (int a = 0; a < F; ++a) mu[a] = float(fd->m[a]);
  std::vector<float> WfT(HID * F), W2T(C * HID), KT(9 * P * C);
  for (int f = 0; f < F; ++f)
    for (int u = 0; u < HID; ++u) WfT[u * F + f] = Wf[f * HID + u];
  for (int u = 0; u < HID; ++u)
    for (int c = 0; c < C; ++c) W2T[c * HID + u] = W2[u * C + c];
  for (int t = 0; t < 9; ++t)
    for (int c = 0; c < C; ++c)
      for (int p = 0; p < P; ++p) KT[(t * P + p) * C + c] = K[(t * C + c) * P + p];

  // (B2) the fired cells
  std::vector<double> xdp(F * HID, 0.0), dsh(HID, 0.0), dw2(HID * C, 0.0);
#pragma omp parallel
  {
    alignas(64) float h[24 * HID];
    alignas(64) float dp[24 * HID];
    std::vector<float> xdr(F * HID, 0.0f), dshr(HID, 0.0f), dw2r(HID * C, 0.0f);
    std::vector<double> xdl(F * HID, 0.0), dshl(HID, 0.0), dw2l(HID * C, 0.0);
    const float* xs[24];
    float* dst[24];
    int idx[24];
    int pending = 0;  // fired cells in the float sums since they were last added to the doubles
    auto flush = [&]() {
      for (int a = 0; a < F * HID; ++a) xdl[a] += xdr[a];
      for (int a = 0; a < HID; ++a) dshl[a] += dshr[a];
      for (int a = 0; a < HID * C; ++a) dw2l[a] += dw2r[a];
      std::fill(xdr.begin(), xdr.end(), 0.0f);
      std::fill(dshr.begin(), dshr.end(), 0.0f);
      std::fill(dw2r.begin(), dw2r.end(), 0.0f);
      pending = 0;
    };
#pragma omp for schedule(static)
    for (int r = 0; r < B * H; ++r) {
      const float* X = feats + size_t(r) * W * F;
      const float* mrow = mask + size_t(r) * W;
      const float* grow = gout + size_t(r) * W * C;
      float* drow = dfeat + size_t(r) * W * F;
      std::memset(drow, 0, size_t(W) * F * sizeof(float));
      int j = 0;
      while (j < W) {
        const int cnt = gather_fired(mrow, W, j, X, xs, idx);
        if (cnt == 0) break;
        pending += cnt;
        const int full = (cnt + MT - 1) / MT * MT;
        for (int t = 0; t < full; t += MT) mlp1_tile(xs + t, Wf, cb, h + t * HID);
        for (int t = 0; t < cnt; t += 2) {
          const int t1 = t + 1 < cnt ? t + 1 : t;
          dpre_pair(grow + idx[t] * C, grow + idx[t1] * C, W2T.data(), h + t * HID,
                    h + t1 * HID, dp + t * HID, dp + t1 * HID);
        }
        // dW2 += h^T g
        for (int jb = 0; jb < HID; jb += 16) {
          __m512 acc[16];
#pragma GCC unroll 16
          for (int t = 0; t < 16; ++t) acc[t] = _mm512_loadu_ps(dw2r.data() + (jb + t) * C);
          for (int m = 0; m < cnt; ++m) {
            const __m512 gv = _mm512_loadu_ps(grow + idx[m] * C);
#pragma GCC unroll 16
            for (int t = 0; t < 16; ++t)
              acc[t] = _mm512_fmadd_ps(_mm512_set1_ps(h[m * HID + jb + t]), gv, acc[t]);
          }
#pragma GCC unroll 16
          for (int t = 0; t < 16; ++t) _mm512_storeu_ps(dw2r.data() + (jb + t) * C, acc[t]);
        }
        // xc^T dpre and the sums of dpre
        for (int f0 = 0; f0 < F; f0 += 3) {
          __m512 acc[3][8];
#pragma GCC unroll 3
          for (int t = 0; t < 3; ++t)
#pragma GCC unroll 8
            for (int b = 0; b < 8; ++b) acc[t][b] = _mm512_loadu_ps(xdr.data() + (f0 + t) * HID + 16 * b);
          for (int m = 0; m < cnt; ++m) {
            const __m512 x0 = _mm512_set1_ps(xs[m][f0] - mu[f0]);
            const __m512 x1 = _mm512_set1_ps(xs[m][f0 + 1] - mu[f0 + 1]);
            const __m512 x2 = _mm512_set1_ps(xs[m][f0 + 2] - mu[f0 + 2]);
#pragma GCC unroll 8
            for (int b = 0; b < 8; ++b) {
              const __m512 d = _mm512_loadu_ps(dp + m * HID + 16 * b);
              acc[0][b] = _mm512_fmadd_ps(x0, d, acc[0][b]);
              acc[1][b] = _mm512_fmadd_ps(x1, d, acc[1][b]);
              acc[2][b] = _mm512_fmadd_ps(x2, d, acc[2][b]);
            }
          }
#pragma GCC unroll 3
          for (int t = 0; t < 3; ++t)
#pragma GCC unroll 8
            for (int b = 0; b < 8; ++b) _mm512_storeu_ps(xdr.data() + (f0 + t) * HID + 16 * b, acc[t][b]);
        }
        for (int b = 0; b < 8; ++b) {
          __m512 s = _mm512_loadu_ps(dshr.data() + 16 * b);
          for (int m = 0; m < cnt; ++m) s = _mm512_add_ps(s, _mm512_loadu_ps(dp + m * HID + 16 * b));
          _mm512_storeu_ps(dshr.data() + 16 * b, s);
        }
        // the fired rows' dfeat = dpre @ Wf^T
        for (int t = 0; t < cnt; ++t) dst[t] = drow + idx[t] * F;
        int t = 0;
        for (; t + 8 <= cnt; t += 8) dx_tile<8>(dp + t * HID, WfT.data(), dst + t);
        switch (cnt - t) {
#define CASE(k) \
  case k:       \
    dx_tile<k>(dp + t * HID, WfT.data(), dst + t); \
    break;
          CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7)
#undef CASE
          default:
            break;
        }
      }
      if (pending >= 256) flush();
    }
    flush();
#pragma omp critical
    {
      for (int a = 0; a < F * HID; ++a) xdp[a] += xdl[a];
      for (int a = 0; a < HID; ++a) dsh[a] += dshl[a];
      for (int a = 0; a < HID * C; ++a) dw2[a] += dw2l[a];
    }
  }

  // (B3a) the norm's gradients (mlp.py `_stats_grads` with the features centred exactly)
  // (loops over the contiguous index innermost, vectorised: this part runs on one thread)
  std::vector<double> da(HID, 0.0), dvar(HID), wd(F * HID), w1t(HID * F), dd(F * F, 0.0);
  for (int f = 0; f < F; ++f)
    for (int u = 0; u < HID; ++u) da[u] += xdp[f * HID + u] * W1[f * HID + u];
  for (int u = 0; u < HID; ++u) {
    const double r = fd->rstd[u];
    dvar[u] = da[u] * scale[u] * -0.5 * r * r * r;
    o.dscale[u] = float(da[u] * r);
    o.dshift[u] = float(dsh[u]);
  }
  for (int f = 0; f < F; ++f)
    for (int u = 0; u < HID; ++u) {
      o.dW1[f * HID + u] = float(xdp[f * HID + u] * fd->a[u] + 2.0 * fd->cw[f * HID + u] * dvar[u]);
      wd[f * HID + u] = W1[f * HID + u] * dvar[u];
      w1t[u * F + f] = W1[f * HID + u];
    }
  for (int a = 0; a < HID * C; ++a) o.dW2[a] = float(dw2[a]);
  // D = (2 / n) W1 diag(dvar) W1^T, row = dshift @ Wf^T / n
  for (int f = 0; f < F; ++f)
    for (int u = 0; u < HID; ++u) {
      const double k = wd[f * HID + u];
      for (int c = 0; c < F; ++c) dd[f * F + c] += k * w1t[u * F + c];
    }
  alignas(64) float D[F * F];
  alignas(64) float row[F];
  for (int a = 0; a < F * F; ++a) D[a] = float(2.0 * dd[a] / double(n));
  std::vector<double> rd(F, 0.0);
  for (int u = 0; u < HID; ++u)
    for (int f = 0; f < F; ++f) rd[f] += dsh[u] * double(WfT[u * F + f]);
  for (int f = 0; f < F; ++f) row[f] = float(rd[f] / double(n));

  // (B3b) dfeat on every cell, dstate's own share, the kernel's gradient
  std::vector<double> dk(9 * C * P, 0.0);
#pragma omp parallel
  {
    std::vector<double> dkl(9 * C * P, 0.0);
    std::vector<float> dkf(9 * C * P, 0.0f);  // float sums of >= 256 cells, then into dkl
    int pending = 0;
    auto flush = [&]() {
      for (int a = 0; a < 9 * C * P; ++a) dkl[a] += dkf[a];
      std::fill(dkf.begin(), dkf.end(), 0.0f);
      pending = 0;
    };
#pragma omp for schedule(static)
    for (int r = 0; r < B * H; ++r) {
      const int b = r / H, i = r % H;
      const float* X = feats + size_t(r) * W * F;
      float* drow = dfeat + size_t(r) * W * F;
      int j = 0;
      for (; j + 8 <= W; j += 8) dcov_tile<8>(X + j * F, mu, D, row, drow + j * F);
      for (; j < W; ++j) dcov_tile<1>(X + j * F, mu, D, row, drow + j * F);
      const float* grow = gout + size_t(r) * W * C;
      float* srow = o.dstate + size_t(r) * W * C;
      float* zrow = dcz + size_t(r) * (W + 4) * P;
      std::memset(zrow, 0, 2 * P * sizeof(float));
      std::memset(zrow + (W + 2) * P, 0, 2 * P * sizeof(float));
      for (int jj = 0; jj < W; ++jj) {
        for (int c = 0; c < C; ++c) srow[jj * C + c] = grow[jj * C + c] + drow[jj * F + c];
        std::memcpy(zrow + (jj + 2) * P, drow + jj * F + C, P * sizeof(float));
      }
      // dK[di][dj][c][p] += sum over the row of pad[i + di][j + dj][c] * dconv[j][p]
      for (int t = 0; t < 9; ++t) {
        const int di = t / 3, dj = t % 3;
        const float* A = pad + ((size_t(b) * hp + i + di) * wp + dj) * C;
        for (int c0 = 0; c0 < C; c0 += 8) {
          __m512 acc[8][2];
#pragma GCC unroll 8
          for (int q = 0; q < 8; ++q) acc[q][0] = acc[q][1] = _mm512_setzero_ps();
          for (int jj = 0; jj < W; ++jj) {
            const __m512 d0 = _mm512_loadu_ps(zrow + (jj + 2) * P);
            const __m512 d1 = _mm512_loadu_ps(zrow + (jj + 2) * P + 16);
#pragma GCC unroll 8
            for (int q = 0; q < 8; ++q) {
              const __m512 a = _mm512_set1_ps(A[jj * C + c0 + q]);
              acc[q][0] = _mm512_fmadd_ps(a, d0, acc[q][0]);
              acc[q][1] = _mm512_fmadd_ps(a, d1, acc[q][1]);
            }
          }
          for (int q = 0; q < 8; ++q) {
            float* d = dkf.data() + (t * C + c0 + q) * P;
            _mm512_storeu_ps(d, _mm512_add_ps(_mm512_loadu_ps(d), acc[q][0]));
            _mm512_storeu_ps(d + 16, _mm512_add_ps(_mm512_loadu_ps(d + 16), acc[q][1]));
          }
        }
      }
      pending += W;
      if (pending >= 256) flush();
    }
    flush();
#pragma omp critical
    for (int a = 0; a < 9 * C * P; ++a) dk[a] += dkl[a];
  }
  for (int a = 0; a < 9 * C * P; ++a) o.dK[a] = float(dk[a]);

  // (B4) dconv back through the convolutions into the padded grid (pad is free now), then the
  // reflection folded into dstate
  float* dpad = pad;
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int r = 0; r < B * hp; ++r) {
      const int b = r / hp, ip = r % hp;
      const float* z = dcz + size_t(b) * H * (W + 4) * P;
      float* out = dpad + size_t(r) * wp * C;
      int jp = 0;
      for (; jp + 12 <= wp; jp += 12) tconv_tile<12>(z, ip, H, W, jp, KT.data(), out + jp * C);
      for (; jp + 4 <= wp; jp += 4) tconv_tile<4>(z, ip, H, W, jp, KT.data(), out + jp * C);
      for (; jp < wp; ++jp) tconv_tile<1>(z, ip, H, W, jp, KT.data(), out + jp * C);
    }
#pragma omp for schedule(static)
    for (int r = 0; r < B * H; ++r) {
      const int b = r / H, i = r % H;
      float* srow = o.dstate + size_t(r) * W * C;
      int ips[3], nr = 0;
      ips[nr++] = i + 1;
      if (i == 1) ips[nr++] = 0;
      if (i == H - 2) ips[nr++] = H + 1;
      for (int q = 0; q < nr; ++q) {
        const float* prow = dpad + (size_t(b) * hp + ips[q]) * wp * C;
        for (int j = 0; j < W; ++j) {
          __m512 s = _mm512_add_ps(_mm512_loadu_ps(srow + j * C), _mm512_loadu_ps(prow + (j + 1) * C));
          if (j == 1) s = _mm512_add_ps(s, _mm512_loadu_ps(prow));
          if (j == W - 2) s = _mm512_add_ps(s, _mm512_loadu_ps(prow + (W + 1) * C));
          _mm512_storeu_ps(srow + j * C, s);
        }
      }
    }
  }
}

ffi::Error check_shapes(const char* who, ffi::Buffer<ffi::F32>& state, ffi::Buffer<ffi::F32>& mask,
                        ffi::Buffer<ffi::F32>& kernel, ffi::Buffer<ffi::F32>& w1,
                        ffi::Buffer<ffi::F32>& scale, ffi::Buffer<ffi::F32>& shift,
                        ffi::Buffer<ffi::F32>& w2, ffi::Buffer<ffi::F32>& epsb) {
  auto d = state.dimensions();
  const std::string w(who);
  if (d.size() != 5 || d[4] != C)
    return ffi::Error::InvalidArgument(w + ": state must be (G, B, H, W, 16)");
  if (d[2] < 2 || d[3] < 2) return ffi::Error::InvalidArgument(w + ": H and W must be >= 2");
  if (mask.element_count() != size_t(d[0] * d[1] * d[2] * d[3]))
    return ffi::Error::InvalidArgument(w + ": mask must be (G, B, H, W)");
  if (kernel.element_count() != 9 * C * P || w1.element_count() != F * HID ||
      scale.element_count() != HID || shift.element_count() != HID ||
      w2.element_count() != HID * C)
    return ffi::Error::InvalidArgument(w + ": parameter shapes do not match 16/128");
  if (epsb.element_count() != 1) return ffi::Error::InvalidArgument(w + ": eps must be one float");
  return ffi::Error::Success();
}

ffi::Error StepImpl(ffi::Buffer<ffi::F32> state, ffi::Buffer<ffi::F32> mask,
                    ffi::Buffer<ffi::F32> kernel, ffi::Buffer<ffi::F32> w1,
                    ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> shift,
                    ffi::Buffer<ffi::F32> w2, ffi::Buffer<ffi::F32> epsb,
                    ffi::ResultBuffer<ffi::F32> out) {
  ffi::Error e = check_shapes("nca_step_fwd", state, mask, kernel, w1, scale, shift, w2, epsb);
  if (e.failure()) return e;
  auto d = state.dimensions();
  const int64_t G = d[0], B = d[1], H = d[2], W = d[3];
  const float eps = epsb.typed_data()[0];
  thread_local Scratch scr;
  const size_t per = size_t(B * H * W);
  for (int64_t g = 0; g < G; ++g)
    group_step(state.typed_data() + g * per * C, mask.typed_data() + g * per, int(B), int(H),
               int(W), kernel.typed_data(), w1.typed_data(), scale.typed_data(),
               shift.typed_data(), w2.typed_data(), eps, out->typed_data() + g * per * C, scr);
  return ffi::Error::Success();
}

ffi::Error StepBwdImpl(ffi::Buffer<ffi::F32> state, ffi::Buffer<ffi::F32> mask,
                       ffi::Buffer<ffi::F32> kernel, ffi::Buffer<ffi::F32> w1,
                       ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> shift,
                       ffi::Buffer<ffi::F32> w2, ffi::Buffer<ffi::F32> epsb,
                       ffi::Buffer<ffi::F32> gout, ffi::ResultBuffer<ffi::F32> dstate,
                       ffi::ResultBuffer<ffi::F32> dK, ffi::ResultBuffer<ffi::F32> dW1,
                       ffi::ResultBuffer<ffi::F32> dscale, ffi::ResultBuffer<ffi::F32> dshift,
                       ffi::ResultBuffer<ffi::F32> dW2) {
  ffi::Error e = check_shapes("nca_step_bwd", state, mask, kernel, w1, scale, shift, w2, epsb);
  if (e.failure()) return e;
  if (gout.element_count() != state.element_count())
    return ffi::Error::InvalidArgument("nca_step_bwd: the cotangent must be the state's shape");
  auto d = state.dimensions();
  const int64_t G = d[0], B = d[1], H = d[2], W = d[3];
  const float eps = epsb.typed_data()[0];
  thread_local Scratch scr;
  const size_t per = size_t(B * H * W);
  for (int64_t g = 0; g < G; ++g) {
    Grads o{dstate->typed_data() + g * per * C, dK->typed_data() + g * 9 * C * P,
            dW1->typed_data() + g * F * HID,     dscale->typed_data() + g * HID,
            dshift->typed_data() + g * HID,      dW2->typed_data() + g * HID * C};
    group_step_bwd(state.typed_data() + g * per * C, mask.typed_data() + g * per,
                   gout.typed_data() + g * per * C, int(B), int(H), int(W), kernel.typed_data(),
                   w1.typed_data(), scale.typed_data(), shift.typed_data(), w2.typed_data(), eps,
                   o, scr);
  }
  return ffi::Error::Success();
}

using F32 = ffi::Buffer<ffi::F32>;

// Both handlers' first eight arguments: state, mask, kernel, w1, scale, shift, w2, eps.
auto step_inputs() {
  return ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>()
      .Arg<F32>().Arg<F32>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NcaStepFwd, StepImpl, step_inputs().Ret<F32>());

// ... and the cotangent g in; dstate, dK, dW1, dscale, dshift, dW2 out
XLA_FFI_DEFINE_HANDLER_SYMBOL(NcaStepBwd, StepBwdImpl,
                              step_inputs().Arg<F32>().Ret<F32>().Ret<F32>().Ret<F32>()
                                  .Ret<F32>().Ret<F32>().Ret<F32>());
