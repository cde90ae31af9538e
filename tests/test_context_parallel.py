"""RainFusion under diffusers' Ulysses context parallelism: 2 CPU processes (gloo) against one process."""
import os
import queue
import socket

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed: pip install -e '.[diffusers]'")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("needs torch.distributed with gloo", allow_module_level=True)

import torch.multiprocessing as mp  # noqa: E402

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def _worker(rank, port, family, order, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        _setup_cpu_parallelism()
        from diffusers import ContextParallelConfig

        from rainfusion_core.integrations.diffusers import apply_rainfusion

        tiny = next(m for m in MODELS if m.family == family)
        model = tiny.build(0)
        torch.manual_seed(1)
        kwargs = _inputs(tiny)
        config = ContextParallelConfig(ulysses_degree=WORLD)
        if order == "parallel-first":
            model.enable_parallelism(config=config)
            handle = apply_rainfusion(model, sparsity=0.8, block_size=16, backend="torch")
        else:
            handle = apply_rainfusion(model, sparsity=0.8, block_size=16, backend="torch")
            model.enable_parallelism(config=config)
        sparse = forward(model, kwargs)
        handle.remove()
        dense = forward(model, kwargs)  # remove() leaves a working context-parallel dense model
        if rank == 0:
            results.put((sparse.numpy(), dense.numpy()))  # by value: a rank's shared memory ends with it
            results.close()
            results.join_thread()  # the result is out of this process before it tears anything down
        dist.barrier()  # both ranks done before either destroys the group (gloo aborted at exit otherwise)
    finally:
        dist.destroy_process_group()


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


def _run_parallel(family, order):
    context = mp.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    processes = [context.Process(target=_worker, args=(rank, port, family, order, results))
                 for rank in range(WORLD)]
    for p in processes:
        p.start()
    try:
        while True:
            try:
                sparse, dense = (torch.from_numpy(x) for x in results.get(timeout=2))
                break
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in processes):
                    raise AssertionError(f"a rank failed: exit codes {[p.exitcode for p in processes]}") from None
    finally:
        for p in processes:
            p.join(timeout=60)
    assert all(p.exitcode == 0 for p in processes), [p.exitcode for p in processes]
    return sparse, dense


@pytest.mark.parametrize("family", FAMILIES)
def test_ulysses_two_processes_equal_one(family):
    sparse, dense = _run_parallel(family, "parallel-first" if family != "Wan" else "rainfusion-first")
    expected_sparse, expected_dense = _single_process(family)
    torch.testing.assert_close(dense, expected_dense, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sparse, expected_sparse, rtol=1e-4, atol=1e-5)
    assert (sparse - dense).abs().max() > 1e-3  # the sparse path ran


def test_ulysses_order_of_the_two_calls_does_not_matter():
    first = _run_parallel("Wan", "parallel-first")
    second = _run_parallel("Wan", "rainfusion-first")
    torch.testing.assert_close(first[0], second[0], rtol=0, atol=0)


@pytest.mark.parametrize("config, message", [
    (dict(ring_degree=2), "ring attention"),
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
