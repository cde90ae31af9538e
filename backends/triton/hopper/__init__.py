"""Kernels for NVIDIA Hopper (sm_90) GPUs only; imported when one runs."""
