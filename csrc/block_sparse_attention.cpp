// Block-sparse flash attention forward on the CPU: one build for every CPU, the instruction set
// chosen at run time (see block_sparse_attention.h and kernel_impl.inc).
#include "block_sparse_attention.h"

#include <cstring>
#include <stdexcept>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace rainfusion {

#define RF_DECLARE(ns)                                                              \
  namespace ns {                                                                    \
  template <typename T>                                                             \
  void block_sparse_attention_forward(const AttentionArgs<T>& args);                \
  }
RF_DECLARE(generic)
#ifdef RF_HAVE_AVX2
RF_DECLARE(avx2)
#endif
#ifdef RF_HAVE_AVX512
RF_DECLARE(avx512)
#endif
#undef RF_DECLARE

namespace {

bool cpu_has(Isa isa) {
  switch (isa) {
    case Isa::kGeneric:
      return true;
#if defined(RF_HAVE_AVX2) && (defined(__GNUC__) || defined(__clang__))
    case Isa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
#if defined(RF_HAVE_AVX512) && (defined(__GNUC__) || defined(__clang__))
    case Isa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
    default:
      return false;  // not built into this library
  }
}

}  // namespace

Isa best_isa() {
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2})
    if (cpu_has(isa)) return isa;
  return Isa::kGeneric;
}

Isa parse_isa(const char* name) {
  if (name == nullptr || *name == '\0') return best_isa();
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2, Isa::kGeneric}) {
    if (std::strcmp(name, isa_key(isa)) != 0) continue;
    if (!cpu_has(isa))
      throw std::invalid_argument(std::string("instruction set '") + name +
                                  "' is not available: this CPU or this build lacks it (available: " +
                                  available_isas() + ")");
    return isa;
  }
  throw std::invalid_argument(std::string("unknown instruction set '") + name + "'; expected one of: " +
                              available_isas());
}

const char* isa_key(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "generic";
  }
}

const char* isa_description(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "AVX-512F + FMA";
    case Isa::kAvx2: return "AVX2 + FMA";
    default: return "generic 128-bit vectors";
  }
}

std::string available_isas() {
  std::string names;
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2, Isa::kGeneric})
    if (cpu_has(isa)) names += std::string(names.empty() ? "" : ", ") + isa_key(isa);
  return names;
}

template <typename T>
void block_sparse_attention_forward(const AttentionArgs<T>& a, Isa isa) {
  switch (isa) {
#ifdef RF_HAVE_AVX512
    case Isa::kAvx512:
      return avx512::block_sparse_attention_forward(a);
#endif
#ifdef RF_HAVE_AVX2
    case Isa::kAvx2:
      return avx2::block_sparse_attention_forward(a);
#endif
    default:
      return generic::block_sparse_attention_forward(a);
  }
}

bool has_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

template void block_sparse_attention_forward<float>(const AttentionArgs<float>&, Isa);
template void block_sparse_attention_forward<double>(const AttentionArgs<double>&, Isa);
template void block_sparse_attention_forward<Half>(const AttentionArgs<Half>&, Isa);
template void block_sparse_attention_forward<BFloat16>(const AttentionArgs<BFloat16>&, Isa);

}  // namespace rainfusion
