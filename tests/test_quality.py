import math

import pytest
import torch

import rainfusion_core as rf
from helpers import random_dense
from rainfusion_core.cli import main
from rainfusion_core.quality import (
    attention_recall, block_attention_mass, evaluate, load_qkv, oracle_block_mask, random_block_mask, save_qkv,
)
from rainfusion_core.synthetic import video_dit_qkv


def naive_recall(q, k, dense, block_size, scale):
    """Full float64 softmax matrix per (batch, head); kept mass per row, averaged."""
    q, k = q.double(), k.double()
    group = q.shape[1] // k.shape[1]
    rows = torch.arange(q.shape[2]) // block_size
    cols = torch.arange(k.shape[2]) // block_size
    out = torch.zeros(q.shape[:2], dtype=torch.float64)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            probs = torch.softmax(q[b, h] @ k[b, h // group].T * scale, dim=-1)
            out[b, h] = (probs * dense[b, h][rows][:, cols]).sum(-1).mean()
    return out


@pytest.mark.parametrize("q_len, kv_len, heads, bs", [(113, 203, (2, 2), 64), (1000, 1000, (4, 2), 128), (129, 129, (2, 1), 128)])
def test_attention_recall_equals_naive_float64(q_len, kv_len, heads, bs, monkeypatch):
    monkeypatch.setattr("rainfusion_core.quality.CHUNK_ELEMENTS", 1)  # force many row chunks
    q = torch.randn(2, heads[0], q_len, 32, dtype=torch.float64)
    k = torch.randn(2, heads[1], kv_len, 32, dtype=torch.float64)
    dense = random_dense(2, heads[0], -(-q_len // bs), -(-kv_len // bs), empty_rows=[(0, 0, 0)])
    mask = rf.BlockMask.from_dense(dense, block_size=bs, q_len=q_len, kv_len=kv_len)
    got = attention_recall(q, k, mask, scale=0.3)
    assert got.shape == (2, heads[0])
    assert (got - naive_recall(q, k, dense, bs, 0.3)).abs().max() < 1e-6


def test_full_mask_recall_is_one_and_block_mass_sums_to_row_sizes():
    q, k = torch.randn(1, 2, 300, 16, dtype=torch.float64), torch.randn(1, 2, 300, 16, dtype=torch.float64)
    full = rf.BlockMask.from_dense(torch.ones(1, 2, 3, 3, dtype=torch.bool), block_size=128, q_len=300, kv_len=300)
    assert torch.allclose(attention_recall(q, k, full), torch.ones(1, 2, dtype=torch.float64))
    mass = block_attention_mass(q, k, block_size=128)
    assert torch.allclose(mass.sum(-1), torch.tensor([128.0, 128.0, 44.0], dtype=torch.float64).expand(1, 2, 3))


def test_oracle_keeps_the_counts_and_beats_any_mask_with_them():
    layout = rf.VideoLayout(4, 16, 16)
    q, k, _ = video_dit_qkv(layout, 2, 32, seed=1, dtype=torch.float64)
    predicted = rf.predict_block_mask(q, k, layout, sparsity=0.7, block_size=64)
    oracle = oracle_block_mask(q, k, predicted.kv_counts, block_size=64)
    rand = random_block_mask(predicted, generator=torch.Generator().manual_seed(0))
    assert torch.equal(oracle.kv_counts, predicted.kv_counts) and torch.equal(rand.kv_counts, predicted.kv_counts)
    r_oracle, r_pred, r_rand = (attention_recall(q, k, m) for m in (oracle, predicted, rand))
    assert (r_oracle >= r_pred - 1e-12).all() and (r_oracle >= r_rand - 1e-12).all()


def test_evaluate_reports_every_variant_and_says_what_each_idea_buys(tmp_path):
    layout = rf.VideoLayout(8, 16, 24)
    q, k, v = video_dit_qkv(layout, 2, 64, seed=0)
    report = evaluate(q, k, v, layout, sparsities=(0.5, 0.8), block_size=64, backend="cpu")
    assert len(report.rows) == 1 + 2 * 6  # fp8_dense once, the rest per sparsity
    for row in report.rows:
        assert 0 < row.density <= 1 and 0 < row.recall <= 1 + 1e-6 and row.rel_l2 >= 0 and -1 <= row.cosine <= 1
    assert report.get("oracle", 0.8).recall >= report.get("rainfusion", 0.8).recall
    assert report.get("random", 0.8).recall < report.get("rainfusion", 0.8).recall
    for sparsity in (0.5, 0.8):  # the sink ablation spends the same budget elsewhere
        assert report.get("no_sink", sparsity).density == report.get("rainfusion", sparsity).density
    text = report.table()
    assert "x the oracle's" in text and "the permutation" in text and "the first-frame sink" in text
    assert "FP8 moves the error" in text
    report.plot(tmp_path / "recall.png")
    assert (tmp_path / "recall.png").read_bytes()[:4] == b"\x89PNG"


def test_sparsity_zero_has_full_recall_and_no_error():
    layout = rf.VideoLayout(2, 8, 16)
    q, k, v = video_dit_qkv(layout, 2, 32, seed=2, dtype=torch.float64)
    report = evaluate(q, k, v, layout, sparsities=(0.0,), variants=("rainfusion", "no_permutation"), block_size=32)
    for row in report.rows:
        assert math.isclose(row.recall, 1.0, abs_tol=1e-9) and row.rel_l2 < 1e-9


def test_unknown_variant():
    layout = rf.VideoLayout(2, 8, 8)
    q = torch.randn(1, 1, 128, 16)
    with pytest.raises(ValueError, match="variants must be among"):
        evaluate(q, q, q, layout, variants=("magic",))


def test_capture_file_round_trip_and_cli(tmp_path, capsys):
    layout = rf.VideoLayout(4, 8, 16, text_len=5)
    q, k, v = video_dit_qkv(layout, 2, 32, seed=3)
    path = tmp_path / "qkv.pt"
    save_qkv(path, q, k, v, layout, layer=7, step=3)
    q2, _, _, layout2, meta = load_qkv(path)
    assert torch.equal(q2, q) and layout2 == layout and meta == {"layer": 7, "step": 3}
    plot = tmp_path / "recall.png"
    assert main(["evaluate", "--qkv", str(path), "--sparsity", "0.5", "--block-size", "32", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "rainfusion" in out and "oracle" in out and plot.exists()
    assert main(["evaluate", "--synthetic", "2,8,8", "--sparsity", "0.5", "--block-size", "32"]) == 0
    assert main(["evaluate"]) == 2


def test_reuse_rows_compare_a_layers_own_mask_with_an_earlier_steps(tmp_path, capsys):
    from rainfusion_core.quality import evaluate_reuse

    layout = rf.VideoLayout(4, 8, 16, text_len=5)
    q, k, v = video_dit_qkv(layout, 2, 32, seed=3)
    same = evaluate_reuse((q, k), q, k, v, layout, sparsities=(0.5,), block_size=32)
    own, reused = same.get("rainfusion", 0.5), same.get("reused", 0.5)
    assert (reused.density, reused.recall, reused.rel_l2) == (own.density, own.recall, own.rel_l2)
    assert "keeps 100% of the tiles" in same.notes[0]
    gen = torch.Generator().manual_seed(0)
    later_q, later_k = (x + torch.randn(x.shape, generator=gen) for x in (q, k))  # a later step moved q and k
    moved = evaluate_reuse((q, k), later_q, later_k, v, layout, sparsities=(0.5,), block_size=32)
    fresh = evaluate(later_q, later_k, v, layout, sparsities=(0.5,), variants=("rainfusion",), block_size=32)
    assert moved.get("rainfusion", 0.5) == fresh.get("rainfusion", 0.5)  # the later step's own mask, as evaluate
    assert moved.get("reused", 0.5).rel_l2 != fresh.get("rainfusion", 0.5).rel_l2
    with pytest.raises(ValueError, match="reuse needs captures of one layer at two steps"):
        evaluate_reuse((q[:, :1], k), q, k, v, layout, block_size=32)
    poisoned = q.clone()
    poisoned[0, 0, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="the earlier step's q holds NaN or infinite values"):
        evaluate_reuse((poisoned, k), q, k, v, layout, block_size=32)
    with pytest.raises(TypeError, match="sparsity must be a float"):
        evaluate_reuse([q, k], q, k, v, layout, sparsities=("0.5",), block_size=32)
    # the CLI: --reuse-from EARLIER with --qkv LATER
    earlier, later = tmp_path / "step0.pt", tmp_path / "step4.pt"
    save_qkv(earlier, q, k, v, layout, layer=2, step=0)
    save_qkv(later, later_q, later_k, v, layout, layer=2, step=4)
    assert main(["evaluate", "--qkv", str(later), "--reuse-from", str(earlier), "--sparsity", "0.5",
                 "--block-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "reused" in out and "the earlier step's mask keeps" in out
    other = tmp_path / "other.pt"
    save_qkv(other, *video_dit_qkv(rf.VideoLayout(2, 8, 16), 2, 32, seed=1), rf.VideoLayout(2, 8, 16))
    layer3 = tmp_path / "layer3.pt"
    save_qkv(layer3, q, k, v, layout, layer=3, step=0)
    for argv, message in ((["--synthetic", "2,8,8", "--reuse-from", str(earlier)], "--reuse-from needs --qkv"),
                          (["--qkv", str(later), "--reuse-from", ""], "--reuse-from : no such file"),
                          (["--qkv", str(later), "--reuse-from", str(later)], "is the --qkv capture itself"),
                          (["--qkv", str(earlier), "--reuse-from", str(later)], "not earlier than --qkv's step 0"),
                          (["--qkv", str(later), "--reuse-from", str(layer3)], "a mask is reused by its own layer"),
                          (["--qkv", str(later), "--reuse-from", str(other)], "captures of one layer at two steps"),
                          (["--qkv", str(later), "--reuse-from", str(earlier), "--plot", str(tmp_path / "p.png")],
                           "does not go with --reuse-from")):
        assert main(["evaluate", *argv]) == 2
        assert message in capsys.readouterr().err


def test_synthetic_generator_is_deterministic_and_local():
    layout = rf.VideoLayout(4, 16, 16)
    a = video_dit_qkv(layout, 1, 64, seed=5)
    b = video_dit_qkv(layout, 1, 64, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    q, k, _ = a
    probs = torch.softmax(q[0, 0] @ k[0, 0].T / 8, dim=-1)
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean()
    assert entropy < 0.85 * math.log(layout.seq_len)  # attention concentrates, unlike iid noise


def test_no_sink_ablation_keeps_rainfusion_counts_and_text_blocks():
    from rainfusion_core.quality import _predicted_top

    layout = rf.VideoLayout(3, 8, 16, text_len=40)
    q, k = (torch.randn(2, 2, layout.seq_len, 16) for _ in range(2))
    predicted = rf.predict_block_mask(q, k, layout, sparsity=0.7, block_size=32)
    ablated = _predicted_top(q, k, layout, predicted, 0.25)
    assert torch.equal(ablated.kv_counts, predicted.kv_counts)
    assert ablated.dense[..., -2:].all()  # the text's two blocks are still kept in every row
    assert not torch.equal(ablated.dense, predicted.dense)


def test_fp8_rows_say_what_precision_costs_apart_from_sparsity():
    from helpers import Fp8Emulation
    from rainfusion_core.synthetic import video_dit_qkv

    layout = rf.VideoLayout(4, 16, 16)
    q, k, v = video_dit_qkv(layout, 2, 64, seed=0)
    report = evaluate(q, k, v, layout, sparsities=(0.8,), variants=("rainfusion", "fp8", "fp8_dense"))
    dense_fp8, sparse, sparse_fp8 = report.get("fp8_dense", 0.0), report.get("rainfusion", 0.8), report.get("fp8", 0.8)
    assert 0 < dense_fp8.rel_l2 < 0.1 and dense_fp8.density == 1.0  # FP8 alone: small, never zero
    assert sparse_fp8.density == sparse.density and sparse_fp8.recall == sparse.recall  # the same mask
    assert sparse_fp8.rel_l2 != sparse.rel_l2 and abs(sparse_fp8.rel_l2 - sparse.rel_l2) < dense_fp8.rel_l2 * 2
    assert any("FP8 reference" in note for note in report.notes)  # the torch backend has no FP8 kernel
    with rf.scoped_backends(Fp8Emulation()) as (plugin,):
        report = evaluate(q, k, v, layout, sparsities=(0.8,), variants=("fp8",), backend="fp8_emulation")
    assert ("forward", "fp8") in plugin.seen and not any("FP8 reference" in note for note in report.notes)


def test_fp8_rows_fall_back_to_the_reference_where_the_fp8_kernel_refuses_the_inputs():
    # On a GPU the Triton backend offers FP8 but only for 16-bit inputs: a float32 capture must still be
    # evaluated, its fp8 rows from the FP8 reference, and the report must say why.
    from helpers import Fp8Emulation
    from rainfusion_core.synthetic import video_dit_qkv

    class Fp8NeedsHalf(Fp8Emulation):
        name = "fp8_needs_half"

        def unsupported_reasons(self, q, k, v, block_mask, precision="bf16"):
            self.seen.append(("reasons", precision))
            return ["FP8 needs float16 or bfloat16"] if precision == "fp8" and q.dtype == torch.float32 else []

    layout = rf.VideoLayout(4, 16, 16)
    q, k, v = video_dit_qkv(layout, 2, 64, seed=0)
    with rf.scoped_backends(Fp8NeedsHalf()) as (plugin,):
        report = evaluate(q, k, v, layout, sparsities=(0.8,), variants=("rainfusion", "fp8", "fp8_dense"),
                          backend="fp8_needs_half")
        reference = evaluate(q, k, v, layout, sparsities=(0.8,), variants=("fp8",), backend="torch")
    assert ("forward", "fp8") not in plugin.seen and ("forward", "bf16") in plugin.seen
    (note,) = [n for n in report.notes if "FP8 reference" in n]
    assert "fp8_needs_half" in note and "FP8 needs float16 or bfloat16" in note
    assert report.get("fp8", 0.8).rel_l2 == reference.get("fp8", 0.8).rel_l2  # the reference's numbers
    assert 0 < report.get("fp8_dense", 0.0).rel_l2 < 0.1


def test_fp8_rows_on_the_triton_backend_where_its_fp8_kernel_cannot_run():
    # float32 inputs: the FP8 kernel takes 16-bit inputs only (the triton backend's precision_limits), on a GPU
    # and under the interpreter alike, so the fp8 rows come from the reference and the report says why.
    from helpers import triton_device

    from rainfusion_core.synthetic import video_dit_qkv

    device = triton_device(module_level=False)
    layout = rf.VideoLayout(2, 8, 16)
    q, k, v = video_dit_qkv(layout, 2, 64, device=device, seed=0)
    report = evaluate(q, k, v, layout, sparsities=(0.5,), variants=("rainfusion", "fp8"), block_size=128,
                      backend="triton")
    (note,) = [n for n in report.notes if "FP8 reference" in n]
    expected = "in fp8, dtype torch.float32 is not supported"  # the declared FP8 limits, before the kernel is asked
    assert "'triton'" in note and expected in note
    sparse, fp8 = report.get("rainfusion", 0.5), report.get("fp8", 0.5)
    assert fp8.rel_l2 > 0 and fp8.cosine > 0.99  # the reference's FP8 rows, on video-like data
    assert abs(fp8.rel_l2 - sparse.rel_l2) < 0.05  # FP8 moves the error little


FAILED_WRITE = '''
import os, resource, signal, sys, torch
import rainfusion_core as rf
from rainfusion_core.quality import load_qkv, save_qkv
path = sys.argv[1]
layout = rf.VideoLayout(4, 16, 16)
q = torch.randn(1, 2, layout.seq_len, 64)
save_qkv(path, q, q, q, layout, step=1)                      # an earlier capture, about 800 KB
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)                # past the limit, a write fails with EFBIG
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, hard))   # a disk that fills up part way
try:
    save_qkv(path, q * 2, q, q, layout, step=2)
    print("WROTE")
except OSError as exc:
    print("FAILED", exc.errno)
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
q2, _, _, _, meta = load_qkv(path)
print("INTACT", bool(torch.equal(q2, q)), meta["step"], sorted(os.listdir(os.path.dirname(path))))
'''


def test_a_failed_capture_write_leaves_the_earlier_capture_intact(tmp_path):
    import subprocess
    import sys

    pytest.importorskip("resource", reason="needs POSIX resource limits to simulate a full disk")
    path = tmp_path / "qkv.pt"
    run = subprocess.run([sys.executable, "-c", FAILED_WRITE, str(path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "FAILED 27" in run.stdout  # EFBIG
    assert "INTACT True 1 ['qkv.pt']" in run.stdout, run.stdout  # the old capture, and no temporary file left


def test_the_readme_quality_snippet_runs_as_written(tmp_path):
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    (snippet,) = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "attention_recall(" in b]
    run = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "RAINFUSION_PROGRESS": "0"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "rainfusion" in run.stdout and (tmp_path / "recall.png").exists() and (tmp_path / "layer12_step5.pt").exists()
