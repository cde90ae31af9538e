"""Controls per denoising step: a sparsity that changes with the step (a list or a function of it).

Each step's output equals a handle with that step's one sparsity; a compiled model runs every
step with the graphs it compiled at the first one.
"""
import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is not installed: pip install -e '.[diffusers]'")
import torch._dynamo.testing  # noqa: E402

from helpers import tiny_wan, wan_inputs  # noqa: E402
from rainfusion_core.integrations.diffusers import apply_rainfusion  # noqa: E402

TIMESTEPS = (900.0, 800.0, 700.0)  # three steps of one generation


def _steps(model, latent, text):
    with torch.no_grad():
        return [model(latent, torch.full((1,), t), text, return_dict=False)[0] for t in TIMESTEPS]


def _one_sparsity(model, latent, text, sparsity):
    handle = apply_rainfusion(model, sparsity=sparsity, block_size=16, min_tokens=0, backend="torch")
    outs = _steps(model, latent, text)
    handle.remove()
    return outs


@pytest.mark.parametrize("rule", [[0.5, 0.9], lambda step: 0.5 if step == 0 else 0.9], ids=["list", "function"])
def test_each_step_runs_its_own_sparsity(rule):
    model, (latent, text) = tiny_wan(), wan_inputs((3, 16, 20))
    low, high = _one_sparsity(model, latent, text, 0.5), _one_sparsity(model, latent, text, 0.9)
    assert not torch.equal(low[1], high[1])  # the two sparsities give different outputs here
    handle = apply_rainfusion(model, sparsity=rule, block_size=16, min_tokens=0, backend="torch")
    outs = _steps(model, latent, text)
    assert torch.equal(outs[0], low[0])
    assert torch.equal(outs[1], high[1]) and torch.equal(outs[2], high[2])  # a list's last value goes on
    assert handle.stats().sparse_calls == 3
    handle.remove()


def test_a_compiled_model_runs_every_step_with_the_graphs_of_the_first():
    model, (latent, text) = tiny_wan(), wan_inputs((3, 16, 20))
    rule = [0.5, 0.7, 0.9]
    handle = apply_rainfusion(model, sparsity=rule, block_size=16, min_tokens=0, backend="torch")
    eager = _steps(model, latent, text)
    handle.remove()
    handle = apply_rainfusion(model, sparsity=rule, block_size=16, min_tokens=0, backend="torch")
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    model.compile_repeated_blocks(fullgraph=True, backend=counter)
    with torch.no_grad():
        first = model(latent, torch.full((1,), TIMESTEPS[0]), text, return_dict=False)[0]
        frames = counter.frame_count
        rest = [model(latent, torch.full((1,), t), text, return_dict=False)[0] for t in TIMESTEPS[1:]]
    assert frames >= 1 and counter.frame_count == frames  # no recompilation for the later steps' sparsities
    for got, want in zip([first, *rest], eager):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    handle.remove()
    torch._dynamo.reset()


def test_a_per_step_sparsity_is_checked_and_named():
    model = tiny_wan()
    with pytest.raises(ValueError, match=r"sparsity\[1\] \(step 1\): sparsity must be in \[0, 1\), got 1.5"):
        apply_rainfusion(model, sparsity=[0.5, 1.5])
    with pytest.raises(ValueError, match="at least one value"):
        apply_rainfusion(model, sparsity=[])
    with pytest.raises(TypeError, match=r"sparsity\[0\] \(step 0\): sparsity must be a float"):
        apply_rainfusion(model, sparsity=[True])
    with pytest.raises(TypeError, match="a list of them \\(one per step\\) or a function of the step"):
        apply_rainfusion(model, sparsity="0.8")
    latent, text = wan_inputs((3, 16, 20))
    handle = apply_rainfusion(model, sparsity=lambda step: 0.5 + step, block_size=16, min_tokens=0)
    with torch.no_grad():
        model(latent, torch.full((1,), 900.0), text, return_dict=False)  # step 0: 0.5
        with pytest.raises(ValueError, match=r"returned 1.5 for step 1: sparsity must be in \[0, 1\)"):
            model(latent, torch.full((1,), 800.0), text, return_dict=False)
    handle.remove()


# --------------------------------------------------------------------------- mask reuse: refresh_every
def _call(model, latent, text, t):
    with torch.no_grad():
        return model(latent, torch.full((1,), t), text, return_dict=False)[0]


def test_refresh_every_reuses_each_layers_mask_between_refreshes():
    model, (latent, text) = tiny_wan(), wan_inputs((3, 16, 20))
    latents = [latent] + [torch.randn_like(latent) for _ in range(3)]  # new q and k every step
    fresh = apply_rainfusion(model, sparsity=0.8, block_size=16, min_tokens=0, backend="torch")
    every = [_call(model, x, text, t) for x, t in zip(latents, (900.0, 800.0, 700.0, 600.0))]
    fresh.remove()
    handle = apply_rainfusion(model, sparsity=0.8, block_size=16, min_tokens=0, backend="torch", refresh_every=2)
    reused = [_call(model, x, text, t) for x, t in zip(latents, (900.0, 800.0, 700.0, 600.0))]
    assert torch.equal(reused[0], every[0]) and torch.equal(reused[2], every[2])  # predicted at steps 0 and 2
    assert not torch.equal(reused[1], every[1]) and not torch.equal(reused[3], every[3])  # step 0's, step 2's
    stats = handle.stats()
    assert [s.masks for s in stats.layers.values()] == [2] * len(model.blocks)
    assert stats.reused == 2 * len(model.blocks)
    _call(model, latents[0], text, 900.0)  # a larger timestep: a new generation predicts again
    assert [s.masks for s in handle.stats().layers.values()] == [3] * len(model.blocks)
    handle.remove()


def test_guidance_calls_keep_their_own_masks():
    model, (latent, text) = tiny_wan(), wan_inputs((3, 16, 20))
    other = torch.randn_like(latent)  # the second call of a step (the unconditional half of guidance)
    fresh = apply_rainfusion(model, sparsity=0.8, block_size=16, min_tokens=0, backend="torch")
    want = _call(model, other, text, 900.0)
    fresh.remove()
    handle = apply_rainfusion(model, sparsity=0.8, block_size=16, min_tokens=0, backend="torch", refresh_every=3)
    _call(model, latent, text, 900.0)
    assert torch.equal(_call(model, other, text, 900.0), want)  # never the first call's mask
    handle.remove()


def test_refresh_every_is_checked():
    model = tiny_wan()
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="refresh_every must be a positive int"):
            apply_rainfusion(model, refresh_every=bad)


def test_a_compiled_model_reuses_masks_as_the_eager_one_does_with_one_graph():
    model, (latent, text) = tiny_wan(), wan_inputs((3, 16, 20))
    latents = [latent] + [torch.randn_like(latent) for _ in range(3)]
    timesteps = (900.0, 800.0, 700.0, 600.0)
    handle = apply_rainfusion(model, sparsity=[0.8, 0.8, 0.6], block_size=16, min_tokens=0, backend="torch",
                              refresh_every=2)
    eager = [_call(model, x, text, t) for x, t in zip(latents, timesteps)]
    assert handle.stats().reused == 2 * len(model.blocks)  # steps 1 and 3 (step 2: a new sparsity, predicted)
    handle.remove()
    handle = apply_rainfusion(model, sparsity=[0.8, 0.8, 0.6], block_size=16, min_tokens=0, backend="torch",
                              refresh_every=2)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    model.compile_repeated_blocks(fullgraph=True, backend=counter)
    compiled = [_call(model, x, text, t) for x, t in zip(latents, timesteps)]
    assert counter.frame_count == 1  # one graph for the block, every step
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert handle.stats().reused == 2 * len(model.blocks)  # steps 1 and 3
    handle.remove()
    torch._dynamo.reset()


def test_a_new_handle_compiles_nothing_new():
    model, (latent, text) = tiny_wan(), wan_inputs((3, 16, 20))
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    model.compile_repeated_blocks(fullgraph=True, backend=counter)
    for _ in range(3):  # the handle's store travels as data, not as a constant of the graph
        handle = apply_rainfusion(model, sparsity=0.8, block_size=16, min_tokens=0, backend="torch", refresh_every=2)
        _call(model, latent, text, 900.0)
        _call(model, latent, text, 800.0)
        assert handle.stats().reused == len(model.blocks)
        handle.remove()
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_a_mask_is_predicted_again_when_the_sparsity_comes_back():
    model, (latent, text) = tiny_wan(), wan_inputs((3, 16, 20))
    latents = [latent] + [torch.randn_like(latent) for _ in range(2)]
    timesteps = (900.0, 800.0, 700.0)
    fresh = apply_rainfusion(model, sparsity=0.8, block_size=16, min_tokens=0, backend="torch")
    want = [_call(model, x, text, t) for x, t in zip(latents, timesteps)]
    fresh.remove()
    handle = apply_rainfusion(model, sparsity=[0.8, 0.5, 0.8], block_size=16, min_tokens=0, backend="torch",
                              refresh_every=3)
    got = [_call(model, x, text, t) for x, t in zip(latents, timesteps)]
    assert torch.equal(got[2], want[2]) and handle.stats().reused == 0  # one mask per call: step 1 replaced it
    handle.remove()


def test_kept_masks_are_one_per_call_and_freed_at_the_last_step_and_by_remove():
    model, (latent, text) = tiny_wan(), wan_inputs((3, 16, 20))
    handle = apply_rainfusion(model, sparsity=lambda step: 0.5 + 0.1 * step, block_size=16, min_tokens=0,
                              backend="torch", refresh_every=4)
    store = handle.state.reuse
    handle.new_generation(total_steps=4)
    for step, t in enumerate((900.0, 800.0, 700.0)):
        _call(model, latent, text, t)
        assert len(store._masks) == len(model.blocks)  # a new sparsity replaces each call's mask
    _call(model, latent, text, 600.0)  # the last step: nothing is kept for after it
    assert not store._masks
    _call(model, latent, text, 950.0)  # a new generation
    assert len(store._masks) == len(model.blocks)
    handle.remove()
    assert not store._masks


def test_steps_follow_the_pipelines_scheduler_when_timesteps_repeat():
    import types

    import diffusers

    model, (latent, text) = tiny_wan(), wan_inputs((3, 16, 20))
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler()
    pipe = types.SimpleNamespace(transformer=model, scheduler=scheduler)
    lower = apply_rainfusion(pipe, sparsity=0.8, block_size=16, min_tokens=0, backend="torch", refresh_every=2)
    upper = apply_rainfusion(pipe, sparsity=0.8, block_size=16, min_tokens=0, backend="torch")
    upper.remove()  # the lower handle keeps following the scheduler
    scheduler.set_timesteps(4)
    for step in range(3):  # a timestep in bfloat16 can repeat from one step to the next
        out = _call(model, latent, text, 996.0)
        assert (lower.step, lower.state.call_in_step) == (step, 0)
        scheduler.step(out, scheduler.timesteps[step], latent)
    scheduler.set_timesteps(4)
    _call(model, latent, text, 996.0)
    assert lower.step == 0
    lower.remove()
    assert "set_timesteps" not in vars(scheduler) and "step" not in vars(scheduler)


def test_step_controls_refuse_what_they_cannot_run():
    import numpy as np

    from rainfusion_core.backends.torch_backend import TorchBackend

    model = tiny_wan()
    with pytest.raises(ValueError, match="refresh_every > 1 needs a backend by name or device"):
        apply_rainfusion(model, refresh_every=2, backend=TorchBackend())
    asked = []
    handle = apply_rainfusion(model, sparsity=lambda step: asked.append(step) or 0.7, block_size=16, min_tokens=0)
    assert asked == []  # asked per step, from the first step on, never at apply time
    latent, text = wan_inputs((3, 16, 20))
    _call(model, latent, text, 900.0)
    _call(model, torch.randn_like(latent), text, 900.0)  # guidance's second call: the same step
    assert asked == [0]
    handle.remove()
    handle = apply_rainfusion(model, sparsity=np.linspace(0.5, 0.8, 3, dtype=np.float32), block_size=16)
    assert handle.state.sparsity.values == pytest.approx((0.5, 0.65, 0.8))
    handle.remove()
