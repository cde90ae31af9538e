"""Scratch: the Gluon sm_90 kernel against the Triton kernel (correctness and speed), Wan shapes."""
import torch
from triton.testing import do_bench

import rainfusion_core as rf
from rainfusion_core.backends.triton_backend import block_sparse_attention_triton as bsa
from rainfusion_core.prediction import predict_mask

predict = dict(sparsity=0.8, block_size=128, first_frame_sink=None, scale=None, share_batch_mask=False)
rows = []
for name, (b, h, f, hh, ww) in {"ragged": (2, 3, 3, 7, 11), "wan1.3b": (1, 12, 21, 30, 52), "wan14b": (1, 40, 21, 45, 80)}.items():
    layout = rf.VideoLayout(f, hh, ww)
    q, k, v = (torch.randn(b, h, layout.seq_len, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    order = rf.build_permutation(layout, "cuda").indices
    mask = predict_mask(q, k, layout, order, backend="triton", **predict)
    scale = 128 ** -0.5
    ref = bsa(q, k, v, mask, scale, order=order)
    got = bsa(q, k, v, mask, scale, order=order, gather_kv=False, kernel="gluon")
    err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
    line = f"{name}: rel err gluon vs triton {err:.2e}, max {(got.float()-ref.float()).abs().max().item():.2e}"
    if name != "ragged":
        t_tri = do_bench(lambda: bsa(q, k, v, mask, scale, order=order), warmup=25, rep=100, return_mode="median")
        t_cp = do_bench(lambda: bsa(q, k, v, mask, scale, order=order, gather_kv=False), warmup=25, rep=100, return_mode="median")
        t_glu = do_bench(lambda: bsa(q, k, v, mask, scale, order=order, gather_kv=False, kernel="gluon"), warmup=25, rep=100, return_mode="median")
        line += f" | triton gather {t_tri:.3f} ms, triton copies {t_cp:.3f} ms, gluon copies {t_glu:.3f} ms"
    print(line, flush=True)
    rows.append(line)
print("==== summary\n" + "\n".join(rows))
