"""The fused q/k prologue of Wan self-attention (RMS norm across heads + rotary) against diffusers' eager one."""
import pytest
import torch

from helpers import triton_device

DEVICE = triton_device()
diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed: pip install -e '.[diffusers]'")

from rainfusion_core.backends.triton.wan_prologue import rms_norm_rope  # noqa: E402
from rainfusion_core.integrations.diffusers import apply_rainfusion  # noqa: E402

from helpers import tiny_wan, wan_inputs as inputs  # noqa: E402

# (batch, tokens, heads, head dim): tokens not a multiple of the rows per program, channels
# not a power of two, one head.
SHAPES = [(2, 37, 3, 32), (1, 16, 1, 64), (1, 9, 12, 128)]


def run(model, latent, text, t):
    with torch.no_grad():
        timestep = torch.full((latent.shape[0],), float(t), device=latent.device)
        return model(latent, timestep, text, return_dict=False)[0]


def angle_tables(length, head_dim):
    """Wan-style tables: one angle per (even, odd) pair, repeated twice, float64 as diffusers keeps them."""
    angles = torch.rand(length, head_dim // 2, dtype=torch.float64) * 50
    return angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)


def _rotate_pairs(x, cos, sin):
    """Wan's rotary embedding as diffusers computes it: rotate (even, odd) channel pairs."""
    even, odd = x[..., 0::2], x[..., 1::2]
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack((even * c - odd * s, even * s + odd * c), dim=-1).flatten(-2).type_as(x)


def eager(x, norm, cos, sin, heads):
    y = norm(x).unflatten(2, (heads, -1))
    return _rotate_pairs(y, cos[None, :, None], sin[None, :, None])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("affine", [True, False], ids=["weight", "no-weight"])
def test_fused_prologue_matches_eager(shape, dtype, affine):
    batch, length, heads, head_dim = shape
    norm = torch.nn.RMSNorm(heads * head_dim, eps=1e-6, elementwise_affine=affine).to(DEVICE, dtype)
    if affine:
        norm.weight.data.uniform_(0.5, 1.5)
    x = (torch.randn(batch, length, heads * head_dim) * 3).to(DEVICE, dtype)
    cos, sin = angle_tables(length, head_dim)
    with torch.no_grad():
        expected = eager(x, norm, cos.to(DEVICE), sin.to(DEVICE), heads)
        got = rms_norm_rope(x, norm.weight, 1e-6, cos.float().to(DEVICE), sin.float().to(DEVICE), heads)
    assert got.shape == (batch, length, heads, head_dim) and got.dtype == dtype and got.is_contiguous()
    scale = norm(x).abs().max().item()
    if dtype == torch.float32:
        tol = dict(rtol=1e-5, atol=1e-6)  # float32 rotation instead of float64
    elif DEVICE == "cuda":
        # one bfloat16 step (2**-7 relative) of the output apart, and where the rotation
        # cancels, one rounding of the normalised row (torch's CUDA RMS norm may round differently)
        tol = dict(rtol=2**-7, atol=2**-8 * scale)
    else:
        # Triton's interpreter truncates float32 -> bfloat16 (the GPU rounds to nearest), once for
        # the normalised row and once for the output: two steps of 2**-7 relative to the inputs.
        tol = dict(rtol=2**-6, atol=2**-6 * scale)
    torch.testing.assert_close(got, expected, **tol)


def test_fused_prologue_rejects_bad_tables():
    x = torch.randn(1, 8, 64, device=DEVICE)
    cos, sin = (t.float().to(DEVICE) for t in angle_tables(8, 32))
    with pytest.raises(ValueError, match="cos: expected a contiguous float32"):
        rms_norm_rope(x, None, 1e-6, cos.double(), sin, 2)
    with pytest.raises(ValueError, match="do not split into 3 heads"):
        rms_norm_rope(x, None, 1e-6, cos, sin, 3)


@pytest.mark.parametrize("grid", [(3, 16, 20), (2, 16, 16)], ids=["unaligned", "aligned"])
def test_model_with_fused_prologue_matches_eager_prologue(grid):
    model, (latent, text) = tiny_wan(), inputs(grid, batch=2)
    latent, text, model = latent.to(DEVICE), text.to(DEVICE), model.to(DEVICE)
    outs = []
    for fuse in (False, True):
        handle = apply_rainfusion(model, sparsity=0.5, block_size=16, backend="torch", fuse_prologue=fuse)
        outs.append(run(model, latent, text, 500))
        handle.remove()
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)


def test_fuse_prologue_true_names_what_is_missing():
    model, (latent, text) = tiny_wan(), inputs((2, 16, 16))
    model, latent, text = model.to(DEVICE), latent.to(DEVICE), text.to(DEVICE)
    model.blocks[0].attn1.norm_q = torch.nn.Identity()
    handle = apply_rainfusion(model, sparsity=0.5, block_size=16, backend="torch", fuse_prologue=True)
    with pytest.raises(ValueError, match="attn.norm_q is Identity"):
        run(model, latent, text, 500)
    handle.remove()
    model = tiny_wan().to(DEVICE)
    handle = apply_rainfusion(model, sparsity=0.5, block_size=16, backend="torch", fuse_prologue=True)
    with pytest.raises(ValueError, match="has no backward"):  # autograd on: no silent loss of gradients
        model(latent, torch.full((1,), 500.0, device=DEVICE), text, return_dict=False)
    handle.remove()
    with pytest.raises(ValueError, match="fuse_prologue must be"):
        apply_rainfusion(model, fuse_prologue="yes")
