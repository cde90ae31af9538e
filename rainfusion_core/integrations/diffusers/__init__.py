"""RainFusion2.0 for Hugging Face diffusers' video and image transformers.

    from rainfusion_core.integrations.diffusers import apply_rainfusion, Schedule
    handle = apply_rainfusion(pipe, sparsity=0.8, schedule=Schedule(dense_steps=2))
    video = pipe(prompt, ...).frames
    handle.remove()   # the original processors, exactly

Supported (diffusers 0.42): Wan2.1/2.2 (and VACE, SkyReels-V2), HunyuanVideo,
HunyuanVideo-1.5, CogVideoX, LTX-Video, Flux.1 and Qwen-Image; see
:func:`supported_models`. Only self- and joint (text + video) attention is
replaced; cross-attention stays dense. The processors stay diffusers' own: only
their attention call is routed to ``rf.sparse_attention``. The latent grid, and
which text tokens are real, are read from the transformer's own input by a
forward pre-hook, so any resolution and frame count works.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

import torch

from ..._checks import check_block_size, check_indices, check_int, check_optional_bool, describe
from ...call import crossover_reason
from ...backend import Backend
from ...precision import DEFAULT_PRECISION, check_precision
from ...reuse import MaskReuse
from ...registry import available_backends, device_type_of, get_backend, is_automatic
from .adapters import ADAPTERS, ModelAdapter, adapter_for, supported_classes, unsupported_reason
from .processor import RainFusionAttnProcessor, RainFusionHandle, RainFusionStats, base_processor, processor_type
from .sites import CaptureSite, SparseSite
from .state import CallState, Schedule, StepSparsity
from .wan_fused import WanFusedPrologue

__all__ = ["apply_rainfusion", "capture_qkv", "attention_layers", "supported_models", "Schedule",
           "RainFusionHandle", "RainFusionStats", "RainFusionAttnProcessor", "ModelAdapter"]


def supported_models() -> dict[str, tuple[str, ...]]:
    """Model family -> the diffusers transformer classes RainFusion patches."""
    return {adapter.family: adapter.classes for adapter in ADAPTERS}


def _transformers(model, adapter: ModelAdapter | None = None) -> tuple[ModelAdapter, list]:
    """The transformers of a pipeline (``transformer``, ``transformer_2``) or the model itself, and their
    adapter: ``adapter`` when given, else the built-in one of their class."""
    if adapter is not None and not isinstance(adapter, ModelAdapter):
        raise TypeError(f"adapter must be a rainfusion_core.integrations.diffusers.ModelAdapter, got "
                        f"{describe(adapter)}")
    if isinstance(model, torch.nn.Module) and (adapter is not None or adapter_for(model) is not None
                                               or unsupported_reason(model) is not None):
        found = [model]
    else:
        found = [t for t in (getattr(model, name, None) for name in ("transformer", "transformer_2")) if t is not None]
    for transformer in found:
        reason = unsupported_reason(transformer)
        if reason is not None:
            raise TypeError(f"{type(transformer).__name__} cannot run with RainFusion: {reason}")
    if adapter is not None:
        if not found:
            raise TypeError(f"expected a diffusers transformer or a pipeline holding one, got {describe(model)}")
        return adapter, found
    if not found or any(adapter_for(t) is None for t in found):
        names = ", ".join(type(t).__name__ for t in found) or type(model).__name__
        raise TypeError(f"expected a supported diffusers transformer or a pipeline holding one, got {names}; "
                        f"supported: {', '.join(supported_classes())}. For another model, say where its video "
                        "tokens are: apply_rainfusion(model, adapter=ModelAdapter(family=..., attention_modules="
                        "[(block list attribute, attention attribute)], grid=(transformer, forward arguments) -> "
                        "(frames, height, width), text_position='head', 'tail' or None)); docs/design.md, "
                        "'Writing an adapter'")
    adapters = {adapter_for(t).family: adapter_for(t) for t in found}
    if len(adapters) != 1:
        raise TypeError(f"a pipeline whose transformers are of different families: "
                        f"{', '.join(type(t).__name__ for t in found)}")
    return next(iter(adapters.values())), found


def attention_layers(model, *, adapter: ModelAdapter | None = None) -> list[str]:
    """Names of the attention modules RainFusion replaces, in the order ``layers=`` indexes them."""
    adapter, transformers = _transformers(model, adapter)
    return [name for name, _ in adapter.attention_modules(transformers[0])]


def _heads(attn) -> int:
    """An attention module's head count (``heads`` in diffusers' ``Attention``; ``num_heads`` in Kandinsky 6's)."""
    heads = getattr(attn, "heads", None) or getattr(attn, "num_heads", None)
    if not isinstance(heads, int):
        raise TypeError(f"{type(attn).__name__} has neither heads nor num_heads: RainFusion needs its head count")
    return heads


def _install(model, schedule: Schedule, layers, make_site, shortcut=None, crossover=None,
             dense_layers=None, adapter: ModelAdapter | None = None) -> RainFusionHandle:
    """Swap the processors of the chosen attention modules and hook the transformers; all or nothing."""
    adapter, transformers = _transformers(model, adapter)
    names = [name for name, _ in adapter.attention_modules(transformers[0])]
    layers = check_indices("layers", layers, names)
    dense = check_indices("dense_layers", dense_layers, names)
    if dense is not None:
        if layers is not None:
            raise ValueError("give layers= (the sparse ones) or dense_layers= (the others), not both")
        layers = [i for i in range(len(names)) if i not in dense]
    plan = []
    for transformer in transformers:
        modules = adapter.attention_modules(transformer)
        for option, chosen in (("layers", layers), ("dense_layers", dense)):
            for index in chosen or ():
                if not 0 <= index < len(modules):
                    raise ValueError(f"{option}: attention layer {index} does not exist (the model has "
                                     f"{len(modules)}: see attention_layers(model))")
        for index in range(len(modules)) if layers is None else layers:
            name, attn = modules[index]
            base = base_processor(attn.processor)
            call_site = adapter.call_site(base)
            if call_site is None:
                raise TypeError(f"{name} runs {type(base).__name__}; RainFusion routes the attention of "
                                f"{adapter.routed_processors()} in {adapter.family} models")
            plan.append((index, attn, call_site, base))
    state = CallState(schedule, adapter, crossover=crossover)
    handle = RainFusionHandle(state, names)
    sites = {}
    chosen = [make_site(state, index, sites) for index, _, _, _ in plan]
    for site, (_, attn, _, base) in zip(chosen, plan):
        site.check_parallel(getattr(base, "_parallel_config", None), _heads(attn))  # enable_parallelism came first
    for site, (index, attn, call_site, base) in zip(chosen, plan):
        attn.processor = processor_type(type(base))(attn.processor, site, call_site, index, _heads(attn), shortcut)
        handle._installed.append((attn, attn.processor))
    handle._sites.extend({id(s): s for s in sites.values()}.values())
    for transformer in transformers:
        handle._hooks.append(transformer.register_forward_pre_hook(handle.check_processors))
        handle._hooks.append(transformer.register_forward_pre_hook(state.hook(), with_kwargs=True))
    scheduler = getattr(model, "scheduler", None) if not transformers or model is not transformers[0] else None
    if callable(getattr(scheduler, "set_timesteps", None)):
        handle._hooks.append(_GenerationStart(scheduler, state))
    return handle


class _GenerationStart:
    """The pipeline's scheduler tells the steps: ``set_timesteps`` starts every generation, ``step`` ends each step.

    Wraps both methods on the scheduler instance. ``remove()`` puts back what was there before (another
    handle's wrapper, or the class's method); a wrapper that another handle wrapped in turn stays in that
    chain and passes calls through.
    """

    def __init__(self, scheduler, state):
        self.scheduler, self.state, self.active = scheduler, state, True
        self.installed = {}
        for name, hook in (("set_timesteps", self._generation), ("step", state.scheduler_stepped)):
            original = getattr(scheduler, name)
            below = scheduler.__dict__.get(name)  # another handle's wrapper, if any

            def wrapper(*args, _original=original, _hook=hook, **kwargs):
                if self.active:
                    _hook()
                return _original(*args, **kwargs)

            setattr(scheduler, name, wrapper)
            self.installed[name] = (wrapper, below)

    def _generation(self) -> None:
        self.state.new_generation(count_steps=self.steps)

    def steps(self) -> int:
        """The steps this generation runs: the scheduler's timesteps past its begin index (img2img skips some)."""
        begin = getattr(self.scheduler, "begin_index", None) or 0
        return max(1, len(self.scheduler.timesteps) - begin)

    def remove(self) -> None:
        self.active = False
        for name, (wrapper, below) in self.installed.items():
            if self.scheduler.__dict__.get(name) is wrapper:
                if below is None:
                    del self.scheduler.__dict__[name]
                else:
                    setattr(self.scheduler, name, below)


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
    precision: str = "bf16",
    min_tokens: int | None = None,
    dense_layers=None,
    refresh_every: int = 1,
    adapter: ModelAdapter | None = None,
) -> RainFusionHandle:
    """Make the self- and joint attention of a diffusers transformer (or of a pipeline's) RainFusion2.0-sparse.

    Args:
        model: a supported transformer (:func:`supported_models`) or a pipeline with
            ``transformer`` (and ``transformer_2``, as Wan2.2 has).
        sparsity, block_size, backend, first_frame_sink: as in ``rf.sparse_attention``.
            Images (``frames == 1``) get no first-frame sink unless asked. ``sparsity`` may
            also change with the denoising step: a list (one value per step, the last one
            for every later step) or a function of the step (``lambda step: ...``, asked
            once per step). Steps count as in :class:`Schedule` (one host read of the
            timestep per transformer call); compiled blocks read the step's value at run
            time, so one graph serves every step (such graphs are not captured in CUDA
            graphs: the value lives on the CPU).
        schedule: when to stay dense (:class:`Schedule`).
        layers: the attention layers to make sparse, as indices into
            :func:`attention_layers` or as its names; ``None`` means all, the rest stay dense.
        dense_layers: instead of ``layers``, the ones to keep dense (indices or names).
        fuse_prologue: Wan only. Run the q/k RMS norm and rotary embedding of the sparse
            layers as one Triton pass per tensor (float32 rotation instead of diffusers'
            float64). ``None``: in eager mode when the input is on CUDA, Triton is
            installed and autograd is not recording (the pass has no backward);
            ``True``: always, an error where it cannot run; ``False``: never.
        precision: ``"bf16"`` or ``"fp8"``, as in ``rf.sparse_attention``: the sparse
            attention's operands in float8 (Hopper GPUs); dense layers, dense steps and
            padded text rows keep the model's precision. Refused here when neither the named
            backend nor any backend for the device of the model's weights offers it.
        min_tokens: the dense crossover, as in ``rf.sparse_attention``: a transformer call whose
            latent grid has fewer tokens than the measured crossover of its device (or whose
            sparsity leaves a mask that keeps nearly every tile) runs its attention dense, as the
            model would, because that is faster there. ``None``: the measured crossover
            (``rainfusion_core.crossover``); ``0``: always sparse. FP8 handles, and handles with a
            backend named explicitly (not ``None`` or a device string), never run dense.
            ``handle.stats()`` counts the calls each way.
        refresh_every: predict each layer's mask once every this many denoising steps and
            reuse it in the steps between (``1``, the default: every step). A mask is
            predicted again when what it depends on changes (the step's sparsity, the shapes)
            and at each new generation. One mask is kept per attention call of a step (memory:
            a mask is ``B x H x NQ x NK`` bools and int32s), freed at a pipeline's last step and
            by ``remove()``. Works eager and compiled (the whole-call op looks the mask up when it
            runs; such graphs are not captured in CUDA graphs: the step lives on the CPU); in
            compiled code masks are found by the call's position in the transformer call, so a
            hook that skips attention calls at some steps must not be combined with it.
            ``handle.stats().reused`` counts the calls that reused a mask; ``rainfusion
            evaluate --reuse-from`` shows what reuse costs on captured q, k, v of two steps.
        adapter: for a transformer no built-in adapter serves, a :class:`ModelAdapter` saying
            which attention modules to patch and where the video tokens are (docs/design.md,
            "Writing an adapter"); it also replaces the built-in adapter of a supported class.
    Each batch item gets its own mask, so the halves of a guidance batch differ.
    Padded text tokens (HunyuanVideo, Qwen-Image) are never keys of the sparse call;
    their own rows run dense, exactly as in the model.
    """
    sparsity = StepSparsity.of(sparsity)
    block_size = check_block_size(block_size)
    check_optional_bool("first_frame_sink", first_frame_sink)
    check_optional_bool("fuse_prologue", fuse_prologue)
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a rainfusion_core.integrations.diffusers.Schedule, got {describe(schedule)}")
    precision = check_precision(precision)
    if min_tokens is not None:
        check_int("min_tokens", min_tokens, minimum=0)
    refresh_every = check_int("refresh_every", refresh_every, minimum=1)
    if backend is not None:
        get_backend(backend)  # an unknown name, a missing device or an unavailable backend fails here, not mid-run
    adapter, transformers = _transformers(model, adapter)
    _check_precision_offered(precision, backend, transformers)
    shortcut = None
    if adapter.family == "Wan":
        shortcut = WanFusedPrologue(fuse_prologue)
    elif fuse_prologue:
        raise ValueError(f"fuse_prologue=True: only Wan's self-attention has a fused prologue, not {adapter.family}")

    per_step = sparsity if isinstance(sparsity, StepSparsity) else None
    if (per_step is not None or refresh_every > 1) and isinstance(backend, Backend):
        what = "a per-step sparsity" if per_step is not None else "refresh_every > 1"
        raise ValueError(f"{what} needs a backend by name or device (a Backend object cannot cross the compiled "
                         "op's boundary): register it and pass its name")

    def make_site(state, index, sites):
        if "sparse" not in sites:
            state.sparsity = per_step
            state.reuse = MaskReuse(refresh_every) if refresh_every > 1 else None
            # with a sparsity per step, every call takes the step's value: this one only stands in for it
            sites["sparse"] = SparseSite(state, sparsity=0.5 if per_step else sparsity,
                                         block_size=block_size, backend=backend, first_frame_sink=first_frame_sink,
                                         precision=precision)
        return sites["sparse"]

    def crossover(device_type, layout, step_sparsity=None):
        if precision != DEFAULT_PRECISION or not is_automatic(backend):  # asked for by name: never dense
            return None
        return crossover_reason(device_type, layout, sparsity if step_sparsity is None else step_sparsity,
                                block_size, first_frame_sink, min_tokens)

    return _install(model, schedule, layers, make_site, shortcut, crossover, dense_layers, adapter)


def _check_precision_offered(precision: str, backend, transformers) -> None:
    """Refuse, before any forward, a precision that no backend could run for this model.

    With ``backend`` named: that backend must list it. Otherwise some available backend for
    the device the model's weights are on must. (Whether the call itself suits the backend,
    a Hopper GPU for FP8 say, is still decided per call, with the reason.)
    """
    if precision == DEFAULT_PRECISION:
        return
    if isinstance(backend, Backend) or (backend is not None and device_type_of(backend) is None):
        chosen = get_backend(backend)
        candidates, where = [chosen], f"backend {chosen.name!r}"
    else:
        parameter = next((p for t in transformers for p in t.parameters()), None)
        device_type = device_type_of(backend) if backend is not None else (
            parameter.device.type if parameter is not None else "cpu")
        candidates = available_backends(device_type)  # the ones automatic selection would consider
        where = f"any available backend for {device_type} (the device of the model's weights)"
    if not any(precision in b.precisions for b in candidates):
        offered = "; ".join(f"{b.name}: {', '.join(b.precisions)}" for b in candidates) or "none"
        raise ValueError(f"precision={precision!r} is not offered by {where} ({offered})")


class _CountSteps(Schedule):
    """A schedule that counts steps (reads the timestep) and never forces dense attention."""

    @property
    def reads_timestep(self) -> bool:
        return True


def capture_qkv(model, directory, *, layers=(0,), steps=(0,), adapter: ModelAdapter | None = None) -> RainFusionHandle:
    """Save self-attention q, k, v of the given layers at the given denoising steps, for ``rainfusion evaluate``.

    Files are ``qkv_layer{L}_step{S}_call{C}.pt`` in ``directory`` (BNSD, model order,
    with the layout; with padded text, one ``..._group{G}.pt`` per group of batch items
    with the same real text, holding those tokens only); the model's outputs are unchanged.
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(exc.errno, f"capture_qkv: cannot create the folder {directory} ({exc.strerror})") from None
    if not os.access(directory, os.W_OK | os.X_OK):  # refuse now, not at the first forward
        raise PermissionError(errno.EACCES, f"capture_qkv: the folder {directory} is not writable")

    def make_site(state, index, sites):
        sites[index] = CaptureSite(state, directory=directory, steps=steps, layer=index)
        return sites[index]

    return _install(model, _CountSteps(), layers, make_site, adapter=adapter)
