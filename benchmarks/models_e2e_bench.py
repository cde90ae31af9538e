"""One transformer forward per model family, dense vs RainFusion 0.8, eager and compiled (needs a CUDA GPU).

    python benchmarks/models_e2e_bench.py [--models wan-1.3b,flux] [--modes eager,compiled] [--repeats 2]
                                          [--precisions bf16,fp8]

Each model is built from its published configuration with random bfloat16
weights (no weights are downloaded) and run at its usual resolution and frame
count, batch 1. Dense runs torch's SDPA with cuDNN first in priority (flash and
memory-efficient after it, for the masks cuDNN refuses); RainFusion runs at
sparsity 0.8 through ``apply_rainfusion`` with automatic backend selection (the Triton
backend on a GPU), so a model below the dense crossover runs dense as it would for a user
(the script says so); ``--backend triton`` always runs sparse. "compiled" is
diffusers' ``compile_repeated_blocks(fullgraph=True)`` (``torch.compile`` of the
whole model where the class declares no repeated blocks: CogVideoX). Attention's
share is one attention call at the model's shape (same backends) times the
number of attention layers, over the forward. Times are medians of CUDA-event
timings after a warm-up forward (which also compiles). ``--precisions bf16,fp8`` adds
a RainFusion row with ``precision="fp8"`` (the attention in FP8; needs an NVIDIA Hopper
GPU); the dense forward stays bf16.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import rainfusion_core as rf
from rainfusion_core.benchmarking import comma_choices, event_median_ms
from rainfusion_core.integrations.diffusers import apply_rainfusion, attention_layers
from rainfusion_core.precision import PRECISIONS

DENSE = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
                cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
WAN_14B = dict(WAN_1_3B, num_attention_heads=40, ffn_dim=13824, num_layers=40)


@dataclass(frozen=True)
class Model:
    """A published configuration at its usual size: class, config, forward inputs, attention shape."""

    cls: str
    config: dict
    inputs: Callable  # device -> forward kwargs
    grid: tuple  # latent token grid (frames, height, width)
    heads: int
    head_dim: int
    text: int = 0  # text tokens in the joint attention
    text_position: str = "head"
    real_text: int | None = None  # real (unpadded) text tokens


def _randn(*shape):
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)


def _t(value):
    return torch.tensor([value], device="cuda", dtype=torch.float32)


def _wan_inputs(frames, height, width):
    """A ``[1, 16, frames, height, width]`` latent (tokens: height / 2 x width / 2) and 512 text tokens."""
    return lambda: dict(hidden_states=_randn(1, 16, frames, height, width), timestep=_t(500.0),
                        encoder_hidden_states=_randn(1, 512, 4096))


def _hunyuan_inputs():
    mask = torch.zeros(1, 256, dtype=torch.int64, device="cuda")
    mask[:, :100] = 1  # a 100-token prompt padded to 256, as the pipeline pads it
    return dict(hidden_states=_randn(1, 16, 33, 90, 160), timestep=_t(500.0), encoder_hidden_states=_randn(1, 256, 4096),
                encoder_attention_mask=mask, pooled_projections=_randn(1, 768), guidance=_t(6000.0))


def _cogvideox_inputs():
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    rotary = get_3d_rotary_pos_embed(embed_dim=64, crops_coords=((0, 0), (30, 45)), grid_size=(30, 45),
                                     temporal_size=13, device="cuda")
    return dict(hidden_states=_randn(1, 13, 16, 60, 90), encoder_hidden_states=_randn(1, 226, 4096),
                timestep=torch.tensor([500], device="cuda"), image_rotary_emb=rotary)


def _ltx_inputs():
    return dict(hidden_states=_randn(1, 16 * 16 * 24, 128), encoder_hidden_states=_randn(1, 128, 4096),
                timestep=torch.tensor([500], device="cuda"),
                encoder_attention_mask=torch.ones(1, 128, dtype=torch.int64, device="cuda"),
                num_frames=16, height=16, width=24)


def _flux_inputs(side):
    """A ``side x side`` packed latent grid (16 x side pixels) and 512 text tokens."""
    def inputs():
        ids = torch.zeros(side, side, 3, device="cuda")
        ids[..., 1] = torch.arange(side, device="cuda")[:, None]
        ids[..., 2] = torch.arange(side, device="cuda")[None, :]
        return dict(hidden_states=_randn(1, side * side, 64), encoder_hidden_states=_randn(1, 512, 4096),
                    pooled_projections=_randn(1, 768), timestep=_t(0.5), img_ids=ids.reshape(-1, 3),
                    txt_ids=torch.zeros(512, 3, device="cuda"), guidance=_t(3.5))
    return inputs


def _qwen_inputs():
    """Qwen-Image at 1328 x 1328: an 83 x 83 packed latent grid and a 128-token prompt (no padding)."""
    return dict(hidden_states=_randn(1, 83 * 83, 64), encoder_hidden_states=_randn(1, 128, 3584),
                encoder_hidden_states_mask=torch.ones(1, 128, dtype=torch.int64, device="cuda"),
                timestep=_t(0.5), img_shapes=[[(1, 83, 83)]])


def _mochi_inputs():
    """Mochi 1 at 848 x 480, 163 frames: a [1, 12, 28, 60, 106] latent; a 100-token prompt padded to 256."""
    mask = torch.zeros(1, 256, dtype=torch.int64, device="cuda")
    mask[:, :100] = 1
    return dict(hidden_states=_randn(1, 12, 28, 60, 106), encoder_hidden_states=_randn(1, 256, 4096),
                encoder_attention_mask=mask, timestep=_t(500.0))


def _cosmos_inputs():
    """Cosmos-1.0 7B at 1280 x 704, 121 frames: a [1, 16, 16, 88, 160] latent, 512 T5 tokens."""
    return dict(hidden_states=_randn(1, 16, 16, 88, 160), encoder_hidden_states=_randn(1, 512, 1024),
                timestep=_t(500.0), fps=24)


def _minimax_h3_inputs(frames=37, height=24, width=42, text=300, audio=200):
    """MiniMax-H3 text-to-video-and-audio at 768 x 1344, 124 frames: [text | stereo audio | video], packed as its
    pipeline's builders pack it (positions (time, row, column)); its time runs 0 = noise -> 1 = clean."""
    def inputs():
        video, rows = frames * height * width, 2 * audio
        length = text + rows + video
        positions = torch.zeros(length, 3, device="cuda")
        positions[:text, 0] = torch.arange(text, device="cuda")
        positions[text:text + rows, 0] = (text + torch.arange(audio, device="cuda")).repeat(2)
        positions[text:text + rows, 2] = torch.tensor([0.0, width - 1.0], device="cuda").repeat_interleave(audio)
        f, h, w = torch.meshgrid(*(torch.arange(n, device="cuda") for n in (frames, height, width)), indexing="ij")
        positions[text + rows:] = torch.stack([text + 5 * f.flatten(), h.flatten(), w.flatten()], -1).float()
        tags = torch.cat([torch.full((text,), 1), torch.full((rows,), 2), torch.full((video,), 0)]).cuda()
        return dict(hidden_states=_randn(1, video, 24 * 4), audio_hidden_states=_randn(1, rows, 32),
                    encoder_hidden_states=_randn(1, text, 5120), timestep=_t(0.5),
                    timestep_indices=torch.zeros(length, dtype=torch.long, device="cuda"), token_tags=tags,
                    position_ids=positions, video_indices=torch.arange(text + rows, length, device="cuda"),
                    audio_indices=torch.arange(text, text + rows, device="cuda"),
                    text_indices=torch.arange(text, device="cuda"))
    return inputs


MODELS = {
    "wan-1.3b": Model("WanTransformer3DModel", WAN_1_3B, _wan_inputs(21, 60, 104), (21, 30, 52), 12, 128),
    "wan-14b": Model("WanTransformer3DModel", WAN_14B, _wan_inputs(21, 90, 160), (21, 45, 80), 40, 128),
    "hunyuanvideo": Model("HunyuanVideoTransformer3DModel", dict(), _hunyuan_inputs, (33, 45, 80), 24, 128,
                          text=256, text_position="tail", real_text=100),
    "cogvideox-5b": Model("CogVideoXTransformer3DModel",
                          dict(num_attention_heads=48, attention_head_dim=64, num_layers=42, time_embed_dim=512,
                               use_rotary_positional_embeddings=True, sample_width=90, sample_height=60),
                          _cogvideox_inputs, (13, 30, 45), 48, 64, text=226),
    "ltx-video": Model("LTXVideoTransformer3DModel", dict(), _ltx_inputs, (16, 16, 24), 32, 64),
    "flux-dev": Model("FluxTransformer2DModel", dict(guidance_embeds=True), _flux_inputs(64), (1, 64, 64), 24, 128,
                      text=512),
    "flux-dev-2048": Model("FluxTransformer2DModel", dict(guidance_embeds=True), _flux_inputs(128), (1, 128, 128), 24,
                           128, text=512),
    "qwen-image": Model("QwenImageTransformer2DModel", dict(), _qwen_inputs, (1, 83, 83), 24, 128, text=128),
    "mochi": Model("MochiTransformer3DModel", dict(), _mochi_inputs, (28, 30, 53), 24, 128, text=256,
                   text_position="tail", real_text=100),
    # concat_padding_mask off: it concatenates a padding-mask channel before patching (torchvision), not attention
    "cosmos-7b": Model("CosmosTransformer3DModel", dict(concat_padding_mask=False), _cosmos_inputs, (16, 44, 80), 32,
                       128),
    "minimax-h3": Model("MiniMaxH3Transformer3DModel", dict(), _minimax_h3_inputs(), (37, 24, 42), 56, 128,
                        text=700),  # the dense head: 300 text tokens and 400 audio rows
}


def build(spec: Model):
    import diffusers

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            return getattr(diffusers, spec.cls)(**spec.config).eval()
    finally:
        torch.set_default_dtype(default)


def attention_ms(spec: Model, repeats: int, precision: str = "bf16") -> tuple[float, float]:
    """One attention call at the model's shape: dense SDPA and rf.sparse_attention at 0.8, ms."""
    text = spec.real_text if spec.real_text is not None else spec.text
    layout = rf.VideoLayout(*spec.grid, text_len=text, text_position=spec.text_position)
    q, k, v = (_randn(1, layout.seq_len, spec.heads, spec.head_dim) for _ in range(3))
    with sdpa_kernel(DENSE, set_priority=True):
        dense = event_median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)), repeats=max(repeats, 5))
    sparse = event_median_ms(lambda: rf.sparse_attention(q, k, v, layout, tensor_layout="BSND", backend="triton",
                                                         precision=precision), repeats=max(repeats, 5))
    return dense, sparse


def measure(name: str, spec: Model, modes, repeats: int, precisions=("bf16",), backend=None) -> list[str]:
    model = build(spec)
    kwargs = spec.inputs()
    layers = len(attention_layers(model))

    def forward():
        with torch.no_grad():
            return model(**kwargs, return_dict=False)[0]

    def timed(label):
        started = time.perf_counter()
        with sdpa_kernel(DENSE, set_priority=True):
            ms = event_median_ms(forward, repeats=repeats)
        print(f"  {name} {label}: {ms:.0f} ms (with warm-up {time.perf_counter() - started:.0f} s)", flush=True)
        return ms

    attention = {p: attention_ms(spec, repeats, p) for p in precisions}
    times = {}
    for mode in modes:
        if mode == "compiled":
            torch._dynamo.reset()
            if model._repeated_blocks:
                model.compile_repeated_blocks(fullgraph=True)
            else:
                compiled = torch.compile(model)
                forward = lambda: _no_grad(compiled, kwargs)  # noqa: E731
        times[mode, "dense"] = timed(f"{mode} dense")
        for precision in precisions:
            # automatic selection (the triton backend on a GPU), so the dense crossover applies as for users
            handle = apply_rainfusion(model, sparsity=0.8, backend=backend, precision=precision)
            times[mode, precision] = timed(f"{mode} RainFusion 0.8 {precision}")
            stats = handle.stats()
            if stats.dense_by_crossover:
                print(f"  {name}: {stats.dense_by_crossover} of {stats.dense_by_crossover + stats.sparse_calls} "
                      f"forwards ran dense below the crossover ({stats.dense_reason})", flush=True)
            seen = (handle.layout.frames, handle.layout.height, handle.layout.width)
            handle.remove()
            if seen != spec.grid:
                raise RuntimeError(f"{name}: the model ran a {seen} token grid, the table says {spec.grid}")
    rows = []
    for mode in modes:
        for precision in precisions:
            dense, sparse = times[mode, "dense"], times[mode, precision]
            dense_attn, sparse_attn = attention[precision]
            rows.append(f"| {name} | {'x'.join(map(str, spec.grid))}{f' + {spec.text} text' if spec.text else ''} | "
                        f"{mode} | {precision} | {dense:.0f} ms | {sparse:.0f} ms | **{dense / sparse:.2f}x** | "
                        f"{100 * layers * dense_attn / dense:.0f} % / {100 * layers * sparse_attn / sparse:.0f} % |")
    del model
    torch.cuda.empty_cache()
    return rows


def _no_grad(module, kwargs):
    with torch.no_grad():
        return module(**kwargs, return_dict=False)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of: {', '.join(MODELS)}")
    parser.add_argument("--modes", default="eager,compiled")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--precisions", default="bf16", help="comma-separated RainFusion precisions: bf16, fp8")
    parser.add_argument("--backend", default=None,
                        help="backend for RainFusion (default: automatic, with the dense crossover; naming one, "
                             "e.g. triton, always runs sparse)")
    args = parser.parse_args()
    precisions = comma_choices(parser, "--precisions", args.precisions, PRECISIONS)
    names = comma_choices(parser, "--models", args.models, MODELS)
    modes = args.modes.split(",")
    rows = []
    for name in names:
        print(f"== {name}", flush=True)
        rows += measure(name, MODELS[name], modes, args.repeats, precisions, args.backend)
        print("\n".join(rows[-len(modes) * len(precisions):]), flush=True)
    print("\n==== summary: one forward, batch 1, bf16 model (RainFusion attention in the precision shown) ====")
    print("| model | grid | mode | precision | dense | RainFusion 0.8 | speed-up | "
          "attention share (dense / RainFusion) |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
