// The CPU kernel for any CPU: 128-bit vectors (SSE2 on x86-64, NEON on aarch64), no extra flags.
// setup.py compiles this file with the instruction set's flags; see kernel_impl.inc.
#define RF_ISA generic
#define RF_VEC_BYTES 16
#define RF_QR 64
#define RF_RB 4
#define RF_JW_VECS 2
#define RF_DW_MAX_VECS 2
#include "kernel_impl.inc"
