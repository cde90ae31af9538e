"""Dense below the measured crossover: the rule, its override, and how the handle counts it.

``tests/conftest.py`` turns the crossover off for the rest of the suite (``RAINFUSION_MIN_TOKENS=0``);
every test here removes that, so the defaults users get are what is checked.
"""
import pytest
import torch
import torch.nn.functional as F

import rainfusion_core as rf
from rainfusion_core.crossover import CROSSOVER, MIN_TOKENS_ENV, crossover_for, dense_reason, expected_density


@pytest.fixture(autouse=True)
def _defaults(monkeypatch):
    monkeypatch.delenv(MIN_TOKENS_ENV, raising=False)


def _qkv(layout, heads=(2, 2), dim=32, bsnd=False):
    shape = lambda h: (1, layout.seq_len, h, dim) if bsnd else (1, h, layout.seq_len, dim)  # noqa: E731
    return torch.randn(shape(heads[0])), torch.randn(shape(heads[1])), torch.randn(shape(heads[1]))


def _dense(q, k, v, bsnd=False):
    if bsnd:
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2) if bsnd else out


def test_the_table_the_environment_and_zero():
    assert crossover_for("cuda") is CROSSOVER["cuda"] and crossover_for("cpu") is CROSSOVER["cpu"]
    assert crossover_for("npu").min_tokens == 0  # not measured: always sparse
    assert crossover_for("cpu", 100).min_tokens == 100
    assert crossover_for("cpu", 0).min_tokens == 0 and dense_reason("cpu", 10, 1.0, 0) is None
    reason = dense_reason("cuda", 4096, 0.3)
    assert reason is not None and "4096 latent tokens" in reason and "cuda" in reason
    assert "keep about 1.00" in dense_reason("cuda", 10 ** 6, 1.0)
    assert dense_reason("cuda", 10 ** 6, 0.3) is None


def test_the_environment_variable_is_checked(monkeypatch):
    monkeypatch.setenv(MIN_TOKENS_ENV, "0")
    assert crossover_for("cuda").min_tokens == 0
    monkeypatch.setenv(MIN_TOKENS_ENV, "2048")
    assert crossover_for("cuda").min_tokens == 2048
    monkeypatch.setenv(MIN_TOKENS_ENV, "many")
    with pytest.raises(ValueError, match="RAINFUSION_MIN_TOKENS must be a non-negative int, got 'many'"):
        crossover_for("cpu")


def test_expected_density_bounds_the_predicted_one():
    layout = rf.VideoLayout(4, 16, 16, text_len=40)
    q, k, _ = _qkv(layout)
    for sparsity in (0.0, 0.5, 0.8, 0.95):
        mask = rf.predict_block_mask(q, k, layout, sparsity=sparsity, block_size=64)
        keep = max(1, -(-mask.shape[3] * (1 - sparsity) // 1))
        estimate = expected_density(layout.seq_len, 64, int(keep), 4 + 1)  # sink: 256 tokens, text: 40
        assert mask.density <= estimate + 1e-9 and estimate <= 1.0


@pytest.mark.parametrize("bsnd", [False, True], ids=["BNSD", "BSND"])
@pytest.mark.parametrize("heads", [(2, 2), (4, 2)], ids=["MHA", "GQA"])
def test_below_the_crossover_a_call_is_dense_attention(bsnd, heads):
    layout = rf.VideoLayout(3, 8, 16)  # 384 latent tokens: below every measured crossover
    q, k, v = _qkv(layout, heads, bsnd=bsnd)
    tensor_layout = "BSND" if bsnd else "BNSD"
    out = rf.sparse_attention(q, k, v, layout, sparsity=0.9, block_size=32, tensor_layout=tensor_layout)
    torch.testing.assert_close(out, _dense(q, k, v, bsnd), rtol=0, atol=0)
    assert out.shape == q.shape and out.is_contiguous()
    sparse = rf.sparse_attention(q, k, v, layout, sparsity=0.9, block_size=32, tensor_layout=tensor_layout,
                                 min_tokens=0)  # 0: always sparse
    assert (sparse - out).abs().max() > 1e-3


def test_above_the_crossover_a_call_is_sparse_and_a_dense_mask_is_not():
    layout = rf.VideoLayout(4, 32, 40)  # 5120 latent tokens: above the CPU crossover
    q, k, v = _qkv(layout, dim=16)
    assert layout.video_len >= CROSSOVER["cpu"].min_tokens
    sparse = rf.sparse_attention(q, k, v, layout, sparsity=0.9, backend="cpu")  # the device: automatic choice
    torch.testing.assert_close(sparse, rf.sparse_attention(q, k, v, layout, sparsity=0.9, backend="cpu",
                                                           min_tokens=0), rtol=0, atol=0)
    assert (sparse - _dense(q, k, v)).abs().max() > 1e-3
    # sparsity 0 keeps every tile: sparse attention would only add work
    dense = rf.sparse_attention(q, k, v, layout, sparsity=0.0)
    torch.testing.assert_close(dense, _dense(q, k, v), rtol=0, atol=0)
    # a token count of the caller's own replaces the table's
    assert (rf.sparse_attention(q, k, v, layout, sparsity=0.9, min_tokens=10 ** 6) - _dense(q, k, v)).abs().max() == 0


def test_a_backend_named_explicitly_always_runs_and_a_wrong_device_is_an_error():
    layout = rf.VideoLayout(3, 8, 16)  # below the crossover
    q, k, v = _qkv(layout)
    named = rf.sparse_attention(q, k, v, layout, sparsity=0.9, block_size=32, backend="torch")
    assert (named - _dense(q, k, v)).abs().max() > 1e-3  # sparse: the torch backend was asked for by name
    torch.testing.assert_close(rf.sparse_attention(q, k, v, layout, sparsity=0.9, block_size=32,
                                                   backend=rf.get_backend("torch")), named, rtol=0, atol=0)
    with pytest.raises(rf.BackendUnavailableError, match="device 'cpu:1' is not present on this machine"):
        rf.sparse_attention(q, k, v, layout, backend="cpu:1")  # dense path: the device is still checked
    with pytest.raises(rf.UnknownBackendError, match="unknown backend 'no_such_backend'"):
        rf.sparse_attention(q, k, v, layout, backend="no_such_backend")


def test_min_tokens_is_checked_and_fp8_never_turns_dense():
    layout = rf.VideoLayout(3, 8, 16)
    q, k, v = _qkv(layout)
    for bad in (-1, 1.5, True, "0"):
        with pytest.raises(ValueError, match="min_tokens must be a non-negative int"):
            rf.sparse_attention(q, k, v, layout, min_tokens=bad)
    # FP8 is asked for by name: below the crossover it still runs (or refuses) the sparse FP8 path
    with pytest.raises(rf.UnsupportedInputError, match="precision 'fp8'"):
        rf.sparse_attention(q, k, v, layout, backend="torch", precision="fp8")


def test_the_dense_path_compiles_without_a_graph_break():
    layout = rf.VideoLayout(3, 8, 16)
    q, k, v = _qkv(layout)
    layer = torch.compile(lambda q, k, v: rf.sparse_attention(q, k, v, layout, block_size=32), fullgraph=True)
    torch.testing.assert_close(layer(q, k, v), _dense(q, k, v), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- the diffusers handle
def test_the_handle_counts_calls_each_way_and_the_mean_density():
    pytest.importorskip("diffusers", reason="diffusers is not installed: pip install -e '.[diffusers]'")
    from helpers import tiny_wan, wan_inputs
    from rainfusion_core.integrations.diffusers import Schedule, apply_rainfusion

    model, (latent, text) = tiny_wan(), wan_inputs((3, 16, 20))

    def run(t=500.0):
        with torch.no_grad():
            return model(latent, torch.full((1,), t), text, return_dict=False)[0]

    dense, dense_first = run(), run(900.0)
    # 240 latent tokens: below the CPU crossover, so the model runs as it would without RainFusion
    handle = apply_rainfusion(model, sparsity=0.8, block_size=16)
    assert torch.equal(run(), dense)
    stats = handle.stats()
    assert (stats.sparse_calls, stats.dense_by_crossover, stats.masks) == (0, 1, 0)
    assert "240 latent tokens" in stats.dense_reason and stats.mean_density is None
    handle.remove()

    handle = apply_rainfusion(model, sparsity=0.8, block_size=16, min_tokens=0, schedule=Schedule(dense_steps=1))
    assert torch.equal(run(900.0), dense_first)  # step 0: dense by the schedule, exactly the model
    assert (run(500.0) - dense).abs().max() > 1e-4  # step 1: sparse
    stats = handle.stats()
    layers = len(model.blocks)
    assert (stats.sparse_calls, stats.dense_by_schedule, stats.dense_by_crossover) == (1, 1, 0)
    assert stats.dense_calls == 1 and stats.masks == layers
    mask = rf.predict_block_mask(torch.randn(1, 2, 240, 16), torch.randn(1, 2, 240, 16), rf.VideoLayout(3, 8, 10),
                                 sparsity=0.8, block_size=16)
    assert 0 < stats.mean_density < 1 and abs(stats.mean_density - mask.density) < 0.25
    handle.remove()
    handle = apply_rainfusion(model, sparsity=0.8, block_size=16, backend="torch")  # named: always sparse
    assert (run() - dense).abs().max() > 1e-4 and handle.stats().sparse_calls == 1
    handle.remove()
    with pytest.raises(ValueError, match="min_tokens must be a non-negative int"):
        apply_rainfusion(model, min_tokens=-5)


def test_the_handle_reports_each_layers_density_and_leaves_dense_layers_out(monkeypatch):
    pytest.importorskip("diffusers", reason="diffusers is not installed: pip install -e '.[diffusers]'")
    from helpers import tiny_wan, wan_inputs
    from rainfusion_core.integrations.diffusers import apply_rainfusion, attention_layers
    from rainfusion_core.integrations.diffusers.state import Tally

    model, (latent, text) = tiny_wan(), wan_inputs((3, 16, 20))
    names = attention_layers(model)
    seen = []
    real = Tally.add_mask
    monkeypatch.setattr(Tally, "add_mask", lambda self, mask, layer=None: seen.append((layer, mask.density))
                        or real(self, mask, layer))
    handle = apply_rainfusion(model, sparsity=0.7, block_size=16, min_tokens=0, dense_layers=[names[1]])
    with torch.no_grad():
        for t in (900.0, 500.0):
            model(latent, torch.full((1,), t), text, return_dict=False)
    stats = handle.stats()
    sparse = [name for i, name in enumerate(names) if i != 1]
    assert list(stats.layers) == sparse  # in layer order; the dense layer has no entry
    for index, name in enumerate(names):
        if index == 1:
            continue
        densities = [d for layer, d in seen if layer == index]
        assert stats.layers[name].masks == 2 == len(densities)
        assert abs(stats.layers[name].mean_density - sum(densities) / 2) < 1e-6  # equal tiles per call
    assert stats.masks == 2 * len(sparse)
    assert abs(stats.mean_density - sum(s.mean_density for s in stats.layers.values()) / len(sparse)) < 1e-9
    handle.remove()
