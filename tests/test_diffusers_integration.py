"""RainFusion in diffusers' WanTransformer3DModel (a tiny random-weight model, CPU)."""
import types

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed: pip install -e '.[diffusers]'")

from diffusers.models.transformers.transformer_wan import WanAttnProcessor  # noqa: E402

from helpers import tiny_wan, wan_inputs as inputs  # noqa: E402
from rainfusion_core.cli import main  # noqa: E402
from rainfusion_core.integrations.diffusers import (  # noqa: E402
    RainFusionAttnProcessor, Schedule, apply_rainfusion, capture_qkv,
)
from rainfusion_core.quality import load_qkv  # noqa: E402

GRIDS = [pytest.param((3, 16, 20), id="unaligned-8x10"), pytest.param((2, 16, 16), id="aligned-8x8")]


def run(model, latent, text, t):
    with torch.no_grad():
        return model(latent, torch.full((latent.shape[0],), float(t)), text, return_dict=False)[0]


@pytest.mark.parametrize("grid", GRIDS)
def test_sparsity_zero_reproduces_dense(grid):
    model, (latent, text) = tiny_wan(), inputs(grid)
    dense = run(model, latent, text, 500)
    handle = apply_rainfusion(model, sparsity=0.0, block_size=16, backend="torch")
    torch.testing.assert_close(run(model, latent, text, 500), dense, rtol=1e-4, atol=1e-5)
    assert handle.layout == rf_layout(grid)
    handle.remove()


def rf_layout(grid):
    import rainfusion_core as rf

    return rf.VideoLayout(grid[0], grid[1] // 2, grid[2] // 2)


@pytest.mark.parametrize("grid", GRIDS)
def test_sparse_changes_output_replaces_only_self_attention_and_remove_restores(grid):
    model, (latent, text) = tiny_wan(), inputs(grid, batch=2)
    dense = run(model, latent, text, 500)
    originals = [(b.attn1.processor, b.attn2.processor) for b in model.blocks]
    handle = apply_rainfusion(model, sparsity=0.8, block_size=16)
    for block, (self_proc, cross_proc) in zip(model.blocks, originals):
        assert isinstance(block.attn1.processor, RainFusionAttnProcessor)
        assert block.attn2.processor is cross_proc and isinstance(cross_proc, WanAttnProcessor)
        assert block.attn1.processor._attention_backend is self_proc._attention_backend
        assert block.attn1.processor._parallel_config is self_proc._parallel_config
    sparse = run(model, latent, text, 500)
    assert torch.isfinite(sparse).all() and (sparse - dense).abs().max() > 1e-4
    handle.remove()
    assert [(b.attn1.processor, b.attn2.processor) for b in model.blocks] == originals
    assert torch.equal(run(model, latent, text, 500), dense)


@pytest.mark.parametrize("guidance", ["two-calls", "doubled-batch"])
def test_dense_steps_counted_per_timestep_with_guidance(guidance):
    model = tiny_wan()
    latent, text = inputs((3, 16, 20))
    handle = apply_rainfusion(model, sparsity=0.8, block_size=16, schedule=Schedule(dense_steps=2))
    ref = tiny_wan()  # same weights, never patched
    seen = []
    for t in (900, 800, 700, 600):
        if guidance == "two-calls":
            outs = [run(model, latent, text, t), run(model, latent, text, t)]
            dense = run(ref, latent, text, t)
            matches = [torch.allclose(o, dense, atol=1e-6) for o in outs]
        else:
            batch_latent, batch_text = latent.repeat(2, 1, 1, 1, 1), text.repeat(2, 1, 1)
            out = run(model, batch_latent, batch_text, t)
            matches = [torch.allclose(out, run(ref, batch_latent, batch_text, t), atol=1e-6)]
        seen.append((handle.step, all(matches)))
    assert seen == [(0, True), (1, True), (2, False), (3, False)]
    run(model, latent, text, 950)  # a new generation starts again at step 0
    assert handle.step == 0
    handle.remove()


def test_dense_above_timestep_and_layer_subset():
    model, (latent, text) = tiny_wan(layers=3), inputs((3, 16, 20))
    ref = tiny_wan(layers=3)
    handle = apply_rainfusion(model, sparsity=0.8, block_size=16, layers=[1], schedule=Schedule(dense_above_timestep=700))
    assert [type(b.attn1.processor).__name__ for b in model.blocks] == [
        "WanAttnProcessor", "RainFusionAttnProcessor", "WanAttnProcessor"]
    assert torch.allclose(run(model, latent, text, 800), run(ref, latent, text, 800), atol=1e-6)
    assert not torch.allclose(run(model, latent, text, 600), run(ref, latent, text, 600), atol=1e-4)
    handle.remove()
    with pytest.raises(ValueError, match="attention layer 5 does not exist"):
        apply_rainfusion(model, layers=[5])


def test_pipeline_with_two_transformers():
    pipe = types.SimpleNamespace(transformer=tiny_wan(0), transformer_2=tiny_wan(1))
    handle = apply_rainfusion(pipe, sparsity=0.8, block_size=16)
    for transformer in (pipe.transformer, pipe.transformer_2):
        assert all(isinstance(b.attn1.processor, RainFusionAttnProcessor) for b in transformer.blocks)
    handle.remove()
    for transformer in (pipe.transformer, pipe.transformer_2):
        assert all(isinstance(b.attn1.processor, WanAttnProcessor) for b in transformer.blocks)
    with pytest.raises(TypeError, match="supported: WanTransformer3DModel"):
        apply_rainfusion(object())


def test_capture_then_evaluate(tmp_path, capsys):
    model, (latent, text) = tiny_wan(), inputs((3, 16, 20))
    dense = run(model, latent, text, 900)
    handle = capture_qkv(model, tmp_path, layers=(1,), steps=(1,))
    for t in (900, 800, 700):
        out = run(model, latent, text, t)
        if t == 900:
            assert torch.equal(out, dense)  # capturing changes nothing
    handle.remove()
    (path,) = tmp_path.glob("qkv_layer1_step1_*.pt")
    q, k, v, layout, meta = load_qkv(path)
    assert q.shape == (1, 2, 240, 32) and layout == rf_layout((3, 16, 20)) and meta["layer"] == 1
    assert main(["evaluate", "--qkv", str(path), "--sparsity", "0.5", "--block-size", "16"]) == 0
    assert "oracle" in capsys.readouterr().out


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(first_frame_sink="x"), ValueError, "first_frame_sink must be None, True or False, got 'x'"),
    (dict(block_size=0), ValueError, "block_size must be a positive int, got 0"),
    (dict(backend="no_such_backend"), Exception, "unknown backend 'no_such_backend'"),
    (dict(schedule=2), TypeError, "schedule must be a rainfusion_core.integrations.diffusers.Schedule"),
    (dict(sparsity=1.5), ValueError, r"sparsity must be in \[0, 1\)"),
])
def test_arguments_are_checked_at_the_call_not_at_the_first_forward(kwargs, error, message):
    model = tiny_wan()
    originals = [b.attn1.processor for b in model.blocks]
    with pytest.raises(error, match=message):
        apply_rainfusion(model, **kwargs)
    assert [b.attn1.processor for b in model.blocks] == originals  # nothing installed


@pytest.mark.parametrize("order", ["first-then-second", "second-then-first"])
def test_stacked_handles_can_be_removed_in_any_order(order):
    model, (latent, text) = tiny_wan(), inputs((3, 16, 20))
    dense = run(model, latent, text, 500)
    originals = [b.attn1.processor for b in model.blocks]
    first = apply_rainfusion(model, sparsity=0.8, block_size=16, backend="torch")
    sparse = run(model, latent, text, 500)
    second = apply_rainfusion(model, sparsity=0.0, block_size=16, backend="torch")
    handles = [first, second] if order == "first-then-second" else [second, first]
    handles[0].remove()
    remaining = handles[1]
    # The remaining handle still works: its own state is fed by its own hook.
    expected = dense if remaining is second else sparse
    torch.testing.assert_close(run(model, latent, text, 500), expected, rtol=1e-4, atol=1e-5)
    remaining.remove()
    assert [b.attn1.processor for b in model.blocks] == originals
    assert torch.equal(run(model, latent, text, 500), dense)


def test_capture_refuses_a_folder_it_cannot_write_when_called(tmp_path):
    model = tiny_wan()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match=f"capture_qkv: cannot create the folder {blocker / 'sub'}"):
        capture_qkv(model, blocker / "sub", layers=(0,))
    import os

    if os.geteuid() != 0:  # root may write anywhere: the permission check is real only for other users
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        with pytest.raises(PermissionError, match=f"capture_qkv: the folder {locked} is not writable"):
            capture_qkv(model, locked, layers=(0,))
