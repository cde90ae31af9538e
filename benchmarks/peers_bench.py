"""Our Hopper kernel beside the kernels a user would pick instead, on the same RainFusion masks.

    python benchmarks/peers_bench.py [--shapes wan-1.3b,...] [--peers cudnn,flashinfer-fa3,ours,...] [--rounds 3]
    # needs an NVIDIA Hopper GPU

Per shape (batch 1, bf16, random q/k/v, the mask predicted at sparsity 0.8, all inputs already in
permuted order): dense cuDNN and dense FlashAttention-2 through SDPA; FlexAttention on the same mask,
compiled, with its default Triton kernels and with its FlashAttention-4 backend
(``kernel_options={"BACKEND": "FLASH"}``, needs the ``flash-attn-4`` package); FlashInfer's
``VariableBlockSparseAttentionWrapper`` (per-head masks; ``flashinfer-python``, its kernels compiled on
first use) with its FlashAttention-3 and FlashAttention-2 kernels, planned once outside the timing;
cuDNN's block-sparse attention (``nvidia-cudnn-frontend``, experimental; on sm_90 it takes 64-token
blocks, so the mask is given as 64-token blocks, :func:`bsa_metadata`; its FP8 variant takes only
a fixed number of whole blocks per row on sm_90 and so cannot express these masks);
our Hopper kernel alone (on the operands a call passes it, permuted k and v as they are:
``benchmarking.hopper_kernel_call``) and the whole ``rf.sparse_attention`` call (from model order). Every sparse peer's
output is compared with ours (largest difference printed), so a timing is never of a different mask.
A peer that cannot run prints one line saying why. Times are ``triton.testing.do_bench`` medians;
with ``--rounds N`` every call is timed N times, the calls in turn, and the median of the N is
reported, so slow drift of the GPU's clocks does not favour whichever ran first. Per shape a last
row gives the fastest peer's time over our kernel's (above 1: ours is faster). TFLOP/s count the
kept blocks for the sparse rows and every block for the dense ones.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import rainfusion_core as rf
from rainfusion_core.benchmarking import comma_choices, hopper_kernel_call, median_ms, require_hopper
from rainfusion_core.shapes import KERNEL_SHAPES, kernel_shape

SHAPES = {name: kernel_shape(name) for name in KERNEL_SHAPES}  # heads, head dim, layout


def _flex(qp, kp, vp, mask, scale, backend: str | None):
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention)
    flex_mask = mask.to_flex_block_mask()
    options = {"BACKEND": backend} if backend else None
    return lambda: compiled(qp, kp, vp, block_mask=flex_mask, scale=scale, kernel_options=options)


def _flashinfer(qp, kp, vp, mask, scale, backend: str):
    """FlashInfer's per-head block-sparse wrapper on our mask; planned here, once (host work, untimed)."""
    import flashinfer

    _, heads, seq, head_dim = qp.shape
    block = mask.block_size
    n_blocks = mask.dense.shape[-1]
    sizes = torch.full((heads, n_blocks), block, dtype=torch.int32, device=qp.device)
    sizes[:, -1] = seq - block * (n_blocks - 1)  # the last block holds what is left
    workspace = torch.empty(128 * 1024 * 1024, dtype=torch.uint8, device=qp.device)
    wrapper = flashinfer.sparse.VariableBlockSparseAttentionWrapper(workspace, backend=backend)
    wrapper.plan(mask.dense[0], sizes, sizes, heads, heads, head_dim, sm_scale=scale,
                 q_data_type=qp.dtype, kv_data_type=kp.dtype)
    q, k, v = qp[0], kp[0], vp[0]
    return lambda: wrapper.run(q, k, v)


def bsa_metadata(mask: rf.BlockMask, padded_q_len: int):
    """Our 128-token mask as cuDNN's block-sparse attention takes it on sm_90, in 64-token blocks:
    ``(q2k_block_index [B, H, NQ64, cap], q2k_block_nums [B, H, NQ64], block_sizes [NK64])``, int32.

    Each 128-row query block becomes two 64-row blocks with its list; each kept 128-key block ``j``
    becomes the 64-key blocks ``2j`` and ``2j + 1`` (the latter only where it exists), in ascending
    order; ``block_sizes`` shortens the last key block to what the sequence holds. q is padded to
    ``padded_q_len`` rows (a multiple of 64, which sm_90 needs); padded rows are dropped after.
    """
    n_q64, n_k64 = padded_q_len // 64, -(-mask.kv_len // 64)
    fine = mask.dense.repeat_interleave(2, dim=-1)[..., :n_k64].repeat_interleave(2, dim=2)[:, :, :n_q64]
    nums = fine.sum(-1, dtype=torch.int32)
    kept_first = torch.argsort((~fine).to(torch.int8), dim=-1, stable=True)  # kept ids first, each part ascending
    index = kept_first[..., :max(int(nums.max()), 1)].to(torch.int32).contiguous()
    sizes = torch.full((n_k64,), 64, dtype=torch.int32, device=mask.dense.device)
    sizes[-1] = mask.kv_len - 64 * (n_k64 - 1)
    return index, nums.contiguous(), sizes


def _cudnn_bsa(qp, kp, vp, mask, scale):
    """cuDNN's block-sparse attention (``nvidia-cudnn-frontend``, experimental; 64-token blocks on sm_90)
    on our mask (:func:`bsa_metadata`), q padded to a multiple of 64 rows; metadata made here, untimed."""
    from cudnn.block_sparse_attention import block_sparse_attention_forward

    seq = qp.shape[2]
    padded = -(-seq // 64) * 64
    q = F.pad(qp, (0, 0, 0, padded - seq)).contiguous()
    index, nums, sizes = bsa_metadata(mask, padded)

    def call():
        out = block_sparse_attention_forward(q, kp, vp, index, q2k_block_nums=nums, block_sizes=sizes,
                                             sparse_block_size=64, allow_empty_block_nums=True,
                                             softmax_scale=scale, layout="bhsd")["o_tensor"]
        return out[:, :, :seq]
    return call


PEERS = ("cudnn", "fa2", "flex", "flex-fa4", "flashinfer-fa3", "flashinfer-fa2", "cudnn-bsa", "ours", "whole")


def measure(name: str, peers=PEERS, rounds: int = 1) -> list[str]:
    heads, head_dim, layout = SHAPES[name]
    seq = layout.seq_len
    q, k, v = (torch.randn(1, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    perm = rf.build_permutation(layout, "cuda")
    qp, kp, vp = (perm.apply(x, 2).contiguous() for x in (q, k, v))
    mask = rf.predict_block_mask(qp, kp, layout, sparsity=0.8)
    density, scale = mask.token_density(), head_dim ** -0.5
    flops = 4 * heads * seq * seq * head_dim
    runs = [  # (key, what, fraction of blocks computed, SDPA backend to pin or None, build: -> the call to time)
        ("cudnn", "dense cuDNN (SDPA)", 1.0, SDPBackend.CUDNN_ATTENTION,
         lambda: lambda: F.scaled_dot_product_attention(q, k, v)),
        ("fa2", "dense FlashAttention-2 (SDPA)", 1.0, SDPBackend.FLASH_ATTENTION,
         lambda: lambda: F.scaled_dot_product_attention(q, k, v)),
        ("flex", "FlexAttention, Triton kernels", density, None, lambda: _flex(qp, kp, vp, mask, scale, None)),
        ("flex-fa4", "FlexAttention, FlashAttention-4 backend", density, None,
         lambda: _flex(qp, kp, vp, mask, scale, "FLASH")),
        ("flashinfer-fa3", "FlashInfer block-sparse, FA3 kernels", density, None,
         lambda: _flashinfer(qp, kp, vp, mask, scale, "fa3")),
        ("flashinfer-fa2", "FlashInfer block-sparse, FA2 kernels", density, None,
         lambda: _flashinfer(qp, kp, vp, mask, scale, "fa2")),
        ("cudnn-bsa", "cuDNN block-sparse attention (64-token blocks)", density, None,
         lambda: _cudnn_bsa(qp, kp, vp, mask, scale)),
        ("ours", "ours: Hopper kernel", density, None, lambda: hopper_kernel_call(qp, kp, vp, mask, scale)),
        ("whole", "ours: whole rf.sparse_attention", density, None,
         lambda: lambda: rf.sparse_attention(q, k, v, layout, backend="triton")),
    ]
    ours = hopper_kernel_call(qp, kp, vp, mask, scale)().clone()  # the kernel alone, on permuted k, v as they are
    rows, times, timed, failed = [], {}, [], {}
    print(f"== {name}: {heads} heads × d{head_dim}, {seq} tokens, mask density {density:.3f}", flush=True)
    for key, what, fraction, sdpa, build in runs:
        if key not in peers:
            continue
        try:
            with sdpa_kernel(sdpa) if sdpa is not None else contextlib.nullcontext():
                call = build()
                note = "" if sdpa is not None or key == "whole" else _difference(call(), ours)
                times[what] = [median_ms(call, "cuda", repeats=10)]
        except Exception as exc:  # a peer missing here (package, backend) is reported, not fatal
            reason = " ".join(str(exc).split())[:160] or type(exc).__name__
            failed[what] = f"| {name} | {what} | cannot run here: {type(exc).__name__}: {reason} | | |"
            print(failed[what], flush=True)
            continue
        timed.append((key, what, fraction, sdpa, call, note))
        print(f"   {what}: {times[what][0]:.2f} ms", flush=True)
    for _ in range(rounds - 1):  # every call again, in the same order: drift of the clocks hits all alike
        for _, what, _, sdpa, call, _ in timed:
            with sdpa_kernel(sdpa) if sdpa is not None else contextlib.nullcontext():
                times[what].append(median_ms(call, "cuda", repeats=10))
    ms = {what: statistics.median(times[what]) for _, what, *_ in timed}
    cudnn = ms.get("dense cuDNN (SDPA)")
    notes = {what: (fraction, note) for _, what, fraction, _, _, note in timed}
    for _, what, *_ in runs:  # in the table's order, the peers that could not run included
        if what in failed:
            rows.append(failed[what])
        elif what in notes:
            fraction, note = notes[what]
            versus = f"{cudnn / ms[what]:.2f}×" if cudnn else ""
            tflops = flops * fraction / ms[what] / 1e9
            rows.append(f"| {name} | {what} | {ms[what]:.2f} ms | {tflops:.0f} | {versus} |{note}")
    others = [ms[what] for key, what, *_ in timed if key not in ("ours", "whole")]
    if "ours: Hopper kernel" in ms and others:
        rows.append(f"| {name} | fastest peer's time / our kernel's | {min(others) / ms['ours: Hopper kernel']:.3f} "
                    f"(medians of {rounds} round{'s' if rounds > 1 else ''}) | | |")
    torch.cuda.empty_cache()
    return rows


def _difference(out: torch.Tensor, ours: torch.Tensor) -> str:
    """The largest absolute difference from our kernel's output (peers may return [H, S, D])."""
    return f" {(out.reshape(ours.shape).float() - ours.float()).abs().max().item():.1e} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of: {', '.join(SHAPES)}")
    parser.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated, of: {', '.join(PEERS)}")
    parser.add_argument("--rounds", type=int, default=1,
                        help="time every call this many times, in turn, and report the medians (default 1)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds: at least 1, got {args.rounds}")
    names = comma_choices(parser, "--shapes", args.shapes, SHAPES)
    peers = comma_choices(parser, "--peers", args.peers, PEERS)
    require_hopper(parser)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    rows = [row for name in names for row in measure(name, peers, args.rounds)]
    print("\n==== summary ====")
    print("| shape | what | time | TFLOP/s (kept blocks; dense: all) | × dense cuDNN | max abs difference from ours |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
