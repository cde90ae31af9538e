"""Input checks shared by the public entry points; each error names the argument."""
from __future__ import annotations

import math

import torch

from .dtypes import FLOAT_DTYPES

TENSOR_LAYOUTS = ("BNSD", "BSND")
#: Largest accepted softmax scale. Beyond it ``scale * q.k`` leaves float32's range for
#: ordinary half-precision inputs and every row of the softmax becomes NaN.
MAX_SCALE = 1e6


def check_int(name: str, value, *, minimum: int = 1) -> int:
    """``value`` as an int ``>= minimum``; a bool, float or anything else is refused naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        expected = {1: "a positive int", 0: "a non-negative int"}.get(minimum, f"an int >= {minimum}")
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return value


def describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dim()}-D {x.dtype} tensor of shape {tuple(x.shape)}"
    return f"a {type(x).__name__}"


def check_qkv(q, k, v) -> None:
    """Check ``(B, H, S, D)`` query/key/value tensors against each other."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (B, H, S, D), got {describe(x)}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}.dtype must be one of float16/bfloat16/float32/float64, got {x.dtype}")
        for dim, what in ((0, "batch size"), (1, "number of heads"), (2, "sequence length"), (3, "head dim")):
            if x.shape[dim] == 0:
                raise ValueError(f"{name} has {what} 0 (shape {tuple(x.shape)}, (B, H, S, D)); it must be >= 1")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name}.dtype must equal q.dtype ({q.dtype}), got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} must be on q's device ({q.device}), got {x.device}")
        if x.shape[0] != q.shape[0]:
            raise ValueError(f"{name} batch size must equal q's ({q.shape[0]}), got {x.shape[0]}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"k head dim must equal q's ({q.shape[3]}), got {k.shape[3]}")
    if v.shape[3] != q.shape[3]:
        raise ValueError(f"v head dim must equal q's ({q.shape[3]}), got {v.shape[3]}")
    if v.shape[1] != k.shape[1] or v.shape[2] != k.shape[2]:
        raise ValueError(
            f"v must have k's heads and length {tuple(k.shape[1:3])}, got {tuple(v.shape[1:3])}"
        )
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"q heads ({q.shape[1]}) must be a multiple of k/v heads ({k.shape[1]}) for grouped-query attention"
        )


def check_optional_bool(name: str, value) -> bool | None:
    """``None``, ``True`` or ``False``; anything else (``1``, ``"x"``) is refused naming ``name``."""
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{name} must be None, True or False, got {value!r}")
    return value


def check_bool(name: str, value) -> bool:
    """``True`` or ``False``; anything else (``1``, ``"False"``) is refused naming ``name``."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_indices(name: str, values, names: list[str] | None = None) -> list[int] | None:
    """``None``, or distinct positions: non-negative ints, or (with ``names``) entries of ``names``.

    A bool, a float, a string that is not in ``names``, a repeat, or anything that is not a list
    or tuple is refused naming ``name``.
    """
    if values is None:
        return None
    if not isinstance(values, (list, tuple, range)):
        raise TypeError(f"{name} must be None or a list of {'ints or names' if names else 'ints'}, "
                        f"got {describe(values)}")
    values = list(values)
    indices = []
    for value in values:
        if names is not None and isinstance(value, str):
            if value not in names:
                raise ValueError(f"{name}: no layer named {value!r}; the names are attention_layers(model)'s, "
                                 f"e.g. {names[0]!r}")
            indices.append(names.index(value))
        elif isinstance(value, bool) or not isinstance(value, int) or value < 0:
            what = "non-negative ints or layer names" if names is not None else "non-negative ints"
            raise ValueError(f"{name} must hold {what}, got {value!r} in {values!r}")
        else:
            indices.append(value)
    if len(set(indices)) != len(indices):
        raise ValueError(f"{name}: {values} names a layer twice")
    return indices


#: Largest accepted block size: the kernels index blocks with 32-bit integers.
MAX_BLOCK_SIZE = 2 ** 30


def check_sparsity(sparsity) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"sparsity must be a float in [0, 1), got {describe(sparsity)}")
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return float(sparsity)


def check_block_size(block_size) -> int:
    block_size = check_int("block_size", block_size)
    if block_size > MAX_BLOCK_SIZE:
        raise ValueError(f"block_size must be at most 2**30 ({MAX_BLOCK_SIZE}), got {block_size}")
    return block_size


def check_tensor_layout(tensor_layout) -> str:
    if tensor_layout not in TENSOR_LAYOUTS:
        raise ValueError(f"tensor_layout must be one of {TENSOR_LAYOUTS}, got {tensor_layout!r}")
    return tensor_layout


def default_scale(scale, head_dim: int) -> float:
    """``head_dim ** -0.5`` for ``None``; else ``scale`` if it is a finite float in ``(0, MAX_SCALE]``."""
    if scale is None:
        return head_dim ** -0.5
    if (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)
            or not 0 < scale <= MAX_SCALE):
        raise ValueError(f"scale must be None or a finite float in (0, {MAX_SCALE:g}], got {scale!r}")
    return float(scale)
