"""RainFusion2.0 for Hugging Face diffusers' Wan transformers (Wan2.1 / Wan2.2).

    from rainfusion_core.integrations.diffusers import apply_rainfusion, Schedule
    handle = apply_rainfusion(pipe, sparsity=0.8, schedule=Schedule(dense_steps=2))
    video = pipe(prompt, ...).frames
    handle.remove()   # the original processors, exactly

Only self-attention (``attn1``) of each ``WanTransformerBlock`` is replaced;
cross-attention stays dense. The latent grid is read from the transformer's
own input (``hidden_states.shape`` and ``config.patch_size``) by a forward
pre-hook, so any resolution and frame count works.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._checks import check_block_size, check_int, check_optional_bool, check_sparsity, describe
from ..api import sparse_attention
from ..layout import VideoLayout
from ..quality import save_qkv
from ..registry import get_backend


@dataclass(frozen=True)
class Schedule:
    """When attention stays dense.

    Attributes:
        dense_steps: the first denoising steps run dense. Steps are counted per
            distinct timestep the transformer sees, so classifier-free guidance
            (two calls, or one doubled batch, per step) counts once; a timestep
            larger than the previous one starts a new generation at step 0.
        dense_above_timestep: run dense while the timestep is above this value.
    Reading the timestep costs one host synchronisation per transformer call,
    and only when one of these is set.
    """

    dense_steps: int = 0
    dense_above_timestep: float | None = None

    def __post_init__(self):
        check_int("Schedule.dense_steps", self.dense_steps, minimum=0)
        above = self.dense_above_timestep
        if above is not None and (isinstance(above, bool) or not isinstance(above, (int, float))
                                  or not math.isfinite(above)):
            raise ValueError(f"Schedule.dense_above_timestep must be None or a finite number, got {above!r}")

    @property
    def reads_timestep(self) -> bool:
        return self.dense_steps > 0 or self.dense_above_timestep is not None


@dataclass
class _State:
    """What the pre-hook learns each transformer call; shared by the processors of one model (or pipeline)."""

    schedule: Schedule
    layout: VideoLayout | None = None
    step: int = -1
    last_timestep: float | None = None
    sparse: bool = True
    calls: int = 0
    angle_tables: dict = field(default_factory=dict)  # float32 rotary tables of this call, by source

    def update(self, module, args, kwargs) -> None:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        _, _, frames, height, width = hidden.shape
        p_t, p_h, p_w = module.config.patch_size
        self.layout = VideoLayout(frames // p_t, height // p_h, width // p_w)
        self.calls += 1
        self.sparse = True
        self.angle_tables.clear()
        if not self.schedule.reads_timestep:
            return
        t = float(timestep.flatten()[0])  # one host sync per transformer call
        if self.last_timestep is None or t > self.last_timestep:
            self.step = 0
        elif t != self.last_timestep:
            self.step += 1
        self.last_timestep = t
        if self.step < self.schedule.dense_steps:
            self.sparse = False
        if self.schedule.dense_above_timestep is not None and t > self.schedule.dense_above_timestep:
            self.sparse = False


def _rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding: rotate (even, odd) channel pairs by the per-position angles."""
    even, odd = x[..., 0::2], x[..., 1::2]
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack((even * c - odd * s, even * s + odd * c), dim=-1).flatten(-2).type_as(x)


def _self_attention_qkv(attn, hidden_states, rotary_emb, tables=None):
    """q, k, v ``[B, S, H, D]`` of a Wan self-attention, computed as WanAttnProcessor does.

    With ``tables`` (float32 ``[S, D]`` cos and sin, from :func:`_fused_prologue_tables`) the
    RMS norm and the rotation of q and k run as one Triton pass each.
    """
    if getattr(attn, "fused_projections", False):
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    value = value.unflatten(2, (attn.heads, -1))
    if tables is not None:
        from .wan_prologue import rms_norm_rope

        query, key = (rms_norm_rope(x, norm.weight, _rms_eps(norm, x), *tables, attn.heads)
                      for x, norm in ((query, attn.norm_q), (key, attn.norm_k)))
        return query, key, value
    query, key = attn.norm_q(query), attn.norm_k(key)
    query, key = (x.unflatten(2, (attn.heads, -1)) for x in (query, key))
    if rotary_emb is not None:
        query, key = _rotate_pairs(query, *rotary_emb), _rotate_pairs(key, *rotary_emb)
    return query, key, value


def _rms_eps(norm, x: torch.Tensor) -> float:
    return norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps


def _fused_prologue_problem(attn, hidden_states, rotary_emb, *, explicit: bool) -> str | None:
    """Why the fused q/k prologue cannot run here, or ``None`` when it can.

    Like a named Triton backend, an explicit request also runs on CPU tensors under
    ``TRITON_INTERPRET=1`` (how CI tests the kernel).
    """
    interpreting = explicit and os.environ.get("TRITON_INTERPRET") == "1"
    if not hidden_states.is_cuda and not interpreting:
        return f"hidden_states are on {hidden_states.device}, the fused prologue is a CUDA Triton kernel"
    if rotary_emb is None:
        return "the layer got no rotary embedding"
    if torch.is_grad_enabled() and (hidden_states.requires_grad or any(p.requires_grad for p in attn.parameters())):
        return "autograd is recording and the fused prologue has no backward (run under torch.no_grad())"
    width = attn.heads * rotary_emb[0].shape[-1]
    for name in ("norm_q", "norm_k"):
        norm = getattr(attn, name, None)
        if not isinstance(norm, torch.nn.RMSNorm) or tuple(norm.normalized_shape) != (width,):
            return f"attn.{name} is {type(norm).__name__}, not an RMSNorm across heads of width {width}"
    if rotary_emb[0].numel() != hidden_states.shape[1] * rotary_emb[0].shape[-1]:
        return f"rotary tables of shape {tuple(rotary_emb[0].shape)} are not one angle row per token"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed"
    return None


def _fused_prologue_tables(state: "_State", rotary_emb):
    """Float32 ``[S, D]`` cos and sin for the fused prologue, converted once per transformer call."""
    cos, sin = rotary_emb
    key = (cos.data_ptr(), sin.data_ptr(), cos.shape)
    if key not in state.angle_tables:
        state.angle_tables[key] = tuple(t.reshape(-1, t.shape[-1]).float().contiguous() for t in (cos, sin))
    return state.angle_tables[key]


class _SelfAttentionProcessor:
    """Base of the replacements: keeps the original and the attributes diffusers sets on processors."""

    def __init__(self, original, state: _State, layer: int):
        self.original, self.state, self.layer = original, state, layer
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._parallel_config = getattr(original, "_parallel_config", None)

    def _dense(self, attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs):
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)


class RainFusionAttnProcessor(_SelfAttentionProcessor):
    """Wan self-attention through ``rf.sparse_attention`` (dense when the schedule says so)."""

    def __init__(self, original, state, layer, *, sparsity, block_size, backend, first_frame_sink, fuse_prologue):
        super().__init__(original, state, layer)
        self.sparsity, self.block_size, self.backend, self.first_frame_sink = sparsity, block_size, backend, first_frame_sink
        self.fuse_prologue = fuse_prologue

    def _tables(self, attn, hidden_states, rotary_emb):
        """Angle tables when the fused q/k prologue runs, ``None`` for the eager one."""
        if self.fuse_prologue is False:
            return None
        problem = _fused_prologue_problem(attn, hidden_states, rotary_emb, explicit=bool(self.fuse_prologue))
        if problem is None:
            return _fused_prologue_tables(self.state, rotary_emb)
        if self.fuse_prologue:
            raise ValueError(f"fuse_prologue=True but the fused q/k prologue cannot run: {problem}")
        return None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, **kwargs):
        if not self.state.sparse:
            return self._dense(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)
        if encoder_hidden_states is not None or attention_mask is not None or kwargs:
            raise ValueError("RainFusion replaces Wan self-attention only: it got encoder states, a mask or extra "
                             "arguments; is this processor on a cross-attention layer?")
        layout = self.state.layout
        if layout is None or hidden_states.shape[1] != layout.seq_len:
            raise ValueError(f"self-attention has {hidden_states.shape[1]} tokens but the transformer input gives "
                             f"{layout}; RainFusion needs the whole latent sequence on this device")
        tables = self._tables(attn, hidden_states, rotary_emb)
        query, key, value = _self_attention_qkv(attn, hidden_states, rotary_emb, tables)
        out = sparse_attention(query, key, value, layout, sparsity=self.sparsity, block_size=self.block_size,
                               tensor_layout="BSND", backend=self.backend, first_frame_sink=self.first_frame_sink)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class CaptureProcessor(_SelfAttentionProcessor):
    """Saves q, k, v (BNSD, model order) of chosen steps to files, then runs the original processor."""

    def __init__(self, original, state, layer, *, directory: Path, steps):
        super().__init__(original, state, layer)
        self.directory, self.steps = directory, set(steps)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, **kwargs):
        if self.state.step in self.steps and encoder_hidden_states is None:
            q, k, v = (x.transpose(1, 2) for x in _self_attention_qkv(attn, hidden_states, rotary_emb))
            path = self.directory / f"qkv_layer{self.layer}_step{self.state.step}_call{self.state.calls}.pt"
            save_qkv(path, q, k, v, self.state.layout, layer=self.layer, step=self.state.step)
        return self._dense(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)


@dataclass
class RainFusionHandle:
    """Undo what :func:`apply_rainfusion` or :func:`capture_qkv` did with :meth:`remove`.

    Handles may be stacked on one model and removed in any order: removing one
    takes its processors out of each layer's chain and leaves the others working.
    """

    state: _State
    _installed: list = field(default_factory=list)  # (attention module, the processor this handle installed)
    _hooks: list = field(default_factory=list)

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def layout(self) -> VideoLayout | None:
        return self.state.layout

    def remove(self) -> None:
        """Restore what each layer ran before this handle; idempotent."""
        for attn, mine in reversed(self._installed):
            if attn.processor is mine:
                attn.processor = mine.original
                continue
            # Something was installed on top of ours: unlink ours from the chain of originals.
            node = attn.processor
            while isinstance(node, _SelfAttentionProcessor) and node.original is not mine:
                node = node.original
            if isinstance(node, _SelfAttentionProcessor):
                node.original = mine.original
            # else: ours was replaced outright by someone else's processor and no longer runs
        for hook in self._hooks:
            hook.remove()
        self._installed.clear()
        self._hooks.clear()


def _transformers(model) -> list:
    """The Wan transformers of a pipeline (transformer, transformer_2) or the model itself."""
    if hasattr(model, "blocks") and hasattr(model, "config"):
        return [model]
    found = [getattr(model, name, None) for name in ("transformer", "transformer_2")]
    found = [t for t in found if t is not None]
    if not found:
        raise TypeError(f"expected a WanTransformer3DModel or a pipeline holding one, got {type(model).__name__}")
    return found


def _install(model, state: _State, layers, make) -> RainFusionHandle:
    """Swap ``attn1`` processors of the chosen blocks and hook the transformers; all or nothing."""
    transformers = _transformers(model)
    for transformer in transformers:
        for index in layers or ():
            if not 0 <= index < len(transformer.blocks):
                raise ValueError(f"layers: block {index} does not exist (the model has {len(transformer.blocks)})")
    handle = RainFusionHandle(state)
    for transformer in transformers:
        for index in range(len(transformer.blocks)) if layers is None else layers:
            attn = transformer.blocks[index].attn1
            attn.processor = make(attn.processor, index)
            handle._installed.append((attn, attn.processor))
        handle._hooks.append(transformer.register_forward_pre_hook(state.update, with_kwargs=True))
    return handle


def apply_rainfusion(
    model,
    *,
    sparsity: float = 0.8,
    block_size: int = 128,
    backend=None,
    first_frame_sink: bool | None = None,
    schedule: Schedule = Schedule(),
    layers=None,
    fuse_prologue: bool | None = None,
) -> RainFusionHandle:
    """Make the self-attention of a Wan transformer (or of a pipeline's transformers) RainFusion2.0-sparse.

    Args:
        model: a ``WanTransformer3DModel`` or a pipeline with ``transformer``
            (and ``transformer_2``, Wan2.2).
        sparsity, block_size, backend, first_frame_sink: as in ``rf.sparse_attention``.
        schedule: when to stay dense (:class:`Schedule`).
        layers: block indices to make sparse; ``None`` means all, the rest stay dense.
        fuse_prologue: run the q/k RMS norm and rotary embedding of the sparse
            layers as one Triton pass per tensor (float32 rotation instead of
            diffusers' float64; outputs agree to the last bit in all but rare
            roundings). ``None``: when the input is on CUDA, Triton is installed
            and autograd is not recording (the pass has no backward); ``True``:
            always, an error where it cannot run; ``False``: never.
    Each batch item gets its own mask, so the halves of a guidance batch differ.
    """
    sparsity = check_sparsity(sparsity)
    block_size = check_block_size(block_size)
    check_optional_bool("first_frame_sink", first_frame_sink)
    check_optional_bool("fuse_prologue", fuse_prologue)
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a rainfusion_core.integrations.diffusers.Schedule, got {describe(schedule)}")
    if backend is not None:
        get_backend(backend)  # an unknown name, a missing device or an unavailable backend fails here, not mid-run
    state = _State(schedule)

    def make(original, index):
        return RainFusionAttnProcessor(original, state, index, sparsity=sparsity, block_size=block_size,
                                       backend=backend, first_frame_sink=first_frame_sink,
                                       fuse_prologue=fuse_prologue)

    return _install(model, state, layers, make)


@dataclass(frozen=True)
class _CountSteps(Schedule):
    """A schedule that counts steps (reads the timestep) and never forces dense attention."""

    @property
    def reads_timestep(self) -> bool:
        return True


def capture_qkv(model, directory, *, layers=(0,), steps=(0,)) -> RainFusionHandle:
    """Save self-attention q, k, v of the given blocks at the given denoising steps, for ``rainfusion evaluate``.

    Files are ``qkv_layer{L}_step{S}_call{C}.pt`` in ``directory`` (BNSD, model
    order, with the layout); the model's outputs are unchanged.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = _State(_CountSteps())

    def make(original, index):
        return CaptureProcessor(original, state, index, directory=directory, steps=steps)

    return _install(model, state, layers, make)


