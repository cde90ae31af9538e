"""apply_rainfusion on every supported diffusers transformer family (tiny random-weight models, CPU)."""
import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed: pip install -e '.[diffusers]'")

import torch._dynamo.testing  # noqa: E402

from rainfusion_core.integrations.diffusers import (  # noqa: E402
    ModelAdapter, RainFusionAttnProcessor, Schedule, apply_rainfusion, attention_layers, supported_models,
)
from tiny_models import MODELS, TEXT, forward  # noqa: E402

TOLERANCE = dict(rtol=1e-4, atol=1e-5)  # float32: sparsity 0 is the dense attention, summed in another order


def grids(model):
    """An unaligned grid (width 10: remainder columns) and an aligned one, as the model takes them."""
    frames = (1, 1) if model.frames_must_be_one else (3, 2)
    return [(frames[0], 8, 10), (frames[1], 8, 8)]


def every_processor(model):
    return {name: module.processor for name, module in model.named_modules() if hasattr(module, "processor")}


@pytest.fixture(params=MODELS, ids=str)
def tiny(request):
    return request.param


def test_every_family_is_tested():
    tested = {type(m.build(0)).__name__ for m in MODELS}
    assert tested == {name for classes in supported_models().values() for name in classes}


@pytest.mark.parametrize("grid_index", [0, 1], ids=["unaligned", "aligned"])
def test_sparsity_zero_is_dense_and_remove_restores_bit_identical_output(tiny, grid_index):
    model = tiny.build(0)
    kwargs = tiny.inputs(grids(tiny)[grid_index], 2, tiny.text_mask, 500)
    dense = forward(model, kwargs)
    handle = apply_rainfusion(model, sparsity=0.0, block_size=16, backend="torch")
    torch.testing.assert_close(forward(model, kwargs), dense, **TOLERANCE)
    assert (handle.layout.frames, handle.layout.height, handle.layout.width) == grids(tiny)[grid_index]
    assert (handle.state.text is not None) == tiny.text_mask  # padded text took the padding path
    handle.remove()
    assert torch.equal(forward(model, kwargs), dense)


def test_sparse_output_changes_and_only_self_or_joint_attention_is_replaced(tiny):
    model = tiny.build(0)
    kwargs = tiny.inputs(grids(tiny)[0], 2, tiny.text_mask, 500)
    dense = forward(model, kwargs)
    before = every_processor(model)
    handle = apply_rainfusion(model, sparsity=0.8, block_size=16, backend="torch")
    replaced = set(attention_layers(model))
    after = every_processor(model)
    for name, processor in after.items():
        if name in replaced:
            assert isinstance(processor, RainFusionAttnProcessor) and processor.original is before[name]
        else:
            assert processor is before[name], f"{name} should stay as it was"
    assert replaced and replaced <= set(after)
    sparse = forward(model, kwargs)
    assert torch.isfinite(sparse).all() and (sparse - dense).abs().max() > 1e-3
    handle.remove()
    assert every_processor(model) == before


def test_each_batch_item_gets_its_own_mask(tiny):
    """A guidance batch equals its items run alone: the mask (and the text padding) is per item."""
    model = tiny.build(0)
    kwargs = tiny.inputs(grids(tiny)[0], 2, tiny.text_mask, 500)
    handle = apply_rainfusion(model, sparsity=0.8, block_size=16, backend="torch")
    batch = forward(model, kwargs)
    for item in range(2):
        alone = {k: _item(k, v, item) for k, v in kwargs.items()}
        torch.testing.assert_close(forward(model, alone), batch[item:item + 1], **TOLERANCE)
    handle.remove()


def _item(name, value, index):
    if name == "encoder_hidden_states_llama3":  # HiDream's Llama stack [layers, B, T, D]
        return value[:, index:index + 1]
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == 2:
        return value[index:index + 1]
    if isinstance(value, list) and len(value) == 2:  # Qwen-Image's img_shapes, Z-Image's per-item lists
        return value[index:index + 1]
    return value


@pytest.mark.parametrize("family", [m.family for m in MODELS if m.mask_argument])
def test_padded_text_tokens_get_no_weight(family):
    """Whatever the padded text tokens hold, the output is the same, dense or sparse."""
    tiny = next(m for m in MODELS if m.family == family)
    model = tiny.build(0)
    kwargs = tiny.inputs(grids(tiny)[0], 2, True, 500)
    other = dict(kwargs, encoder_hidden_states=kwargs["encoder_hidden_states"].clone())
    mask = kwargs[tiny.mask_argument]
    padded = ~mask.bool()
    assert padded.any()
    other["encoder_hidden_states"][padded] = torch.randn(int(padded.sum()), other["encoder_hidden_states"].shape[-1]) * 5
    handle = apply_rainfusion(model, sparsity=0.8, block_size=16, backend="torch")
    torch.testing.assert_close(forward(model, other), forward(model, kwargs), **TOLERANCE)
    assert handle.state.text is not None and handle.state.text.text_len >= TEXT
    handle.remove()


def test_schedule_counts_steps_per_timestep(tiny):
    model, reference = tiny.build(0), tiny.build(0)
    handle = apply_rainfusion(model, sparsity=0.8, block_size=16, backend="torch", schedule=Schedule(dense_steps=1))
    torch.manual_seed(0)
    seen = []
    for t in (900, 800):
        kwargs = tiny.inputs(grids(tiny)[0], 1, tiny.text_mask, t)
        outs = [forward(model, kwargs), forward(model, kwargs)]  # guidance as two calls: one step
        dense = forward(reference, kwargs)
        seen.append((handle.step, [torch.allclose(o, dense, atol=1e-6) for o in outs]))
    assert seen == [(0, [True, True]), (1, [False, False])]
    handle.remove()


def test_compiles_without_graph_breaks(tiny):
    """compile_repeated_blocks(fullgraph=True) (torch.compile(fullgraph=True) where the model has no repeated
    blocks): one graph per block class, no break, the eager result."""
    model = tiny.build(0)
    kwargs = tiny.inputs(grids(tiny)[0], 2, tiny.text_mask, 500)
    handle = apply_rainfusion(model, sparsity=0.8, block_size=16, backend="torch")
    eager = forward(model, kwargs)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    if not tiny.fullgraph:  # the model breaks its graph itself; where RainFusion does: the next test
        compiled = torch.compile(model, backend=counter)
        torch.testing.assert_close(forward(compiled, kwargs), eager, rtol=0, atol=0)
        torch.testing.assert_close(forward(compiled, kwargs), eager, rtol=0, atol=0)
        handle.remove()
        return
    if model._repeated_blocks:
        model.compile_repeated_blocks(fullgraph=True, backend=counter)
        compiled = model
    else:
        compiled = torch.compile(model, fullgraph=True, backend=counter)
    first, again = forward(compiled, kwargs), forward(compiled, kwargs)
    torch.testing.assert_close(first, eager, rtol=0, atol=0)
    torch.testing.assert_close(again, eager, rtol=0, atol=0)
    assert 1 <= counter.frame_count <= 4  # block classes x (the batch's text groups), never one per layer
    handle.remove()
    torch._dynamo.reset()


def test_whole_model_compile_breaks_nowhere_in_rainfusion(tiny):
    model = tiny.build(0)
    kwargs = tiny.inputs(grids(tiny)[0], 2, tiny.text_mask, 500)
    handle = apply_rainfusion(model, sparsity=0.8, block_size=16, backend="torch",
                              schedule=Schedule(dense_above_timestep=950))  # the hook reads the timestep
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(**kwargs, return_dict=False)
    for reason in explained.break_reasons:
        ours = [frame for frame in reason.user_stack if "rainfusion_core" in frame.filename]
        innermost = reason.user_stack[-1]
        if tiny.data_dependent_lengths and ours:
            # the model's own data-dependent code inside the processor RainFusion runs, or the one break of
            # RainFusion's: reading such a call's length for its layout
            assert "rainfusion_core" not in innermost.filename or innermost.name == "layout_of", (reason.reason, ours)
            continue
        assert not ours, (reason.reason, [frame.filename for frame in reason.user_stack])
    handle.remove()
    torch._dynamo.reset()


def test_unsupported_models_and_processors_are_named():
    with pytest.raises(TypeError, match="supported: WanTransformer3DModel, .*FluxTransformer2DModel"):
        apply_rainfusion(torch.nn.Linear(2, 2))
    tiny = next(m for m in MODELS if m.family == "Flux")
    model = tiny.build(0)
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    model.transformer_blocks[0].attn.processor = FluxIPAdapterAttnProcessor(32, 32)
    before = every_processor(model)
    with pytest.raises(TypeError, match="transformer_blocks.0.attn runs FluxIPAdapterAttnProcessor"):
        apply_rainfusion(model)
    assert every_processor(model) == before  # nothing installed
    with pytest.raises(ValueError, match="only Wan's self-attention has a fused prologue, not Flux"):
        apply_rainfusion(tiny.build(0), fuse_prologue=True)


def test_a_mask_the_model_does_not_document_is_refused():
    """Wan's self-attention never gets a mask; one passed anyway is an error, not ignored."""
    tiny = MODELS[0]
    model = tiny.build(0)
    apply_rainfusion(model, sparsity=0.8, block_size=16, backend="torch")
    attn = model.blocks[0].attn1
    hidden = torch.randn(1, 240, 64)
    from rainfusion_core.layout import VideoLayout

    attn.processor.site.state.layout = VideoLayout(3, 8, 10)
    with pytest.raises(ValueError, match="Wan self-attention got an attention mask"):
        attn.processor(attn, hidden, None, torch.ones(1, 1, 240, 240, dtype=torch.bool), None)


def test_attention_layers_name_what_layers_indexes():
    tiny = next(m for m in MODELS if m.family == "HunyuanVideo")
    model = tiny.build(0)
    assert attention_layers(model) == ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
    handle = apply_rainfusion(model, layers=[1], block_size=16, backend="torch")
    assert not isinstance(model.transformer_blocks[0].attn.processor, RainFusionAttnProcessor)
    assert isinstance(model.single_transformer_blocks[0].attn.processor, RainFusionAttnProcessor)
    handle.remove()
    with pytest.raises(ValueError, match=r"layers: \[1, 1\] names a layer twice"):
        apply_rainfusion(model, layers=[1, 1])


def test_layers_outside_the_layout_are_left_out():
    """Attention whose sequence is not one video grid plus one dense span stays dense: Motif-Video's decoder blocks
    (decoder and encoder video, twice the grid), Z-Image's refiners, Flux 3's text mode blocks, MiniMax-H3's text
    refiner."""
    from tiny_models import _motif

    assert attention_layers(_motif(0, decoder_layers=1)) == ["transformer_blocks.0.attn",
                                                              "single_transformer_blocks.0.attn"]
    names = {m.family: attention_layers(m.build(0)) for m in MODELS if m.family in ("Z-Image", "Flux.3", "MiniMax-H3")}
    assert names["Z-Image"] == ["layers.0.attention", "layers.1.attention"]
    assert names["Flux.3"] == ["mode_blocks.image.0.attn", "single_transformer_blocks.0.attn"]
    assert names["MiniMax-H3"] == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]


@pytest.mark.parametrize("name", ["HunyuanVideoFramepackTransformer3DModel", "SanaVideoTransformer3DModel",
                                  "QwenImage21Transformer2DModel", "Cosmos3OmniTransformer",
                                  "WanAnimate2Transformer3DModel"])
def test_families_rainfusion_cannot_express_are_refused_with_the_reason(name):
    from rainfusion_core.integrations.diffusers.adapters import UNSUPPORTED

    stand_in = type(name, (torch.nn.Module,), {})()  # the class name is what is looked up
    with pytest.raises(TypeError, match=f"{name} cannot run with RainFusion: .{{60}}"):
        apply_rainfusion(stand_in)
    with pytest.raises(TypeError, match=f"{name} cannot run with RainFusion"):  # a user's adapter does not change it
        apply_rainfusion(stand_in, adapter=ModelAdapter(family="x", attention_modules=[("b", "a")],
                                                        grid=lambda t, a: (1, 1, 1)))
    assert name in UNSUPPORTED and hasattr(diffusers, name)


@pytest.mark.xdist_group("compile")  # tools/gpu_suite.py: never beside another Inductor compile of the same blocks
def test_inductor_compiles_the_sparse_blocks():
    """The real compiler (Inductor, CPU) on Wan's repeated blocks: same output as eager within rounding."""
    tiny = MODELS[0]
    model = tiny.build(0)
    kwargs = tiny.inputs(grids(tiny)[0], 2, False, 500)
    handle = apply_rainfusion(model, sparsity=0.8, block_size=16, backend="torch")
    eager = forward(model, kwargs)
    torch._dynamo.reset()
    model.compile_repeated_blocks(fullgraph=True)
    torch.testing.assert_close(forward(model, kwargs), eager, **TOLERANCE)
    handle.remove()
    torch._dynamo.reset()


def test_capture_with_padded_text_saves_the_real_tokens_per_group(tmp_path):
    from rainfusion_core.integrations.diffusers import capture_qkv
    from rainfusion_core.quality import load_qkv

    tiny = next(m for m in MODELS if m.family == "HunyuanVideo")
    model = tiny.build(0)
    kwargs = tiny.inputs(grids(tiny)[0], 2, True, 500)  # item b has TEXT - 2 - b real text tokens
    dense = forward(model, kwargs)
    handle = capture_qkv(model, tmp_path, layers=(1,), steps=(0,))
    assert torch.equal(forward(model, kwargs), dense)  # capturing changes nothing
    handle.remove()
    files = sorted(tmp_path.glob("qkv_layer1_step0_*_group*.pt"))
    assert len(files) == 2  # the two items differ in padding
    for item, path in enumerate(files):
        q, k, v, layout, meta = load_qkv(path)
        assert layout.text_len == TEXT - 2 - item and layout.text_position == "tail"
        assert q.shape[0] == 1 and q.shape[2] == layout.seq_len


def test_capture_of_a_model_attending_per_item_saves_every_item(tmp_path):
    """Mochi attends one batch item at a time, each over its own real text: one file per call, none overwritten."""
    from rainfusion_core.integrations.diffusers import capture_qkv
    from rainfusion_core.quality import load_qkv

    tiny = next(m for m in MODELS if m.family == "Mochi")
    model = tiny.build(0)
    kwargs = tiny.inputs(grids(tiny)[0], 2, True, 500)  # item b has TEXT - 2 - b real text tokens
    handle = capture_qkv(model, tmp_path, layers=(0,), steps=(0,))
    forward(model, kwargs)
    handle.remove()
    files = sorted(tmp_path.glob("qkv_layer0_step0_*.pt"))
    assert [f.name for f in files] == ["qkv_layer0_step0_call1.pt", "qkv_layer0_step0_call1_part1.pt"]
    assert [load_qkv(f)[3].text_len for f in files] == [TEXT - 2, TEXT - 3]


@pytest.mark.parametrize("family, change, message", [
    ("Flux", lambda kw: kw["img_ids"].__setitem__((slice(None), 0), 1.0), "joins several images"),
    ("Flux.2", lambda kw: kw.__setitem__("img_ids", kw["img_ids"] + torch.tensor([10, 0, 0, 0])),
     "joins reference images"),
    ("Flux.3", lambda kw: kw.__setitem__("image_cond_hidden_states", torch.randn(2, 4, 4)), "has reference images"),
    ("Lumina2", lambda kw: kw["encoder_attention_mask"].__setitem__((0, slice(None)), 1), "same caption length"),
    ("MiniMax-H3", lambda kw: kw.__setitem__("video_indices", kw["video_indices"][:-1]), "at the tail"),
    ("Qwen-Image", lambda kw: kw.__setitem__("img_shapes", [[(1, 8, 10), (1, 4, 4)]] * 2), "one image grid per call"),
    ("LTX-Video", lambda kw: kw.__setitem__("num_frames", None), "needs num_frames, height and width"),
    ("LTX-Video", lambda kw: kw.__setitem__("num_frames", 4), "num_frames x height x width = 4x8x10"),
])
def test_inputs_rainfusion_cannot_read_are_refused_by_name(family, change, message):
    tiny = next(m for m in MODELS if m.family == family)
    model = tiny.build(0)
    kwargs = tiny.inputs(grids(tiny)[0], 2, False, 500)
    change(kwargs)
    handle = apply_rainfusion(model, block_size=16, backend="torch")
    with pytest.raises(ValueError, match=message):
        forward(model, kwargs)
    handle.remove()


def test_capture_refuses_context_parallelism(tmp_path):
    from diffusers import ContextParallelConfig
    from diffusers.models._modeling_parallel import ParallelConfig

    from rainfusion_core.integrations.diffusers import capture_qkv

    cp = ContextParallelConfig.__new__(ContextParallelConfig)
    cp.ring_degree, cp.ulysses_degree, cp.ulysses_anything = 1, 2, False
    model = MODELS[0].build(0)
    handle = capture_qkv(model, tmp_path, layers=(0,))
    with pytest.raises(ValueError, match="capture_qkv does not run under context parallelism"):
        model.blocks[0].attn1.processor._parallel_config = ParallelConfig(context_parallel_config=cp)
    handle.remove()


def test_precision_reaches_the_sparse_calls_of_a_model():
    from helpers import Fp8Emulation
    from rainfusion_core import get_backend, scoped_backends

    tiny = next(m for m in MODELS if m.family == "HunyuanVideo")  # padded text: the padding path too
    model = tiny.build(0)
    kwargs = tiny.inputs(grids(tiny)[0], 2, tiny.text_mask, 500)
    with pytest.raises(ValueError, match="precision='fp8' is not offered by backend 'torch'"):
        apply_rainfusion(model, backend="torch", precision="fp8")
    with pytest.raises(ValueError, match="not offered by any available backend for cpu"):
        apply_rainfusion(model, precision="fp8")  # the weights are on the CPU: refused before any forward
    with pytest.raises(ValueError, match="precision='fp8' is not offered by backend 'torch'"):
        apply_rainfusion(model, backend=get_backend("torch"), precision="fp8")  # a Backend object too
    with scoped_backends(Fp8Emulation()) as (emulation,):
        handle = apply_rainfusion(model, sparsity=0.5, block_size=16, backend="fp8_emulation", precision="fp8")
        fp8_out = forward(model, kwargs)
        handle.remove()
        handle = apply_rainfusion(model, sparsity=0.5, block_size=16, backend="fp8_emulation")
        bf16_out = forward(model, kwargs)
        handle.remove()
    assert ("forward", "fp8") in emulation.seen
    assert not torch.equal(fp8_out, bf16_out)
    assert float(torch.nn.functional.cosine_similarity(fp8_out.flatten(), bf16_out.flatten(), dim=0)) > 0.99
