"""RainFusion on real diffusers transformer classes without downloading weights.

    python examples/diffusers_tiny.py            # needs diffusers (pip install -e ".[diffusers]")

Builds a small random-weight ``WanTransformer3DModel`` (video) and ``FluxTransformer2DModel``
(image) on the CPU, with the inputs their forward takes, and runs each dense, then with
``apply_rainfusion``, then after ``handle.remove()``. It prints the time of one forward each
way, how far the sparse output is from the dense one, what the handle counted, and whether
``remove()`` restored the model bit for bit. Random weights and two heads make these figures a check of
the plumbing, not of quality or speed: ``rainfusion evaluate`` measures quality on real
activations, and the speed-up needs real sizes (the README's model table).
"""
from __future__ import annotations

import time

import torch

from rainfusion_core.integrations.diffusers import apply_rainfusion


def tiny_wan():
    """Wan2.1's transformer class, 2 blocks of 2 heads of 32; latents ``[B, 4, F, H, W]`` (2x2 patches)."""
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4,
                                  out_channels=4, text_dim=16, freq_dim=16, ffn_dim=64, num_layers=2,
                                  rope_max_seq_len=64).eval()
    frames, height, width = 8, 32, 48  # a latent grid of 8 x 16 x 24 = 3072 tokens after patching
    inputs = dict(hidden_states=torch.randn(1, 4, frames, height, width), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, 8, 16), return_dict=False)
    return model, inputs


def tiny_flux():
    """Flux.1's transformer class, 1 joint and 1 single block; a 48 x 48 latent image and 8 text tokens."""
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                   pooled_projection_dim=8, axes_dims_rope=(4, 6, 6)).eval()
    height = width = 48
    image_ids = torch.zeros(height, width, 3)  # Flux reads the image grid from these position ids
    image_ids[..., 1] = torch.arange(height)[:, None]
    image_ids[..., 2] = torch.arange(width)[None, :]
    inputs = dict(hidden_states=torch.randn(1, height * width, 4), encoder_hidden_states=torch.randn(1, 8, 16),
                  pooled_projections=torch.randn(1, 8), timestep=torch.tensor([0.5]),
                  img_ids=image_ids.reshape(-1, 3), txt_ids=torch.zeros(8, 3), return_dict=False)
    return model, inputs


def timed(model, inputs):
    with torch.no_grad():
        model(**inputs)  # warm-up
        start = time.perf_counter()
        out = model(**inputs)[0]
    return out, (time.perf_counter() - start) * 1e3


def main() -> None:
    torch.manual_seed(0)
    for name, build in (("Wan", tiny_wan), ("Flux", tiny_flux)):
        model, inputs = build()
        dense, dense_ms = timed(model, inputs)
        handle = apply_rainfusion(model, sparsity=0.8, block_size=64)
        sparse, sparse_ms = timed(model, inputs)
        stats = handle.stats()
        handle.remove()
        restored, _ = timed(model, inputs)
        error = float((sparse - dense).norm() / dense.norm())
        print(f"{name}: {type(model).__name__}, random weights, CPU")
        print(f"  one forward: dense {dense_ms:.0f} ms, RainFusion 0.8 {sparse_ms:.0f} ms")
        print(f"  relative L2 difference from dense: {error:.3f}")
        density = "n/a" if stats.mean_density is None else f"{stats.mean_density:.3f}"
        print(f"  handle.stats(): {stats.sparse_calls} calls sparse, {stats.dense_calls} dense"
              f"{' (' + stats.dense_reason + ')' if stats.dense_reason else ''}, mean mask density {density}")
        print(f"  after handle.remove(): {'bit for bit the dense model' if torch.equal(restored, dense) else 'DIFFERS'}")


if __name__ == "__main__":
    main()
