"""Ring attention with RainFusion2.0 masks (``rainfusion_core.ring``): R CPU processes (gloo) against one process."""
import numpy
import pytest
import torch

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("needs torch.distributed with gloo", allow_module_level=True)

import rainfusion_core as rf  # noqa: E402
from rainfusion_core.ring import RingPlan, ring_sparse_attention  # noqa: E402
from helpers import needs_cpp, needs_cuda  # noqa: E402
from ranks import run_ranks  # noqa: E402

# (name, layout, heads, kv heads, block size, held, padded text positions): ragged blocks, text at either end,
# GQA, rows scattered over the ranks, padded text
CASES = [
    ("video", dict(frames=3, height=8, width=10), 2, 2, 16, "chunks", ()),
    ("text head, ragged", dict(frames=2, height=8, width=12, text_len=12, text_position="head"), 4, 2, 16, "chunks",
     ()),
    ("text tail, scattered", dict(frames=3, height=8, width=8, text_len=8, text_position="tail"), 2, 1, 32,
     "scattered", ()),
    ("padded text head", dict(frames=2, height=8, width=8, text_len=8, text_position="head"), 2, 2, 16, "chunks",
     (5, 6, 7)),
]


def _layouts(layout_args, padded):
    """The whole sequence's layout and the sparse sequence's (padded text left out), and ``keep``."""
    whole = rf.VideoLayout(**layout_args)
    if not padded:
        return whole, whole, None
    keep = torch.tensor([i for i in range(whole.seq_len) if i not in padded])
    return whole, rf.VideoLayout(**dict(layout_args, text_len=whole.text_len - len(padded))), keep


def _held(layout, degree, how):
    total = layout.seq_len
    if how == "chunks":
        return None
    return torch.randperm(total, generator=torch.Generator().manual_seed(5)).view(degree, total // degree)


def _inputs(layout, heads, kv_heads, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, layout.seq_len, heads, 32, generator=g).to(dtype)
    k, v = (torch.randn(2, layout.seq_len, kv_heads, 32, generator=g).to(dtype) for _ in range(2))
    return q, k, v


def _one_process(layout, q, k, v, block_size, keep=None):
    """The single-process output (padded rows: dense over the kept keys) and mask."""
    from rainfusion_core.permutation import cached_permutation
    from rainfusion_core.prediction import predict_mask

    full_q = q
    if keep is not None:
        q, k, v = (x.index_select(1, keep) for x in (q, k, v))
    out = rf.sparse_attention(q, k, v, layout, sparsity=0.7, block_size=block_size, tensor_layout="BSND",
                              backend="torch", min_tokens=0)
    order = cached_permutation(layout, q.device).indices
    mask = predict_mask(*(x.transpose(1, 2) for x in (q, k)), layout, order, sparsity=0.7, block_size=block_size,
                        first_frame_sink=None, scale=None, share_batch_mask=False, backend="torch")
    if keep is not None:
        whole = torch.nn.functional.scaled_dot_product_attention(
            *(x.transpose(1, 2) for x in (full_q, k, v)), enable_gqa=True).transpose(1, 2)
        whole[:, keep] = out
        out = whole
    return out, mask.dense


def _worker(rank, world):
    found = []
    for name, layout_args, heads, kv_heads, block_size, how, padded in CASES:
        whole, layout, keep = _layouts(layout_args, padded)
        q, k, v = _inputs(whole, heads, kv_heads, seed=len(found))
        held = _held(whole, world, how)
        rows = (torch.arange(whole.seq_len).view(world, -1) if held is None else held)[rank]
        if keep is not None and held is None:
            held = torch.arange(whole.seq_len).view(world, -1)
        plan = RingPlan.build(layout, degree=world, rank=rank, block_size=block_size, held=held, keep=keep)
        masks = []
        out = ring_sparse_attention(*(x.index_select(1, rows) for x in (q, k, v)), plan,
                                    group=dist.group.WORLD, sparsity=0.7, backend="torch",
                                    tensor_layout="BSND", on_mask=lambda m: masks.append(m.dense))
        found.append((name, rows, out, masks[0]))
    return [(n, r.numpy(), o.numpy(), m.numpy()) for n, r, o, m in found]


@pytest.mark.parametrize("world", [2, 4])
def test_ring_ranks_equal_one_process(world):
    per_rank = run_ranks(_worker, world)
    for index, (name, layout_args, heads, kv_heads, block_size, _, padded) in enumerate(CASES):
        whole, layout, keep = _layouts(layout_args, padded)
        q, k, v = _inputs(whole, heads, kv_heads, seed=index)
        expected, expected_mask = _one_process(layout, q, k, v, block_size, keep)
        out = torch.empty_like(expected)
        for rank_results in per_rank:
            _, rows, part, mask = rank_results[index]
            out[:, torch.from_numpy(rows)] = torch.from_numpy(part)
            assert torch.equal(torch.from_numpy(mask), expected_mask), name  # bit-identical masks on every rank
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, msg=name)


SIXTEEN_BIT = rf.VideoLayout(frames=3, height=8, width=8, text_len=6, text_position="tail")  # 198 = 3 x 66 tokens


def _sixteen_bit_inputs():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4 if i == 0 else 2, SIXTEEN_BIT.seq_len, 32, generator=g).to(torch.bfloat16)
               for i in range(3))
    q[1, 3, 70, 0] = float("nan")  # a poisoned row: NaN exactly where one process has it
    return q, k, v


def _sixteen_bit_worker(rank, world):
    q, k, v = _sixteen_bit_inputs()
    plan = RingPlan.build(SIXTEEN_BIT, degree=world, rank=rank, block_size=16)
    rows = slice(rank * plan.local, (rank + 1) * plan.local)
    out = ring_sparse_attention(q[:, :, rows], k[:, :, rows], v[:, :, rows], plan, group=dist.group.WORLD,
                                sparsity=0.6, backend="torch", share_batch_mask=True)
    return out.float().numpy()


def test_a_ring_of_three_in_bfloat16_bnsd_with_a_shared_mask_and_a_nan():
    out = torch.from_numpy(numpy.concatenate(run_ranks(_sixteen_bit_worker, 3), axis=2))
    q, k, v = _sixteen_bit_inputs()
    want = rf.sparse_attention(q, k, v, SIXTEEN_BIT, sparsity=0.6, block_size=16, backend="torch",
                               share_batch_mask=True, min_tokens=0).float()
    assert torch.equal(out.isnan(), want.isnan()) and want.isnan().any()
    torch.testing.assert_close(out.nan_to_num(), want.nan_to_num(), rtol=2e-2, atol=2e-2)  # bf16 parts, merged


def _cpp_worker(rank, world):
    """The C++ kernel (named, and chosen automatically) in a ring, against one process on the same backend."""
    layout = rf.VideoLayout(frames=3, height=16, width=16, text_len=32)
    q, k, v = (x.transpose(1, 2) for x in _inputs(layout, 4, 2, seed=11))
    found = {}
    for backend in ("cpu", None):
        plan = RingPlan.build(layout, degree=world, rank=rank, block_size=64)
        rows = slice(rank * plan.local, (rank + 1) * plan.local)
        out = ring_sparse_attention(q[:, :, rows], k[:, :, rows], v[:, :, rows], plan, group=dist.group.WORLD,
                                    sparsity=0.7, backend=backend)
        want = rf.sparse_attention(q, k, v, layout, sparsity=0.7, block_size=64, backend=backend, min_tokens=0)
        found[str(backend)] = float((out - want[:, :, rows]).abs().max())
    return found


@needs_cpp
def test_the_cpp_kernel_in_a_ring_equals_one_process():
    for errors in run_ranks(_cpp_worker, 2):
        assert max(errors.values()) < 1e-5, errors


def _gpu_worker(rank, world):
    """A ring of one on the GPU (NCCL): the collectives on device tensors, the Triton kernels with lse, the merge."""
    layout = rf.VideoLayout(frames=3, height=16, width=24, text_len=40)
    q, k, v = (x.to("cuda", torch.bfloat16) for x in _inputs(layout, 4, 2, seed=9))
    plan = RingPlan.build(layout, degree=world, rank=rank, block_size=128, device="cuda")
    masks = []
    out = ring_sparse_attention(q, k, v, plan, group=dist.group.WORLD, sparsity=0.7, backend="triton",
                                tensor_layout="BSND", on_mask=lambda m: masks.append(m.dense))
    want = rf.sparse_attention(q, k, v, layout, sparsity=0.7, tensor_layout="BSND", backend="triton")
    mask = rf.predict_block_mask(*(rf.build_permutation(layout, "cuda").apply(x.transpose(1, 2), 2) for x in (q, k)),
                                 layout, sparsity=0.7, backend="triton")
    return (out.float() - want.float()).abs().max().item(), torch.equal(masks[0], mask.dense)


@needs_cuda
def test_a_ring_of_one_on_the_gpu_equals_sparse_attention():
    max_error, same_mask = run_ranks(_gpu_worker, 1, backend="nccl")[0]
    assert same_mask
    assert max_error < 2e-2, max_error  # bf16: one rounding of the output apart (the merge rounds it again)


@pytest.mark.parametrize("arguments, message", [
    (dict(degree=4, block_size=64), "fewer than the 4 ranks"),
    (dict(held=torch.arange(160).view(2, 80) % 100), "each of the 160 model positions once"),
    (dict(held=torch.arange(160).view(4, 40)), r"shape \[degree=2, local\]"),
    (dict(keep=torch.arange(150), held=torch.arange(160).view(2, 80)),
     "keep has 150 positions but layout.seq_len is 160"),
    (dict(rank=2), "rank must be below degree"),
    (dict(keep=torch.arange(150)), "with keep=, pass held= too"),
    (dict(keep=torch.arange(160)[None], held=torch.arange(160).view(2, 80)), "keep must be a 1-D integer tensor"),
    (dict(keep=torch.ones(160, dtype=torch.bool), held=torch.arange(160).view(2, 80)), "keep must be a 1-D integer"),
    (dict(held=torch.arange(160.0).view(2, 80)), "held must be a 2-D integer tensor"),
])
def test_a_plan_refuses_what_cannot_split(arguments, message):
    layout = rf.VideoLayout(frames=2, height=8, width=10)
    with pytest.raises(ValueError, match=message):
        RingPlan.build(layout, **{**dict(degree=2, rank=0, block_size=16), **arguments})


def test_a_plan_deals_blocks_in_turn_and_moves_every_row_once():
    layout = rf.VideoLayout(frames=3, height=8, width=10, text_len=15)  # 255 tokens: a ragged last block
    plans = [RingPlan.build(layout, degree=3, rank=r, block_size=16) for r in range(3)]
    assert [p.blocks[1].tolist() for p in plans[:1]] == [list(range(1, 16, 3))]
    assert sum(p.shard_len for p in plans) == layout.seq_len
    for p in plans:  # what each rank sends is what the others expect from it
        assert sorted(p.send_index.tolist()) == list(range(p.local))
        assert [q.recv_splits[p.rank] for q in plans] == list(p.send_splits)


def _wrong_group_worker(rank, world):
    layout = rf.VideoLayout(frames=2, height=8, width=8)
    q = torch.randn(1, 2, layout.seq_len // world, 32)
    found = []
    for plan, group in ((RingPlan.build(layout, degree=world, rank=world - 1 - rank, block_size=16),
                         dist.group.WORLD),
                        (RingPlan.build(layout, degree=world, rank=rank, block_size=16), None)):
        try:
            ring_sparse_attention(q, q, q, plan, group=group, sparsity=0.5, backend="torch")
        except (TypeError, ValueError) as exc:  # before any collective: no rank waits for the other
            found.append(str(exc))
    return found


def test_a_plan_for_another_rank_or_no_group_is_refused_before_any_exchange():
    for messages in run_ranks(_wrong_group_worker, 2):
        assert "the plan is for rank" in messages[0] and "group must be a torch.distributed ProcessGroup" in messages[1]
