"""Timing and machine-naming helpers shared by the CLI, the demo and the benchmark scripts."""
from __future__ import annotations

import platform
import statistics
import time

import torch


def median_ms(fn, device, *, repeats: int = 5) -> float:
    """Median time of ``fn()`` in milliseconds after one warm-up call.

    On CUDA this is ``triton.testing.do_bench`` (events, median) when Triton is
    installed; elsewhere a host clock around synchronised calls.
    """
    device = torch.device(device)
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            pass
        else:
            return do_bench(fn, warmup=25, rep=max(100, 20 * repeats), return_mode="median")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def event_median_ms(fn, *, repeats: int) -> float:
    """Median of exactly ``repeats`` CUDA-event timings of ``fn()`` after one warm-up call.

    For long calls (a whole transformer forward) where :func:`median_ms`'s time budget
    would allow a single run.
    """
    fn()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def host_us(fn, calls: int = 200) -> float:
    """Host time per call of ``fn`` on a CUDA GPU, in microseconds, calls issued back to back after one warm-up
    (it equals the GPU time once the launch queue is full)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def comma_choices(parser, option: str, value: str, choices) -> list[str]:
    """The comma-separated names in ``value`` (the benchmark scripts' ``option``), each one of
    ``choices``; an unknown name is the parser's one-line error naming the option."""
    names = value.split(",")
    unknown = [n for n in names if n not in choices]
    if unknown:
        parser.error(f"{option}: unknown {', '.join(unknown)}; choose from {', '.join(choices)}")
    return names


def require_hopper(parser) -> None:
    """Stop a GPU benchmark script with its parser's one-line error where no NVIDIA Hopper GPU is present."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        parser.error("needs an NVIDIA Hopper GPU (sm_90)")


def kernel_bench_args(parser, shapes, precisions, *, default_shapes: str, rounds_help: str):
    """``(shape names, precisions, rounds)`` of a Hopper kernel benchmark's ``--shapes``, ``--precisions``
    and ``--rounds`` (default 2), each checked with a one-line error; then the same for a missing Hopper GPU."""
    parser.add_argument("--shapes", default=default_shapes, help=f"comma-separated, of: {', '.join(shapes)}")
    parser.add_argument("--precisions", default=",".join(precisions),
                        help=f"comma-separated, of: {', '.join(precisions)}")
    parser.add_argument("--rounds", type=int, default=2, help=rounds_help)
    args = parser.parse_args()
    names = comma_choices(parser, "--shapes", args.shapes, shapes)
    chosen = comma_choices(parser, "--precisions", args.precisions, precisions)
    if args.rounds < 1:
        parser.error(f"--rounds: at least 1, got {args.rounds}")
    require_hopper(parser)
    return names, chosen, args.rounds


def print_summary(header: list[str], rows: list[str]) -> None:
    """A benchmark's closing Markdown table: ``header``'s cells, then ``rows`` (already ``| ... |`` lines)."""
    print("\n==== summary ====")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    print("\n".join(rows))


def device_name(device) -> str:
    """What a timing ran on: the GPU's name, or the CPU's model name and the threads torch uses.

    Speed-ups on CPUs differ by model and instruction set (see the README), so every printed
    CPU figure names the processor it came from.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type != "cpu":
        return str(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def synthetic_video_problem(layout, heads: int, head_dim: int, device, *, sparsity: float = 0.8):
    """A benchmark's inputs at one video shape: ``(q, k, v, perm, (qp, kp, vp), mask)``.

    q, k, v are ``synthetic.video_dit_qkv``'s bf16 activations (seed 0) in model order, ``[1, H, S, D]``;
    ``qp, kp, vp`` their contiguous copies in ``perm``'s order; ``mask`` predicted from those at ``sparsity``.
    """
    from .permutation import build_permutation
    from .prediction import predict_block_mask
    from .synthetic import video_dit_qkv

    print(f"== building synthetic activations: {heads} heads, {layout.seq_len} tokens ...", flush=True)
    q, k, v = video_dit_qkv(layout, heads, head_dim, device=device, dtype=torch.bfloat16, seed=0)
    perm = build_permutation(layout, device)
    permuted = tuple(perm.apply(x, 2).contiguous() for x in (q, k, v))
    mask = predict_block_mask(permuted[0], permuted[1], layout, sparsity=sparsity)
    return q, k, v, perm, permuted, mask


def hopper_kernel_operands(k, v, precision: str) -> tuple:
    """``(k, v, launch keywords)`` of already permuted ``[B, H, S, D]`` k and v as the Hopper kernel
    (``backends/triton/hopper/attention.launch``) takes them, so that a benchmark times the kernel alone:
    in 16 bits k and v themselves (a call on permuted inputs TMA can read passes them without a copy), in
    FP8 the quantised k and transposed v with their scales (what the call's quantisation pass writes).
    ``precision`` names a row of ``rainfusion_core.precision.TABLE``."""
    from .backends.triton.hopper import attention as ws
    from .fp8 import FP8_DTYPE
    from .precision import get_precision

    if get_precision(precision).operand_dtype == FP8_DTYPE:  # refuses a name the precision table lacks
        from .backends.triton.quantize import quantize_kv

        order = torch.arange(k.shape[2], device=k.device)
        k8, k_descale, v8t, v_descale = quantize_kv(k, v, order, ws.BLOCK)
        return k8, v8t, {"k_descale": k_descale, "v_descale": v_descale}
    return k, v, {}


def hopper_kernel_call(q, k, v, mask, scale: float, precision: str = "bf16"):
    """A call of the Hopper kernel alone on already permuted ``[B, H, S, D]`` q, k, v: the operands
    (``hopper_kernel_operands``), the output and the mask's tensors made once, here; each call of the
    returned function is one launch, and returns the output."""
    from .backends.triton.hopper import attention as ws

    k_op, v_op, extra = hopper_kernel_operands(k, v, precision)
    counts, indices = mask.kv_counts.contiguous(), mask.kv_indices.contiguous()
    order = torch.arange(q.shape[2], device=q.device)
    out = torch.empty_like(q)

    def launch():
        ws.launch(q, k_op, v_op, out, counts, indices, order, scale, **extra)
        return out
    return launch
