"""Run the Triton kernel a few times at the Wan2.1-1.3B shape, for a profiler to capture.

    ncu --kernel-name regex:block_sparse --launch-skip 2 --launch-count 1 \\
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section Occupancy \\
        python benchmarks/triton_profile.py
"""
import torch

import rainfusion_core as rf
from rainfusion_core.backends.triton.launch import block_sparse_attention_triton
from rainfusion_core.shapes import REFERENCE_HEAD_DIM, REFERENCE_SHAPES

batch, heads, frames, height, width, _ = REFERENCE_SHAPES["wan1.3b"]
layout = rf.VideoLayout(frames, height, width)
q, k, v = (torch.randn(batch, heads, layout.seq_len, REFERENCE_HEAD_DIM, device="cuda", dtype=torch.bfloat16)
           for _ in range(3))
mask = rf.predict_block_mask(q, k, layout, sparsity=0.8)
for _ in range(4):
    block_sparse_attention_triton(q, k, v, mask, 128 ** -0.5)
torch.cuda.synchronize()
print(f"done, density {mask.density:.3f}")
