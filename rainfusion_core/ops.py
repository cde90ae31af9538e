"""The device-side steps of a sparse call, and the one place that decides how each is run.

``torch.compile`` sees ``rainfusion::sparse_attention`` (a whole call: prediction and
attention), ``rainfusion::predict_block_mask`` and ``rainfusion::block_sparse_attention``
as opaque nodes (each with a fake implementation for shapes), so a compiled model that
calls ``sparse_attention`` has no graph break: backend selection, prediction on the
backend's kernels and the kernel launch run inside the op at run time, and a whole
call is one node.

:func:`sparse_call`, :func:`predict` and :func:`attention` are what the entry points
call. In plain eager mode (:func:`runs_directly`: no tracing, no dispatch mode, plain
tensors, nothing for autograd to record) they run the op's body directly, which skips
the dispatcher's host cost per op; otherwise, and for tracing, they go through the op.
A ``Backend`` object cannot cross the op boundary and always runs directly. A
``BlockMask`` crosses as :meth:`BlockMask.as_tuple` and is rebuilt without checks on
the other side. Each call chooses its backend once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ._checks import describe
from .backend import Backend, MaskPredictor
from .block_mask import BlockMask, num_blocks
from .call import BackendChoice
from .dtypes import accumulation_dtype
from .errors import BackendError
from .layout import VideoLayout
from .mask_rule import MaskRule
from .permutation import cached_permutation
from .precision import DEFAULT_PRECISION, backend_keywords
from .reuse import MaskReuse
from .registry import select_backend


# --------------------------------------------------------------------------- choosing
def runs_directly(*tensors: torch.Tensor | None) -> bool:
    """Whether an op's body may run as a plain function call instead of through the dispatcher.

    True in plain eager mode only: not under ``torch.compile`` or ``torch.export``, no
    ``TorchDispatchMode`` (fake tensors, ``make_fx``, FLOP counters), only plain tensors
    (no subclasses, no functorch wrappers), and nothing autograd would record (through the
    op such a call gets the op's backward, which says there is none). The body is the same
    either way, so the result is too.
    """
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    grad = torch.is_grad_enabled()
    for x in tensors:
        if x is None:
            continue
        if type(x) is not torch.Tensor or (grad and x.requires_grad) or _is_functorch_wrapped(x):
            return False
    return True


def _is_functorch_wrapped(x: torch.Tensor) -> bool:
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(check(x)) if check is not None else False


def prediction_backend(spec, q: torch.Tensor, k: torch.Tensor, block_size: int,
                       precision: str = DEFAULT_PRECISION, lse: bool = False) -> Backend:
    """The backend that runs this call, chosen once by the one rule of ``select_backend``.

    Asked before the mask exists, it sees a stand-in mask of the right shape and block size;
    the same backend then predicts the mask (in the inputs' precision) and attends.
    """
    stand_in = BlockMask.stand_in(q.shape[0], q.shape[1], q.shape[2], k.shape[2], block_size, q.device)
    return select_backend(spec, q, k, k, stand_in, precision, lse)


def _predictor(spec, q, k, block_size, precision) -> MaskPredictor | None:
    return prediction_backend(spec, q, k, block_size, precision).mask_predictor(q.dtype)


# --------------------------------------------------------------------------- mask prediction
@torch.library.custom_op("rainfusion::predict_block_mask", mutates_args=())
def predict_block_mask_op(
    q: torch.Tensor,
    k: torch.Tensor,
    order: Optional[torch.Tensor],
    block_size: int,
    scale: float,
    keep: int,
    sink_blocks: int,
    text_blocks: int,
    backend: Optional[str],
    precision: str = DEFAULT_PRECISION,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rule = MaskRule(block_size, scale, keep, sink_blocks, text_blocks)
    return rule.predict(q, k, order, _predictor(backend, q, k, block_size, precision))


@predict_block_mask_op.register_fake
def _(q, k, order, block_size, scale, keep, sink_blocks, text_blocks, backend, precision=DEFAULT_PRECISION):
    batch, heads, length = q.shape[:3]
    blocks = num_blocks(length, block_size)
    dense = q.new_empty((batch, heads, blocks, blocks), dtype=torch.bool)
    counts = q.new_empty((batch, heads, blocks), dtype=torch.int32)
    return dense, counts, q.new_empty((batch, heads, blocks, blocks), dtype=torch.int32)


def predict(choice: BackendChoice, q: torch.Tensor, k: torch.Tensor, order: torch.Tensor | None,
            rule: MaskRule, precision: str = DEFAULT_PRECISION, chosen: Backend | None = None) -> BlockMask:
    """The RainFusion2.0 mask of ``q``, ``k`` (read through ``order``, or as they are) for a resolved call.

    ``precision`` only picks the backend (the one that will attend); the mask does not depend on it.
    ``chosen``: the backend this call already chose (then nothing is selected again).
    """
    batch, length = q.shape[0], q.shape[2]
    if rule.share_batch_mask:
        q, k = q[:1], k[:1]
    if chosen is not None:
        parts = rule.predict(q, k, order, chosen.mask_predictor(q.dtype))
    elif choice.obj is not None or runs_directly(q, k, order):  # the op's body, without the dispatcher
        parts = rule.predict(q, k, order, _predictor(choice.obj or choice.spec, q, k, rule.block_size, precision))
    else:
        parts = predict_block_mask_op(q, k, order, rule.block_size, rule.scale, rule.keep, rule.sink_blocks,
                                      rule.text_blocks, choice.spec, precision)
    if rule.share_batch_mask:
        parts = tuple(x.expand(batch, *x.shape[1:]) for x in parts)
    return BlockMask.from_tuple((*parts, rule.block_size), length, length)


# --------------------------------------------------------------------------- attention
def checked_output(backend: Backend, out, q: torch.Tensor) -> torch.Tensor:
    """``out`` if it is what :meth:`Backend.forward` must return for ``q``; else an error naming the backend."""
    if (not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(q.shape) or out.dtype != q.dtype
            or out.device != q.device):
        where = f" on {out.device}" if isinstance(out, torch.Tensor) else ""
        raise BackendError(
            f"backend {backend.name!r} returned {describe(out)}{where} from forward(); expected a {q.dtype} "
            f"tensor of shape {tuple(q.shape)} on {q.device}"
        )
    return out


def _forward(backend: Backend, q, k, v, mask: BlockMask, scale: float, extra: dict, lse=None) -> torch.Tensor:
    """``backend.forward`` checked; with ``lse`` (a ``[B, Hq, Sq]`` buffer) it is asked for the log-sum-exp too,
    which is checked and written there."""
    if lse is None:
        return checked_output(backend, backend.forward(q, k, v, mask, scale, **extra), q)
    result = backend.forward(q, k, v, mask, scale, return_lse=True, **extra)
    pair = isinstance(result, tuple) and len(result) == 2
    part = result[1] if pair else None
    if (not isinstance(part, torch.Tensor) or tuple(part.shape) != tuple(q.shape[:3]) or not part.is_floating_point()
            or part.device != q.device):
        got = describe(part) if pair else f"{describe(result)}, not (out, lse)"
        raise BackendError(f"backend {backend.name!r} returned lse as {got} from forward(return_lse=True); expected "
                           f"a float tensor of shape {tuple(q.shape[:3])} on {q.device}")
    lse.copy_(part)
    return checked_output(backend, result[0], q)


def attend_permuted_copies(backend: Backend, q, k, v, block_mask: BlockMask, scale: float, order: torch.Tensor,
                           out: torch.Tensor, lse: torch.Tensor | None = None, **extra) -> None:
    """Model-order attention for a backend without :meth:`Backend.model_order_attention`: gather
    permuted copies of q, k, v, run :meth:`Backend.forward`, scatter its rows (and, with ``lse``,
    its log-sum-exp) back. ``extra`` (``precision=``, only when not the default) is passed on."""
    permuted = [x.index_select(2, order) for x in (q, k, v)]
    part = None if lse is None else torch.empty(lse.shape, dtype=lse.dtype, device=lse.device)
    out.index_copy_(2, order, _forward(backend, *permuted, block_mask, scale, extra, part))
    if lse is not None:
        lse.index_copy_(2, order, part)


def empty_lse(q: torch.Tensor) -> torch.Tensor:
    """A ``[B, Hq, Sq]`` log-sum-exp buffer: float32, float64 for float64 inputs."""
    return q.new_empty(q.shape[:3], dtype=accumulation_dtype(q.dtype))


@torch.library.custom_op("rainfusion::block_sparse_attention", mutates_args=())
def block_sparse_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dense: torch.Tensor,
    kv_counts: torch.Tensor,
    kv_indices: torch.Tensor,
    block_size: int,
    scale: float,
    backend: Optional[str],
    order: Optional[torch.Tensor] = None,
    bsnd_out: bool = False,
    precision: str = DEFAULT_PRECISION,
) -> torch.Tensor:
    """``[B, Hq, Sq, D]`` attention; with ``order`` the tensors are in model order (see Backend.model_order_attention).

    The result is contiguous: ``[B, Hq, Sq, D]``, or ``[B, Sq, Hq, D]`` with ``bsnd_out``.
    """
    mask = BlockMask.from_tuple((dense, kv_counts, kv_indices, block_size), q.shape[2], k.shape[2])
    chosen = select_backend(backend, q, k, v, mask, precision)
    return attend(chosen, q, k, v, mask, scale, order, bsnd_out, precision)


@torch.library.custom_op("rainfusion::block_sparse_attention_lse", mutates_args=())
def block_sparse_attention_lse_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dense: torch.Tensor,
    kv_counts: torch.Tensor,
    kv_indices: torch.Tensor,
    block_size: int,
    scale: float,
    backend: Optional[str],
    order: Optional[torch.Tensor] = None,
    bsnd_out: bool = False,
    precision: str = DEFAULT_PRECISION,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`block_sparse_attention_op` and each row's log-sum-exp ``[B, Hq, Sq]``, in the output's row order."""
    mask = BlockMask.from_tuple((dense, kv_counts, kv_indices, block_size), q.shape[2], k.shape[2])
    chosen = select_backend(backend, q, k, v, mask, precision, lse=True)
    lse = empty_lse(q)
    return attend(chosen, q, k, v, mask, scale, order, bsnd_out, precision, lse), lse


def attend(chosen: Backend, q, k, v, mask: BlockMask, scale: float, order=None, bsnd_out: bool = False,
           precision: str = DEFAULT_PRECISION, lse: torch.Tensor | None = None) -> torch.Tensor:
    """Run ``chosen`` into a contiguous output, ``[B, Hq, Sq, D]`` or ``[B, Sq, Hq, D]`` with ``bsnd_out``.

    With ``order`` the inputs are in model order: the backend's model-order attention
    reads through it, or else the rows are gathered into permuted copies and scattered back.
    A precision other than the default reaches the backend as ``precision=``. ``lse`` (a
    ``[B, Hq, Sq]`` buffer, :func:`empty_lse`) receives each row's log-sum-exp, in the
    output's row order.
    """
    extra = backend_keywords(precision)
    if order is None and not bsnd_out:
        return _forward(chosen, q, k, v, mask, scale, extra, lse).contiguous()
    out = _empty_out(q, bsnd_out)
    view = out.transpose(1, 2) if bsnd_out else out
    if order is None:
        view.copy_(_forward(chosen, q, k, v, mask, scale, extra, lse))
        return out
    run = chosen.model_order_attention()
    if run is not None:
        if not chosen.writes_every_row:  # rows a function leaves unwritten read NaN, never stale memory
            view.fill_(float("nan"))
            if lse is not None:
                lse.fill_(float("nan"))
        run(q, k, v, mask, scale, order, view, **extra, **({} if lse is None else {"lse": lse}))
    else:
        attend_permuted_copies(chosen, q, k, v, mask, scale, order, view, lse, **extra)
    return out


def attention(choice: BackendChoice, q, k, v, mask: BlockMask, scale: float, order=None,
              bsnd_out: bool = False, precision: str = DEFAULT_PRECISION, chosen: Backend | None = None,
              chose=None, return_lse: bool = False):
    """Attention of a resolved call: through the op, or its body directly (eager mode, a ``Backend`` object).

    ``chosen``: the backend a caller chose for this class of inputs before (a plan), used without
    asking the registry again; ``chose(backend)`` is told the choice when one is made.
    ``return_lse``: ``(out, lse)``, the log-sum-exp ``[B, Hq, Sq]`` in the output's row order.
    """
    if choice.obj is not None or runs_directly(q, k, v, order, mask.dense, mask.kv_counts, mask.kv_indices):
        if chosen is None:
            chosen = select_backend(choice.obj or choice.spec, q, k, v, mask, precision, lse=return_lse)
            if chose is not None:
                chose(chosen)
        if not return_lse:
            return attend(chosen, q, k, v, mask, scale, order, bsnd_out, precision)
        lse = empty_lse(q)
        return attend(chosen, q, k, v, mask, scale, order, bsnd_out, precision, lse), lse
    op = block_sparse_attention_lse_op if return_lse else block_sparse_attention_op
    return op(q, k, v, *mask.as_tuple(), scale, choice.spec, order, bsnd_out, precision)


def _empty_out(q: torch.Tensor, bsnd_out: bool) -> torch.Tensor:
    batch, heads, length, dim = q.shape
    shape = (batch, length, heads, dim) if bsnd_out else (batch, heads, length, dim)
    return q.new_empty(shape)


@block_sparse_attention_op.register_fake
def _(q, k, v, dense, kv_counts, kv_indices, block_size, scale, backend, order=None, bsnd_out=False,
      precision=DEFAULT_PRECISION):
    return _empty_out(q, bsnd_out)


@block_sparse_attention_lse_op.register_fake
def _(q, k, v, dense, kv_counts, kv_indices, block_size, scale, backend, order=None, bsnd_out=False,
      precision=DEFAULT_PRECISION):
    return _empty_out(q, bsnd_out), empty_lse(q)


# --------------------------------------------------------------------------- below the crossover
def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, bsnd_out: bool) -> torch.Tensor:
    """Dense attention of ``[B, H, S, D]`` views, as a call below the crossover runs it; output like the sparse path."""
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2).contiguous() if bsnd_out else out


# --------------------------------------------------------------------------- a whole call
def layout_args(layout: VideoLayout) -> list[int]:
    """How a layout crosses the whole-call op: ``[frames, height, width, text_len, text at the tail]``."""
    return [layout.frames, layout.height, layout.width, layout.text_len, int(layout.text_position == "tail")]


def _layout_of(args: list[int]) -> VideoLayout:
    frames, height, width, text_len, tail = args
    return VideoLayout(frames, height, width, text_len=text_len, text_position="tail" if tail else "head")


@torch.library.custom_op("rainfusion::sparse_attention", mutates_args=())
def sparse_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: list[int],
    block_size: int,
    mask_scale: float,
    keep: int,
    sink_blocks: int,
    text_blocks: int,
    share_batch_mask: bool,
    scale: float,
    backend: Optional[str],
    bsnd_out: bool = False,
    precision: str = DEFAULT_PRECISION,
    step_sparsity: Optional[torch.Tensor] = None,
    reuse: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """A whole ``sparse_attention`` call after its checks: one backend chosen, the mask predicted, attention.

    q, k, v are in model order; the permutation of ``layout`` (:func:`layout_args`) is looked up
    here, at run time, so no traced graph ever builds it or holds it as a constant.
    ``step_sparsity`` (a one-element CPU tensor) replaces ``keep`` by the budget of the sparsity it
    holds when the call runs: compiled code whose sparsity changes from step to step passes it, so
    one graph serves every step. ``reuse`` (a CPU int64 tensor ``[MaskReuse id, step, last step or
    -1, layer or -1]``, as :meth:`ReuseAt.as_tensor` writes it) reuses a mask predicted at an earlier step,
    looked up when the call runs; the handle's id travels as data, so a new handle compiles nothing.
    """
    rule = MaskRule(block_size, mask_scale, keep, sink_blocks, text_blocks, share_batch_mask)
    if step_sparsity is not None:
        rule = rule.at_sparsity(float(step_sparsity), k.shape[2])
    reused = None
    if reuse is not None:
        reuse_id, step, last, layer = reuse.tolist()
        reused = ReuseAt(MaskReuse.find(reuse_id), step, None if last < 0 else last, None if layer < 0 else layer)
    return _sparse_call_body(backend, q, k, v, _layout_of(layout), rule, scale, bsnd_out, precision, reuse=reused)


@sparse_attention_op.register_fake
def _(q, k, v, layout, block_size, mask_scale, keep, sink_blocks, text_blocks, share_batch_mask, scale, backend,
      bsnd_out=False, precision=DEFAULT_PRECISION, step_sparsity=None, reuse=None):
    return _empty_out(q, bsnd_out)


@torch.library.custom_op("rainfusion::sparse_attention_lse", mutates_args=())
def sparse_attention_lse_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: list[int],
    block_size: int,
    mask_scale: float,
    keep: int,
    sink_blocks: int,
    text_blocks: int,
    share_batch_mask: bool,
    scale: float,
    backend: Optional[str],
    bsnd_out: bool = False,
    precision: str = DEFAULT_PRECISION,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sparse_attention_op` and each row's log-sum-exp ``[B, Hq, S]`` in model order."""
    rule = MaskRule(block_size, mask_scale, keep, sink_blocks, text_blocks, share_batch_mask)
    lse = empty_lse(q)
    return _sparse_call_body(backend, q, k, v, _layout_of(layout), rule, scale, bsnd_out, precision, lse=lse), lse


@sparse_attention_lse_op.register_fake
def _(q, k, v, layout, block_size, mask_scale, keep, sink_blocks, text_blocks, share_batch_mask, scale, backend,
      bsnd_out=False, precision=DEFAULT_PRECISION):
    return _empty_out(q, bsnd_out), empty_lse(q)


def _sparse_call_body(spec, q, k, v, layout: VideoLayout, rule: MaskRule, scale: float, bsnd_out: bool,
                      precision: str, on_mask=None, reuse: "ReuseAt | None" = None,
                      lse: torch.Tensor | None = None) -> torch.Tensor:
    order = cached_permutation(layout, q.device).indices  # never leaves this call
    chosen = prediction_backend(spec, q, k, rule.block_size, precision, lse is not None)  # the one choice
    mask = None
    if reuse is not None:  # what the kept mask must have been made for (the layer, where eager code knows it)
        where = reuse.store.slot()
        depends = (reuse.layer, layout, rule, tuple(q.shape), tuple(k.shape), q.dtype, q.device)
        mask = reuse.store.get(where, depends, reuse.step, reuse.last_step)
    if mask is None:
        mask = predict(BackendChoice(), q, k, order, rule, precision, chosen=chosen)
        if reuse is not None:
            reuse.store.put(where, depends, mask, reuse.step, reuse.last_step)
        if on_mask is not None:
            on_mask(mask)
    return attend(chosen, q, k, v, mask, scale, order, bsnd_out, precision, lse)


@dataclass(frozen=True)
class ReuseAt:
    """Where a call's mask may come from: a :class:`~rainfusion_core.reuse.MaskReuse`, the step, the
    generation's last step (``None``: not known) and the attention layer (``None``: not known)."""

    store: MaskReuse
    step: int
    last_step: int | None = None
    layer: int | None = None

    def as_tensor(self, out: torch.Tensor) -> torch.Tensor:
        """Written into ``out`` (CPU int64 ``[4]``), as the whole-call op takes it."""
        out.copy_(torch.tensor([self.store.id, self.step, -1 if self.last_step is None else self.last_step,
                                -1 if self.layer is None else self.layer]))
        return out


def sparse_call(choice: BackendChoice, q, k, v, layout: VideoLayout, rule: MaskRule, scale: float,
                bsnd_out: bool = False, precision: str = DEFAULT_PRECISION, on_mask=None,
                step_sparsity: torch.Tensor | None = None, reuse: "ReuseAt | torch.Tensor | None" = None,
                return_lse: bool = False):
    """Prediction and attention of a resolved call on model-order q, k, v, with one backend choice: the op,
    or its body directly.

    ``on_mask(mask)`` sees each mask predicted when the body runs directly (never through the op).
    ``step_sparsity`` and ``reuse``: see :func:`sparse_attention_op`; as tensors (what compiled code
    passes) the op is always used, and eager code may pass ``reuse`` as a :class:`ReuseAt`.
    ``return_lse``: ``(out, lse)``, each row's log-sum-exp ``[B, Hq, S]`` in model order (not with
    ``step_sparsity`` or ``reuse``).
    """
    if return_lse:
        if step_sparsity is not None or reuse is not None:
            raise ValueError("return_lse=True is not combined with a per-step sparsity or mask reuse")
        if choice.obj is not None or runs_directly(q, k, v):
            lse = empty_lse(q)
            return _sparse_call_body(choice.obj or choice.spec, q, k, v, layout, rule, scale, bsnd_out, precision,
                                     on_mask, lse=lse), lse
        return sparse_attention_lse_op(q, k, v, layout_args(layout), rule.block_size, rule.scale, rule.keep,
                                       rule.sink_blocks, rule.text_blocks, rule.share_batch_mask, scale,
                                       choice.spec, bsnd_out, precision)
    if not isinstance(step_sparsity, torch.Tensor) and not isinstance(reuse, torch.Tensor) and (
            choice.obj is not None or runs_directly(q, k, v)):
        return _sparse_call_body(choice.obj or choice.spec, q, k, v, layout, rule, scale, bsnd_out, precision,
                                 on_mask, reuse)
    if choice.obj is not None:
        raise ValueError("a Backend object cannot cross the op boundary: with a per-step sparsity or mask reuse "
                         "under torch.compile, name a registered backend")
    if isinstance(reuse, ReuseAt):
        reuse = reuse.as_tensor(torch.empty(4, dtype=torch.int64))
    return sparse_attention_op(q, k, v, layout_args(layout), rule.block_size, rule.scale, rule.keep,
                               rule.sink_blocks, rule.text_blocks, rule.share_batch_mask, scale,
                               choice.spec, bsnd_out, precision, step_sparsity, reuse)


# --------------------------------------------------------------------------- no backward
NO_BACKWARD = ("RainFusion sparse attention has no backward: it is an inference kernel. To train or fine-tune, "
               "run attention dense there (handle.remove(), or keep those steps dense with a Schedule); for "
               "inference, run the model under torch.no_grad() or torch.inference_mode()")


def _no_backward(ctx, *grads):
    raise RuntimeError(NO_BACKWARD)


for _op in (sparse_attention_op, sparse_attention_lse_op, block_sparse_attention_op, block_sparse_attention_lse_op,
            predict_block_mask_op):
    _op.register_autograd(_no_backward)
