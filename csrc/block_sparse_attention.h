// Block-sparse flash attention forward on the CPU: plain C++17, no Python or torch headers.
#pragma once

#include <cstdint>

namespace rainfusion {

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
template <typename T>
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
  T scale;
  int num_threads;  // <= 0: the OpenMP default
};

template <typename T>
void block_sparse_attention_forward(const AttentionArgs<T>& args);

// True when the library was compiled with OpenMP.
bool has_openmp();

// The vector instruction sets the kernel was compiled for, e.g. "AVX2 FMA" or "AVX-512F FMA".
const char* instruction_set();

}  // namespace rainfusion
