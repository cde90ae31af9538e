"""RainFusion under diffusers' context parallelism (Ulysses, ring, both): CPU processes (gloo) against one process."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed: pip install -e '.[diffusers]'")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("needs torch.distributed with gloo", allow_module_level=True)

from ranks import run_ranks  # noqa: E402
from tiny_models import MODELS, forward  # noqa: E402

WORLD = 2
# The families whose diffusers transformer has a context-parallel plan; their tiny grids split evenly in 2.
# LTX-2 has a plan too, but diffusers 0.42's own context-parallel forward of it fails (its audio-to-video
# attention gets the whole rotary table for a split sequence), dense or not.
FAMILIES = ["Wan", "LTX-Video", "Flux", "Qwen-Image", "MiniMax-H3"]  # MiniMax-H3 splits its packed sequence whole


def _grid(tiny):
    return (1, 8, 10) if tiny.frames_must_be_one else (3, 8, 10)


def _inputs(tiny):
    kwargs = tiny.inputs(_grid(tiny), 2, tiny.text_mask, 500)
    if tiny.family.startswith("LTX"):
        # diffusers 0.42's Ulysses path cannot take LTX's cross-attention mask (it views the mask per head
        # before the heads are split); the all-ones mask changes nothing, so leave it out.
        kwargs["encoder_attention_mask"] = None
    return kwargs


def _setup_cpu_parallelism():
    """What diffusers 0.42 needs for context parallelism on CPU tensors: it builds its device mesh
    for the current accelerator (CPU here, also on a machine with a GPU) and places each rank on
    ``rank % torch.accelerator.device_count()`` (0 on a CPU); its context-parallel hook logs with
    ``logger.warning_once``, which only exists once ``transformers`` is imported."""
    import diffusers.hooks.context_parallel as hooks

    torch._C._get_accelerator = lambda: torch.device("cpu")
    torch.accelerator.device_count = lambda: 1
    if not hasattr(hooks.logger, "warning_once"):
        hooks.logger.warning_once = hooks.logger.warning
    _native_attention_with_lse()


def _native_attention_with_lse():
    """diffusers' ring attention needs each partial attention's log-sum-exp, which its native SDPA backend (the
    only one that runs on a CPU) does not return: give it one here, so the dense ring runs on CPU processes too
    (the layers RainFusion leaves alone, and every layer after ``remove()``)."""
    import diffusers.models.attention_dispatch as dispatch

    native = dispatch._native_attention_forward_op

    def forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
        if not return_lse:
            return native(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, False,
                          _save_ctx, _parallel_config)
        assert not dropout_p and not is_causal and not enable_gqa
        q, k, v = (x.transpose(1, 2).double() for x in (query, key, value))  # [B, H, S, D]
        scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else \
                scores + attn_mask
        lse = torch.logsumexp(scores, dim=-1)
        out = torch.softmax(scores, dim=-1) @ v
        return out.transpose(1, 2).to(query.dtype), lse.transpose(1, 2).float()  # [B, S, H, D], [B, S, H]

    dispatch._native_attention_forward_op = forward_op


def _ulysses_worker(rank, world, jobs):
    """Each ``(family, order)`` of ``jobs`` under Ulysses: its sparse output, and the dense one after ``remove()``."""
    _setup_cpu_parallelism()
    return {job: _ulysses_job(world, *job) for job in jobs}


def _ulysses_job(world, family, order):
    from diffusers import ContextParallelConfig

    tiny = next(m for m in MODELS if m.family == family)
    model = tiny.build(0)
    torch.manual_seed(1)
    kwargs = _inputs(tiny)
    handle = _parallel_rainfusion(model, ContextParallelConfig(ulysses_degree=world), order)
    sparse = forward(model, kwargs)
    handle.remove()
    dense = forward(model, kwargs)  # remove() leaves a working context-parallel dense model
    return sparse.numpy(), dense.numpy()


def _parallel_rainfusion(model, config, order):
    """``enable_parallelism`` and ``apply_rainfusion`` on ``model``, in ``order``; the handle."""
    from rainfusion_core.integrations.diffusers import apply_rainfusion

    if order == "parallel-first":
        model.enable_parallelism(config=config)
        return apply_rainfusion(model, sparsity=0.8, block_size=16, backend="torch")
    handle = apply_rainfusion(model, sparsity=0.8, block_size=16, backend="torch")
    model.enable_parallelism(config=config)
    return handle


def _single_process(family):
    from rainfusion_core.integrations.diffusers import apply_rainfusion

    tiny = next(m for m in MODELS if m.family == family)
    model = tiny.build(0)
    torch.manual_seed(1)
    kwargs = _inputs(tiny)
    dense = forward(model, kwargs)
    handle = apply_rainfusion(model, sparsity=0.8, block_size=16, backend="torch")
    sparse = forward(model, kwargs)
    handle.remove()
    return sparse, dense


# Every family in one call order (Wan in both): one pair of processes runs them all, since spawning one costs seconds
ORDER = {family: "rainfusion-first" if family == "Wan" else "parallel-first" for family in FAMILIES}
ULYSSES_JOBS = [*ORDER.items(), ("Wan", "parallel-first")]


@pytest.fixture(scope="module")
def ulysses_outputs():
    """``(family, order) -> (sparse, dense)`` outputs of rank 0 for every job of ``ULYSSES_JOBS``."""
    found = run_ranks(_ulysses_worker, WORLD, ULYSSES_JOBS)[0]
    return {job: (torch.from_numpy(sparse), torch.from_numpy(dense)) for job, (sparse, dense) in found.items()}


@pytest.mark.xdist_group("ulysses")
@pytest.mark.parametrize("family", FAMILIES)
def test_ulysses_two_processes_equal_one(family, ulysses_outputs):
    sparse, dense = ulysses_outputs[family, ORDER[family]]
    expected_sparse, expected_dense = _single_process(family)
    torch.testing.assert_close(dense, expected_dense, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sparse, expected_sparse, rtol=1e-4, atol=1e-5)
    assert (sparse - dense).abs().max() > 1e-3  # the sparse path ran


@pytest.mark.xdist_group("ulysses")
def test_ulysses_order_of_the_two_calls_does_not_matter(ulysses_outputs):
    first = ulysses_outputs["Wan", "parallel-first"]
    second = ulysses_outputs["Wan", "rainfusion-first"]
    torch.testing.assert_close(first[0], second[0], rtol=0, atol=0)


@pytest.mark.parametrize("config, message", [
    (dict(ring_degree=2, ring_anything=True), "ring_anything"),
    (dict(ulysses_degree=2, ulysses_anything=True), "ulysses_anything"),
    (dict(ulysses_degree=3), "do not divide among ulysses_degree=3"),
])
def test_unsupported_parallel_configs_are_refused_at_either_call(config, message):
    """Checked without processes: the refusal reads only the config (and the heads of each layer)."""
    from diffusers import ContextParallelConfig
    from diffusers.models._modeling_parallel import ParallelConfig

    from rainfusion_core.integrations.diffusers import apply_rainfusion

    cp = ContextParallelConfig.__new__(ContextParallelConfig)  # skip __post_init__'s world checks
    cp.ring_degree, cp.ulysses_degree, cp.ulysses_anything = config.get("ring_degree", 1), config.get(
        "ulysses_degree", 1), config.get("ulysses_anything", False)
    cp.ring_anything = config.get("ring_anything", False)
    parallel = ParallelConfig(context_parallel_config=cp)
    tiny = MODELS[0]
    model = tiny.build(0)  # 2 heads
    handle = apply_rainfusion(model, block_size=16, backend="torch")
    with pytest.raises(ValueError, match=message):
        model.blocks[0].attn1.processor._parallel_config = parallel  # what enable_parallelism does
    handle.remove()
    model.blocks[0].attn1.processor._parallel_config = parallel  # as if enable_parallelism came first
    with pytest.raises(ValueError, match=message):
        apply_rainfusion(model, block_size=16, backend="torch")


# --------------------------------------------------------------------------- ring and unified attention
# Qwen-Image's text is padded (its padded rows run dense); MiniMax-H3 splits its packed sequence whole
RING_FAMILIES = ["Wan", "Flux", "LTX-Video", "Qwen-Image", "MiniMax-H3"]


def _ring_worker(rank, world, ring, ulysses, families, compiled=False):
    """Each of ``families`` in both call orders; the sparse outputs, and whether remove() gave the layers back
    their diffusers processors."""
    _setup_cpu_parallelism()
    from diffusers import ContextParallelConfig

    from rainfusion_core.integrations.diffusers import attention_layers

    found = {}
    for family in families:
        tiny = next(m for m in MODELS if m.family == family)
        for order in ("parallel-first", "rainfusion-first"):
            model = tiny.build(0)
            torch.manual_seed(1)
            kwargs = _inputs(tiny)
            before = {name: type(module.processor) for name, module in model.named_modules()
                      if hasattr(module, "processor")}
            config = ContextParallelConfig(ring_degree=ring, ulysses_degree=ulysses)
            handle = _parallel_rainfusion(model, config, order)
            sparse = forward(model, kwargs)
            masks = handle.stats().masks
            layers = len(attention_layers(model))
            if compiled and family == "Wan" and order == "parallel-first":  # the ring op, traced whole
                fresh = tiny.build(0)
                fresh_handle = _parallel_rainfusion(fresh, config, "parallel-first")
                found["compiled"] = forward(torch.compile(fresh), kwargs).numpy()
                fresh_handle.remove()
            handle.remove()
            after = {name: type(module.processor) for name, module in model.named_modules()
                     if hasattr(module, "processor")}
            # remove() leaves a working context-parallel dense model; but diffusers' own ring cannot take a
            # key-padding mask (it applies each rank's slice of the mask to every key shard, or fails to broadcast
            # it under Ulysses x ring), so Qwen-Image's padded text has no dense ring to compare with
            dense = None if family == "Qwen-Image" else forward(model, kwargs).numpy()
            found[family, order] = (sparse.numpy(), dense, masks, layers, before == after)
    return found


@pytest.mark.parametrize("ring, ulysses, families", [
    (2, 1, RING_FAMILIES),
    (4, 1, ["Wan", "Qwen-Image"]),  # four ranks on the CI's two cores: a video family and the padded text
    (2, 2, RING_FAMILIES),
], ids=["ring2", "ring4", "ulysses2xring2"])
def test_ring_and_unified_equal_one_process(ring, ulysses, families):
    """Ring degree 2 and 4, and Ulysses 2 x ring 2, each equal one process for every family (ring 4: two), in
    either call order; after ``remove()`` the model runs diffusers' own (dense) ring and equals one process too."""
    found = run_ranks(_ring_worker, ring * ulysses, ring, ulysses, families, ring == 2 and ulysses == 1)
    for family in families:
        expected_sparse, expected_dense = _single_process(family)
        for order in ("parallel-first", "rainfusion-first"):
            sparse, dense, masks, layers, restored = found[0][family, order]
            sparse = torch.from_numpy(sparse)
            torch.testing.assert_close(sparse, expected_sparse, rtol=1e-4, atol=1e-5, msg=f"{family} {order}")
            if dense is not None:
                torch.testing.assert_close(torch.from_numpy(dense), expected_dense, rtol=1e-4, atol=1e-5,
                                           msg=f"{family} {order} dense")
            assert (sparse - expected_dense).abs().max() > 1e-3  # the sparse path ran
            assert masks >= layers, (family, masks, layers)  # every layer predicted its mask on the ring
            assert restored, f"{family} {order}: remove() left RainFusion processors"
            for other in found[1:]:  # every rank gathers the same output
                torch.testing.assert_close(torch.from_numpy(other[family, order][0]), sparse, rtol=0, atol=0)
    if ring == 2 and ulysses == 1:  # torch.compile of a fresh model: its first call traces the ring op
        torch.testing.assert_close(torch.from_numpy(found[0]["compiled"]), _single_process("Wan")[0], rtol=1e-4,
                                   atol=1e-5)


def test_mask_reuse_and_fp8_are_refused_under_ring_at_either_call(monkeypatch):
    from diffusers import ContextParallelConfig
    from diffusers.models._modeling_parallel import ParallelConfig

    from rainfusion_core.integrations.diffusers import apply_rainfusion

    cp = ContextParallelConfig.__new__(ContextParallelConfig)  # skip __post_init__'s world checks
    cp.ring_degree, cp.ulysses_degree, cp.ulysses_anything, cp.ring_anything = 2, 1, False, False
    parallel = ParallelConfig(context_parallel_config=cp)
    model = MODELS[0].build(0)
    handle = apply_rainfusion(model, block_size=16, backend="torch", refresh_every=2)
    with pytest.raises(ValueError, match="refresh_every > 1 does not run under ring attention"):
        model.blocks[0].attn1.processor._parallel_config = parallel
    handle.remove()
    model.blocks[0].attn1.processor._parallel_config = parallel
    with pytest.raises(ValueError, match="refresh_every > 1 does not run under ring attention"):
        apply_rainfusion(model, block_size=16, backend="torch", refresh_every=2)
    import rainfusion_core.integrations.diffusers as integration

    with monkeypatch.context() as patch:  # as on a Hopper GPU, where FP8 is offered
        patch.setattr(integration, "_check_precision_offered", lambda *args: None)
        with pytest.raises(ValueError, match="precision='fp8' does not run under ring attention"):
            apply_rainfusion(model, block_size=16, precision="fp8")
    apply_rainfusion(model, block_size=16, backend="torch").remove()  # without reuse it applies
