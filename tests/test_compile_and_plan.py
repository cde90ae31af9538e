"""The sparse path under torch.compile, as a custom op, in CUDA graphs, and the plan/run API."""
import pytest
import torch

import rainfusion_core as rf
from helpers import needs_cpp, needs_cuda
from rainfusion_core.ops import block_sparse_attention_op, layout_args, runs_directly, sparse_attention_op

LAYOUT = rf.VideoLayout(3, 8, 16)  # 384 tokens


def _qkv(device="cpu", dtype=torch.float32, heads=(2, 2), dim=32, layout=LAYOUT):
    q = torch.randn(1, heads[0], layout.seq_len, dim, device=device, dtype=dtype)
    k, v = (torch.randn(1, heads[1], layout.seq_len, dim, device=device, dtype=dtype) for _ in range(2))
    return q, k, v


def test_custom_op_passes_opcheck():
    q, k, v = _qkv(heads=(4, 2))
    mask = rf.predict_block_mask(q, k, LAYOUT, sparsity=0.5, block_size=64)
    args = (q, k, v, mask.dense, mask.kv_counts, mask.kv_indices, 64, 0.2, "torch")
    torch.library.opcheck(block_sparse_attention_op, args, test_utils=("test_schema", "test_faketensor"))


def test_whole_call_op_passes_opcheck():
    q, k, v = _qkv(heads=(4, 2))
    args = (q, k, v, layout_args(LAYOUT), 64, 0.2, 3, 1, 0, False, 0.2, "torch")
    torch.library.opcheck(sparse_attention_op, args, test_utils=("test_schema", "test_faketensor"))
    # a sparsity read when the call runs (compiled blocks with a sparsity per step)
    step = torch.tensor([0.8], dtype=torch.float64)
    torch.library.opcheck(sparse_attention_op, args + (False, "bf16", step), test_utils=("test_schema", "test_faketensor"))
    by_tensor = sparse_attention_op(*args, False, "bf16", step)  # 6 key blocks at 0.8: keep 2, not the 3 given
    torch.testing.assert_close(by_tensor, sparse_attention_op(*args[:6], 2, *args[7:]), rtol=0, atol=0)
    assert not torch.equal(by_tensor, sparse_attention_op(*args))


def test_eager_calls_skip_the_dispatcher_and_give_the_ops_result():
    q, k, v = _qkv(heads=(4, 2))
    assert runs_directly(q, k, v, None)
    # 12 blocks of 32: keep 6 per row; the first frame (128 tokens) is 4 sink blocks
    through_op = sparse_attention_op(q, k, v, layout_args(LAYOUT), 32, 32 ** -0.5, 6, 4, 0, False, 32 ** -0.5, "torch")
    torch.testing.assert_close(rf.sparse_attention(q, k, v, LAYOUT, sparsity=0.5, block_size=32, backend="torch"),
                               through_op, rtol=0, atol=0)
    # What must see the op: tracing modes, tensor subclasses, and anything autograd records.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        assert not runs_directly(torch.empty(2))
    assert not runs_directly(q.requires_grad_())
    with torch.no_grad():
        assert runs_directly(q)
    assert not runs_directly(torch.nn.Parameter(torch.ones(1)).detach().as_subclass(torch.nn.Parameter))


def test_a_compiled_call_is_one_op_node():
    q, k, v = _qkv(heads=(4, 2))
    seen = []

    def count_ops(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function" and "rainfusion" in str(n.target))
        return gm

    def layer(q, k, v):
        return rf.sparse_attention(q, k, v, LAYOUT, sparsity=0.5, block_size=32, backend="torch")

    out = torch.compile(layer, fullgraph=True, backend=count_ops)(q, k, v)
    assert seen == ["rainfusion.sparse_attention.default"], seen
    torch.testing.assert_close(out, layer(q, k, v), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_compiled_fullgraph_matches_eager(backend):
    q, k, v = _qkv(heads=(4, 2))

    def layer(q, k, v):
        return rf.sparse_attention(q, k, v, LAYOUT, sparsity=0.5, block_size=32, backend=backend) * 2.0

    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), layer(q, k, v), rtol=0, atol=0)


def test_traced_calls_leave_the_permutation_to_the_op():
    """No traced graph builds the permutation or holds it as a constant: the whole-call op looks it up at
    run time. (Built in a graph, it was wrong on a GPU under Inductor; cached from a trace, the write would
    be replayed after every run, storing graph outputs that a CUDA-graph replay may overwrite.)"""
    from rainfusion_core import permutation

    q, k, v = _qkv(heads=(4, 2))

    def layer(q, k, v):  # the layout is built inside the traced code, as the diffusers hooks do
        layout = rf.VideoLayout(LAYOUT.frames, LAYOUT.height, LAYOUT.width, text_len=LAYOUT.text_len)
        return rf.sparse_attention(q, k, v, layout, sparsity=0.5, block_size=32, backend="torch")

    permutation._CACHE.clear()
    torch._dynamo.reset()
    graphs = []
    out = torch.compile(layer, fullgraph=True, backend=lambda gm, args: graphs.append(gm) or gm)(q, k, v)
    (graph,) = graphs
    called = [str(n.target) for n in graph.graph.nodes if n.op == "call_function"]
    assert called == ["rainfusion.sparse_attention.default"], called
    assert not any(n.op == "get_attr" for n in graph.graph.nodes)  # no tensor constant
    assert list(permutation._CACHE) == [(LAYOUT, torch.device("cpu"))]  # cached by the op's run, not the trace
    torch.testing.assert_close(out, layer(q, k, v), rtol=0, atol=0)
    torch._dynamo.reset()


def test_plan_reuses_one_mask_across_layers():
    q, k, v = _qkv()
    plan = rf.plan_sparse_attention(q, k, LAYOUT, sparsity=0.6, block_size=32)
    assert isinstance(plan, rf.SparseAttentionPlan) and 0 < plan.density <= 1
    torch.testing.assert_close(plan.run(q, k, v), rf.sparse_attention(q, k, v, LAYOUT, sparsity=0.6, block_size=32),
                               rtol=0, atol=0)
    q2, k2, v2 = _qkv()  # another layer: same mask, new activations
    idx = plan.permutation.indices
    expected = torch.empty_like(q2)
    expected[:, :, idx] = rf.block_sparse_attention(q2[:, :, idx], k2[:, :, idx], v2[:, :, idx], plan.block_mask)
    torch.testing.assert_close(plan.run(q2, k2, v2), expected, rtol=0, atol=0)


def test_plan_in_bsnd():
    q, k, v = (x.transpose(1, 2).contiguous() for x in _qkv())
    plan = rf.plan_sparse_attention(q, k, LAYOUT, sparsity=0.6, block_size=32, tensor_layout="BSND")
    out = plan.run(q, k, v)
    assert out.shape == q.shape
    torch.testing.assert_close(
        out, rf.sparse_attention(q, k, v, LAYOUT, sparsity=0.6, block_size=32, tensor_layout="BSND"), rtol=0, atol=0
    )
    with pytest.raises(ValueError, match="q has 2 tokens"):
        plan.run(q.transpose(1, 2), k, v)


def test_backend_object_and_bad_backend_type():
    q, k, v = _qkv()
    mask = rf.predict_block_mask(q, k, LAYOUT, sparsity=0.5, block_size=64)
    ref = rf.block_sparse_attention(q, k, v, mask, backend="torch")
    torch.testing.assert_close(rf.block_sparse_attention(q, k, v, mask, backend=rf.get_backend("torch")), ref)
    with pytest.raises(TypeError, match="backend must be None, a name"):
        rf.block_sparse_attention(q, k, v, mask, backend=3)


GPU = needs_cuda
WAN_SMALL = rf.VideoLayout(5, 30, 52)  # 7800 tokens, unaligned width like Wan 480p


@GPU
def test_whole_call_has_no_host_sync_and_replays_in_a_cuda_graph():
    q, k, v = _qkv("cuda", torch.bfloat16, heads=(4, 2), dim=128, layout=WAN_SMALL)
    eager = rf.sparse_attention(q, k, v, WAN_SMALL)  # builds the cached permutation, compiles kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        rf.sparse_attention(q, k, v, WAN_SMALL)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = rf.sparse_attention(q, k, v, WAN_SMALL)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
    q.copy_(torch.randn_like(q))  # new inputs, same buffers: the replay recomputes everything
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, rf.sparse_attention(q, k, v, WAN_SMALL))


@GPU
def test_a_graph_captured_on_a_layouts_first_call_leaves_no_unwritten_cache():
    warm = rf.VideoLayout(2, 8, 16)  # compiles the kernels outside the capture
    rf.sparse_attention(*_qkv("cuda", torch.bfloat16, heads=(4, 2), dim=128, layout=warm), warm)
    layout = rf.VideoLayout(3, 9, 13)  # no other test uses it: its permutation is first built under capture
    q, k, v = _qkv("cuda", torch.bfloat16, heads=(4, 2), dim=128, layout=layout)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = rf.sparse_attention(q, k, v, layout)
    eager = rf.sparse_attention(q, k, v, layout)  # before any replay has written what the capture allocated
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
    perm = rf.build_permutation(layout, "cuda")
    assert torch.equal(perm.indices.cpu(), rf.build_permutation(layout, "cpu").indices)


@GPU
def test_compiled_fullgraph_on_gpu_with_triton():
    q, k, v = _qkv("cuda", torch.bfloat16, heads=(4, 2), dim=128, layout=WAN_SMALL)
    compiled = torch.compile(lambda q, k, v: rf.sparse_attention(q, k, v, WAN_SMALL, backend="triton"), fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), rf.sparse_attention(q, k, v, WAN_SMALL, backend="triton"),
                               rtol=0, atol=0)


def test_backward_says_there_is_none_and_what_to_do():
    q, k, v = (x.requires_grad_() for x in _qkv())
    out = rf.sparse_attention(q, k, v, LAYOUT, sparsity=0.5, block_size=32, backend="torch")
    with pytest.raises(RuntimeError, match="RainFusion sparse attention has no backward: it is an inference kernel"):
        out.sum().backward()
    mask = rf.predict_block_mask(q.detach(), k.detach(), LAYOUT, sparsity=0.5, block_size=32)
    with pytest.raises(RuntimeError, match="has no backward"):
        rf.block_sparse_attention(q, k, v, mask, backend="torch").sum().backward()


@needs_cpp
def test_the_cpu_backend_object_refuses_inputs_that_require_grad():
    q, k, v = (x.requires_grad_() for x in _qkv())
    with pytest.raises(RuntimeError, match="the cpu backend has no backward"):
        rf.sparse_attention(q, k, v, LAYOUT, sparsity=0.5, block_size=32, backend=rf.get_backend(name="cpu"))
    with torch.no_grad():
        rf.sparse_attention(q, k, v, LAYOUT, sparsity=0.5, block_size=32, backend=rf.get_backend(name="cpu"))
