// Block-sparse flash attention forward on the CPU: plain C++17, no Python or torch headers.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

namespace rainfusion {

// 16-bit storage types, by their bits. The kernel computes in float and converts where it
// reads (packing K and V, loading q) and where it writes the output: no full-size float copies.
struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

// The type a storage type is computed in.
template <typename In> struct ComputeType { using type = float; };
template <> struct ComputeType<double> { using type = double; };

inline float to_compute(float x) { return x; }
inline double to_compute(double x) { return x; }
inline float to_compute(BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float to_compute(Half x) {
  const uint32_t sign = static_cast<uint32_t>(x.bits & 0x8000u) << 16;
  uint32_t exponent = (x.bits >> 10) & 0x1fu, mantissa = x.bits & 0x3ffu, bits;
  if (exponent == 0x1fu) {
    bits = sign | 0x7f800000u | (mantissa << 13);  // inf, nan
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;  // +-0
  } else {  // subnormal: normalise
    exponent = 113u;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    bits = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline void from_compute(float v, float* dst) { *dst = v; }
inline void from_compute(double v, double* dst) { *dst = v; }
inline void from_compute(float v, BFloat16* dst) {  // round to nearest even
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    dst->bits = static_cast<uint16_t>((bits >> 16) | 0x40u);  // quiet nan
    return;
  }
  bits += 0x7fffu + ((bits >> 16) & 1u);
  dst->bits = static_cast<uint16_t>(bits >> 16);
}
inline void from_compute(float v, Half* dst) {  // round to nearest even
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) {
    dst->bits = sign | 0x7e00u;  // nan
  } else if (magnitude >= 0x477ff000u) {
    dst->bits = sign | 0x7c00u;  // rounds to or beyond 65520: inf
  } else if (magnitude >= 0x38800000u) {  // a normal half
    const uint32_t rounded = magnitude + 0xfffu + ((magnitude >> 13) & 1u) - (112u << 23);
    dst->bits = sign | static_cast<uint16_t>(rounded >> 13);
  } else if (magnitude > 0x33000000u) {  // a subnormal half: scale into the 10-bit mantissa
    const uint32_t exponent = magnitude >> 23, mantissa = (magnitude & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - exponent;  // 14..23 bits off the 24-bit mantissa
    uint32_t half = mantissa >> shift;
    const uint32_t rest = mantissa & ((1u << shift) - 1u), halfway = 1u << (shift - 1u);
    if (rest > halfway || (rest == halfway && (half & 1u))) ++half;
    dst->bits = sign | static_cast<uint16_t>(half);
  } else {
    dst->bits = sign;  // underflows to +-0
  }
}

// Element strides of a 4-D tensor indexed [batch, head, token, dim].
struct Strides4 {
  int64_t batch, head, token, dim;
};

// Inputs of one forward call.
//   q   [B, Hq, Sq, D], k/v [B, Hkv, Sk, D], out [B, Hq, Sq, D]; any element strides.
//   kv_counts  int32 [B, Hq, NQ]      (contiguous)
//   kv_indices int32 [B, Hq, NQ, NK]  (contiguous), ascending, left-packed.
// The kernel trusts every count to be in [0, NK] and every kept index in [0, NK):
// callers check that first (the Python binding does, in O(B * Hq * NQ * NK)).
// Query head h reads key/value head h / (Hq / Hkv). Rows whose block keeps no key
// block are written as zeros.
template <typename T>  // the storage type: float, double, Half or BFloat16
struct AttentionArgs {
  const T* q;
  const T* k;
  const T* v;
  T* out;
  Strides4 q_strides, k_strides, v_strides, out_strides;
  int64_t batch, q_heads, kv_heads, q_len, kv_len, head_dim;
  const int32_t* kv_counts;
  const int32_t* kv_indices;
  int64_t block_size;
  double scale;
  int num_threads;  // <= 0: the OpenMP default
};

// The instruction-set paths of the kernel. Each is compiled in its own file with its own flags
// (kernel_<isa>.cpp); which ones this CPU can run is known only at run time.
enum class Isa { kGeneric, kAvx2, kAvx512 };

Isa best_isa();                       // the fastest path this CPU and this build can run
Isa parse_isa(const char* name);      // "avx512", "avx2", "generic", or "" for the best; throws if unavailable
const char* isa_key(Isa isa);         // "avx512", ...
const char* isa_description(Isa isa); // "AVX-512F + FMA", ...
std::string available_isas();         // comma-separated keys this CPU and build can run

template <typename T>
void block_sparse_attention_forward(const AttentionArgs<T>& args, Isa isa);

// True when the library was compiled with OpenMP.
bool has_openmp();

}  // namespace rainfusion
