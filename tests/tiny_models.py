"""Tiny random-weight instances of every transformer family RainFusion patches (real diffusers classes).

Each :class:`TinyModel` builds the model and the keyword arguments of one forward
for a latent token grid ``(frames, height, width)``; ``padded=True`` gives text
padding where the model has a text mask.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

TEXT = 8  # text tokens per item (padded to this length; even, so context parallelism can split it)


@dataclass(frozen=True)
class TinyModel:
    family: str
    build: Callable  # seed -> model
    inputs: Callable  # (grid, batch, padded, t) -> forward kwargs
    text_mask: bool = False  # the model masks padded text
    frames_must_be_one: bool = False

    def __str__(self):
        return self.family


def _text_mask(batch, padded):
    """``[B, TEXT]``: item b has ``TEXT - 2 - b`` real tokens when padded (so CFG halves differ)."""
    mask = torch.ones(batch, TEXT, dtype=torch.int64)
    if padded:
        for b in range(batch):
            mask[b, TEXT - 2 - b:] = 0
    return mask


def _timestep(batch, t):
    return torch.full((batch,), float(t))


def _wan(cls, **extra):
    def build(seed):
        from diffusers import models

        torch.manual_seed(seed)
        config = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4,
                      out_channels=4, text_dim=16, freq_dim=16, ffn_dim=64, num_layers=2, rope_max_seq_len=64)
        return getattr(models, cls)(**{**config, **extra}).eval()
    return build


def _wan_inputs(grid, batch, padded, t, control=False):
    frames, height, width = grid
    kwargs = dict(hidden_states=torch.randn(batch, 4, frames, 2 * height, 2 * width),
                  timestep=_timestep(batch, t), encoder_hidden_states=torch.randn(batch, TEXT, 16))
    if control:
        kwargs["control_hidden_states"] = torch.randn(batch, 4, frames, 2 * height, 2 * width)
    return kwargs


def _wan_i2v_inputs(grid, batch, padded, t):
    """Wan I2V: 257 image-encoder tokens joined before 512 text tokens (the processor splits at 512)."""
    kwargs = _wan_inputs(grid, batch, padded, t)
    kwargs["encoder_hidden_states"] = torch.randn(batch, 512, 16)
    kwargs["encoder_hidden_states_image"] = torch.randn(batch, 257, 16)
    return kwargs


def _wan_ti2v_inputs(grid, batch, padded, t):
    """Wan2.2 TI2V: one timestep per token, 0 on the conditioning first frame."""
    kwargs = _wan_inputs(grid, batch, padded, t)
    frames, height, width = grid
    per_token = torch.full((batch, frames, height * width), float(t))
    per_token[:, 0] = 0
    kwargs["timestep"] = per_token.flatten(1)
    return kwargs


def _hunyuan(seed):
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=False,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6)).eval()


def _hunyuan_inputs(grid, batch, padded, t):
    frames, height, width = grid
    return dict(hidden_states=torch.randn(batch, 4, frames, 2 * height, 2 * width), timestep=_timestep(batch, t),
                encoder_hidden_states=torch.randn(batch, TEXT, 16), encoder_attention_mask=_text_mask(batch, padded),
                pooled_projections=torch.randn(batch, 8))


def _hunyuan15(seed):
    from diffusers import HunyuanVideo15Transformer3DModel

    torch.manual_seed(seed)
    return HunyuanVideo15Transformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8,
        image_embed_dim=8, rope_axes_dim=(4, 6, 6), task_type="t2v").eval()


def _hunyuan15_inputs(grid, batch, padded, t):
    frames, height, width = grid
    mask_2 = torch.ones(batch, 3, dtype=torch.int64)
    if padded:
        mask_2[:, 2:] = 0
    return dict(hidden_states=torch.randn(batch, 4, frames, height, width), timestep=_timestep(batch, t),
                encoder_hidden_states=torch.randn(batch, TEXT, 16), encoder_attention_mask=_text_mask(batch, padded),
                encoder_hidden_states_2=torch.randn(batch, 3, 8), encoder_attention_mask_2=mask_2,
                image_embeds=torch.zeros(batch, 2, 8))


def _cogvideox(seed):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=2, sample_width=16, sample_height=16, sample_frames=5, patch_size=2,
        max_text_seq_length=TEXT, norm_eps=1e-5).eval()


def _cogvideox_inputs(grid, batch, padded, t):
    frames, height, width = grid
    return dict(hidden_states=torch.randn(batch, frames, 4, 2 * height, 2 * width),
                encoder_hidden_states=torch.randn(batch, TEXT, 16), timestep=_timestep(batch, t))


def _ltx(seed):
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(seed)
    return LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
        num_layers=2, caption_channels=16).eval()


def _ltx_inputs(grid, batch, padded, t):
    frames, height, width = grid
    return dict(hidden_states=torch.randn(batch, frames * height * width, 4),
                encoder_hidden_states=torch.randn(batch, TEXT, 16), timestep=_timestep(batch, t),
                encoder_attention_mask=_text_mask(batch, False), num_frames=frames, height=height, width=width)


def _ltx2(seed):
    from diffusers import LTX2VideoTransformer3DModel

    torch.manual_seed(seed)
    return LTX2VideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
        audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2, audio_attention_head_dim=16,
        audio_cross_attention_dim=32, num_layers=2, caption_channels=16).eval()


def _ltx2_inputs(grid, batch, padded, t):
    frames, height, width = grid
    return dict(hidden_states=torch.randn(batch, frames * height * width, 4), audio_hidden_states=torch.randn(batch, 5, 4),
                encoder_hidden_states=torch.randn(batch, TEXT, 16), audio_encoder_hidden_states=torch.randn(batch, TEXT, 16),
                timestep=_timestep(batch, t), num_frames=frames, height=height, width=width, audio_num_frames=5)


def _flux(seed):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(4, 6, 6)).eval()


def _flux_inputs(grid, batch, padded, t):
    _, height, width = grid
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return dict(hidden_states=torch.randn(batch, height * width, 4), encoder_hidden_states=torch.randn(batch, TEXT, 16),
                pooled_projections=torch.randn(batch, 8), timestep=_timestep(batch, t / 1000),
                img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(TEXT, 3))


def _qwen(seed):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(4, 6, 6)).eval()


def _qwen_inputs(grid, batch, padded, t):
    _, height, width = grid
    return dict(hidden_states=torch.randn(batch, height * width, 16), encoder_hidden_states=torch.randn(batch, TEXT, 16),
                encoder_hidden_states_mask=_text_mask(batch, padded), timestep=_timestep(batch, t / 1000),
                img_shapes=[[(1, height, width)]] * batch)


MODELS = [
    TinyModel("Wan", _wan("WanTransformer3DModel"), _wan_inputs),
    TinyModel("Wan-I2V", _wan("WanTransformer3DModel", image_dim=16, added_kv_proj_dim=64), _wan_i2v_inputs),
    TinyModel("Wan2.2-TI2V", _wan("WanTransformer3DModel"), _wan_ti2v_inputs),
    TinyModel("Wan-VACE", _wan("WanVACETransformer3DModel", vace_layers=[0], vace_in_channels=4),
              lambda grid, batch, padded, t: _wan_inputs(grid, batch, padded, t, control=True)),
    TinyModel("SkyReels-V2", _wan("SkyReelsV2Transformer3DModel"), _wan_inputs),
    TinyModel("HunyuanVideo", _hunyuan, _hunyuan_inputs, text_mask=True),
    TinyModel("HunyuanVideo-1.5", _hunyuan15, _hunyuan15_inputs, text_mask=True),
    TinyModel("CogVideoX", _cogvideox, _cogvideox_inputs),
    TinyModel("LTX-Video", _ltx, _ltx_inputs),
    TinyModel("LTX-2", _ltx2, _ltx2_inputs),
    TinyModel("Flux", _flux, _flux_inputs, frames_must_be_one=True),
    TinyModel("Qwen-Image", _qwen, _qwen_inputs, text_mask=True, frames_must_be_one=True),
]


def forward(model, kwargs):
    """The model's first output (the denoised latent), under no_grad."""
    with torch.no_grad():
        return model(**kwargs, return_dict=False)[0]
