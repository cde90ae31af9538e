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
    #: the forward argument of that mask, when the padding is given as one (Z-Image's is in its lists' lengths)
    mask_argument: str | None = None
    frames_must_be_one: bool = False
    #: each attention call's length depends on tensor values (Mochi drops each item's padded text itself), so
    #: torch.compile breaks the graph where RainFusion reads the call's length
    data_dependent_lengths: bool = False
    #: the model compiles with fullgraph=True on its own (HiDream's MoE routing and Lumina2's forward read
    #: tensor values: they do not, with or without RainFusion)
    fullgraph: bool = True

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


def _wan_animate(seed):
    from diffusers import WanAnimateTransformer3DModel

    torch.manual_seed(seed)
    return WanAnimateTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=12, latent_channels=4,
        out_channels=4, text_dim=16, freq_dim=16, ffn_dim=64, num_layers=2, image_dim=None, rope_max_seq_len=64,
        motion_encoder_channel_sizes={"4": 8}, motion_encoder_size=4, motion_style_dim=8, motion_dim=4,
        motion_encoder_dim=8, face_encoder_hidden_dim=8, face_encoder_num_heads=1, inject_face_latents_blocks=2,
        motion_encoder_batch_size=8).eval()


def _wan_animate_inputs(grid, batch, padded, t):
    """Frame 0 is the reference image's latent; the pose covers the later frames; the face video gives one motion
    step per later frame (frames >= 2)."""
    frames, height, width = grid
    return dict(hidden_states=torch.randn(batch, 12, frames, 2 * height, 2 * width), timestep=_timestep(batch, t),
                encoder_hidden_states=torch.randn(batch, TEXT, 16),
                pose_hidden_states=torch.randn(batch, 4, frames - 1, 2 * height, 2 * width),
                face_pixel_values=torch.randn(batch, 3, 4 * (frames - 2) + 1, 4, 4))


def _mochi(seed):
    from diffusers import MochiTransformer3DModel

    torch.manual_seed(seed)
    model = MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2, pooled_projection_dim=16,
        in_channels=4, out_channels=4, text_embed_dim=16, time_embed_dim=4, max_sequence_length=TEXT).eval()
    with torch.no_grad():  # the rotary frequencies start at zero (no rotation): give them values
        model.pos_frequencies.normal_()
    return model


def _mochi_inputs(grid, batch, padded, t):
    """Always padded: Mochi drops each item's padded text itself, so each item's attention call has its own length."""
    frames, height, width = grid
    return dict(hidden_states=torch.randn(batch, 4, frames, 2 * height, 2 * width),
                encoder_hidden_states=torch.randn(batch, TEXT, 16), timestep=_timestep(batch, t),
                encoder_attention_mask=_text_mask(batch, True))


def _cosmos(seed):
    from diffusers import CosmosTransformer3DModel

    torch.manual_seed(seed)
    return CosmosTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2, mlp_ratio=2.0,
        text_embed_dim=16, adaln_lora_dim=8, max_size=(16, 64, 64), patch_size=(1, 2, 2), rope_scale=(1.0, 3.0, 3.0),
        concat_padding_mask=False, extra_pos_embed_type="learnable").eval()


def _cosmos_inputs(grid, batch, padded, t):
    frames, height, width = grid
    return dict(hidden_states=torch.randn(batch, 4, frames, 2 * height, 2 * width), timestep=_timestep(batch, t),
                encoder_hidden_states=torch.randn(batch, TEXT, 16), fps=24)


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


def _kandinsky6(seed):
    from diffusers import Kandinsky6Transformer3DModel

    torch.manual_seed(seed)
    return Kandinsky6Transformer3DModel(
        in_visual_dim=4, out_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, patch_size=(1, 2, 2),
        model_dim=32, ff_dim=64, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 6, 6), visual_cond=True,
        in_audio_dim=4, out_audio_dim=4, text_token_padding=True, ca_rope=True, cross_gates=True,
        fix_modulation=True).eval()


def _kandinsky6_inputs(grid, batch, padded, t):
    """Channels-last latents with the visual condition's channels; audio joins through cross-attention."""
    frames, height, width = grid
    return dict(hidden_states=torch.randn(batch, frames, 2 * height, 2 * width, 2 * 4 + 1),
                encoder_hidden_states=torch.randn(batch, TEXT, 16), pooled_projections=torch.randn(batch, 8),
                timestep=_timestep(batch, t), encoder_attention_mask=_text_mask(batch, padded).bool(),
                audio_hidden_states=torch.randn(batch, 6, 4))


def _motif(seed, decoder_layers=0):
    from diffusers import MotifVideoTransformer3DModel

    torch.manual_seed(seed)
    return MotifVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1 + decoder_layers, num_decoder_layers=decoder_layers, mlp_ratio=2.0, patch_size=2,
        patch_size_t=1, text_embed_dim=16, rope_axes_dim=(4, 6, 6), image_embed_dim=8).eval()


def _motif_inputs(grid, batch, padded, t):
    """Image-to-video: 3 image-encoder tokens join the text after the video."""
    frames, height, width = grid
    return dict(hidden_states=torch.randn(batch, 4, frames, 2 * height, 2 * width), timestep=_timestep(batch, t),
                encoder_hidden_states=torch.randn(batch, TEXT, 16), encoder_attention_mask=_text_mask(batch, padded),
                image_embeds=torch.randn(batch, 3, 8))


def _minimax_h3(seed):
    from diffusers import MiniMaxH3Transformer3DModel

    torch.manual_seed(seed)
    return MiniMaxH3Transformer3DModel(
        num_attention_heads=2, attention_head_dim=16, hidden_size=32, num_layers=2, num_refiner_layers=1, ffn_dim=64,
        in_channels=4, audio_in_channels=4, patch_size=(1, 2, 2), text_dim=16, freq_dim=16, time_embed_hidden_dim=32,
        time_embed_dim=16, rope_freq_dim=2).eval()


H3_AUDIO = 6  # audio latents per channel; stereo, channel-major: 2 * H3_AUDIO rows


def _minimax_h3_inputs(grid, batch, padded, t):
    """The pipeline's text-to-video-and-audio packing [text | audio | video], positions as its builders make
    them; one layout for the whole batch. Its time rises from 0 (noise) to 1 (clean); no text mask."""
    frames, height, width = grid
    video, audio = frames * height * width, 2 * H3_AUDIO
    length = TEXT + audio + video
    positions = torch.zeros(length, 3)
    positions[:TEXT, 0] = torch.arange(TEXT)
    positions[TEXT:TEXT + audio, 0] = (TEXT + torch.arange(H3_AUDIO)).repeat(2)
    positions[TEXT:TEXT + audio, 2] = torch.tensor([0.0, float(width - 1)]).repeat_interleave(H3_AUDIO)
    f, h, w = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
    positions[TEXT + audio:] = torch.stack([TEXT + 5 * f.flatten(), h.flatten(), w.flatten()], -1).float()
    tags = torch.cat([torch.full((TEXT,), 1), torch.full((audio,), 2), torch.full((video,), 0)])
    return dict(hidden_states=torch.randn(batch, video, 16), audio_hidden_states=torch.randn(batch, audio, 4),
                encoder_hidden_states=torch.randn(batch, TEXT, 16), timestep=torch.tensor([1.0 - t / 1000.0]),
                timestep_indices=torch.zeros(length, dtype=torch.long), token_tags=tags, position_ids=positions,
                video_indices=torch.arange(TEXT + audio, length), audio_indices=torch.arange(TEXT, TEXT + audio),
                text_indices=torch.arange(TEXT))


def _flux2(seed):
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    return Flux2Transformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, timestep_guidance_channels=16, axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False).eval()


def _ids(*sizes):
    """Rows ``(t, h, w, l)`` of every position of a grid of these sizes, in raster order."""
    return torch.cartesian_prod(*(torch.arange(n) for n in sizes))


def _flux2_inputs(grid, batch, padded, t):
    _, height, width = grid
    return dict(hidden_states=torch.randn(batch, height * width, 4), encoder_hidden_states=torch.randn(batch, TEXT, 16),
                timestep=_timestep(batch, t / 1000), img_ids=_ids(1, height, width, 1).expand(batch, -1, -1),
                txt_ids=_ids(1, 1, 1, TEXT).expand(batch, -1, -1))


def _flux3(seed):
    from diffusers import Flux3Transformer2DModel

    torch.manual_seed(seed)
    return Flux3Transformer2DModel(
        in_channels=4, cond_in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, timestep_channels=16, axes_dims_rope=(4, 4, 4, 4)).eval()


def _flux3_inputs(grid, batch, padded, t):
    _, height, width = grid
    return dict(hidden_states=torch.randn(batch, height * width, 4), encoder_hidden_states=torch.randn(batch, TEXT, 16),
                timestep=_timestep(batch, t / 1000), img_ids=_ids(1, height, width, 1), txt_ids=_ids(1, 1, 1, TEXT))


def _sd3(seed):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=32, pooled_projection_dim=8,
        pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm").eval()


def _sd3_inputs(grid, batch, padded, t):
    _, height, width = grid
    return dict(hidden_states=torch.randn(batch, 4, 2 * height, 2 * width), timestep=_timestep(batch, t),
                encoder_hidden_states=torch.randn(batch, TEXT, 16), pooled_projections=torch.randn(batch, 8))


def _hidream(seed):
    from diffusers import HiDreamImageTransformer2DModel

    torch.manual_seed(seed)
    return HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, caption_channels=[16, 16], text_emb_dim=8, num_routed_experts=2,
        num_activated_experts=1, axes_dims_rope=(8, 4, 4), max_resolution=(32, 32), llama_layers=[0, 2]).eval()


def _hidream_inputs(grid, batch, padded, t):
    """``encoder_hidden_states_llama3`` is the Llama stack ``[layers, B, T, D]``: the batch is its second dim."""
    _, height, width = grid
    return dict(hidden_states=torch.randn(batch, 4, 2 * height, 2 * width), timesteps=_timestep(batch, t),
                encoder_hidden_states_t5=torch.randn(batch, TEXT, 16),
                encoder_hidden_states_llama3=torch.randn(3, batch, TEXT, 16), pooled_embeds=torch.randn(batch, 8))


def _zimage(seed):
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(seed)
    return ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=64, n_layers=2, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, cap_feat_dim=16, axes_dims=[8, 12, 12], axes_lens=[128, 32, 32]).eval()


def _zimage_inputs(grid, batch, padded, t):
    """Lists per item. ``padded``: item b has 32 * b more caption tokens, so the model pads the batch and masks
    it. Its time rises from 0 (noise) to 1 (clean)."""
    _, height, width = grid
    return dict(x=list(torch.randn(batch, 4, 1, 2 * height, 2 * width).unbind(0)),
                cap_feats=[torch.randn(TEXT + (32 * b if padded else 0), 16) for b in range(batch)],
                t=_timestep(batch, 1 - t / 1000))


def _lumina2(seed):
    from diffusers import Lumina2Transformer2DModel

    torch.manual_seed(seed)
    return Lumina2Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, hidden_size=64, num_layers=2, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(8, 12, 12), cap_feat_dim=16).eval()


def _lumina2_inputs(grid, batch, padded, t):
    """The last 2 caption tokens of every item are padding (the model drops them); time rises 0 -> 1."""
    _, height, width = grid
    mask = torch.ones(batch, TEXT, dtype=torch.int64)
    mask[:, TEXT - 2:] = 0
    return dict(hidden_states=torch.randn(batch, 4, 2 * height, 2 * width), timestep=_timestep(batch, 1 - t / 1000),
                encoder_hidden_states=torch.randn(batch, TEXT, 16), encoder_attention_mask=mask)


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
    TinyModel("Wan-Animate", _wan_animate, _wan_animate_inputs),
    TinyModel("Mochi", _mochi, _mochi_inputs, data_dependent_lengths=True, fullgraph=False),
    TinyModel("Cosmos", _cosmos, _cosmos_inputs),
    TinyModel("HunyuanVideo", _hunyuan, _hunyuan_inputs, text_mask=True, mask_argument="encoder_attention_mask"),
    TinyModel("HunyuanVideo-1.5", _hunyuan15, _hunyuan15_inputs, text_mask=True,
              mask_argument="encoder_attention_mask"),
    TinyModel("CogVideoX", _cogvideox, _cogvideox_inputs),
    TinyModel("LTX-Video", _ltx, _ltx_inputs),
    TinyModel("LTX-2", _ltx2, _ltx2_inputs),
    TinyModel("Flux", _flux, _flux_inputs, frames_must_be_one=True),
    TinyModel("Qwen-Image", _qwen, _qwen_inputs, text_mask=True, frames_must_be_one=True,
              mask_argument="encoder_hidden_states_mask"),
    TinyModel("Kandinsky 6", _kandinsky6, _kandinsky6_inputs),
    TinyModel("Motif-Video", _motif, _motif_inputs, text_mask=True, mask_argument="encoder_attention_mask"),
    TinyModel("MiniMax-H3", _minimax_h3, _minimax_h3_inputs),
    TinyModel("Flux.2", _flux2, _flux2_inputs, frames_must_be_one=True),
    TinyModel("Flux.3", _flux3, _flux3_inputs, frames_must_be_one=True),
    TinyModel("SD3", _sd3, _sd3_inputs, frames_must_be_one=True),
    TinyModel("HiDream-I1", _hidream, _hidream_inputs, frames_must_be_one=True, fullgraph=False),
    TinyModel("Z-Image", _zimage, _zimage_inputs, text_mask=True, frames_must_be_one=True),
    TinyModel("Lumina2", _lumina2, _lumina2_inputs, frames_must_be_one=True, fullgraph=False),
]


def forward(model, kwargs):
    """The model's first output (the denoised latent), under no_grad; a list of items (Z-Image) stacked."""
    with torch.no_grad():
        out = model(**kwargs, return_dict=False)[0]
    return torch.stack(out) if isinstance(out, (list, tuple)) else out
