"""How much attention a block mask keeps, and what each RainFusion2.0 idea buys.

* :func:`attention_recall` -- softmax mass that falls in kept blocks, exactly.
* :func:`oracle_block_mask` -- the best mask with the same kept count per row.
* :func:`evaluate` -- compares ``rainfusion``, ``no_permutation``, ``no_sink``,
  ``oracle`` and ``random`` across sparsities: density, recall, output error; and
  ``fp8`` / ``fp8_dense``, what ``precision="fp8"`` adds to the error with and
  without sparsity.

Everything runs blockwise over query rows (memory ``O(rows x S)``, never
``O(S^2)``) on the inputs' device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ._checks import check_block_size, check_qkv, check_sparsity, default_scale, describe
from .api import block_sparse_attention
from .backend import Backend
from .block_mask import BlockMask, check_mask_matches, num_blocks, query_chunks
from .capture import load_qkv, save_qkv  # noqa: F401  (the capture format, also reachable from here)
from .dtypes import accumulation_dtype
from .files import save_figure
from .layout import VideoLayout
from .mask_rule import MaskRule
from .permutation import build_permutation
from .precision import TABLE, Precision
from .prediction import predict_block_mask
from .progress import progress
from .registry import get_backend, refusal_reasons

#: each precision's evaluator rows (``precision.TABLE``): row -> (precision, whether every block is kept)
_PRECISION_ROWS = {row: (p, kept_all) for p in TABLE.values() for row, kept_all in zip(p.evaluator_rows, (False, True))}
VARIANTS = ("rainfusion", "no_permutation", "no_sink", "oracle", "random", *_PRECISION_ROWS)
CHUNK_ELEMENTS = 1 << 25


def _log_probs(q, k, start, stop, scale, dtype):
    """``log softmax(scale * q k^T)`` of query rows ``[start, stop)`` over all keys, ``[B, Hq, rows, Sk]``."""
    kv_heads = k.shape[1]
    grouped = q[:, :, start:stop].unflatten(1, (kv_heads, q.shape[1] // kv_heads)).to(dtype)
    scores = (grouped @ k.unsqueeze(2).to(dtype).transpose(-1, -2)).flatten(1, 2) * scale
    return torch.log_softmax(scores, dim=-1)


def attention_recall(q: torch.Tensor, k: torch.Tensor, block_mask: BlockMask, *, scale: float | None = None) -> torch.Tensor:
    """Mean over query tokens of the softmax probability mass inside kept blocks, ``[B, Hq]``.

    ``q [B, Hq, Sq, D]``, ``k [B, Hkv, Sk, D]`` in the order the mask was made
    for. Exact (float64 for float64 inputs, float32 otherwise), blockwise.
    """
    check_qkv(q, k, k)
    check_mask_matches(q, k, block_mask)
    scale = default_scale(scale, q.shape[-1])
    dtype = accumulation_dtype(q.dtype)
    total = torch.zeros(q.shape[:2], dtype=dtype, device=q.device)
    for start, stop in query_chunks(q.shape[2], k.shape[2], q.shape[0] * q.shape[1], block_mask.block_size,
                                    CHUNK_ELEMENTS):
        log_p = _log_probs(q, k, start, stop, scale, dtype)
        kept = block_mask.token_mask(start, stop)
        mass = torch.logsumexp(log_p.masked_fill(~kept, float("-inf")), dim=-1).exp()  # 0 for empty rows
        total += mass.sum(dim=-1)
    return total / q.shape[2]


def block_attention_mass(q: torch.Tensor, k: torch.Tensor, *, block_size: int = 128, scale: float | None = None) -> torch.Tensor:
    """True attention mass of each (query block, key block) tile, summed over the block's queries.

    Returns ``[B, Hq, NQ, NK]``; each row sums to the number of queries in that block.
    """
    check_qkv(q, k, k)
    block_size = check_block_size(block_size)
    scale = default_scale(scale, q.shape[-1])
    dtype = accumulation_dtype(q.dtype)
    kv_len = k.shape[2]
    nq, nk = num_blocks(q.shape[2], block_size), num_blocks(kv_len, block_size)
    key_block = torch.arange(kv_len, device=q.device) // block_size
    mass = torch.zeros(q.shape[0], q.shape[1], nq, nk, dtype=dtype, device=q.device)
    for start, stop in query_chunks(q.shape[2], kv_len, q.shape[0] * q.shape[1], block_size, CHUNK_ELEMENTS):
        probs = _log_probs(q, k, start, stop, scale, dtype).exp()  # [B, H, rows, Sk]
        per_key_block = torch.zeros(*probs.shape[:3], nk, dtype=dtype, device=q.device)
        per_key_block.index_add_(3, key_block, probs)
        query_block = torch.arange(start, stop, device=q.device) // block_size
        mass.index_add_(2, query_block, per_key_block)
    return mass


def _keep_top(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Bool mask keeping the ``counts[..., i]`` largest entries of each row of ``scores``."""
    order = scores.argsort(dim=-1, descending=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return rank < counts.unsqueeze(-1)


def oracle_block_mask(
    q: torch.Tensor, k: torch.Tensor, keep_per_row, *, block_size: int = 128, scale: float | None = None
) -> BlockMask:
    """Per query block, the ``keep_per_row`` key blocks holding the most true attention mass.

    ``keep_per_row``: an int, or an int tensor ``[B, Hq, NQ]`` (e.g. another
    mask's ``kv_counts``, to compare at equal density). The recall ceiling of
    any predictor at that kept count.
    """
    mass = block_attention_mass(q, k, block_size=block_size, scale=scale)
    counts = torch.as_tensor(keep_per_row, device=q.device).expand(mass.shape[:3])
    return BlockMask.from_dense(_keep_top(mass, counts), block_size=block_size, q_len=q.shape[2], kv_len=k.shape[2])


def _predicted_top(q, k, layout: VideoLayout, like: BlockMask, scale: float) -> BlockMask:
    """RainFusion2.0's pooled-score choice with no first-frame sink, at ``like``'s kept count per row.

    The budget the sink's forced blocks took is spent on the next best predicted
    blocks instead, so comparing with ``like`` isolates what the sink buys at equal
    density. Text blocks stay first in line (they are forced in both).
    """
    block = like.block_size
    rule = MaskRule.for_layout(layout, k.shape[2], q.shape[-1], sparsity=0.0, block_size=block, first_frame_sink=False,
                               scale=scale)  # the rule's scores; this variant's own budget and no sink
    probs = torch.softmax(rule.scores(q, k) * rule.scale, dim=-1)
    text = rule.text_blocks
    if text:
        probs[..., probs.shape[-1] - text:] += 2.0  # above any probability: kept first
    return BlockMask.from_dense(_keep_top(probs, like.kv_counts), block_size=block, q_len=like.q_len,
                                kv_len=like.kv_len)


def random_block_mask(like: BlockMask, *, generator: torch.Generator | None = None) -> BlockMask:
    """Random key blocks with exactly the kept count per row of ``like``."""
    noise = torch.rand(like.dense.shape, generator=generator).to(like.device)
    return BlockMask.from_dense(_keep_top(noise, like.kv_counts), block_size=like.block_size,
                                q_len=like.q_len, kv_len=like.kv_len)


@dataclass(frozen=True)
class QualityRow:
    variant: str
    sparsity: float
    density: float
    recall: float
    rel_l2: float
    cosine: float


@dataclass
class QualityReport:
    """Rows of :func:`evaluate`, one per (sparsity, variant)."""

    rows: list[QualityRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def get(self, variant: str, sparsity: float) -> QualityRow:
        return next(r for r in self.rows if r.variant == variant and math.isclose(r.sparsity, sparsity))

    def table(self) -> str:
        lines = [f"{'sparsity':>8} {'variant':<15} {'density':>8} {'recall':>8} {'rel L2':>8} {'cosine':>8}"]
        for r in self.rows:
            lines.append(f"{r.sparsity:>8.2f} {r.variant:<15} {r.density:>8.3f} {r.recall:>8.4f} "
                         f"{r.rel_l2:>8.4f} {r.cosine:>8.4f}")
        return "\n".join(lines + self.notes)

    __str__ = table

    def plot(self, path) -> None:
        """Recall vs sparsity per variant, as a PNG (needs matplotlib)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for variant in dict.fromkeys(r.variant for r in self.rows):
            rows = [r for r in self.rows if r.variant == variant]
            ax.plot([r.sparsity for r in rows], [r.recall for r in rows], "o-", label=variant)
        ax.set(xlabel="sparsity", ylabel="attention recall", title="attention mass kept by the block mask")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        save_figure(fig, path, dpi=120)
        plt.close(fig)


def evaluate(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: VideoLayout,
    *,
    sparsities=(0.5, 0.8, 0.9),
    variants=VARIANTS,
    block_size: int = 128,
    scale: float | None = None,
    backend="torch",
    seed: int = 0,
) -> QualityReport:
    """Compare mask variants on BNSD ``q, k, v`` in the model's token order.

    Variants: ``rainfusion`` (permutation + block-mean prediction + sink),
    ``no_permutation`` (prediction on the raw order), ``no_sink`` (no forced
    first frame; its blocks' budget goes to the next best predicted blocks, so
    each row keeps as many blocks as rainfusion's), ``oracle`` (true top
    blocks at rainfusion's kept count per row), ``random`` (random blocks at
    that count). ``fp8``: rainfusion's mask with ``precision="fp8"``; ``fp8_dense``: every
    block kept, in FP8 (one row, at sparsity 0), so the error of each of sparsity and
    precision can be read apart. FP8 runs on ``backend``'s FP8 kernel when it offers one,
    else through :func:`~rainfusion_core.fp8.fp8_reference_attention` (same
    roundings; the report says so). Columns: tile density,
    attention recall, relative L2 error and cosine similarity of the output
    against dense attention.
    """
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"variants must be among {VARIANTS}, got {sorted(unknown)}")
    check_qkv(q, k, v)
    block_size = check_block_size(block_size)
    _check_layout_of(layout, q, k, v)
    sparsities = _check_sparsities(sparsities)
    scale = default_scale(scale, q.shape[-1])
    with progress(total=1 + len(sparsities) * len(variants), desc="evaluate", unit="step") as bar:
        bar.set_postfix_str("dense reference")
        perm, (qp, kp, vp), full, dense = _dense_reference(q, k, v, layout, block_size, scale, backend)
        dense_model_order = perm.undo(dense, 2) if "no_permutation" in variants else None
        bar.update()
        gen = torch.Generator().manual_seed(seed)
        report = QualityReport()
        in_precision = {p.name: _precision_attention(backend, p, qp, kp, vp, full, report)
                        for p in {_PRECISION_ROWS[v][0] for v in variants if v in _PRECISION_ROWS}}
        for variant in (v for v in variants if _PRECISION_ROWS.get(v, (None, False))[1]):  # every block kept
            bar.set_postfix_str(variant)
            out = in_precision[_PRECISION_ROWS[variant][0].name](qp, kp, vp, full, scale).double()
            report.rows.append(QualityRow(variant, 0.0, 1.0, 1.0, *_errors(out, dense)))
        for sparsity in sparsities:
            predicted = predict_block_mask(qp, kp, layout, sparsity=sparsity, block_size=block_size, scale=scale)
            for variant in (v for v in variants if not _PRECISION_ROWS.get(v, (None, False))[1]):
                bar.set_postfix_str(f"sparsity {sparsity:g} {variant}")
                order_q, order_k, order_v, ref = qp, kp, vp, dense
                if variant == "rainfusion" or variant in _PRECISION_ROWS:
                    mask = predicted
                elif variant == "no_sink":
                    mask = _predicted_top(qp, kp, layout, predicted, scale)
                elif variant == "oracle":
                    mask = oracle_block_mask(qp, kp, predicted.kv_counts, block_size=block_size, scale=scale)
                elif variant == "random":
                    mask = random_block_mask(predicted, generator=gen)
                else:  # no_permutation: the same method on the raw token order
                    order_q, order_k, order_v = q, k, v
                    ref = dense_model_order
                    mask = predict_block_mask(q, k, layout, sparsity=sparsity, block_size=block_size, scale=scale)
                if variant in _PRECISION_ROWS:
                    out = in_precision[_PRECISION_ROWS[variant][0].name](qp, kp, vp, mask, scale).double()
                else:
                    out = block_sparse_attention(order_q, order_k, order_v, mask, scale=scale,
                                                 backend=backend).double()
                recall = float(attention_recall(order_q, order_k, mask, scale=scale).mean())
                report.rows.append(QualityRow(variant, sparsity, mask.density, recall, *_errors(out, ref)))
                bar.update()
    _add_findings(report, sparsities, variants)
    return report


def evaluate_reuse(
    earlier: tuple[torch.Tensor, torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: VideoLayout,
    *,
    sparsities=(0.5, 0.8, 0.9),
    block_size: int = 128,
    scale: float | None = None,
    backend="torch",
) -> QualityReport:
    """What reusing a mask costs (``apply_rainfusion(refresh_every=N)``): BNSD ``q, k, v`` of a later step
    attended with the mask predicted from ``earlier = (q, k)`` of an earlier step of the same layer.

    Rows per sparsity: ``rainfusion`` (the later step's own mask) and ``reused`` (the earlier
    step's mask on the later step's q, k, v); columns as in :func:`evaluate`, against the later
    step's dense attention. A note per sparsity says how many of the fresh mask's tiles the
    reused one keeps and how much reuse moves the error.
    """
    if not (isinstance(earlier, (tuple, list)) and len(earlier) == 2):
        raise TypeError(f"earlier must be (q, k) of an earlier step, got {describe(earlier)}")
    check_qkv(q, k, v)
    _check_layout_of(layout, q, k, v)
    block_size = check_block_size(block_size)
    sparsities = _check_sparsities(sparsities)
    for name, x, want in (("q", earlier[0], q), ("k", earlier[1], k)):
        if not isinstance(x, torch.Tensor) or x.shape != want.shape:
            raise ValueError(f"the earlier step's {name} is {describe(x)}, the later step's has shape "
                             f"{tuple(want.shape)}: reuse needs captures of one layer at two steps")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"the earlier step's {name} holds NaN or infinite values: its mask would keep every "
                             "tile, which says nothing about reuse")
    scale = default_scale(scale, q.shape[-1])
    report = QualityReport()
    with progress(total=1 + len(sparsities), desc="evaluate reuse", unit="step") as bar:
        bar.set_postfix_str("dense reference")
        perm, (qp, kp, vp), _, dense = _dense_reference(q, k, v, layout, block_size, scale, backend)
        old_q, old_k = (perm.apply(x.to(device=q.device, dtype=q.dtype), 2) for x in earlier)
        bar.update()
        for sparsity in sparsities:
            bar.set_postfix_str(f"sparsity {sparsity:g}")
            rows = {}
            for variant, (mq, mk) in (("rainfusion", (qp, kp)), ("reused", (old_q, old_k))):
                mask = predict_block_mask(mq, mk, layout, sparsity=sparsity, block_size=block_size, scale=scale)
                out = block_sparse_attention(qp, kp, vp, mask, scale=scale, backend=backend).double()
                recall = float(attention_recall(qp, kp, mask, scale=scale).mean())
                rows[variant] = (mask, QualityRow(variant, sparsity, mask.density, recall, *_errors(out, dense)))
            (fresh, own), (reused, row) = rows["rainfusion"], rows["reused"]
            report.rows += [own, row]
            shared = float((fresh.dense & reused.dense).sum()) / max(1, int(fresh.dense.sum()))
            report.notes.append(f"sparsity {sparsity:.2f}: the earlier step's mask keeps {shared:.0%} of the tiles "
                                f"the later step's own mask keeps; reuse moves the error against dense attention "
                                f"from rel L2 {own.rel_l2:.4f} to {row.rel_l2:.4f} (recall {own.recall:.4f} to "
                                f"{row.recall:.4f})")
            bar.update()
    return report


def _check_sparsities(sparsities) -> tuple[float, ...]:
    """``sparsities`` as a non-empty tuple of checked floats (one number counts as a list of one)."""
    if isinstance(sparsities, (int, float)) and not isinstance(sparsities, bool):
        sparsities = (sparsities,)
    if not isinstance(sparsities, (list, tuple)) or not sparsities:
        raise TypeError(f"sparsities must be a non-empty list of floats in [0, 1), got {describe(sparsities)}")
    return tuple(check_sparsity(x) for x in sparsities)


def _check_layout_of(layout, q, k, v) -> None:
    if not isinstance(layout, VideoLayout):
        raise TypeError(f"layout must be a rainfusion_core.VideoLayout, got {describe(layout)}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.shape[2] != layout.seq_len:
            raise ValueError(f"{name} has {x.shape[2]} tokens (BNSD dim 2) but layout.seq_len is "
                             f"{layout.seq_len} for {layout}")


def _dense_reference(q, k, v, layout: VideoLayout, block_size: int, scale: float, backend):
    """``(permutation, permuted (q, k, v), the all-kept mask, dense output in float64)`` of model-order BNSD inputs."""
    perm = build_permutation(layout, q.device)
    permuted = perm.apply(q, 2), perm.apply(k, 2), perm.apply(v, 2)
    full = BlockMask.from_dense(
        torch.ones(q.shape[0], q.shape[1], num_blocks(q.shape[2], block_size), num_blocks(k.shape[2], block_size),
                   dtype=torch.bool, device=q.device),
        block_size=block_size, q_len=q.shape[2], kv_len=k.shape[2],
    )
    return perm, permuted, full, block_sparse_attention(*permuted, full, scale=scale, backend=backend).double()


def _errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """Relative L2 error and cosine similarity of ``out`` against ``ref``."""
    rel = float((out - ref).norm() / ref.norm())
    return rel, float(torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0))


def _precision_attention(backend, precision: Precision, q, k, v, full: BlockMask, report: QualityReport):
    """``run(q, k, v, mask, scale)`` in ``precision``: the backend's kernel where it takes these inputs in it,
    else the precision's reference.

    A precision's rows are a measurement of its recipe, so where the kernel cannot run them (no
    kernel in that precision, float32 inputs, a head dim or block size it lacks) they come from
    the recipe's float64 reference, which rounds as the kernel does, and the report says why.
    """
    chosen = backend if isinstance(backend, Backend) else get_backend(str(q.device) if backend is None else backend)
    reasons = refusal_reasons(chosen, q, k, v, full, precision.name)
    if not reasons:
        return lambda q, k, v, mask, scale: block_sparse_attention(q, k, v, mask, scale=scale, backend=backend,
                                                                   precision=precision.name)
    report.notes.append(f"{precision.name} rows: backend {chosen.name!r} cannot run them: "
                        f"{'; '.join(reasons)}. They come from the {precision.name.upper()} reference "
                        f"(rainfusion_core.{precision.recipe}), which rounds q, k, v and P as the kernel does")
    return precision.reference


def _add_findings(report: QualityReport, sparsities, variants) -> None:
    """Say in words what the permutation, the sink and FP8 did on this data (or that they did not)."""
    for sparsity in sparsities:
        if "rainfusion" not in variants:
            return
        for variant in (v for v in variants if v in _PRECISION_ROWS and not _PRECISION_ROWS[v][1]):
            base, low = report.get("rainfusion", sparsity), report.get(variant, sparsity)
            report.notes.append(f"sparsity {sparsity:.2f}: {_PRECISION_ROWS[variant][0].name.upper()} moves the error "
                                f"against dense attention from rel L2 {base.rel_l2:.4f} to {low.rel_l2:.4f} (cosine "
                                f"{base.cosine:.4f} to {low.cosine:.4f})")
        rf_row = report.get("rainfusion", sparsity)
        if "oracle" in variants:
            ratio = rf_row.recall / max(report.get("oracle", sparsity).recall, 1e-12)
            report.notes.append(f"sparsity {sparsity:.2f}: rainfusion recall is {ratio:.3f} x the oracle's")
        for variant, idea in (("no_permutation", "the permutation"), ("no_sink", "the first-frame sink")):
            if variant in variants:
                other = report.get(variant, sparsity)
                by_recall = _verdict(rf_row.recall - other.recall)
                by_error = _verdict(other.rel_l2 - rf_row.rel_l2)
                report.notes.append(
                    f"sparsity {sparsity:.2f}: {idea} {by_recall} recall and {by_error} output error on this data "
                    f"(recall {other.recall:.4f} without, {rf_row.recall:.4f} with; rel L2 {other.rel_l2:.4f} "
                    f"without, {rf_row.rel_l2:.4f} with; density {other.density:.3f} vs {rf_row.density:.3f})"
                )


def _verdict(gain: float) -> str:
    return "helps" if gain > 1e-3 else "does not change" if gain > -1e-3 else "hurts"
