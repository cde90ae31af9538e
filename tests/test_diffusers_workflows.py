"""Everyday diffusers workflows around a patched model: processor swaps, copies, and new generations."""
import copy
import pickle
import types

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed: pip install -e '.[diffusers]'")

from helpers import tiny_wan, wan_inputs  # noqa: E402
from rainfusion_core.integrations.diffusers import Schedule, apply_rainfusion  # noqa: E402
from tiny_models import MODELS, forward  # noqa: E402

COGVIDEOX = next(m for m in MODELS if m.family == "CogVideoX")


def _run(model, latent, text, t):
    with torch.no_grad():
        return model(latent, torch.full((latent.shape[0],), float(t)), text, return_dict=False)[0]


def test_fusing_or_unfusing_qkv_after_apply_is_refused_at_the_next_forward():
    model = COGVIDEOX.build(0)
    kwargs = COGVIDEOX.inputs((2, 8, 8), 1, False, 500)
    handle = apply_rainfusion(model, sparsity=0.8, block_size=16, min_tokens=0)
    forward(model, kwargs)
    model.fuse_qkv_projections()  # replaces every attention processor
    with pytest.raises(RuntimeError, match="processors RainFusion installed were replaced after apply_rainfusion"):
        forward(model, kwargs)
    handle.remove()
    forward(model, kwargs)  # the model's own (fused) attention again


def test_copies_and_pickles_are_refused_with_what_to_do():
    model = tiny_wan()
    handle = apply_rainfusion(model, sparsity=0.8, block_size=16)
    for attempt in (lambda: copy.deepcopy(model), lambda: pickle.dumps(model)):
        with pytest.raises(TypeError, match="a model with RainFusion applied cannot be copied or pickled"):
            attempt()
    handle.remove()
    copy.deepcopy(model)  # fine once removed


def test_a_new_generation_counts_steps_from_zero():
    model, (latent, text) = tiny_wan(), wan_inputs((3, 16, 20))
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler()
    pipe = types.SimpleNamespace(transformer=model, scheduler=scheduler)  # what apply_rainfusion reads of a pipeline
    handle = apply_rainfusion(pipe, sparsity=0.8, block_size=16, min_tokens=0, schedule=Schedule(dense_steps=1))
    dense = {t: _run_dense(model, handle, latent, text, t) for t in (900, 300)}
    scheduler.set_timesteps(10)  # a pipeline's first act: a new generation starts
    assert torch.equal(_run(model, latent, text, 900), dense[900]) and handle.step == 0  # step 0: dense
    assert not torch.equal(_run(model, latent, text, 600), _run_dense(model, handle, latent, text, 600))
    scheduler.set_timesteps(10)  # img2img: the next run starts lower than the last timestep, still step 0
    assert torch.equal(_run(model, latent, text, 300), dense[300]) and handle.step == 0
    _run(model, latent, text, 200)
    handle.new_generation()  # the same by hand, for a transformer driven directly
    assert torch.equal(_run(model, latent, text, 300), dense[300]) and handle.step == 0
    handle.remove()
    assert "set_timesteps" not in vars(scheduler)  # the scheduler's own method again


def _run_dense(model, handle, latent, text, t):
    state = handle.state
    saved = (state.step, state.last_timestep, state.schedule)
    state.schedule = Schedule(dense_above_timestep=-1.0)  # every call dense, as the model
    try:
        return _run(model, latent, text, t)
    finally:
        state.step, state.last_timestep, state.schedule = saved


def test_the_handle_has_a_short_repr():
    model = tiny_wan()
    handle = apply_rainfusion(model, sparsity=0.8, block_size=16)
    assert repr(handle) == "RainFusionHandle(Wan, 2 attention layers patched, 0 calls sparse, 0 dense)"
    handle.remove()
    assert repr(handle) == "RainFusionHandle(removed)"


def test_the_tiny_diffusers_example_runs():
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "examples" / "diffusers_tiny.py"
    run = subprocess.run([sys.executable, str(example)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("bit for bit the dense model") == 2 and "calls sparse" in run.stdout, run.stdout


def test_dense_last_steps_from_the_pipeline_or_given_by_hand():
    model, (latent, text) = tiny_wan(), wan_inputs((3, 16, 20))
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler()
    pipe = types.SimpleNamespace(transformer=model, scheduler=scheduler)
    handle = apply_rainfusion(pipe, sparsity=0.8, block_size=16, min_tokens=0,
                              schedule=Schedule(dense_steps=1, dense_last_steps=2))
    scheduler.set_timesteps(5)
    timesteps = [float(t) for t in scheduler.timesteps]
    ran = []
    for t in timesteps:
        out = _run(model, latent, text, t)
        ran.append("dense" if torch.equal(out, _run_dense(model, handle, latent, text, t)) else "sparse")
    assert ran == ["dense", "sparse", "sparse", "dense", "dense"], ran
    handle.remove()

    handle = apply_rainfusion(model, sparsity=0.8, block_size=16, min_tokens=0, schedule=Schedule(dense_last_steps=1))
    with pytest.raises(RuntimeError, match=r"needs the number of steps of the generation.*total_steps=N"):
        _run(model, latent, text, 900)
    handle.new_generation(total_steps=2)
    first = _run(model, latent, text, 900)
    assert not torch.equal(first, _run_dense(model, handle, latent, text, 900))
    assert torch.equal(_run(model, latent, text, 800), _run_dense(model, handle, latent, text, 800))  # the last
    with pytest.raises(ValueError, match="total_steps must be a positive int"):
        handle.new_generation(total_steps=0)
    handle.remove()


def test_layers_by_name_and_dense_layers():
    from rainfusion_core.integrations.diffusers import RainFusionAttnProcessor, attention_layers

    model = tiny_wan()
    names = attention_layers(model)
    assert names == ["blocks.0.attn1", "blocks.1.attn1"]
    patched = lambda: [isinstance(b.attn1.processor, RainFusionAttnProcessor) for b in model.blocks]  # noqa: E731
    for kwargs in (dict(layers=["blocks.1.attn1"]), dict(dense_layers=[0]), dict(dense_layers=["blocks.0.attn1"])):
        handle = apply_rainfusion(model, sparsity=0.8, block_size=16, **kwargs)
        assert patched() == [False, True], kwargs
        handle.remove()
    with pytest.raises(ValueError, match="layers: no layer named 'blocks.9.attn1'"):
        apply_rainfusion(model, layers=["blocks.9.attn1"])
    with pytest.raises(ValueError, match="give layers= .* or dense_layers= .*, not both"):
        apply_rainfusion(model, layers=[0], dense_layers=[1])
    with pytest.raises(ValueError, match="dense_layers: attention layer 7 does not exist"):
        apply_rainfusion(model, dense_layers=[7])
    assert patched() == [False, False]
