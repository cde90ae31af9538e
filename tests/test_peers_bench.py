"""The mask conversions ``benchmarks/peers_bench.py`` gives peers: the same keys for every query row."""
import importlib.util
from pathlib import Path

import pytest
import torch

import rainfusion_core as rf
from helpers import random_dense

pytest.importorskip("triton")  # the benchmark imports the Triton launcher


def _peers_bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "peers_bench.py"
    spec = importlib.util.spec_from_file_location("peers_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("seq", [113, 231, 256, 1023], ids=lambda s: f"S{s}")
def test_bsa_metadata_keeps_exactly_our_keys_in_64_token_blocks(seq):
    bench = _peers_bench()
    nb = -(-seq // 128)
    dense = random_dense(2, 3, nb, nb, density=0.4, empty_rows=[(0, 0, 0)])
    mask = rf.BlockMask.from_dense(dense, block_size=128, q_len=seq, kv_len=seq)
    padded = -(-seq // 64) * 64
    index, nums, sizes = bench.bsa_metadata(mask, padded)
    n_q64, n_k64 = padded // 64, -(-seq // 64)
    assert index.dtype == nums.dtype == sizes.dtype == torch.int32
    assert index.shape[:3] == nums.shape == (2, 3, n_q64) and sizes.shape == (n_k64,)
    assert int(sizes.sum()) == seq and bool((sizes[:-1] == 64).all())
    rows, keys = torch.arange(seq), torch.arange(seq)
    ours = dense[:, :, rows // 128][..., keys // 128]  # [B, H, S, S]: the keys each query row attends
    theirs = torch.zeros(2, 3, n_q64, n_k64, dtype=torch.bool)
    for b in range(2):
        for h in range(3):
            for r in range(n_q64):
                ids = index[b, h, r, :nums[b, h, r]]
                assert bool((ids[1:] > ids[:-1]).all()) and bool((ids < n_k64).all())  # ascending, in range
                theirs[b, h, r, ids.long()] = True
    assert torch.equal(theirs[:, :, rows // 64][..., keys // 64], ours)
