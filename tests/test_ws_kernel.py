"""The warp-specialised Hopper kernel (``backends/triton/hopper/attention.py``).

It is Gluon code for sm_90 only: the GPU tests need an NVIDIA Hopper GPU and
are skipped elsewhere. It must equal the portable Triton kernel
bit for bit (same tile order, same online-softmax arithmetic) and meet the
parity rule against the float64 golden. The refusals and the head-chunk rule
are checked everywhere.
"""
import pytest
import torch

import rainfusion_core as rf
from helpers import needs_hopper, random_dense, triton_device
from rainfusion_core.backends.triton import launch as triton_launch
from rainfusion_core.backends.triton.launch import TritonOptions, block_sparse_attention_triton
from rainfusion_core.parity import parity

DEVICE = triton_device()
# tools/gpu_suite.py runs these in one worker, one after another: some take gigabytes of GPU memory.
pytestmark = pytest.mark.xdist_group("gpu_heavy")
HOPPER = DEVICE == "cuda" and torch.cuda.get_device_capability() == (9, 0)
WS, PORTABLE = TritonOptions(kernel="ws"), TritonOptions(kernel="triton")
ON_HOPPER = needs_hopper

# name: (batch, q heads, kv heads, frames, height, width, text tokens)
LAYOUTS = {
    "ragged-7x11": (2, 4, 2, 3, 7, 11, 0),  # 231 tokens: a partial last block, GQA 2
    "gqa4-text": (1, 4, 1, 2, 9, 15, 37),  # text tokens, every q head on one kv head
    "tiled-16x24": (1, 6, 6, 3, 16, 24, 0),  # whole blocks; 6 kv heads: two chunks when chunked
}


def _problem(name, dtype, *, bsnd=False, head_dim=128):
    batch, heads, kv_heads, frames, height, width, text = LAYOUTS[name]
    layout = rf.VideoLayout(frames, height, width, text_len=text)
    seq = layout.seq_len
    shape = lambda h: (batch, seq, h, head_dim) if bsnd else (batch, h, seq, head_dim)  # noqa: E731
    q, k, v = (torch.randn(shape(h), device=DEVICE, dtype=dtype) for h in (heads, kv_heads, kv_heads))
    if bsnd:
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, S, D] views with BSND strides
    nb = -(-seq // 128)
    dense = random_dense(batch, heads, nb, nb, density=0.4, empty_rows=[(0, 0, 1), (batch - 1, heads - 1, 0)])
    mask = rf.BlockMask.from_dense(dense.to(DEVICE), block_size=128, q_len=seq, kv_len=seq)
    return layout, q, k, v, mask


@ON_HOPPER
@pytest.mark.parametrize("head_dim", [64, 128], ids=["d64", "d128"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("bsnd", [False, True], ids=["bnsd", "bsnd"])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_ws_equals_triton_kernel_through_the_permutation(name, bsnd, dtype, head_dim):
    layout, q, k, v, mask = _problem(name, dtype, bsnd=bsnd, head_dim=head_dim)
    order = rf.build_permutation(layout, DEVICE).indices
    want = block_sparse_attention_triton(q, k, v, mask, 0.09, order=order, options=PORTABLE)
    got = block_sparse_attention_triton(q, k, v, mask, 0.09, order=order, options=WS)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert (got[0, 0, order[128:256]] == 0).all()  # mask row 1 of (0, 0) keeps nothing: its rows are zero


@ON_HOPPER
@pytest.mark.parametrize("head_dim", [64, 128], ids=["d64", "d128"])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_ws_in_several_head_chunks_equals_triton_kernel(monkeypatch, name, head_dim):
    # Small calls copy k and v in one chunk; long ones in several, each its own launch on head slices.
    monkeypatch.setattr(triton_launch, "ONE_CHUNK_BYTES", 0)
    monkeypatch.setattr(triton_launch, "_PLANS", {})
    layout, q, k, v, mask = _problem(name, torch.bfloat16, head_dim=head_dim)
    order = rf.build_permutation(layout, DEVICE).indices
    plan = triton_launch.plan_launch(q, k, v, q, mask, order, WS)
    assert plan.kernel == "ws" and (plan.head_step < k.shape[1] or k.shape[1] == 1), plan
    want = block_sparse_attention_triton(q, k, v, mask, 0.09, order=order, options=PORTABLE)
    got = block_sparse_attention_triton(q, k, v, mask, 0.09, order=order, options=WS)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@ON_HOPPER
@pytest.mark.parametrize("chunks", [False, True], ids=["one-chunk", "head-chunks"])
@pytest.mark.parametrize("head_dim", [64, 128], ids=["d64", "d128"])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_ws_log_sum_exp_equals_triton_kernel(monkeypatch, name, head_dim, chunks):
    """The Hopper kernel writes each row's log-sum-exp where the portable one does, bit for bit (-inf rows too)."""
    if chunks:
        monkeypatch.setattr(triton_launch, "ONE_CHUNK_BYTES", 0)
        monkeypatch.setattr(triton_launch, "_PLANS", {})
    layout, q, k, v, mask = _problem(name, torch.bfloat16, bsnd=True, head_dim=head_dim)
    order = rf.build_permutation(layout, DEVICE).indices
    lses = [torch.full(q.shape[:3], 7.0, device=DEVICE) for _ in range(2)]
    want = block_sparse_attention_triton(q, k, v, mask, 0.09, order=order, options=PORTABLE, lse=lses[0])
    got = block_sparse_attention_triton(q, k, v, mask, 0.09, order=order, options=WS, lse=lses[1])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(lses[1], lses[0], rtol=0, atol=0)
    assert (lses[1][0, 0, order[128:256]] == float("-inf")).all()  # mask row 1 of (0, 0) keeps nothing


@ON_HOPPER
@pytest.mark.parametrize("q_len, kv_len", [(640, 300), (300, 640)], ids=["more-queries", "more-keys"])
@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_ws_with_more_queries_than_keys_or_fewer(q_len, kv_len, precision):
    """Permuted inputs of different lengths with strided k and v (a ring step's shapes): q's rows are read through
    an identity as long as q, k's and v's gathered through one as long as them."""
    torch.manual_seed(0)
    q = torch.randn(1, q_len, 4, 128, device=DEVICE, dtype=torch.bfloat16).transpose(1, 2)
    k, v = (torch.randn(1, kv_len, 2, 128, device=DEVICE, dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
    dense = random_dense(1, 4, -(-q_len // 128), -(-kv_len // 128), density=0.6)
    mask = rf.BlockMask.from_dense(dense.to(DEVICE), block_size=128, q_len=q_len, kv_len=kv_len)
    if precision == "fp8":
        got = block_sparse_attention_triton(q, k, v, mask, 0.09, options=WS, precision="fp8")
        want = rf.get_backend("torch").forward(q, k, v, mask, 0.09)
        assert torch.nn.functional.cosine_similarity(got.flatten().float(), want.flatten().float(), dim=0) > 0.99
        return
    lses = [torch.empty(q.shape[:3], device=DEVICE) for _ in range(2)]
    want = block_sparse_attention_triton(q, k, v, mask, 0.09, options=PORTABLE, lse=lses[0])
    got = block_sparse_attention_triton(q, k, v, mask, 0.09, options=WS, lse=lses[1])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(lses[1], lses[0], rtol=0, atol=0)


@ON_HOPPER
@pytest.mark.parametrize("kv_layout", ["bsnd", "expanded-heads", "odd-stride"])
def test_ws_reads_permuted_kv_in_place_or_through_a_copy_alike(kv_layout):
    # permuted k and v that TMA can describe are read where they are; a stride-0 view (k expanded over heads)
    # or rows not whole 16 bytes apart go through the launcher's copy: the output is the portable kernel's
    _, q, k, v, mask = _problem("ragged-7x11", torch.bfloat16)
    if kv_layout == "bsnd":
        k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (k, v))
    elif kv_layout == "expanded-heads":
        k, v = (x[:, :1].expand_as(x) for x in (k, v))
    else:
        k, v = (torch.nn.functional.pad(x, (0, 4))[..., :128] for x in (k, v))
    want = block_sparse_attention_triton(q, k, v, mask, 0.09, options=PORTABLE)
    got = block_sparse_attention_triton(q, k, v, mask, 0.09, options=WS)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@ON_HOPPER
def test_ws_with_a_batch_shared_mask():
    # share_batch_mask=True gives kv_counts / kv_indices expanded over the batch (stride 0)
    layout, q, k, v, mask = _problem("ragged-7x11", torch.bfloat16)
    shared = rf.BlockMask.from_dense(mask.dense[:1].expand_as(mask.dense), block_size=128, q_len=q.shape[2],
                                     kv_len=k.shape[2])
    shared = rf.BlockMask(shared.dense, shared.kv_counts[:1].expand_as(shared.kv_counts),
                          shared.kv_indices[:1].expand_as(shared.kv_indices), 128, q.shape[2], k.shape[2])
    assert shared.kv_counts.stride(0) == 0
    order = rf.build_permutation(layout, DEVICE).indices
    want = block_sparse_attention_triton(q, k, v, shared, 0.09, order=order, options=PORTABLE)
    got = block_sparse_attention_triton(q, k, v, shared, 0.09, order=order, options=WS)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@ON_HOPPER
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous-kv", "strided-kv"])
def test_ws_on_permuted_tensors(contiguous):
    _, q, k, v, mask = _problem("gqa4-text", torch.bfloat16, bsnd=not contiguous)
    want = block_sparse_attention_triton(q, k, v, mask, 0.09, options=PORTABLE)
    got = block_sparse_attention_triton(q, k, v, mask, 0.09, options=WS)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@ON_HOPPER
@pytest.mark.parametrize("head_dim", [64, 128], ids=["d64", "d128"])
@pytest.mark.parametrize("inputs", ["model-order", "permuted"])
def test_a_ragged_last_tile_never_reads_the_next_heads_values(inputs, head_dim):
    # 231 tokens: the last key tile holds 103 keys and 25 rows past the end. The kernel reads k and v through
    # 4-D descriptors, so those 25 rows are TMA's zeros, never kv head 1's first rows (in a copy, or in the
    # caller's own permuted tensors), whose inf would turn head 0's zero probabilities into NaN (0 * inf).
    layout, q, k, v, _ = _problem("ragged-7x11", torch.bfloat16, head_dim=head_dim)
    dense = random_dense(2, 4, 2, 2, density=0.5)
    dense[..., -1] = True  # every row keeps the ragged last block
    mask = rf.BlockMask.from_dense(dense.to(DEVICE), block_size=128, q_len=layout.seq_len, kv_len=layout.seq_len)
    order = rf.build_permutation(layout, DEVICE).indices if inputs == "model-order" else None
    v[:, 1, 0 if order is None else order[0]] = float("inf")  # kv head 1's first row in the kernel's order
    got = block_sparse_attention_triton(q, k, v, mask, 0.09, order=order, options=WS)
    want = block_sparse_attention_triton(q, k, v, mask, 0.09, order=order, options=PORTABLE)
    assert got[:, :2].isfinite().all()  # q heads 0 and 1 read kv head 0 only
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@ON_HOPPER
@pytest.mark.parametrize("head_dim", [64, 128], ids=["d64", "d128"])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_ws_meets_the_parity_rule(name, head_dim):
    layout, q, k, v, mask = _problem(name, torch.bfloat16, head_dim=head_dim)
    scale = head_dim ** -0.5
    golden = rf.get_backend("torch").forward(q.double().cpu(), k.double().cpu(), v.double().cpu(), mask.to("cpu"),
                                             scale)
    low = rf.get_backend("torch").forward(q, k, v, mask, scale)
    got = block_sparse_attention_triton(q, k, v, mask, scale, options=WS)
    result = parity(got, golden.to(DEVICE), low)
    assert result.passed, result


@ON_HOPPER
def test_ws_is_the_default_on_hopper_and_its_copies_stay_small():
    layout, q, k, v, mask = _problem("tiled-16x24", torch.bfloat16)
    order = rf.build_permutation(layout, DEVICE).indices
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = block_sparse_attention_triton(q, k, v, mask, 0.09, order=order)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before - out.numel() * out.element_size()
    qkv = sum(x.numel() * x.element_size() for x in (q, k, v))
    kv = qkv - q.numel() * q.element_size()
    # the k and v copies and nothing else: all heads at once when they are small, else a third of q + k + v
    assert extra <= (kv if kv <= triton_launch.ONE_CHUNK_BYTES else qkv / 3), (extra, qkv)
    torch.testing.assert_close(out, block_sparse_attention_triton(q, k, v, mask, 0.09, order=order, options=WS),
                               rtol=0, atol=0)


@ON_HOPPER
def test_ws_refuses_an_output_with_a_strided_head_dim_and_auto_uses_the_triton_kernel():
    layout, q, k, v, mask = _problem("gqa4-text", torch.bfloat16)
    order = rf.build_permutation(layout, DEVICE).indices
    out = torch.empty(*q.shape[:-1], 2 * q.shape[-1], device=DEVICE, dtype=q.dtype)[..., ::2]
    with pytest.raises(ValueError, match="q and out need a unit stride along the head dim"):
        block_sparse_attention_triton(q, k, v, mask, 0.09, order=order, out=out, options=WS)
    block_sparse_attention_triton(q, k, v, mask, 0.09, order=order, out=out)
    torch.testing.assert_close(out, block_sparse_attention_triton(q, k, v, mask, 0.09, order=order, options=WS),
                               rtol=0, atol=0)


@pytest.mark.parametrize("q_heads, kv_heads", [(12, 12), (40, 40), (6, 6), (8, 2), (8, 1), (1, 1), (3, 3)])
def test_head_chunks_keep_copies_within_a_third_of_qkv(q_heads, kv_heads):
    step = triton_launch._ws_head_chunks(q_heads, kv_heads)
    assert 1 <= step <= kv_heads
    copies = 2 * step  # k and v rows of one chunk, in units of one head's [S, D]
    assert copies * 3 <= q_heads + 2 * kv_heads or step == 1, (step, copies)


def test_small_copies_are_made_in_one_chunk():
    head_bytes = 17776 * 64 * 2  # CogVideoX-5B: 48 heads of 17776 x 64 bf16, 218 MB of k and v copies
    assert triton_launch._ws_head_chunks(48, 48, head_bytes) == 48
    big = 75600 * 128 * 2  # Wan2.1-14B: 40 heads, 1.5 GB of copies: chunks of a third of q + k + v
    assert triton_launch._ws_head_chunks(40, 40, big) == triton_launch._ws_head_chunks(40, 40) == 20
    assert triton_launch._ws_head_chunks(40, 40, big) * 2 * big > triton_launch.ONE_CHUNK_BYTES


def test_explicit_ws_refuses_what_it_cannot_run():
    q = torch.randn(1, 2, 256, 96, device=DEVICE, dtype=torch.float16)
    mask = rf.BlockMask.from_dense(torch.ones(1, 2, 2, 2, dtype=torch.bool, device=DEVICE), block_size=128,
                                   q_len=256, kv_len=256)
    want = ("head dim 64 or 128" if HOPPER else
            "Triton interpreter" if DEVICE == "cpu" else "sm_90")
    with pytest.raises(ValueError, match=f"kernel='ws' cannot run this call: .*{want}"):
        block_sparse_attention_triton(q, q, q, mask, 0.1, options=WS)
    with pytest.raises(ValueError, match="kernel must be 'auto', 'ws' or 'triton', got 'gluon'"):
        TritonOptions(kernel="gluon")


HOSTILE = """
import torch, rainfusion_core as rf
from rainfusion_core.backends.triton.launch import TritonOptions, block_sparse_attention_triton
torch.manual_seed(0)
layout = rf.VideoLayout(3, 7, 11)  # 231 tokens: a ragged last block
seq = layout.seq_len
q, k, v = (torch.randn(2, 4, seq, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
order = rf.build_permutation(layout, "cuda").indices
for field, value in (("kv_indices", -100000), ("kv_indices", 2**31 - 1), ("kv_indices", 1), ("kv_counts", 1000),
                     ("kv_counts", -3)):
    mask = rf.BlockMask.from_dense(torch.ones(2, 4, 2, 2, dtype=torch.bool, device="cuda"), block_size=128,
                                   q_len=seq, kv_len=seq)
    getattr(mask, field).fill_(value)
    for kernel in ("ws", "triton"):
        out = block_sparse_attention_triton(q, k, v, mask, 0.09, order=order, options=TritonOptions(kernel=kernel))
        torch.cuda.synchronize()  # an out-of-bounds access faults here
        assert torch.isfinite(out).all(), (field, value, kernel)
print("HOSTILE-OK")
"""


@ON_HOPPER
def test_ws_and_triton_kernels_stay_inside_their_inputs_for_an_edited_mask():
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", HOSTILE], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "HOSTILE-OK" in run.stdout, run.stderr[-3000:]


@pytest.mark.parametrize("head_dim, tokens, kernel", [(64, 6144, "triton"), (64, 17776, "ws"), (128, 4608, "ws")])
def test_dispatch_rule_per_head_dim(monkeypatch, head_dim, tokens, kernel):
    """Where the Hopper kernel can run, 'auto' takes it from the head dim's min_tokens on (TUNING);
    an explicit kernel='ws' takes it at any length. Checked on any machine: the capability is faked."""
    monkeypatch.setattr(triton_launch, "_ws_unavailable_reason", lambda q, out, block: None)
    q = torch.empty(1, 2, tokens, head_dim)
    mask = rf.BlockMask.stand_in(1, 2, tokens, tokens, 128, "cpu")
    assert triton_launch._make_plan(q, q, q, q, mask, None, TritonOptions()).kernel == kernel
    assert triton_launch._make_plan(q, q, q, q, mask, None, WS).kernel == "ws"


@pytest.mark.parametrize("case, copies", [("ragged", False), ("bsnd", False), ("odd-stride", True),
                                           ("odd-start", True), ("expanded", True), ("model-order", True)])
def test_permuted_inputs_skip_the_copy_where_tma_can_read_them(monkeypatch, case, copies):
    # the kernel reads k and v through 4-D descriptors (zeros past S per head): any length, any strides
    # that are whole 16 bytes; anything else, or inputs in model order, is copied
    monkeypatch.setattr(triton_launch, "_ws_unavailable_reason", lambda q, out, block: None)
    q = torch.empty(1, 2, 231, 128, dtype=torch.bfloat16)
    kv = {"ragged": q, "bsnd": torch.empty(1, 231, 2, 128, dtype=torch.bfloat16).transpose(1, 2),
          "odd-stride": torch.empty(1, 2, 231, 132, dtype=torch.bfloat16)[..., :128],
          "odd-start": torch.empty(2 * 231 * 128 + 1, dtype=torch.bfloat16)[1:].view(1, 2, 231, 128), "model-order": q,
          "expanded": torch.empty(1, 1, 231, 128, dtype=torch.bfloat16).expand(1, 2, 231, 128)}[case]
    order = torch.arange(231) if case == "model-order" else None
    mask = rf.BlockMask.stand_in(1, 2, 231, 231, 128, "cpu")
    plan = triton_launch._make_plan(q, kv, kv, q, mask, order, WS)
    assert plan.kernel == "ws" and (plan.head_step > 0) == copies, plan


def test_the_hopper_launch_refuses_keys_tma_cannot_read():
    pytest.importorskip("triton.experimental.gluon")
    from rainfusion_core.backends.triton.hopper import attention as ws

    q = torch.zeros(1, 1, 200, 64, dtype=torch.bfloat16)
    counts, indices = torch.ones(1, 1, 2, dtype=torch.int32), torch.zeros(1, 1, 2, 2, dtype=torch.int32)
    odd = torch.zeros(1, 1, 200, 68, dtype=torch.bfloat16)[..., :64]  # rows 136 bytes apart
    for k, v, name in ((odd, q, "k"), (q, odd, "v")):
        with pytest.raises(ValueError, match=rf"{name}: TMA needs .*16-byte aligned strides .*\(13600, 13600, 68, 1\)"):
            ws.launch(q, k, v, torch.empty_like(q), counts, indices, torch.arange(200), 0.1)
    shifted = torch.zeros(200 * 64 + 1, dtype=torch.bfloat16)[1:].view(1, 1, 200, 64)  # start 2 bytes off
    expanded = torch.zeros(1, 1, 1, 64, dtype=torch.bfloat16).expand(1, 1, 200, 64)  # stride 0 along S
    for k, match in ((shifted, "at offset 2 from 16 bytes"), (expanded, r"strides \(64, 64, 0, 1\)")):
        with pytest.raises(ValueError, match=f"k: TMA needs .*{match}"):
            ws.launch(q, k, q, torch.empty_like(q), counts, indices, torch.arange(200), 0.1)


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_the_kernel_benchmarks_time_what_the_call_passes_the_kernel(monkeypatch, precision):
    # benchmarking.hopper_kernel_operands must give the kernel what _run_ws gives it, or the kernel rows
    # of the benchmarks would time other operands than a call's
    pytest.importorskip("triton.experimental.gluon")
    from rainfusion_core.backends.triton.hopper import attention as ws
    from rainfusion_core.benchmarking import hopper_kernel_operands

    seen = []
    monkeypatch.setattr(ws, "launch", lambda q, k, v, *args, **kwargs: seen.append((k, v, args, kwargs)))
    q, k, v = (torch.randn(1, 2, 200, 64, device=DEVICE, dtype=torch.float16) for _ in range(3))
    mask = rf.BlockMask.from_dense(torch.ones(1, 2, 2, 2, dtype=torch.bool, device=DEVICE), block_size=128,
                                   q_len=200, kv_len=200)
    monkeypatch.setattr(triton_launch, "_ws_unavailable_reason", lambda q, out, block: None)
    plan = (triton_launch._make_fp8_plan if precision == "fp8" else triton_launch._make_plan)(
        *((q, q, mask, WS) if precision == "fp8" else (q, k, v, q, mask, None, WS)))
    triton_launch._run_ws(plan, q, k, v, mask, 0.1, None, torch.empty_like(q))
    (k_call, v_call, args, kwargs), = seen
    k_op, v_op, extra = hopper_kernel_operands(k, v, precision)
    assert torch.equal(k_call.float(), k_op.float()) and torch.equal(v_call.float(), v_op.float())
    if precision == "fp8":  # the scales, passed positionally by the call
        assert torch.equal(args[-2], extra["k_descale"]) and torch.equal(args[-1], extra["v_descale"])
    else:  # permuted inputs TMA can read go to the kernel as they are
        assert extra == {} and set(kwargs) == {"lse"} and k_call is k and v_call is v


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
@pytest.mark.parametrize("through_order", [False, True], ids=["permuted", "model-order"])
def test_the_launcher_passes_its_own_checks_with_what_the_call_makes(monkeypatch, precision, through_order):
    # _run_ws through the real hopper launch, the kernel itself stubbed (no GPU here): the operands a call makes
    # (the 16-bit copies or k/v as they are, FP8's quantize_kv output) meet the launch's checks, and the kernel
    # gets 4-D k (and 16-bit v) descriptors of the keys' length, GQA's group and the mask's block count
    pytest.importorskip("triton.experimental.gluon")
    from rainfusion_core.backends.triton.hopper import attention as ws

    launches = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((grid, args, kwargs))

    monkeypatch.setattr(ws, "block_sparse_attention_fwd_ws", Kernel())
    monkeypatch.setattr(triton_launch, "_ws_unavailable_reason", lambda q, out, block: None)
    q = torch.randn(1, 4, 200, 64, device=DEVICE, dtype=torch.float16)
    k, v = (torch.randn(1, 2, 200, 64, device=DEVICE, dtype=torch.float16) for _ in range(2))
    mask = rf.BlockMask.from_dense(torch.ones(1, 4, 2, 2, dtype=torch.bool, device=DEVICE), block_size=128,
                                   q_len=200, kv_len=200)
    order = torch.randperm(200, device=DEVICE) if through_order else None
    plan = (triton_launch._make_fp8_plan(q, q, mask, WS) if precision == "fp8"
            else triton_launch._make_plan(q, k, v, q, mask, order, WS))
    triton_launch._run_ws(plan, q, k, v, mask, 0.1, order, torch.empty_like(q))
    (grid, args, kwargs), = launches
    desc_k = args[2]
    assert grid == (2, 4) and kwargs["GROUP"] == 2 and kwargs["FP8"] == (precision == "fp8")
    assert list(desc_k.shape) == [1, 2, 200, 64] and list(desc_k.block_shape) == [1, 1, 128, 64]
    assert args[-3:-1] == (200, 2)  # kv_len, n_blocks
    if precision == "bf16":
        assert list(args[3].shape) == [1, 2, 200, 64] and (args[3].base is v) == (not through_order)


# --------------------------------------------------------------------------- FP8 (rainfusion_core.precision)
@ON_HOPPER
@pytest.mark.parametrize("head_dim", [64, 128], ids=["d64", "d128"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("bsnd", [False, True], ids=["bnsd", "bsnd"])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_fp8_kernel_meets_the_fp8_rule_through_the_permutation(name, bsnd, dtype, head_dim):
    from rainfusion_core.backends.torch_backend import masked_attention
    from rainfusion_core.fp8 import fp8_reference_attention

    layout, q, k, v, mask = _problem(name, dtype, bsnd=bsnd, head_dim=head_dim)
    order = rf.build_permutation(layout, DEVICE).indices
    got = block_sparse_attention_triton(q, k, v, mask, 0.09, order=order, precision="fp8")
    permuted = [x.index_select(2, order).cpu() for x in (q, k, v, got)]
    golden = masked_attention(*(x.double() for x in permuted[:3]), mask.to("cpu"), 0.09)
    reference = fp8_reference_attention(*permuted[:3], mask.to("cpu"), 0.09)
    result = parity(permuted[3], golden, reference)
    assert result.passed, result
    assert (got[0, 0, order[128:256]] == 0).all()  # mask row 1 of (0, 0) keeps nothing: its rows are zero


@ON_HOPPER
def test_fp8_conformance_kit_on_hopper():
    from rainfusion_core.testing import check_backend

    report = check_backend("triton", device="cuda", dtypes=[torch.bfloat16, torch.float16],
                                      precision="fp8")
    assert report.passed, report.table()
    assert sum(r.verdict == "pass" for r in report.rows) >= 20, report.table()


@ON_HOPPER
def test_fp8_sparse_attention_is_close_to_bf16_and_captures_in_a_cuda_graph():
    layout = rf.VideoLayout(5, 16, 24, text_len=40)
    from rainfusion_core.synthetic import video_dit_qkv

    q, k, v = video_dit_qkv(layout, 4, 128, device=DEVICE, dtype=torch.bfloat16, seed=0)
    bf16 = rf.sparse_attention(q, k, v, layout)
    fp8 = rf.sparse_attention(q, k, v, layout, precision="fp8")
    assert float(torch.nn.functional.cosine_similarity(fp8.flatten().float(), bf16.flatten().float(), dim=0)) > 0.999
    rf.sparse_attention(q, k, v, layout, precision="fp8")  # warm caches before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = rf.sparse_attention(q, k, v, layout, precision="fp8")
    graph.replay()
    torch.testing.assert_close(captured, fp8, rtol=0, atol=0)


@ON_HOPPER
def test_fp8_refusals_on_hopper():
    _, q, k, v, mask = _problem("ragged-7x11", torch.float32)
    with pytest.raises(rf.UnsupportedInputError, match="in fp8, dtype torch.float32 is not supported \\(float16, bfloat16 are\\)"):
        rf.block_sparse_attention(q, k, v, mask, backend="triton", precision="fp8")
    _, q, k, v, mask = _problem("ragged-7x11", torch.bfloat16)
    with pytest.raises(ValueError, match="kernel='triton' names the portable kernel"):
        block_sparse_attention_triton(q, k, v, mask, 0.1, options=PORTABLE, precision="fp8")


@ON_HOPPER
@pytest.mark.parametrize("precision", ["bf16", "fp8"])
@pytest.mark.parametrize("head_dim", [64, 128], ids=["d64", "d128"])
def test_skipping_unit_rescales_changes_no_bit_and_keeps_nan(monkeypatch, head_dim, precision):
    # Schedule.rescale_skip: a warp skips O *= alpha when every alpha of its rows is exactly 1
    import dataclasses

    from rainfusion_core.backends.triton.hopper import attention as ws

    layout, q, k, v, _ = _problem("tiled-16x24", torch.bfloat16, head_dim=head_dim)
    q[0, 2, 300, 7] = float("nan")  # one poisoned row: its alphas are NaN, never 1
    dense = random_dense(1, 6, 9, 9, density=0.5)
    dense[..., 0] = True  # every row keeps a block: the poisoned row's output is NaN, not zero
    mask = rf.BlockMask.from_dense(dense.to(DEVICE), block_size=128, q_len=layout.seq_len, kv_len=layout.seq_len)
    order = rf.build_permutation(layout, DEVICE).indices
    key, outs = (precision == "fp8", head_dim), {}
    for skip in (False, True):
        monkeypatch.setitem(ws.SCHEDULES, key, dataclasses.replace(ws.SCHEDULES[key], rescale_skip=skip))
        outs[skip] = block_sparse_attention_triton(q, k, v, mask, 0.09, order=order, options=WS, precision=precision)
    torch.testing.assert_close(outs[True], outs[False], rtol=0, atol=0, equal_nan=True)
    nan_rows = outs[True].isnan().any(-1)
    assert bool(nan_rows[0, 2, 300]) and int(nan_rows.sum()) == 1, int(nan_rows.sum())


# --------------------------------------------------------------------------- compiled for sm_90a on any machine
def test_fp8_p_permutation_in_the_kernel_is_the_key_order_of_v():
    pytest.importorskip("triton.experimental.gluon")
    from rainfusion_core.backends.triton.hopper import attention as ws
    from rainfusion_core.backends.triton.quantize import KEY_BITS

    assert ws.P_KEY_DIMS == tuple([0, 1] + [2 + (4 - bit) for bit in KEY_BITS])  # v8t's key order
    assert f"gl.permute(p, {list(ws.P_KEY_DIMS)})" in ws._p_operand.src  # spelled out in the kernel


def test_every_supported_head_dim_has_a_schedule_in_both_precisions():
    pytest.importorskip("triton")
    from rainfusion_core.backends.triton.hopper import attention as ws

    assert set(ws.SCHEDULES) == {(fp8, d) for fp8 in (False, True) for d in ws.SUPPORTED_HEAD_DIMS}
    assert all(s.poly_every in (0, 2, 4) for s in ws.SCHEDULES.values()), ws.SCHEDULES


@pytest.mark.parametrize("build", ["bf16", "fp8", "lse"])
@pytest.mark.parametrize("head_dim", [64, 128], ids=["d64", "d128"])
def test_hopper_kernel_compiles_to_its_tensor_core_instructions(head_dim, build):
    # Where no Hopper GPU is present this is the check that the Gluon code still builds for one.
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    tool = Path(__file__).resolve().parents[1] / "tools" / "compile_hopper_kernel.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a real compile, not the interpreter
    fp8 = build == "fp8"
    args = [sys.executable, str(tool), "--head-dim", str(head_dim), "--json"] + ({"fp8": ["--fp8"], "lse": ["--lse"]}
                                                                                   .get(build, []))
    run = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    if run.returncode == 3:  # this Triton cannot compile Gluon ahead of time, or ships no cuobjdump
        pytest.skip(run.stdout.strip().splitlines()[-1])
    assert run.returncode == 0, run.stderr[-3000:]
    counts = json.loads(run.stdout.strip().splitlines()[-1])
    wanted, other = ("QGMMA", "HGMMA") if fp8 else ("HGMMA", "QGMMA")
    assert counts[wanted] > 0 and counts[other] == 0, counts
    assert 0 < counts["LOOP"] < 2000, counts  # the consumer's loop over the kept tiles was found
    assert counts["LDL"] == 0 and counts["STL"] == 0, counts  # no spills
    from rainfusion_core.backends.triton.hopper import attention as ws
    if ws.SCHEDULES[fp8, head_dim].late_wait:  # each consumer's softmax of a whole tile runs under its P V
        assert counts["EX2_UNDER_PV"] >= 2 * 64, counts
    else:  # without it the compiler moves the wait for P V above the softmax: the schedule reached the kernel
        assert counts["EX2_UNDER_PV"] == 0, counts
    # the joint release frees the k slot after P V's wait, beside the v slot: no barrier within the softmax
    assert (counts["BAR_UNDER_SOFTMAX"] == 0) == ws.SCHEDULES[fp8, head_dim].joint_release, counts


@ON_HOPPER
def test_exp2_polynomial_is_close_to_exp2_and_zero_for_masked_keys():
    # Schedule.poly_every computes one in two or four of P's exponentials with _exp2's polynomial
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    from rainfusion_core.backends.triton.hopper import attention as ws

    @gluon.jit
    def exp2_kernel(X, Y, EVERY: gl.constexpr):
        layout: gl.constexpr = gl.BlockedLayout([8], [32], [4], [0])
        offs = gl.arange(0, 1024, layout=layout)
        gl.store(Y + offs, ws._exp2(gl.load(X + offs), EVERY))

    x = torch.cat([-torch.rand(1000, device="cuda") * 130,
                   torch.tensor([0.0, -0.5, -0.49999, -125.0, -125.6, -126.0, -1e-8, float("-inf")], device="cuda"),
                   torch.linspace(0, 8, 8, device="cuda"),  # FP8 shifts the exponent up by log2(P_MULT) = 8
                   torch.full((8,), float("nan"), device="cuda")])  # NaN scores (NaN q or k), one thread's 8 values
    want = torch.exp2(x.double())
    for every in (2, 4):
        y = torch.empty_like(x)
        exp2_kernel[(1,)](x, y, every, num_warps=4)
        assert bool(torch.isnan(y[-8:]).all()), y[-8:]  # NaN on both paths: every lane of two packs of four
        got, ref, finite = y[:-8].double(), want[:-8], x[:-8]
        normal = finite >= -124  # results of at least 2**-124: normal floats on both paths
        assert float((got[normal] / ref[normal] - 1).abs().max()) < 1e-4
        # below, and for masked keys (-inf): 0 (flushed) or at most the polynomial's floor, 2**-125
        assert float(got[~normal].max()) <= 2.0 ** -124 and float(got.min()) >= 0.0
