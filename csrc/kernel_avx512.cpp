// The CPU kernel for AVX-512F + FMA (32 zmm registers: 4 rows x 4 vectors of accumulators).
// setup.py compiles this file with the instruction set's flags; see kernel_impl.inc.
#if defined(__x86_64__) || defined(_M_X64)
#define RF_ISA avx512
#define RF_VEC_BYTES 64
#define RF_QR 64
#define RF_RB 4
#define RF_JW_VECS 4
#define RF_DW_MAX_VECS 4
#include "kernel_impl.inc"
#endif
