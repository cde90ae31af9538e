"""What runs in place of a processor's attention call: sparse attention, or a q/k/v capture.

A *site* belongs to one handle and is shared by all the layers it patches
(one routed copy of each processor function, so ``torch.compile`` compiles a
block once for all layers). Its route objects take the call exactly as the
processor makes it (diffusers' ``dispatch_attention_fn`` signature in
``[B, S, H, D]``, or ``F.scaled_dot_product_attention`` in ``[B, H, S, D]``)
and hand it on unchanged to what the processor would have called (``next``)
whenever the site does not take it.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ...api import run_sparse_call
from ...caching import may_cache
from ...call import resolve_sparse_call
from ...capture import save_qkv
from ...layout import VideoLayout
from ...precision import DEFAULT_PRECISION
from . import routing
from .adapters import DISPATCH, CallSite
from .parallel import check_parallel_config, context_parallel, exchange, held_positions
from .ring_call import ring_attention
from .state import CallState


class Site:
    """Base: the handle's state and the routed copies of processor functions made for it."""

    def __init__(self, state: CallState):
        self.state = state
        self._routed: dict = {}

    def active(self) -> bool:
        """Whether this transformer call goes through :meth:`attend` at all."""
        raise NotImplementedError

    def attend(self, q, k, v, attn_mask, scale, tensor_layout: str, dense, call: dict):
        """The attention of one layer; ``dense(q, k, v, mask)`` is what the processor would have run
        (``dense(..., local=True)``: the same on this device only, without context parallelism)."""
        raise NotImplementedError

    def check_parallel(self, parallel_config, heads: int) -> None:
        """Refuse a parallel config this site cannot run under (called when one is set)."""
        raise NotImplementedError

    def route(self, function, call_site: CallSite):
        """``function`` (a processor's ``__call__``, maybe already routed) with its attention call routed here."""
        key = (function, call_site.name)
        if key not in self._routed:
            after = routing.target(function, call_site.name)
            replacement = (DispatchRoute if call_site == DISPATCH else FunctionalRoute)(self, after)
            self._routed[key] = routing.routed(function, call_site.name, replacement)
        return self._routed[key]

    def release(self) -> None:
        for function in self._routed.values():
            routing.release(function)
        self._routed.clear()

    def layout_of(self, length: int, what: str) -> VideoLayout:
        """The full layout of an attention over ``length`` tokens: the call's grid plus its text."""
        grid = self.state.layout
        if grid is None:
            raise RuntimeError("the transformer's pre-hook did not run: call the transformer, not its blocks")
        text_len = length - grid.video_len
        family = self.state.adapter.family
        if text_len < 0:
            raise ValueError(f"{what} has {length} tokens but the transformer input gives {grid.video_len} latent "
                             f"tokens ({grid.frames}x{grid.height}x{grid.width}); RainFusion needs the whole latent "
                             "sequence on this device")
        position = self.state.adapter.text_position
        if text_len and position is None:
            raise ValueError(f"{what} has {length} tokens, {text_len} more than the {family} latent grid "
                             f"{grid.frames}x{grid.height}x{grid.width}; this model's self-attention has no text")
        return VideoLayout(grid.frames, grid.height, grid.width, text_len=text_len, text_position=position or "head")


class DispatchRoute:
    """Stands in for ``dispatch_attention_fn`` (``[B, S, H, D]``) in a routed processor."""

    def __init__(self, site: Site, after):
        self.site, self.after = site, after

    def __call__(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                 enable_gqa=False, attention_kwargs=None, *, backend=None, parallel_config=None):
        after = self.after

        def dense(q, k, v, mask, local=False):
            return after(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                         enable_gqa=enable_gqa, attention_kwargs=attention_kwargs, backend=backend,
                         parallel_config=None if local else parallel_config)

        if not self.site.active():
            return dense(query, key, value, attn_mask)
        call = dict(dropout_p=dropout_p, is_causal=is_causal, attention_kwargs=attention_kwargs,
                    parallel_config=parallel_config)
        return self.site.attend(query, key, value, attn_mask, scale, "BSND", dense, call)


class FunctionalRoute:
    """Stands in for ``torch.nn.functional`` (as ``F``) in a routed processor: routes its SDPA, ``[B, H, S, D]``."""

    def __init__(self, site: Site, after):
        self.site, self.after = site, after

    def __getattr__(self, name):  # everything else of torch.nn.functional
        if name in ("site", "after"):  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.after, name)

    def scaled_dot_product_attention(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                     scale=None, enable_gqa=False):
        after = self.after

        def dense(q, k, v, mask, local=False):
            return after.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                                      is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)

        if not self.site.active():
            return dense(query, key, value, attn_mask)
        call = dict(dropout_p=dropout_p, is_causal=is_causal, attention_kwargs=None, parallel_config=None)
        return self.site.attend(query, key, value, attn_mask, scale, "BNSD", dense, call)


class SparseSite(Site):
    """RainFusion2.0 sparse attention, with the handle's settings."""

    def __init__(self, state: CallState, *, sparsity, block_size, backend, first_frame_sink, precision="bf16"):
        super().__init__(state)
        self.options = dict(sparsity=sparsity, block_size=block_size, backend=backend,
                            first_frame_sink=first_frame_sink, precision=precision)
        self._orders: dict = {}  # (length, ulysses degree, video length, device) -> _gathered_order

    def active(self) -> bool:
        return self.state.sparse

    def check_parallel(self, parallel_config, heads):
        check_parallel_config(parallel_config, heads)
        cp = context_parallel(parallel_config)
        if cp is not None and (cp.ring_degree or 1) > 1:
            if self.state.reuse is not None:
                raise ValueError("RainFusion under context parallelism: refresh_every > 1 does not run under ring "
                                 f"attention (ring_degree={cp.ring_degree}): each ring call predicts its mask")
            if self.options["precision"] != DEFAULT_PRECISION:
                raise ValueError(f"RainFusion under context parallelism: precision={self.options['precision']!r} "
                                 f"does not run under ring attention (ring_degree={cp.ring_degree}): its kernel "
                                 "returns no log-sum-exp to merge the ring's parts")

    def attend(self, q, k, v, attn_mask, scale, tensor_layout, dense, call):
        _refuse_unsupported(call)
        cp = context_parallel(call["parallel_config"])
        if cp is None:
            return self._attend(q, k, v, attn_mask, scale, tensor_layout, dense)
        return self._attend_parallel(q, k, v, attn_mask, scale, tensor_layout, dense, cp)

    def _refuse_foreign_mask(self, attn_mask) -> None:
        """A mask on a model without text padding is something RainFusion cannot apply: an error, never ignored."""
        if attn_mask is not None and self.state.adapter.text_valid is None:
            raise ValueError(f"{self.state.adapter.family} self-attention got an attention mask; RainFusion "
                             "applies only the text padding of the models that have one")

    def _attend(self, q, k, v, attn_mask, scale, tensor_layout, dense, *, exchanged=False):
        seq = 1 if tensor_layout == "BSND" else 2
        length = q.shape[seq]
        if k.shape[seq] != length:
            raise ValueError(f"attention got {length} queries and {k.shape[seq]} keys: RainFusion replaces self- "
                             "and joint attention only; is this a cross-attention module?")
        layout = self.layout_of(length, "self-attention")
        padding = self.state.text
        self._refuse_foreign_mask(attn_mask)
        options = dict(self.options, tensor_layout=tensor_layout, scale=scale)
        if padding is None:  # every text token real: the mask, if any, masks nothing
            return self._sparse(q, k, v, layout, options)
        if padding.text_len != layout.text_len:
            raise ValueError(f"self-attention has {layout.text_len} text tokens but the transformer input has "
                             f"{padding.text_len}")
        if attn_mask is None and not exchanged:
            raise ValueError("the transformer input has padded text but the layer got no attention mask")
        return _attend_with_padding(q, k, v, attn_mask, layout, padding, seq, dense,
                                    lambda q, k, v, real: self._sparse(q, k, v, real, options))

    def _sparse(self, q, k, v, layout: VideoLayout, options: dict):
        """``rf.sparse_attention`` as the handle runs it: the pre-hook already applied the crossover,
        and the mask of each eager call is tallied (``handle.stats()``).

        With a sparsity per step, an eager call takes this step's value; compiled code takes the
        handle's CPU tensor instead, which the pre-hook updates in place and the op reads when it
        runs, so the graph never holds the value and one graph serves every step. With
        ``refresh_every > 1`` the call hands on the handle's ``MaskReuse`` and the step (a tensor
        in compiled code, likewise), and the call reuses the mask it predicted at an earlier step."""
        step_sparsity = None
        if self.state.sparsity is not None:
            if torch.compiler.is_compiling():
                step_sparsity = self.state.sparsity_tensor
            else:
                options = dict(options, sparsity=self.state.step_sparsity)
        reuse = None
        if self.state.reuse is not None:  # compiled code: the tensor the pre-hook filled, read when the op runs
            reuse = self.state.reuse_tensor if torch.compiler.is_compiling() else self.state.reuse_at(self.state.layer)
        call, q, k, v = resolve_sparse_call(q, k, v, layout, share_batch_mask=False, min_tokens=0, **options)
        return run_sparse_call(call, q, k, v, on_mask=self._tally, step_sparsity=step_sparsity, reuse=reuse)

    def _tally(self, mask) -> None:
        self.state.tally.add_mask(mask, self.state.layer)

    def _attend_parallel(self, q, k, v, attn_mask, scale, tensor_layout, dense, cp):
        """Sequence-sharded in and out. Ulysses alone: head-sharded, the whole sequence on each rank, the
        single-device path; with ring: the ring group runs ``rainfusion_core.ring`` on its rows.

        The config was checked when it met this layer (``apply_rainfusion`` or the processor's setter)."""
        if tensor_layout != "BSND":
            raise ValueError("RainFusion under context parallelism needs diffusers' attention dispatch")
        self._refuse_foreign_mask(attn_mask)
        if attn_mask is not None and attn_mask.dim() == 4 and attn_mask.shape[-2] != 1:
            raise ValueError("RainFusion under context parallelism applies key-padding masks only")
        ulysses, ring = cp.ulysses_degree or 1, cp.ring_degree or 1
        if ulysses > 1:
            q, k, v = (exchange(x, cp, to_heads=True) for x in (q, k, v))
        if ring > 1:
            out = self._attend_ring(q, k, v, scale, q.shape[1] * ring, cp)
        else:
            order = self._gathered_order(q.shape[1], ulysses, q.device)
            if order is not None:  # gathered -> model order
                q, k, v = (x.index_select(1, order[0]) for x in (q, k, v))

            def local(q, k, v, mask):
                return dense(q, k, v, mask, local=True)

            # The layer's mask is sharded like the sequence; padded rows attend over the kept keys instead.
            out = self._attend(q, k, v, None, scale, "BSND", local, exchanged=True)
            if order is not None:
                out = out.index_select(1, order[1])
        return exchange(out, cp, to_heads=False) if ulysses > 1 else out

    def _gathered_order(self, length: int, ulysses: int, device):
        """``(order, model)`` on ``device`` under Ulysses alone: ``order[i]`` the gathered position of model
        position ``i``, ``model[g]`` the model position of gathered position ``g``; ``None`` where they agree.
        Cached in eager code; compiled code builds it in its graph (a few index ops, never cached from a trace)."""
        video_len = self.layout_of(length, "self-attention").video_len
        adapter = self.state.adapter
        if length == video_len or adapter.cp_splits_joint_sequence or ulysses == 1:
            return None
        key = (length, ulysses, video_len, device)
        found = self._orders.get(key)
        if found is None:
            model = held_positions(length, video_len, adapter.text_position, False, 1, ulysses)[0].to(device)
            found = (torch.argsort(model), model)
            if may_cache(device):
                self._orders[key] = found
        return found

    def _attend_ring(self, q, k, v, scale, length: int, cp):
        """Ring attention of this rank's rows ``[B, L, H, D]`` of a ``length``-token sequence (which rows:
        ``held_positions``), padded text per group of batch items: its rows attend densely to the kept keys,
        as under Ulysses."""
        layout = self.layout_of(length, "self-attention")
        options = dict(self.options)
        step_sparsity = None
        if self.state.sparsity is not None:  # compiled code reads the handle's tensor when the op runs
            if torch.compiler.is_compiling():
                step_sparsity = self.state.sparsity_tensor
            else:
                options["sparsity"] = self.state.step_sparsity
        split = [length, self.state.layout.video_len, int(self.state.adapter.cp_splits_joint_sequence),
                 cp.ring_degree, cp.ulysses_degree or 1, cp._ring_local_rank]
        group = cp._ring_mesh.get_group()
        padding = self.state.text
        if padding is not None and padding.text_len != layout.text_len:
            raise ValueError(f"self-attention has {layout.text_len} text tokens but the transformer input has "
                             f"{padding.text_len}")
        out = None
        for text in [None] if padding is None else padding.groups:
            rows = None if text is None else text.rows
            sparse_layout = layout if text is None else replace(layout, text_len=text.text_len)
            part = ring_attention(*(x if rows is None else x.index_select(0, rows) for x in (q, k, v)), sparse_layout,
                                  split, text, group, scale=scale, step_sparsity=step_sparsity, on_mask=self._tally,
                                  **options)
            if rows is None:
                return part
            out = part.new_empty(q.shape[:-1] + v.shape[-1:]) if out is None else out
            out.index_copy_(0, rows, part)
        return out


def _refuse_unsupported(call: dict) -> None:
    if call["dropout_p"]:
        raise ValueError(f"RainFusion attention has no dropout: got dropout_p={call['dropout_p']}")
    if call["is_causal"]:
        raise ValueError("RainFusion attention is not causal: got is_causal=True")
    if call["attention_kwargs"]:
        raise ValueError(f"RainFusion attention takes no attention_kwargs: got {sorted(call['attention_kwargs'])}")


def _attend_with_padding(q, k, v, attn_mask, layout: VideoLayout, padding, seq: int, dense, sparse):
    """Sparse attention over video and real text per group of batch items; padded text rows run dense.

    Padded text tokens are never keys of the sparse call and never counted in its mask;
    their own rows attend exactly as in the model (``dense`` with the model's mask rows).
    """
    out = q.new_empty(q.shape[:-1] + v.shape[-1:])
    for group in padding.groups:
        rows = group.rows
        qb, kb, vb = (x if rows is None else x.index_select(0, rows) for x in (q, k, v))
        mb = attn_mask if attn_mask is None or rows is None or attn_mask.shape[0] == 1 else \
            attn_mask.index_select(0, rows)
        part = q.new_empty(qb.shape[:-1] + v.shape[-1:])
        real = VideoLayout(layout.frames, layout.height, layout.width, text_len=group.text_len,
                           text_position=layout.text_position)
        kept = sparse(*(x.index_select(seq, group.keep) for x in (qb, kb, vb)), real)
        part.index_copy_(seq, group.keep, kept)
        if group.pad.numel():
            padded_q = qb.index_select(seq, group.pad)
            if mb is None or mb.shape[-2] == 1:  # a key-padding mask: the padded rows attend to the kept keys
                padded = dense(padded_q, *(x.index_select(seq, group.keep) for x in (kb, vb)), None)
            else:  # a mask per query row (HunyuanVideo-1.5): the model's own rows
                padded = dense(padded_q, kb, vb, mb.index_select(-2, group.pad))
            part.index_copy_(seq, group.pad, padded)
        if rows is None:
            return part
        out.index_copy_(0, rows, part)
    return out


class CaptureSite(Site):
    """Saves q, k, v (``[B, H, S, D]``, model order) of one layer at chosen steps, then runs the model's attention."""

    def __init__(self, state: CallState, *, directory: Path, steps, layer: int):
        super().__init__(state)
        self.directory, self.steps, self.layer = directory, frozenset(steps), layer
        self._last_stem, self._part = None, 0  # a layer attending per batch item (Mochi) saves several parts

    def active(self) -> bool:
        return self.state.step in self.steps

    def check_parallel(self, parallel_config, heads):
        if context_parallel(parallel_config) is not None:
            raise ValueError("capture_qkv does not run under context parallelism: capture on one device")

    def attend(self, q, k, v, attn_mask, scale, tensor_layout, dense, call):
        self.check_parallel(call["parallel_config"], q.shape[2])
        seq = 1 if tensor_layout == "BSND" else 2
        if k.shape[seq] == q.shape[seq]:  # self- or joint attention
            layout = self.layout_of(q.shape[seq], "self-attention")
            bnsd = [x.transpose(1, 2) if tensor_layout == "BSND" else x for x in (q, k, v)]
            stem = f"qkv_layer{self.layer}_step{self.state.step}_call{self.state.calls}"
            self._part = self._part + 1 if stem == self._last_stem else 0
            self._last_stem = stem
            if self._part:
                stem = f"{stem}_part{self._part}"
            padding = self.state.text
            if padding is None:
                save_qkv(self.directory / f"{stem}.pt", *bnsd, layout, layer=self.layer, step=self.state.step)
            else:  # the real tokens of each group of batch items, as the sparse path sees them
                for index, group in enumerate(padding.groups):
                    parts = [x if group.rows is None else x.index_select(0, group.rows) for x in bnsd]
                    parts = [x.index_select(2, group.keep) for x in parts]
                    real = VideoLayout(layout.frames, layout.height, layout.width, text_len=group.text_len,
                                       text_position=layout.text_position)
                    save_qkv(self.directory / f"{stem}_group{index}.pt", *parts, real, layer=self.layer,
                             step=self.state.step)
        return dense(q, k, v, attn_mask)
