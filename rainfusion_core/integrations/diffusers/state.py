"""What a transformer call tells the attention layers: the latent grid, the real text tokens, the step.

A forward pre-hook on each patched transformer fills one :class:`CallState`
per handle before the blocks run, so the attention layers read plain Python
values (and, for padded text, index tensors made once per call) and never
synchronise with the host themselves.
"""
from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import dataclass, field

import torch

from ..._checks import check_int, check_sparsity, describe
from ...layout import VideoLayout
from ...ops import ReuseAt


@dataclass(frozen=True)
class Schedule:
    """When attention stays dense.

    Attributes:
        dense_steps: the first denoising steps run dense. Steps are counted per
            distinct timestep the transformer sees and, on a pipeline, per call of its
            scheduler's ``step`` (so a timestep that repeats in bfloat16 still counts),
            so classifier-free guidance (two calls, or one doubled batch, per step)
            counts once; a timestep larger than the previous one starts a new
            generation at step 0.
        dense_above_timestep: run dense while the timestep is above this value,
            in the units the transformer receives (0-1000 for Wan, HunyuanVideo,
            CogVideoX and LTX-Video; Flux and Qwen-Image pipelines pass 0-1).
        dense_last_steps: the last denoising steps run dense too. It needs the
            number of steps of the generation: ``apply_rainfusion`` on a pipeline
            reads it from the pipeline's scheduler (img2img's shorter runs included);
            on a transformer you drive yourself, call
            ``handle.new_generation(total_steps=N)`` before each generation.
    Reading the timestep costs one host synchronisation per transformer call,
    and only when one of these is set.
    """

    dense_steps: int = 0
    dense_above_timestep: float | None = None
    dense_last_steps: int = 0

    def __post_init__(self):
        check_int("Schedule.dense_steps", self.dense_steps, minimum=0)
        check_int("Schedule.dense_last_steps", self.dense_last_steps, minimum=0)
        above = self.dense_above_timestep
        if above is not None and (isinstance(above, bool) or not isinstance(above, (int, float))
                                  or not math.isfinite(above)):
            raise ValueError(f"Schedule.dense_above_timestep must be None or a finite number, got {above!r}")

    @property
    def reads_timestep(self) -> bool:
        return self.dense_steps > 0 or self.dense_above_timestep is not None or self.dense_last_steps > 0


@dataclass(frozen=True)
class StepSparsity:
    """A sparsity per denoising step: ``apply_rainfusion(sparsity=[0.5, 0.7, 0.8])`` or ``sparsity=fn``.

    ``values``: one per step, the last one for every later step; or ``function(step) -> float``,
    asked at each step (its answer is checked then). Steps count as in :class:`Schedule`.
    """

    values: tuple = ()
    function: object = None

    @classmethod
    def of(cls, sparsity) -> "float | StepSparsity":
        """A checked float for one sparsity at every step, else the per-step rule.

        Numbers of any real type count (NumPy's included); a NumPy array or a 1-D tensor counts as a list.
        """
        if callable(sparsity):
            return cls(function=sparsity)
        if hasattr(sparsity, "tolist") and getattr(sparsity, "ndim", 0) == 1:
            sparsity = sparsity.tolist()
        if isinstance(sparsity, (list, tuple)):
            if not sparsity:
                raise ValueError("sparsity: a per-step list needs at least one value")
            values = []
            for step, value in enumerate(sparsity):
                try:
                    values.append(_real_sparsity(value))
                except (TypeError, ValueError) as exc:
                    raise type(exc)(f"sparsity[{step}] (step {step}): {exc}") from None
            return cls(values=tuple(values))
        if isinstance(sparsity, numbers.Real) and not isinstance(sparsity, bool):
            return _real_sparsity(sparsity)
        raise TypeError(f"sparsity must be a float in [0, 1), a list of them (one per step) or a function of the "
                        f"step, got {describe(sparsity)}")

    def at(self, step: int) -> float:
        if self.function is None:
            return self.values[min(step, len(self.values) - 1)]
        value = self.function(step)
        try:
            return _real_sparsity(value)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"the sparsity function returned {value!r} for step {step}: {exc}") from None


def _real_sparsity(value) -> float:
    """``check_sparsity`` of any real number (NumPy's float32 included), never a bool."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = float(value)
    return check_sparsity(value)


@dataclass(frozen=True)
class TextGroup:
    """Batch items whose text padding is the same.

    ``rows``: their batch indices (``None``: the whole batch). ``keep``: positions of the
    joint sequence that take part in sparse attention (all video tokens and the real
    text tokens, in sequence order); ``pad``: the padded text positions, whose rows run
    dense exactly as in the model and which are never keys. ``text_len``: real text tokens.
    ``pattern``: which text tokens are real, as host data (a key for what depends on it).
    """

    rows: torch.Tensor | None
    keep: torch.Tensor
    pad: torch.Tensor
    text_len: int
    pattern: tuple = ()


@dataclass(frozen=True)
class TextPadding:
    """The real text tokens of one transformer call, grouped by pattern; ``text_len`` is the padded length."""

    text_len: int
    groups: tuple[TextGroup, ...]

    @classmethod
    def from_valid(cls, valid: torch.Tensor | None, video_len: int, text_position: str) -> "TextPadding | None":
        """From a ``[B, T]`` bool tensor of real text tokens; ``None`` when every token is real.

        One host synchronisation (the pattern decides the shapes of what follows).
        """
        if valid is None:
            return None
        rows = valid.bool().cpu()
        if bool(rows.all()):
            return None
        batch, text_len = rows.shape
        patterns: dict[tuple[bool, ...], list[int]] = {}
        for index, row in enumerate(rows.tolist()):
            patterns.setdefault(tuple(row), []).append(index)
        video = torch.arange(video_len)
        head = text_position == "head"
        groups = []
        for pattern, members in patterns.items():
            real = torch.tensor([i for i, ok in enumerate(pattern) if ok], dtype=torch.long)
            padded = torch.tensor([i for i, ok in enumerate(pattern) if not ok], dtype=torch.long)
            if head:
                keep, pad = torch.cat([real, video + text_len]), padded
            else:
                keep, pad = torch.cat([video, real + video_len]), padded + video_len
            device = valid.device
            groups.append(TextGroup(
                rows=None if len(members) == batch else torch.tensor(members, device=device),
                keep=keep.to(device), pad=pad.to(device), text_len=int(real.numel()), pattern=pattern))
        return cls(text_len, tuple(groups))


class NoCopy:
    """Refuses ``copy.deepcopy`` and ``pickle``: what a patched model holds shares per-call state with its handle."""

    def __deepcopy__(self, memo):
        raise TypeError(_NO_COPY)

    def __reduce_ex__(self, protocol):
        raise TypeError(_NO_COPY)


_NO_COPY = ("a model with RainFusion applied cannot be copied or pickled: its attention processors share per-call "
            "state with the handle that installed them. Call handle.remove() first, copy or save the model, then "
            "apply_rainfusion to each copy")


@dataclass
class CallState(NoCopy):
    """What the pre-hook learns each transformer call; shared by the layers of one handle.

    ``layout`` is the latent grid (``text_len`` 0: each layer adds the text it sees),
    ``text`` the padding of the text tokens (``None``: all real), ``sparse`` whether the
    schedule and the dense crossover let this call run sparse. ``crossover(device_type,
    layout)`` gives the reason a call of that grid runs dense, or ``None`` (``None`` itself:
    no crossover, as for captures). ``tally`` counts the calls by how they ran and the kept
    tiles of the eager sparse calls.
    """

    schedule: Schedule
    adapter: object  # the ModelAdapter of the patched transformers
    layout: VideoLayout | None = None
    text: TextPadding | None = None
    step: int = -1
    layer: int | None = None  # the attention layer running now (eager calls; for the tally)
    last_timestep: float | None = None
    sparse: bool = True
    calls: int = 0
    crossover: object = None
    sparsity: object = None  # a StepSparsity (None: the site's one sparsity for every step)
    step_sparsity: float | None = None  # this call's, from ``sparsity``
    sparsity_tensor: torch.Tensor = field(default_factory=lambda: torch.zeros(1, dtype=torch.float64))
    reuse: object = None  # a reuse.MaskReuse with refresh_every > 1: masks kept between steps
    reuse_tensor: torch.Tensor = field(default_factory=lambda: torch.zeros(4, dtype=torch.int64))  # compiled code's
    call_in_step: int = 0  # transformer calls earlier in this step (guidance's second call: 1)
    tally: "Tally" = field(default_factory=lambda: Tally())
    total_steps: int | None = None  # of the current generation, for Schedule.dense_last_steps
    count_steps: object = None  # () -> total_steps, asked at the first step (a pipeline's scheduler)
    scheduler_steps: int | None = None  # the pipeline scheduler's steps this generation (None: no pipeline)
    steps_seen: int | None = None  # scheduler_steps at the previous transformer call

    @property
    def reads_host(self) -> bool:
        """Whether :meth:`update` reads tensor values (the timestep, a text mask, Flux's image ids)."""
        return (self.counts_steps or self.adapter.text_valid is not None or self.adapter.grid_reads_host)

    @property
    def counts_steps(self) -> bool:
        """Whether each call reads the timestep to count steps (the schedule, a per-step sparsity, mask reuse)."""
        return self.schedule.reads_timestep or self.sparsity is not None or self.reuse is not None

    def hook(self):
        """The forward pre-hook to register: :meth:`update`, kept out of ``torch.compile``'s graphs when it
        reads tensor values (one graph break at the transformer's entry, none in its blocks)."""
        return torch.compiler.disable(self.update) if self.reads_host else self.update

    def update(self, module, args, kwargs) -> None:
        bound = _bind(module, args, kwargs)
        frames, height, width = self.adapter.grid(module, bound)
        self.layout = VideoLayout(frames, height, width)
        valid = self.adapter.text_valid(module, bound) if self.adapter.text_valid else None
        self.text = TextPadding.from_valid(valid, self.layout.video_len, self.adapter.text_position)
        self.calls += 1
        self.sparse = True
        if self.counts_steps:
            self._apply_schedule(module, bound)
        if not self.sparse:
            self.tally.dense_by_schedule += 1
            return
        if self.sparsity is not None and (self.call_in_step == 0 or self.step_sparsity is None):
            self.step_sparsity = self.sparsity.at(self.step)  # asked once per step
            self.sparsity_tensor.fill_(self.step_sparsity)  # what compiled blocks read, in place: no recompile
        if self.reuse is not None:  # this call's sparse calls find the masks of the same call at earlier steps
            self.reuse.begin((id(module), self.call_in_step))
            self.reuse_at(None).as_tensor(self.reuse_tensor)  # what compiled blocks hand the op, in place
        reason = self.crossover(_device_type(bound), self.layout, self.step_sparsity) \
            if self.crossover is not None else None
        if reason is not None:
            self.sparse = False
            self.tally.dense_by_crossover += 1
            self.tally.last_dense_reason = reason
        else:
            self.tally.sparse += 1

    def reuse_at(self, layer: int | None):
        """Where this call's masks may come from (``ops.ReuseAt``): the handle's store, the step, the
        generation's last step when known (its masks are not kept), the layer when known."""
        last = self.total_steps - 1 if self.total_steps is not None else None
        return ReuseAt(self.reuse, self.step, last, layer)

    def new_generation(self, total_steps: int | None = None, count_steps=None) -> None:
        """The next call starts a new generation: step 0, whatever its timestep.

        ``total_steps`` (or ``count_steps()``, asked at the generation's first call, as a pipeline's
        scheduler knows it only then) is the generation's number of steps, for ``dense_last_steps``.
        """
        self.step = -1
        self.last_timestep = None
        if self.reuse is not None:
            self.reuse.clear()
        self.total_steps = total_steps
        self.count_steps = count_steps
        self.scheduler_steps = self.steps_seen = 0 if count_steps is not None else None

    def scheduler_stepped(self) -> None:
        """The pipeline's scheduler finished a step: the next transformer call belongs to the next one."""
        if self.scheduler_steps is not None:
            self.scheduler_steps += 1

    def _apply_schedule(self, module, bound) -> None:
        t = self.adapter.noise_level(module, bound)  # one host sync per call
        # In a pipeline the scheduler's step also ends a step: timesteps passed in bfloat16 (HunyuanVideo's
        # pipeline) can round two steps to one value.
        stepped = self.scheduler_steps is not None and self.scheduler_steps != self.steps_seen
        self.steps_seen = self.scheduler_steps
        if self.last_timestep is None or t > self.last_timestep:
            self.step, self.call_in_step = 0, 0
            if self.reuse is not None:
                self.reuse.clear()  # a new generation predicts its own masks
        elif stepped or t != self.last_timestep:
            self.step, self.call_in_step = self.step + 1, 0
        else:
            self.call_in_step += 1
        self.last_timestep = t
        if self.step == 0 and self.call_in_step == 0 and self.count_steps is not None:
            self.total_steps = self.count_steps()
        if self.step < self.schedule.dense_steps:
            self.sparse = False
        if self.schedule.dense_last_steps:
            if self.total_steps is None:
                raise RuntimeError("Schedule(dense_last_steps=...) needs the number of steps of the generation: "
                                   "apply_rainfusion to the pipeline (its scheduler says), or call "
                                   "handle.new_generation(total_steps=N) before each generation")
            if self.step >= self.total_steps - self.schedule.dense_last_steps:
                self.sparse = False
        if self.schedule.dense_above_timestep is not None and t > self.schedule.dense_above_timestep:
            self.sparse = False


@dataclass
class LayerTally:
    """The kept tiles of one attention layer's sparse calls (``kept`` adds up on the device)."""

    masks: int = 0
    tiles: int = 0
    kept: torch.Tensor | None = None


@dataclass
class Tally:
    """How a handle's transformer calls ran, and the kept tiles of its sparse attention calls, per layer.

    Kept tiles add up on the device (no host synchronisation per call); they are counted
    for calls that run eagerly (not inside a ``torch.compile`` graph or a CUDA-graph replay).
    """

    sparse: int = 0
    dense_by_schedule: int = 0
    dense_by_crossover: int = 0
    last_dense_reason: str | None = None
    layers: dict = field(default_factory=dict)  # attention layer index -> LayerTally

    def add_mask(self, mask, layer: int | None = None) -> None:
        kept = mask.kv_counts.sum(dtype=torch.int64)
        entry = self.layers.get(layer)
        if entry is None:
            entry = self.layers[layer] = LayerTally()
        if entry.kept is None:
            entry.kept = kept
        elif entry.kept.device != kept.device:  # the model moved: carry the count over
            entry.kept = kept + entry.kept.to(kept.device)
        else:
            entry.kept.add_(kept)
        entry.masks += 1
        entry.tiles += mask.kv_indices.numel()

    def kept_tiles(self) -> dict:
        """``{layer: kept tiles}`` of the layers tallied so far; one host synchronisation for all of them."""
        tallied = [(layer, entry.kept) for layer, entry in self.layers.items() if entry.kept is not None]
        if not tallied:
            return {}
        device = tallied[-1][1].device
        return dict(zip((layer for layer, _ in tallied), torch.stack([k.to(device) for _, k in tallied]).tolist()))


def _device_type(bound: dict) -> str:
    """The device type of the transformer call's first tensor argument (the latents)."""
    for value in bound.values():
        if isinstance(value, torch.Tensor):
            return value.device.type
    return "cpu"


def _bind(module, args, kwargs) -> dict:
    """The transformer's forward arguments by name (defaults filled in)."""
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments
