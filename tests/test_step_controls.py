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
