"""Backend registry: built-ins and plugins, selection by name or by device.

Selection rules (docs/design.md):

* a name (``"triton"``) or a ``Backend`` instance is *explicit*: it runs or
  raises an error listing its reasons, never falls back;
* a device string (``"cpu"``, ``"cuda:1"``, ``"npu:0"``) or ``None`` (the
  inputs' device) is *automatic*: the highest-priority available backend for
  that device type that supports the call; skipping a higher-priority one
  warns once with the reason. When nothing fits, one error lists every
  candidate and why it was refused.

Strings that name a device type are devices, so ``"cpu"`` selects by device;
pass ``name="cpu"`` to :func:`get_backend` to name the C++ backend itself.
"""
from __future__ import annotations

import contextlib
import importlib
import re
import threading
import warnings
from dataclasses import dataclass
from importlib import metadata

import torch

from .backend import Backend
from .errors import BackendError, BackendUnavailableError, UnknownBackendError, UnsupportedInputError
from .limits import Limits, declared_limits, declared_reasons
from .precision import DEFAULT_PRECISION, PRECISIONS, backend_keywords, get_precision

ENTRY_POINT_GROUP = "rainfusion_core.backends"
_BUILTINS = (
    "rainfusion_core.backends.torch_backend:TorchBackend",
    "rainfusion_core.backends.cpu:CpuBackend",
    "rainfusion_core.backends.triton:TritonBackend",
    "rainfusion_core.backends.npu:NpuBackend",
)
_DEVICE_TYPES = {"cpu", "cuda", "npu", "xpu", "mps", "hpu", "mtia", "meta", "xla", "privateuseone"}
_DEVICE_RE = re.compile(r"^([a-z_]+)(?::(\d+))?$")
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")

_lock = threading.RLock()
_backends: dict[str, Backend] = {}
_load_errors: dict[str, str] = {}  # plugin entry point -> why it failed to load
_loaded = False
_warned: set[tuple[str, str]] = set()
_device_specs: dict[str, str | None] = {}  # spec -> its device type, for the registered backends of now
_generation = 0  # counts changes to the registry: what was chosen before a change is chosen again after it
_UNKNOWN = object()


@dataclass(frozen=True)
class BackendInfo:
    """One row of :func:`list_backends`."""

    name: str
    device_types: tuple[str, ...]
    priority: int
    available: bool
    reason: str  # why it is unavailable; empty when available


# --------------------------------------------------------------------------- loading
def _instantiate(obj, origin: str) -> Backend:
    """A Backend instance from an instance, a Backend subclass, or a zero-argument factory."""
    if not isinstance(obj, Backend) and callable(obj):
        obj = obj()
    if not isinstance(obj, Backend):
        raise TypeError(f"{origin} gave {type(obj).__name__}, expected a rainfusion_core.Backend")
    return obj


def _ensure_loaded() -> None:
    """Load the built-ins and the entry-point plugins once; all or nothing.

    Everything is built into local tables first and published in one step, so an
    interruption (``KeyboardInterrupt``, ``SystemExit``) leaves the registry
    untouched and the next lookup loads again from scratch. A first call traced by
    ``torch.compile`` loads it outside the trace (imports and locks cannot be traced).
    """
    if not _loaded:
        _load_outside_traces()


@torch.compiler.assume_constant_result
def _load_outside_traces() -> bool:
    _load()
    return True


def _load() -> None:
    global _loaded
    with _lock:
        if _loaded:
            return
        backends: dict[str, Backend] = {}
        errors: dict[str, str] = {}
        for target in _BUILTINS:
            module, attr = target.split(":")
            _add(backends, _instantiate(getattr(importlib.import_module(module), attr), target), replace=False)
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                _add(backends, _instantiate(ep.load(), f"entry point {ep.name!r} ({ep.value})"), replace=False)
            except Exception as exc:  # a broken plugin must never break the registry
                errors[ep.name] = f"failed to load entry point {ep.value!r}: {type(exc).__name__}: {exc}"
        _backends.update(backends)
        _changed()
        for name, error in errors.items():
            _load_errors.setdefault(name, error)
        _loaded = True


def _changed() -> None:
    """The registry's table changed (called under the lock): forget what was derived from it."""
    global _generation
    _device_specs.clear()
    _generation += 1


def generation() -> int:
    """A number that changes whenever a backend is registered, removed or restored; for callers that cache a choice."""
    return _generation


def _check_declaration(backend: Backend) -> None:
    """Refuse a backend whose declared data would break selection later."""
    if not isinstance(backend.name, str) or _NAME_RE.match(backend.name) is None:
        raise ValueError(
            f"backend.name must be lowercase letters, digits and '_' (starting with a letter), got {backend.name!r}"
        )
    types = backend.device_types
    if (not isinstance(types, (tuple, list)) or not types
            or not all(isinstance(t, str) and t for t in types)):
        raise ValueError(
            f"backend {backend.name!r}: device_types must be a non-empty tuple of device type strings such as "
            f"('cuda',) or ('*',), got {types!r}"
        )
    if isinstance(backend.priority, bool) or not isinstance(backend.priority, int):
        raise ValueError(f"backend {backend.name!r}: priority must be an int, got {backend.priority!r}")
    for flag in ("writes_every_row", "returns_lse"):
        if not isinstance(getattr(backend, flag), bool):
            raise ValueError(f"backend {backend.name!r}: {flag} must be True or False, got {getattr(backend, flag)!r}")
    precisions = backend.precisions
    if (not isinstance(precisions, tuple) or DEFAULT_PRECISION not in precisions
            or not set(precisions) <= set(PRECISIONS)):
        raise ValueError(f"backend {backend.name!r}: precisions must be a tuple of {PRECISIONS} holding "
                         f"{DEFAULT_PRECISION!r}, got {precisions!r}")
    narrower = backend.precision_limits
    if (not isinstance(narrower, dict) or not set(narrower) <= set(precisions) - {DEFAULT_PRECISION}
            or not all(isinstance(x, Limits) for x in narrower.values())):
        raise ValueError(f"backend {backend.name!r}: precision_limits must map precisions it offers other than "
                         f"{DEFAULT_PRECISION!r} to rainfusion_core.limits.Limits, got {narrower!r}")
    for limits in (declared_limits(backend), *narrower.values()):
        problems = limits.problems()
        if problems:
            raise ValueError(f"backend {backend.name!r}: " + "; ".join(problems))


def _add(table: dict[str, Backend], backend: Backend, replace: bool) -> None:
    _check_declaration(backend)
    if backend.name in table and not replace:
        raise ValueError(f"a backend named {backend.name!r} is already registered; pass replace=True")
    table[backend.name] = backend


def register_backend(backend: Backend | type[Backend], *, replace: bool = False) -> Backend:
    """Register a backend instance (or a ``Backend`` subclass, instantiated with no arguments)."""
    backend = _instantiate(backend, "register_backend argument")
    _ensure_loaded()
    with _lock:
        _add(_backends, backend, replace)
        _load_errors.pop(backend.name, None)
        _changed()
    return backend


def unregister_backend(name: str) -> None:
    """Remove a registered backend (tests and plugins that replace one)."""
    _ensure_loaded()
    with _lock:
        if _backends.pop(name, None) is None:
            raise UnknownBackendError(f"no backend named {name!r} is registered")
        _changed()


def list_backends() -> list[BackendInfo]:
    """Every registered backend, and every plugin that failed to load, by priority."""
    _ensure_loaded()
    with _lock:  # errors and backends from one moment: registration may go on in other threads
        errors = list(_load_errors.items())
        backends = _registered()
    rows = []
    for backend in backends:
        reason = unavailable_reason(backend)
        rows.append(BackendInfo(backend.name, tuple(backend.device_types), backend.priority, reason is None, reason or ""))
    for name, error in errors:
        rows.append(BackendInfo(name, (), 0, False, error))
    return sorted(rows, key=lambda r: (-r.priority, r.name))


def unavailable_reason(backend: Backend) -> str | None:
    """``backend.unavailable_reason()``, with a check that raises reported as the reason, not raised."""
    try:
        reason = backend.unavailable_reason()
    except Exception as exc:  # a plugin's broken check must not break listing or selection
        return f"its availability check raised {type(exc).__name__}: {exc}"
    if reason is not None and not isinstance(reason, str):
        return f"its availability check returned {type(reason).__name__}, not a str or None"
    return reason


# --------------------------------------------------------------------------- selection
def _parse_device(spec: str) -> str | None:
    """The device type of ``spec`` if it is a device string, else ``None``.

    A device string is a known device type (torch's, or one a registered
    backend runs on), optionally with ``:index``; any ``word:index`` counts too.
    Answers are remembered until the registry changes.
    """
    _ensure_loaded()
    found = _device_specs.get(spec, _UNKNOWN)
    if found is not _UNKNOWN:
        return found
    if torch.compiler.is_compiling():  # traced code takes no lock and fills no cache
        return _device_type(spec, list(_backends.values()))
    with _lock:  # the answer and the table it came from belong to one moment
        found = _device_type(spec, _backends.values())
        if len(_device_specs) >= 256:
            _device_specs.clear()
        _device_specs[spec] = found
    return found


def _device_type(spec: str, backends) -> str | None:
    match = _DEVICE_RE.match(spec)
    if match is None:
        return None
    known = _DEVICE_TYPES.union(*(b.device_types for b in backends)) - {"*"}
    return match.group(1) if match.group(1) in known or match.group(2) is not None else None


def device_type_of(spec: str) -> str | None:
    """The device type a device string names (``"cuda:1"`` -> ``"cuda"``); ``None`` for a backend name."""
    return _parse_device(spec)


def _registered() -> list[Backend]:
    """The registered backends now (a snapshot taken under the lock)."""
    with _lock:
        return list(_backends.values())


def registered_backends() -> list[Backend]:
    """Every registered ``Backend`` object, by priority (plugins included; failed plugins are not objects)."""
    _ensure_loaded()
    return sorted(_registered(), key=lambda b: (-b.priority, b.name))


@contextlib.contextmanager
def scoped_backends(*backends: Backend | type[Backend], replace: bool = False):
    """Register ``backends`` for the duration of a ``with`` block; on exit the registry is as before.

    Everything the block did to the registry is undone: its registrations and
    removals, and which fallback warnings were already shown (so each block sees
    its own once-only warnings). For tests and for plugin authors trying a backend::

        with rf.scoped_backends(MyAsicBackend()) as (mine,):
            rf.sparse_attention(q, k, v, layout, backend="my_asic")
    """
    _ensure_loaded()
    with _lock:
        saved = dict(_backends), dict(_load_errors), set(_warned)
    try:
        yield tuple(register_backend(b, replace=replace) for b in backends)
    finally:
        with _lock:
            _backends.clear()
            _backends.update(saved[0])
            _load_errors.clear()
            _load_errors.update(saved[1])
            _warned.clear()
            _warned.update(saved[2])
            _changed()


def require_device(spec: str) -> None:
    """Raise ``BackendUnavailableError`` unless the device string ``spec`` (``"cuda:1"``) names a device here.

    Asks the device type's torch module (``torch.cuda``, ``torch.npu`` once ``torch_npu`` is
    imported) when it has one, else tries to place an empty tensor there.
    """
    match = _DEVICE_RE.match(spec) if isinstance(spec, str) else None
    if match is None:
        raise ValueError(f"expected a device string such as 'cpu' or 'cuda:0', got {spec!r}")
    device_type, index = match.group(1), None if match.group(2) is None else int(match.group(2))
    module = getattr(torch, device_type, None)
    if callable(getattr(module, "device_count", None)):
        is_available = getattr(module, "is_available", None)
        count = module.device_count() if is_available is None or is_available() else 0
        if count == 0:
            raise BackendUnavailableError(f"device {spec!r} is not present on this machine: torch sees no "
                                          f"{device_type} device")
        if index is not None and index >= count:
            raise BackendUnavailableError(f"device {spec!r} is not present on this machine: torch sees {count} "
                                          f"{device_type} device(s), indices 0..{count - 1}")
        return
    try:
        torch.empty(0, device=spec)
    except Exception as exc:  # torch raises RuntimeError, AssertionError or ValueError depending on the build
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BackendUnavailableError(f"device {spec!r} is not present on this machine ({detail})") from None


def _by_name(name: str) -> Backend:
    _ensure_loaded()
    if name in _backends:
        return _backends[name]
    if name in _load_errors:
        raise BackendUnavailableError(f"backend {name!r} is unavailable: {_load_errors[name]}")
    known = sorted(_backends) + sorted(_load_errors)
    raise UnknownBackendError(
        f"unknown backend {name!r}; expected one of {known} or a device string such as 'cpu' or 'cuda:0'"
    )


def _candidates(device_type: str) -> list[Backend]:
    _ensure_loaded()
    # Automatic choice goes by declared device types; runs_on may be wider for explicit use.
    found = [b for b in _registered() if device_type in b.device_types or "*" in b.device_types]
    return sorted(found, key=lambda b: -b.priority)


def available_backends(device_type: str) -> list[Backend]:
    """The available backends automatic selection considers for ``device_type``, highest priority first."""
    return [b for b in _candidates(device_type) if unavailable_reason(b) is None]


def get_backend(spec: str | Backend | None = None, *, name: str | None = None) -> Backend:
    """Look up a backend.

    ``get_backend("triton")`` returns the backend of that name (raising if it
    is unavailable here); ``get_backend("cuda:0")`` the highest-priority
    available backend for that device type; ``get_backend(name="cpu")`` the
    backend named ``cpu`` (the plain string ``"cpu"`` is the device).
    """
    if name is not None:
        if spec is not None:
            raise TypeError("get_backend takes a spec or name=, not both")
        backend = _by_name(name)
        _require_available(backend)
        return backend
    if isinstance(spec, Backend):
        _check_declaration(spec)  # an unregistered object is checked here, as registration would
        _require_available(spec)
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"backend must be a name, a device string or a Backend, got {type(spec).__name__}")
    device_type = _parse_device(spec)
    if device_type is None:
        backend = _by_name(spec)
        _require_available(backend)
        return backend
    candidates = _candidates(device_type)
    for backend in candidates:  # availability checks import accelerator stacks (torch_npu) first
        unavailable_reason(backend)
    require_device(spec)
    return _choose(device_type, None, spec)


def _require_available(backend: Backend) -> None:
    reason = unavailable_reason(backend)
    if reason is not None:
        raise BackendUnavailableError(f"backend {backend.name!r} is unavailable: {reason}")


def check_device_matches(spec: str, device: torch.device) -> None:
    """Refuse a device string (``backend="cuda:1"``) naming a device that is absent or not the inputs' device."""
    require_device(spec)
    spec_type = _parse_device(spec)
    index = _DEVICE_RE.match(spec).group(2)
    if spec_type != device.type or (index is not None and (device.index or 0) != int(index)):
        raise ValueError(f"backend={spec!r} names the device {spec}, but the inputs are on {device}; pass "
                         f"backend={str(device)!r}, a backend name, or None for the inputs' device")


def is_automatic(spec) -> bool:
    """Whether ``backend=spec`` leaves the choice to the registry (``None`` or a device string), not a name."""
    return spec is None or (isinstance(spec, str) and _parse_device(spec) is not None)


def select_backend(spec, q, k, v, block_mask, precision: str = DEFAULT_PRECISION, lse: bool = False) -> Backend:
    """The backend that runs this call; ``spec`` as in :func:`get_backend`, ``None`` = q's device.

    ``precision`` (checked by the caller) is part of the call: a backend must list it in
    ``precisions``, and is asked its ``unsupported_reasons`` for it.
    """
    device_type = q.device.type
    call = _Call(q, k, v, block_mask, precision, lse)
    if spec is None:
        return _choose(device_type, call, str(q.device))
    if isinstance(spec, str) and _parse_device(spec) is not None:
        check_device_matches(spec, q.device)
        return _choose(device_type, call, spec)
    backend = get_backend(spec)  # a name or a Backend; raises when it is unavailable
    if not backend.runs_on(device_type):
        raise UnsupportedInputError(
            f"backend {backend.name!r} runs on {'/'.join(backend.device_types)} devices, "
            f"but the inputs are on {q.device}"
        )
    reasons = call.reasons(backend)
    if reasons:
        raise UnsupportedInputError(f"backend {backend.name!r} cannot run this call: " + "; ".join(reasons))
    return backend


def refusal_reasons(backend: Backend, q, k, v, block_mask, precision: str = DEFAULT_PRECISION,
                    lse: bool = False) -> list[str]:
    """Why ``backend`` cannot run attention of these tensors in ``precision`` (empty when it can).

    The same questions :func:`select_backend` asks: availability, the device, the precision, and
    the backend's own ``unsupported_reasons``.
    """
    reason = unavailable_reason(backend)
    if reason is not None:
        return [f"it is unavailable: {reason}"]
    if not backend.runs_on(q.device.type):
        return [f"it runs on {'/'.join(backend.device_types)} devices, but the inputs are on {q.device}"]
    return _Call(q, k, v, block_mask, precision, lse).reasons(backend)


@dataclass(frozen=True)
class _Call:
    """What selection asks a backend about: the tensors, the mask, the precision, whether the log-sum-exp is wanted."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    block_mask: object
    precision: str
    lse: bool = False

    def reasons(self, backend: Backend) -> list[str]:
        """Why ``backend`` cannot run this call (empty when it can): first what it declares as data
        (``rainfusion_core.limits``), then, for a call the data allows, its ``unsupported_reasons`` hook.

        A precision other than the default is asked only of backends that list it, and
        reaches them as the keyword ``precision=``; other backends never see it.
        """
        if self.precision not in backend.precisions:
            return [f"it does not compute in precision {self.precision!r} (it offers "
                    f"{', '.join(backend.precisions)})"]
        if self.lse and not backend.returns_lse:
            return ["it does not return the log-sum-exp (returns_lse is False)"]
        if self.lse and not get_precision(self.precision).is_default:
            return [f"the log-sum-exp comes only from the {DEFAULT_PRECISION} kernels, not in precision "
                    f"{self.precision!r}"]
        declared = declared_reasons(backend, self.q, self.block_mask.block_size, self.precision)
        if declared:
            return declared
        try:  # a plugin's hook is guarded as its availability check is: it names the plugin, never breaks selection
            reasons = backend.unsupported_reasons(self.q, self.k, self.v, self.block_mask,
                                                  **backend_keywords(self.precision))
        except Exception as exc:
            return [f"its unsupported_reasons() raised {type(exc).__name__}: {exc}"]
        if not isinstance(reasons, (list, tuple)) or not all(isinstance(r, str) for r in reasons):
            return [f"its unsupported_reasons() returned {type(reasons).__name__} {reasons!r:.80}, not a list of "
                    "reason strings"]
        return list(reasons)


def _choose(device_type: str, call: _Call | None, spec: str) -> Backend:
    refused: list[tuple[str, str]] = []
    for backend in _candidates(device_type):
        reason = unavailable_reason(backend)
        if reason is None and call is not None:
            reason = "; ".join(call.reasons(backend)) or None
        if reason is not None:
            refused.append((backend.name, reason))
            continue
        for skipped, why in refused:
            if (skipped, why) not in _warned:
                _warned.add((skipped, why))
                warnings.warn(
                    f"rainfusion_core: backend {skipped!r} skipped on {spec} ({why}); using {backend.name!r}",
                    RuntimeWarning,
                    stacklevel=4,
                )
        return backend
    if not refused:
        raise BackendError(f"no backend is registered for device type {device_type!r} ({spec})")
    lines = "\n".join(f"  - {name}: {why}" for name, why in refused)
    needs = get_precision(call.precision).needs if call is not None else None
    raise BackendError(f"{needs + '; ' if needs else ''}no backend can run on {spec}:\n{lines}")
