// Block-sparse flash attention forward on the CPU (see block_sparse_attention.h).
//
// Stage 1 packs K (transposed) and V once into tiles of KT keys, zero-padded to
// a multiple of the vector width, so every later read is unit-stride.
// Stage 2, one work item per (batch, query head, query block, QR-row slice):
// for each kept key block, for each of its key tiles, S = Q K^T, online
// softmax, O += P V. Both inner products are unit-stride loops the compiler
// vectorises, with RB query rows held in registers per pass.
#include "block_sparse_attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace rainfusion {
namespace {

constexpr int64_t QR = 64;  // query rows per work item
constexpr int64_t KT = 128;  // keys per tile
constexpr int64_t RB = 4;   // query rows per register block

template <typename T>
constexpr int64_t kVec = 64 / sizeof(T);  // elements per vector chunk (one 512-bit register)

// exp(x) for x <= 0 by range reduction and a polynomial, written so loops of it vectorise.
// Relative error ~1 ulp of T; returns 0 below the smallest normal result.
template <typename T>
inline T exp_nonpositive(T x);

template <>
inline float exp_nonpositive<float>(float x) {
  const float lo = -87.0f;
  const float xc = x < lo ? lo : x;
  const float n = std::nearbyint(xc * 1.44269504088896341f);
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits;
  const int32_t e = static_cast<int32_t>(n) + 127;
  bits = e << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < lo ? 0.0f : p * scale;
}

template <>
inline double exp_nonpositive<double>(double x) {
  const double lo = -708.0;
  const double xc = x < lo ? lo : x;
  const double n = std::nearbyint(xc * 1.4426950408889634);
  const double r = (xc - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10;
  // Taylor series to degree 13 on |r| <= ln(2)/2: truncation below 1e-17.
  double p = 1.0 / 6227020800.0;
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r * r + r + 1.0;
  const int64_t e = static_cast<int64_t>(n) + 1023;
  const int64_t bits = e << 52;
  double scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < lo ? 0.0 : p * scale;
}

template <typename T>
int64_t padded_dim(int64_t head_dim) {
  return (head_dim + kVec<T> - 1) / kVec<T> * kVec<T>;
}

// K^T and V of every (batch, kv head), packed tile by tile.
//   kt: [B, Hkv, tiles, dp, KT]    v: [B, Hkv, tiles, KT, dp]
// Tile t = key_block * tiles_per_block + sub covers keys
// [key_block * bs + sub * KT, min(that + KT, end of the block, kv_len)).
template <typename T>
struct PackedKV {
  int64_t dp, tiles_per_block, tiles;
  std::vector<T> kt, v;

  const T* kt_tile(int64_t b, int64_t kh, int64_t kv_heads, int64_t t) const {
    return kt.data() + ((b * kv_heads + kh) * tiles + t) * dp * KT;
  }
  const T* v_tile(int64_t b, int64_t kh, int64_t kv_heads, int64_t t) const {
    return v.data() + ((b * kv_heads + kh) * tiles + t) * KT * dp;
  }
};

template <typename T>
PackedKV<T> pack_kv(const AttentionArgs<T>& a, int threads) {
  PackedKV<T> p;
  const int64_t bs = a.block_size, nk = (a.kv_len + bs - 1) / bs;
  p.dp = padded_dim<T>(a.head_dim);
  // A block never holds more keys than the sequence: memory follows kv_len, not block_size.
  p.tiles_per_block = (std::min(bs, a.kv_len) + KT - 1) / KT;
  p.tiles = nk * p.tiles_per_block;
  const int64_t total = a.batch * a.kv_heads * p.tiles;
  p.kt.assign(total * p.dp * KT, T(0));
  p.v.assign(total * KT * p.dp, T(0));
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads)
#endif
  for (int64_t item = 0; item < total; ++item) {
    const int64_t t = item % p.tiles, kh = (item / p.tiles) % a.kv_heads, b = item / p.tiles / a.kv_heads;
    const int64_t block = t / p.tiles_per_block, key0 = block * bs + (t % p.tiles_per_block) * KT;
    const int64_t keys = std::min({KT, (block + 1) * bs - key0, a.kv_len - key0});
    T* kt = p.kt.data() + item * p.dp * KT;
    T* v = p.v.data() + item * KT * p.dp;
    for (int64_t j = 0; j < keys; ++j) {
      const T* ks = a.k + b * a.k_strides.batch + kh * a.k_strides.head + (key0 + j) * a.k_strides.token;
      const T* vs = a.v + b * a.v_strides.batch + kh * a.v_strides.head + (key0 + j) * a.v_strides.token;
      for (int64_t d = 0; d < a.head_dim; ++d) {
        kt[d * KT + j] = ks[d * a.k_strides.dim];
        v[j * p.dp + d] = vs[d * a.v_strides.dim];
      }
    }
  }
  return p;
}

// Per-thread scratch: the scaled query rows, scores, accumulator and softmax state of QR rows.
template <typename T>
struct Scratch {
  int64_t dp;
  std::vector<T> q, s, o, m, l;
  explicit Scratch(int64_t head_dim)
      : dp(padded_dim<T>(head_dim)), q(QR * dp), s(QR * KT), o(QR * dp), m(QR), l(QR) {}
};

// s[i][j] = sum_d q[i][d] * kt[d][j]: RB rows x JW keys held in registers, vectorised over j.
template <typename T>
void scores_tile(Scratch<T>& w, const T* kt_tile, int64_t rows) {
  constexpr int64_t JW = 4 * kVec<T>;
  static_assert(KT % JW == 0, "key tile must be a whole number of register blocks");
  for (int64_t i0 = 0; i0 < rows; i0 += RB) {
    for (int64_t j0 = 0; j0 < KT; j0 += JW) {
      T acc[RB][JW] = {};
      for (int64_t d = 0; d < w.dp; ++d) {
        const T* kt = kt_tile + d * KT + j0;
        for (int64_t r = 0; r < RB; ++r) {
          const T qv = w.q[(i0 + r) * w.dp + d];
#pragma omp simd
          for (int64_t j = 0; j < JW; ++j) acc[r][j] += qv * kt[j];
        }
      }
      for (int64_t r = 0; r < RB; ++r) std::memcpy(&w.s[(i0 + r) * KT + j0], acc[r], sizeof(acc[r]));
    }
  }
}

// o[i][:] += sum_j p[i][j] * v[j][:]: RB rows x DW head-dim columns in registers, vectorised over d.
template <typename T, int64_t DW>
void values_tile_w(Scratch<T>& w, const T* v_tile, int64_t rows, int64_t keys) {
  for (int64_t i0 = 0; i0 < rows; i0 += RB) {
    for (int64_t d0 = 0; d0 < w.dp; d0 += DW) {
      T acc[RB][DW];
      for (int64_t r = 0; r < RB; ++r) std::memcpy(acc[r], &w.o[(i0 + r) * w.dp + d0], sizeof(acc[r]));
      for (int64_t j = 0; j < keys; ++j) {
        const T* vj = v_tile + j * w.dp + d0;
        for (int64_t r = 0; r < RB; ++r) {
          const T p = w.s[(i0 + r) * KT + j];
#pragma omp simd
          for (int64_t d = 0; d < DW; ++d) acc[r][d] += p * vj[d];
        }
      }
      for (int64_t r = 0; r < RB; ++r) std::memcpy(&w.o[(i0 + r) * w.dp + d0], acc[r], sizeof(acc[r]));
    }
  }
}

// The widest register block (4, 2 or 1 vectors) that divides the padded head dim.
template <typename T>
void values_tile(Scratch<T>& w, const T* v_tile, int64_t rows, int64_t keys) {
  constexpr int64_t V = kVec<T>;
  if (w.dp % (4 * V) == 0)
    values_tile_w<T, 4 * V>(w, v_tile, rows, keys);
  else if (w.dp % (2 * V) == 0)
    values_tile_w<T, 2 * V>(w, v_tile, rows, keys);
  else
    values_tile_w<T, V>(w, v_tile, rows, keys);
}

template <typename T>
void attend_rows(const AttentionArgs<T>& a, const PackedKV<T>& kv, Scratch<T>& w, int64_t b, int64_t h, int64_t qblock,
                 int64_t row0, int64_t rows) {
  const int64_t D = a.head_dim, dp = w.dp, bs = a.block_size;
  const int64_t nq = (a.q_len + bs - 1) / bs, nk = (a.kv_len + bs - 1) / bs;
  const int64_t kh = h / (a.q_heads / a.kv_heads);
  const int64_t row_id = (b * a.q_heads + h) * nq + qblock;
  const int32_t count = a.kv_counts[row_id];
  const int32_t* kept = a.kv_indices + row_id * nk;
  const int64_t rows_padded = (rows + RB - 1) / RB * RB;
  const T neg_inf = -std::numeric_limits<T>::infinity();

  // ---- load the scaled query rows; zero padding rows and columns
  std::fill(w.q.begin(), w.q.end(), T(0));
  for (int64_t r = 0; r < rows; ++r) {
    const T* src = a.q + b * a.q_strides.batch + h * a.q_strides.head + (row0 + r) * a.q_strides.token;
    for (int64_t d = 0; d < D; ++d) w.q[r * dp + d] = src[d * a.q_strides.dim] * a.scale;
  }
  std::fill(w.o.begin(), w.o.end(), T(0));
  std::fill(w.m.begin(), w.m.end(), neg_inf);
  std::fill(w.l.begin(), w.l.end(), T(0));

  for (int32_t c = 0; c < count; ++c) {
    const int64_t kblock = kept[c];
    const int64_t kend = std::min(a.kv_len, (kblock + 1) * bs);
    for (int64_t sub = 0; sub * KT < kend - kblock * bs; ++sub) {
      const int64_t keys = std::min(KT, kend - kblock * bs - sub * KT);
      const int64_t tile = kblock * kv.tiles_per_block + sub;
      // ---- scores S = Q K^T
      scores_tile(w, kv.kt_tile(b, kh, a.kv_heads, tile), rows_padded);
      // ---- online softmax: new running max, rescale the accumulator, P = exp(S - max).
      //      Padding keys get -inf, so every loop runs the whole tile without masks.
      for (int64_t r = 0; r < rows_padded; ++r) {
        T* s = &w.s[r * KT];
        std::fill(s + keys, s + KT, neg_inf);
        T row_max = w.m[r];
#pragma omp simd reduction(max : row_max)
        for (int64_t j = 0; j < KT; ++j) row_max = s[j] > row_max ? s[j] : row_max;
        const T alpha = exp_nonpositive<T>(w.m[r] - row_max);  // 0 while the old max is -inf
        T sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < KT; ++j) {
          s[j] = exp_nonpositive<T>(s[j] - row_max);
          sum += s[j];
        }
        w.l[r] = w.l[r] * alpha + sum;
        w.m[r] = row_max;
#pragma omp simd
        for (int64_t d = 0; d < dp; ++d) w.o[r * dp + d] *= alpha;
      }
      // ---- accumulate O += P V
      values_tile(w, kv.v_tile(b, kh, a.kv_heads, tile), rows_padded, keys);
    }
  }

  // ---- epilogue: normalise and store; rows with no kept block are zeros
  for (int64_t r = 0; r < rows; ++r) {
    T* dst = a.out + b * a.out_strides.batch + h * a.out_strides.head + (row0 + r) * a.out_strides.token;
    const T inv = count > 0 ? T(1) / w.l[r] : T(0);
    for (int64_t d = 0; d < D; ++d) dst[d * a.out_strides.dim] = w.o[r * dp + d] * inv;
  }
}

}  // namespace

template <typename T>
void block_sparse_attention_forward(const AttentionArgs<T>& a) {
  const int64_t bs = a.block_size;
  const int64_t nq = (a.q_len + bs - 1) / bs;
  const int64_t slices = (std::min(bs, a.q_len) + QR - 1) / QR;  // work follows q_len, not block_size
  const int64_t items = a.batch * a.q_heads * nq * slices;
#ifdef _OPENMP
  const int threads = a.num_threads > 0 ? a.num_threads : omp_get_max_threads();
#else
  const int threads = 1;
#endif
  const PackedKV<T> kv = pack_kv(a, threads);
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
#endif
  {
    Scratch<T> w(a.head_dim);
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t item = 0; item < items; ++item) {
      const int64_t slice = item % slices;
      const int64_t block = (item / slices) % nq;
      const int64_t head = (item / slices / nq) % a.q_heads;
      const int64_t batch = item / slices / nq / a.q_heads;
      const int64_t row0 = block * bs + slice * QR;
      const int64_t row_end = std::min({a.q_len, (block + 1) * bs, row0 + QR});
      if (row0 < row_end) attend_rows(a, kv, w, batch, head, block, row0, row_end - row0);
    }
  }
}

bool has_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

const char* instruction_set() {
  return ""
#if defined(__AVX512F__)
         "AVX-512F "
#elif defined(__AVX2__)
         "AVX2 "
#elif defined(__AVX__)
         "AVX "
#elif defined(__SSE2__)
         "SSE2 "
#endif
#if defined(__FMA__)
         "FMA "
#endif
#if defined(__ARM_FEATURE_SVE)
         "SVE "
#endif
#if defined(__ARM_NEON)
         "NEON "
#endif
         "";
}

template void block_sparse_attention_forward<float>(const AttentionArgs<float>&);
template void block_sparse_attention_forward<double>(const AttentionArgs<double>&);

}  // namespace rainfusion
