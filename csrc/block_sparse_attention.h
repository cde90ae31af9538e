// Block-sparse flash attention forward on the CPU: plain C++17, no Python or torch headers.
#pragma once

#include <cstdint>
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

// The type a storage type is computed in (the conversions are in kernel_impl.inc, per instruction set).
template <typename In> struct ComputeType { using type = float; };
template <> struct ComputeType<double> { using type = double; };


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
//   lse [B, Hq, Sq] (contiguous, the compute type), or null: each row's natural log-sum-exp of its
//   scaled scores over its kept keys, -inf for a row with none.
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
  typename ComputeType<T>::type* lse = nullptr;
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
