"""The processor RainFusion installs on an attention module, and the handle that takes it off again."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from ..._checks import check_int
from .adapters import CallSite
from .sites import Site
from .state import CallState, NoCopy


class RainFusionAttnProcessor(NoCopy):
    """Stands in for one attention module's processor.

    It runs the processor's own ``__call__`` (routed, see ``routing.py``) with the
    attention call going to its handle's site; when the site is idle (a dense step)
    it calls the processor it replaced. ``original`` is that processor (maybe another
    RainFusion one: handles stack), ``base`` the diffusers processor at the bottom,
    whose ``_attention_backend`` and ``_parallel_config`` this one reads and sets, so
    ``set_attention_backend`` and ``enable_parallelism`` keep working.
    """

    def __init__(self, original, site: Site, call_site: CallSite, layer: int, heads: int, shortcut=None):
        self.original, self.site, self.call_site, self.layer, self.shortcut = original, site, call_site, layer, shortcut
        self.heads = heads
        self.link()

    def link(self) -> None:
        """(Re)build the routed call over whatever is below this processor now."""
        below = self.original
        if isinstance(below, RainFusionAttnProcessor):
            self.base, function = below.base, below._call
        else:
            self.base, function = below, type(below).__call__
        self._call = self.site.route(function, self.call_site)

    @property
    def _attention_backend(self):
        return self.base._attention_backend

    @_attention_backend.setter
    def _attention_backend(self, value):
        self.base._attention_backend = value

    @property
    def _parallel_config(self):
        return self.base._parallel_config

    @_parallel_config.setter
    def _parallel_config(self, value):
        self.site.check_parallel(value, self.heads)  # enable_parallelism with a config RainFusion cannot run
        self.base._parallel_config = value

    def __call__(self, attn, *args, **kwargs):
        if not self.site.active():
            return self.original(attn, *args, **kwargs)
        if not torch.compiler.is_compiling():  # never read in traced code: one graph for every layer
            self.site.state.layer = self.layer
        if self.shortcut is not None:
            out = self.shortcut(self, attn, args, kwargs)
            if out is not None:
                return out
        return self._call(self.base, attn, *args, **kwargs)


_TYPES: dict = {}


def processor_type(base_type: type) -> type:
    """``RainFusionAttnProcessor`` with the call signature of ``base_type``.

    diffusers' attention modules pass a processor only the keyword arguments its
    ``__call__`` names (Qwen-Image's ``encoder_hidden_states_mask``, for one), so the
    stand-in must name the same ones.
    """
    if base_type not in _TYPES:
        def __call__(self, attn, *args, **kwargs):
            return RainFusionAttnProcessor.__call__(self, attn, *args, **kwargs)

        __call__.__signature__ = inspect.signature(base_type.__call__)
        _TYPES[base_type] = type("RainFusionAttnProcessor", (RainFusionAttnProcessor,),
                                 {"__call__": __call__, "__module__": __name__,
                                  "__qualname__": f"RainFusionAttnProcessor[{base_type.__name__}]"})
    return _TYPES[base_type]


def base_processor(processor):
    while isinstance(processor, RainFusionAttnProcessor):
        processor = processor.original
    return processor


@dataclass(frozen=True)
class LayerStats:
    """One attention layer in :class:`RainFusionStats`: the masks it predicted in eager calls, their mean density."""

    masks: int
    mean_density: float


@dataclass(frozen=True)
class RainFusionStats:
    """What :meth:`RainFusionHandle.stats` reports.

    Attributes:
        sparse_calls: transformer calls whose patched layers ran sparse.
        dense_by_schedule: transformer calls the :class:`Schedule` kept dense.
        dense_by_crossover: transformer calls that ran dense because sparse attention would be
            slower there (``min_tokens``, ``rainfusion_core.crossover``).
        dense_reason: why the last of those ran dense (``None`` if none did).
        masks: sparse attention calls whose masks were tallied (eager calls only).
        mean_density: the mean kept fraction of those masks' tiles (``None`` before any).
        layers: per attention layer (its name in :func:`attention_layers`), the masks tallied and
            their mean density; layers that ran no eager sparse call are absent. A pipeline's
            second transformer (Wan2.2's ``transformer_2``) adds to the layer of the same index.
        reused: attention calls (one per layer and call, unlike ``sparse_calls``, which counts
            transformer calls) that ran on a mask kept from an earlier step (``refresh_every``),
            eager and compiled; ``masks`` and ``mean_density`` count the masks predicted.
    """

    sparse_calls: int
    dense_by_schedule: int
    dense_by_crossover: int
    dense_reason: str | None
    masks: int
    mean_density: float | None
    layers: dict = field(default_factory=dict)
    reused: int = 0

    @property
    def dense_calls(self) -> int:
        return self.dense_by_schedule + self.dense_by_crossover


@dataclass
class RainFusionHandle(NoCopy):
    """Undo what :func:`apply_rainfusion` or :func:`capture_qkv` did with :meth:`remove`.

    Handles may be stacked on one model and removed in any order: removing one
    takes its processors out of each layer's chain and leaves the others working.
    """

    state: CallState
    _layer_names: list = field(default_factory=list)  # attention_layers(model): what the layer indices name
    _installed: list = field(default_factory=list)  # (attention module, the processor this handle installed)
    _hooks: list = field(default_factory=list)
    _sites: list = field(default_factory=list)

    @property
    def step(self) -> int:
        return self.state.step

    def new_generation(self, total_steps: int | None = None) -> None:
        """Count denoising steps from 0 again: the next transformer call is step 0 of a new generation.

        ``apply_rainfusion`` on a pipeline does this by itself when the pipeline sets up its
        scheduler's timesteps (the start of every ``pipe(...)`` call); call it yourself when you
        drive a transformer directly and start over at a smaller timestep (img2img, a stopped run).
        ``total_steps``: the generation's number of steps, which ``Schedule(dense_last_steps=...)``
        needs when there is no pipeline to read it from.
        """
        if total_steps is not None:
            check_int("total_steps", total_steps, minimum=1)
        self.state.new_generation(total_steps)

    def check_processors(self, *_) -> None:
        """Refuse a forward after something replaced this handle's processors (``set_attn_processor``,
        ``fuse_qkv_projections``, ``unfuse_qkv_projections``): RainFusion would silently stop running."""
        for attn, mine in self._installed:
            node = attn.processor
            while isinstance(node, RainFusionAttnProcessor) and node is not mine:
                node = node.original
            if node is not mine:
                raise RuntimeError(
                    f"the attention processors RainFusion installed were replaced after apply_rainfusion (now "
                    f"{type(attn.processor).__name__}; fuse_qkv_projections, unfuse_qkv_projections and "
                    "set_attn_processor do this), so RainFusion would no longer run. Call handle.remove() before "
                    "changing the processors, then apply_rainfusion again")

    def __repr__(self) -> str:
        layers = len(self._installed)
        if not layers:
            return "RainFusionHandle(removed)"
        tally = self.state.tally  # the counts only: no density, so printing never waits on the device
        return (f"RainFusionHandle({self.state.adapter.family}, {layers} attention layers patched, "
                f"{tally.sparse} calls sparse, {tally.dense_by_schedule + tally.dense_by_crossover} dense)")

    def stats(self) -> "RainFusionStats":
        """How this handle's transformer calls ran so far, and the mean density of its sparse masks.

        Reading the density synchronises with the device once (the kept tiles add up there).
        """
        tally = self.state.tally
        kept = tally.kept_tiles()
        tiles = sum(tally.layers[layer].tiles for layer in kept)
        layers = {}
        for layer in sorted(kept, key=lambda index: -1 if index is None else index):
            entry = tally.layers[layer]
            name = self._layer_names[layer] if layer is not None and layer < len(self._layer_names) else str(layer)
            layers[name] = LayerStats(entry.masks, kept[layer] / entry.tiles)
        masks = sum(tally.layers[layer].masks for layer in kept)
        density = sum(kept.values()) / tiles if tiles else None
        reused = self.state.reuse.reused if self.state.reuse is not None else 0
        return RainFusionStats(tally.sparse, tally.dense_by_schedule, tally.dense_by_crossover,
                               tally.last_dense_reason, masks, density, layers, reused)

    @property
    def layout(self):
        """The latent grid of the last transformer call (``VideoLayout``, ``text_len`` 0)."""
        return self.state.layout

    def remove(self) -> None:
        """Restore what each layer ran before this handle; idempotent."""
        for attn, mine in reversed(self._installed):
            if attn.processor is mine:
                attn.processor = mine.original
                continue
            # Something was installed on top of ours: unlink ours from the chain and relink those above.
            chain, node = [], attn.processor
            while isinstance(node, RainFusionAttnProcessor) and node is not mine:
                chain.append(node)
                node = node.original
            if node is mine:
                chain[-1].original = mine.original
                for above in reversed(chain):
                    above.link()
            # else: ours was replaced outright by someone else's processor and no longer runs
        if self.state.reuse is not None:
            self.state.reuse.clear()  # the kept masks go with the handle
        for hook in self._hooks:
            hook.remove()
        for site in self._sites:
            site.release()
        self._installed.clear()
        self._hooks.clear()
        self._sites.clear()
