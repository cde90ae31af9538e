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
    """Masks of one model's sparse calls, kept between steps; see the module docstring."""

    def __init__(self, every: int):
        self.every = check_int("refresh_every", every)
        self.id = next(_IDS)  # what crosses the op boundary (an int, the same for every layer)
        self.predicted = 0
        self.reused = 0
        self._masks: dict = {}
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
        """A new generation: forget every mask."""
        self._masks.clear()

    def slot(self, *shape_key) -> tuple:
        """The next sparse call's key: its scope, its place in the model call, and what its mask depends on."""
        key = (self._scope, self._slot, shape_key)
        self._slot += 1
        return key

    def get(self, key: tuple, step: int):
        """The mask kept under ``key`` if it may serve ``step``, else ``None``."""
        held = self._masks.get(key)
        if held is None or not 0 <= step - held[1] < self.every:
            return None
        self.reused += 1
        return held[0]

    def put(self, key: tuple, mask, step: int) -> None:
        self._masks[key] = (mask, step)
        self.predicted += 1
