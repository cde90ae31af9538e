"""Masks reused across denoising steps: each sparse call's mask predicted once every N steps.

A :class:`MaskReuse` belongs to one caller that runs a model step after step (the diffusers
handle with ``refresh_every=N``). The caller opens a *scope* per model call
(:meth:`MaskReuse.begin`: which transformer, which call within the step) and counts the steps;
each sparse call inside it takes the next *slot*, so the n-th sparse call of a model call
finds the mask the n-th call of the same scope predicted at an earlier step. Calls of one
model call run in data order (each layer's q and k come from the layer before), so the
count names the same attention call at every step, eager or compiled: the whole-call op
looks its mask up when it runs, never while it is traced.

A mask is reused while fewer than ``every`` steps have passed since it was predicted and the
call's shapes, layout and mask parameters (the sparsity's budget included) are those it was
predicted for; otherwise the call predicts and keeps a new one.
"""
from __future__ import annotations

import itertools
import weakref

from ._checks import check_int

_LIVE: "weakref.WeakValueDictionary[int, MaskReuse]" = weakref.WeakValueDictionary()
_IDS = itertools.count()


class MaskReuse:
    """Masks of one model's sparse calls, kept between steps; see the module docstring.

    Each slot holds one mask at most: a call whose shapes or mask parameters differ from the
    kept mask's (another resolution, another sparsity, a layer that now runs elsewhere) predicts
    and replaces it. ``last_step`` (the generation's last step, when the caller knows it) frees
    each slot as its last call takes it, so nothing is held after a generation.
    """

    def __init__(self, every: int):
        self.every = check_int("refresh_every", every)
        self.id = next(_IDS)
        self.reused = 0
        self._masks: dict = {}  # (scope, slot) -> (what the mask depends on, mask, step)
        self._scope: tuple = ()
        self._slot = 0
        _LIVE[self.id] = self

    @staticmethod
    def find(reuse_id: int) -> "MaskReuse":
        found = _LIVE.get(reuse_id)
        if found is None:
            raise RuntimeError(f"mask reuse {reuse_id} no longer exists (its handle was removed)")
        return found

    def begin(self, scope: tuple) -> None:
        """A model call starts: its sparse calls take slots 0, 1, ... of ``scope`` (transformer, call in step)."""
        self._scope, self._slot = scope, 0

    def clear(self) -> None:
        """Forget every mask (a new generation, or the handle removed)."""
        self._masks.clear()

    def slot(self) -> tuple:
        """The next sparse call's place: its scope and its position in the model call."""
        where = (self._scope, self._slot)
        self._slot += 1
        return where

    def get(self, where: tuple, depends: tuple, step: int, last_step: int | None = None):
        """The mask kept at ``where`` if it was made for ``depends`` and may serve ``step``, else ``None``.

        At ``last_step`` the slot is emptied as it is read: no later step will ask for it.
        """
        held = self._masks.pop(where, None) if last_step is not None and step >= last_step else \
            self._masks.get(where)
        if held is None or held[0] != depends or not 0 <= step - held[2] < self.every:
            return None
        self.reused += 1
        return held[1]

    def put(self, where: tuple, depends: tuple, mask, step: int, last_step: int | None = None) -> None:
        """Keep ``mask`` at ``where`` (replacing what was there), unless no later step can use it."""
        if last_step is not None and step >= last_step:
            self._masks.pop(where, None)
            return
        self._masks[where] = (depends, mask, step)
