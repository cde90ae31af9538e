"""Run a diffusers processor's own code with its attention call routed somewhere else.

``routed(function, name, replacement)`` returns a copy of ``function`` (a
processor's ``__call__``) whose global ``name`` (``dispatch_attention_fn`` or
``F``) resolves to ``replacement``. The copy's globals are those of a private
module registered in ``sys.modules``, so ``torch.compile`` resolves and guards
its globals like any module's. Nothing in diffusers is modified: other
processors, and this one outside RainFusion, call the real function.
"""
from __future__ import annotations

import itertools
import sys
import types

_PREFIX = __name__.rpartition(".")[0] + "._routed"
_counter = itertools.count()


def routed(function: types.FunctionType, name: str, replacement) -> types.FunctionType:
    """A copy of ``function`` calling ``replacement`` wherever it names the global ``name``."""
    if name not in function.__code__.co_names:
        raise TypeError(f"{function.__qualname__} never calls {name}: RainFusion cannot route its attention")
    module = types.ModuleType(f"{_PREFIX}{next(_counter)}")
    module.__dict__.update({k: v for k, v in function.__globals__.items() if k != "__name__"})
    setattr(module, name, replacement)
    sys.modules[module.__name__] = module
    copy = types.FunctionType(function.__code__, module.__dict__, function.__name__, function.__defaults__,
                              function.__closure__)
    copy.__kwdefaults__ = function.__kwdefaults__
    copy.__qualname__ = function.__qualname__
    copy.__module__ = module.__name__
    return copy


def release(function: types.FunctionType) -> None:
    """Forget the private module of a routed copy (after its last user is gone)."""
    name = function.__globals__.get("__name__", "")
    if name.startswith(_PREFIX):
        sys.modules.pop(name, None)


def target(function: types.FunctionType, name: str):
    """What ``name`` resolves to inside ``function``."""
    return function.__globals__[name]
