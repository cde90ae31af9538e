"""The ``rainfusion`` command (also ``python -m rainfusion_core``).

    rainfusion info                                  backends and devices
    rainfusion parity --backend NAME [--device DEV]  conformance table; exit 1 on failure
    rainfusion parity --all [--device DEV]           every available backend on the device
    rainfusion bench [--shape B,H,T,Hh,W,D] [--plot out.png]
    rainfusion mask --frames 4 --height 16 --width 24 --out mask.png
    rainfusion evaluate (--qkv FILE | --synthetic F,H,W) [--plot recall.png] [--reuse-from EARLIER]

Parsing imports nothing heavy: torch loads only when a command runs, so
``--help`` is instant. Every error is one line naming the option, exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys

DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64")
CPU_PRESET = (1, 4, 21, 16, 24, 64)  # B, H, T, Hh, W, D: the demo's shape, seconds on a 2-core CPU


class UsageError(Exception):
    """A bad option value found after parsing; printed as one line, exit status 2."""


# --------------------------------------------------------------------------- option types
def _ints(count: int, what: str):
    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(x) for x in text.split(","))
        except ValueError:
            values = ()
        if len(values) != count or any(x < 1 for x in values):
            raise argparse.ArgumentTypeError(f"expected {count} positive integers {what}, got {text!r}")
        return values

    return parse


def int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def sparsity_option(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def _sparsities(text: str) -> list[float]:
    return [sparsity_option(part) for part in text.split(",")]


def _dtypes(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",")]
    unknown = [n for n in names if n not in DTYPE_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown dtype {unknown[0]!r}; expected some of {', '.join(DTYPE_NAMES)}")
    return names


POSITIVE, NON_NEGATIVE = int_at_least(1), int_at_least(0)


class _DefaultsFormatter(argparse.HelpFormatter):
    """Adds ``(default: X)`` to an option's help only when the help does not say it already and X is a value."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or action.default in (None, argparse.SUPPRESS) or action.required
                or not action.option_strings):
            return text
        default = ",".join(map(str, action.default)) if isinstance(action.default, (list, tuple)) else action.default
        return f"{text} (default: {default})"


def _seed(text: str) -> int:
    value = int_at_least(0)(text)
    if value >= 2 ** 63:
        raise argparse.ArgumentTypeError(f"must be below 2**63, got {value}")
    return value


def _wan_preset() -> tuple[int, ...]:
    from .shapes import REFERENCE_HEAD_DIM, REFERENCE_SHAPES

    return (*REFERENCE_SHAPES["wan1.3b"][:5], REFERENCE_HEAD_DIM)


# --------------------------------------------------------------------------- run-time checks
def _check_memory(options: str, elements: int, device) -> None:
    """Refuse, before allocating, tensors of ``elements`` float32 values that ``device`` cannot hold."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        available = torch.cuda.mem_get_info(device)[1]
        where = f"{device} has {available / 2**30:.1f} GiB"
    else:
        try:
            available = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # no such query on this system: let the allocator decide
            return
        where = f"this machine has {available / 2**30:.1f} GiB"
    needed = elements * 4
    if needed > available:
        raise UsageError(f"{options}: this shape needs at least {needed / 2**30:.3g} GiB of tensors and {where}; "
                         "give a smaller one")

def _device(option: str, spec: str | None, default: str | None = None) -> str:
    """``spec`` (or ``default``, else the best device present) after checking that the device exists."""
    import torch

    from .registry import require_device

    spec = spec or default or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        require_device(spec)
    except Exception as exc:  # ValueError for a malformed string, BackendUnavailableError for a missing device
        raise UsageError(f"{option} {spec}: {exc}") from None
    return spec


def _input_file(option: str, path: str) -> str:
    if not os.path.exists(path):
        raise UsageError(f"{option} {path}: no such file")
    if os.path.isdir(path):
        raise UsageError(f"{option} {path}: is a directory, expected a file written by save_qkv")
    if not os.path.isfile(path):  # a named pipe, a device: reading it could block forever
        raise UsageError(f"{option} {path}: is not a regular file, expected a file written by save_qkv")
    return path


def _output_png(option: str, path: str) -> str:
    """The path a PNG will really be written to: refuse a directory, add ``.png`` when there is no suffix."""
    if not path.strip() or os.path.basename(path).startswith("."):
        raise UsageError(f"{option} {path!r}: give a file name such as out.png")
    if os.path.isdir(path):
        raise UsageError(f"{option} {path}: is a directory; give a file name such as {os.path.join(path, 'out.png')}")
    if not os.path.splitext(path)[1]:
        path += ".png"
    if os.path.splitext(path)[1].lower() != ".png":
        raise UsageError(f"{option} {path}: expected a .png file name")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"{option} {path}: the folder {parent} does not exist")
    return path


def _backend_line(spec, q, k, v, mask, precision: str) -> str:
    """Which backend runs this call, and for the C++ one what it runs with."""
    from .registry import select_backend

    chosen = select_backend(spec, q, k, v, mask, precision)
    if chosen.name == "cpu":
        from .backends.cpu import kernel_description

        return f"backend cpu ({kernel_description()})"
    return f"backend {chosen.name}"


# --------------------------------------------------------------------------- commands
def _devices() -> list[str]:
    import torch

    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    npu = getattr(torch, "npu", None)  # present once torch_npu has been imported
    if npu is not None and npu.is_available():
        found += [f"npu:{i}" for i in range(npu.device_count())]
    return found


def cmd_info(args) -> int:
    from . import registry

    rows = registry.list_backends()
    width = max(len("backend"), *(len(r.name) for r in rows))
    print(f"{'backend':<{width}} {'devices':<10} {'priority':>8}  {'available':<9}  reason")
    for r in rows:
        devices = ",".join(r.device_types) or "-"
        print(f"{r.name:<{width}} {devices:<10} {r.priority:>8}  {'yes' if r.available else 'no':<9}  {r.reason}")
    print("\ndevices present: " + ", ".join(_devices()))
    from .backends.cpu import kernel_description

    print(f"cpu kernel: {kernel_description()}")
    return 0


def cmd_parity(args) -> int:
    import torch

    from . import registry
    from .testing import DTYPES, check_backend, default_cases, kit_head_dims

    if not args.all and not args.backend:
        raise UsageError("give --backend NAME or --all")
    dtypes = [getattr(torch, d) for d in args.dtypes] if args.dtypes else list(DTYPES)
    device = _device("--device", args.device, "cpu") if args.device or args.all else None
    if args.all:
        names = [r.name for r in registry.list_backends()
                 if r.available and registry.get_backend(name=r.name).runs_on(torch.device(device).type)]
    else:
        names = [args.backend]
    failed = False
    for name in names:
        backend = registry.get_backend(name=name)
        cases = default_cases(kit_head_dims(backend), long=not args.quick)
        print(f"== {name} ==", flush=True)
        report = check_backend(backend, device=device, dtypes=dtypes, cases=cases, precision=args.precision)
        print(report.table(), flush=True)
        if args.all and all(r.verdict == "refused" for r in report.rows):
            print(f"({name} refuses every case with these dtypes: not compared)")
            continue
        failed |= not report.passed
    return 1 if failed else 0


def cmd_bench(args) -> int:
    import torch
    import torch.nn.functional as F

    from .api import plan_sparse_attention, sparse_attention
    from .benchmarking import device_name, median_ms
    from .call import crossover_reason
    from .files import save_figure
    from .layout import VideoLayout
    from .precision import get_precision
    from .registry import is_automatic
    from .synthetic import video_like_qkv

    device = torch.device(_device("--device", args.device))
    batch, heads, frames, height, width, dim = args.shape or (_wan_preset() if device.type == "cuda" else CPU_PRESET)
    layout = VideoLayout(frames, height, width)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    _check_memory("--shape", 4 * batch * heads * layout.seq_len * dim, device)  # q, k, v and an output
    q, k, v = video_like_qkv(layout, heads, dim, batch=batch, device=device, dtype=dtype, seed=0)
    print(f"bench on {device} ({device_name(device)}): B={batch} H={heads} {frames}x{height}x{width} "
          f"(S={layout.seq_len}) D={dim} {dtype}, synthetic video-like q/k/v", flush=True)
    plans = [plan_sparse_attention(q, k, layout, sparsity=sparsity, backend=args.backend, precision=args.precision)
             for sparsity in args.sparsity]  # before any timing: a backend or precision that cannot run fails now
    print(f"  {_backend_line(args.backend, q, k, v, plans[0].block_mask, args.precision)}", flush=True)
    dense_ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v), device, repeats=args.repeats)
    print(f"  dense SDPA: {dense_ms:.2f} ms", flush=True)
    results = []
    for i, (sparsity, plan) in enumerate(zip(args.sparsity, plans), 1):
        ms = median_ms(lambda: sparse_attention(q, k, v, layout, sparsity=sparsity, backend=args.backend,
                                                precision=args.precision, min_tokens=0), device, repeats=args.repeats)
        results.append(ms)
        dense_why = None
        if get_precision(args.precision).is_default and is_automatic(args.backend):  # a named backend always runs
            dense_why = crossover_reason(device.type, layout, sparsity, 128, None, None)
        rule = f"runs dense by default ({dense_why})" if dense_why else "runs sparse by default"
        print(f"  [{i}/{len(args.sparsity)}] sparsity {sparsity:.2f}: density {plan.density:.3f} (kept tiles, "
              f"first-frame sink included), sparse {ms:.2f} ms ({dense_ms / ms:.2f}x dense); {rule}", flush=True)
    if args.plot:
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(args.sparsity, results, "o-", label="rf.sparse_attention")
        ax.axhline(dense_ms, color="gray", linestyle="--", label="dense SDPA")
        ax.set(xlabel="sparsity", ylabel="ms (median)", title=f"S={layout.seq_len} H={heads} D={dim} on {device}")
        ax.legend()
        fig.tight_layout()
        save_figure(fig, args.plot, dpi=120)
        print(f"plot written to {args.plot}")
    return 0


def cmd_mask(args) -> int:
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    from .files import save_figure
    from .layout import VideoLayout
    from .permutation import build_permutation
    from .prediction import predict_block_mask
    from .synthetic import video_like_qkv

    plt = _pyplot()
    layout = VideoLayout(args.frames, args.height, args.width, text_len=args.text_len)
    _check_memory("--frames/--height/--width/--head", 4 * (args.head + 1) * layout.seq_len * 64, "cpu")
    q, k, _ = video_like_qkv(layout, args.head + 1, 64, seed=0)
    perm = build_permutation(layout)
    mask = predict_block_mask(perm.apply(q, 2), perm.apply(k, 2), layout, sparsity=args.sparsity,
                              block_size=args.block_size)
    image = mask.dense[0, args.head].float().numpy()
    fig, ax = plt.subplots(figsize=(6, 6.6))
    ax.imshow(image, cmap="Greys", interpolation="nearest", vmin=0, vmax=1)
    ax.set(xlabel=f"key block ({args.block_size} tokens each, permuted order)", ylabel="query block",
           title=f"{layout.frames}x{layout.height}x{layout.width}, head {args.head}, sparsity {args.sparsity}, "
                 f"density {mask.density:.2f}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(handles=[Patch(facecolor="black", label="kept (computed)"),
                       Patch(facecolor="white", edgecolor="gray", label="skipped")],
              loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=2, frameon=False)
    fig.text(0.5, 0.01, "q and k are synthetic video-like activations, not a model's", ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    save_figure(fig, args.out, dpi=120)
    plt.close(fig)
    print(f"{mask.shape[2]}x{mask.shape[3]} blocks of {args.block_size} tokens, density {mask.density:.3f} "
          f"(black = kept); written to {args.out}")
    return 0


def cmd_evaluate(args) -> int:
    from .layout import VideoLayout
    from .capture import load_qkv
    from .quality import evaluate
    from .synthetic import video_dit_qkv

    if args.reuse_from is not None and not args.qkv:
        raise UsageError("--reuse-from needs --qkv: the later step's capture of the same layer")
    if bool(args.qkv) == bool(args.synthetic):
        raise UsageError("give --qkv FILE or --synthetic F,H,W (one of them)")
    if args.qkv:
        try:
            q, k, v, layout, meta = load_qkv(_input_file("--qkv", args.qkv))
        except ValueError as exc:
            raise UsageError(f"--qkv {exc}") from None
        source = f"{args.qkv} {meta or ''}".strip()
    else:
        layout = VideoLayout(*args.synthetic)
        _check_memory("--synthetic/--heads/--head-dim", 4 * args.heads * layout.seq_len * args.head_dim, "cpu")
        q, k, v = video_dit_qkv(layout, args.heads, args.head_dim, seed=args.seed)
        source = f"synthetic video-DiT q/k/v, seed {args.seed}"
    device = _device("--device", args.device)
    q, k, v = (x.to(device) for x in (q, k, v))
    if args.reuse_from is not None:
        return _evaluate_reuse(args, q, k, v, layout, meta, source, device)
    print(f"evaluating {source}: {tuple(q.shape)} {q.dtype}, {layout}", flush=True)
    report = evaluate(q, k, v, layout, sparsities=args.sparsity, block_size=args.block_size, backend=args.backend)
    print(report.table())
    if args.plot:
        _pyplot()
        report.plot(args.plot)
        print(f"plot written to {args.plot}")
    return 0


def _evaluate_reuse(args, q, k, v, layout, meta: dict, source: str, device) -> int:
    from .capture import load_qkv
    from .quality import evaluate_reuse

    if args.plot:
        raise UsageError("--plot draws the mask variants; it does not go with --reuse-from")
    path = _input_file("--reuse-from", args.reuse_from)
    if os.path.samefile(path, args.qkv):
        raise UsageError(f"--reuse-from {path} is the --qkv capture itself: give the same layer at an earlier step")
    try:
        old_q, old_k, _, old_layout, old_meta = load_qkv(path)
    except ValueError as exc:
        raise UsageError(f"--reuse-from {exc}") from None
    if old_layout != layout or old_q.shape != q.shape or old_k.shape != k.shape:
        raise UsageError(f"--reuse-from {path} holds {tuple(old_q.shape)} q for {old_layout}, --qkv "
                         f"{tuple(q.shape)} for {layout}: give captures of one layer at two steps")
    if "layer" in meta and "layer" in old_meta and meta["layer"] != old_meta["layer"]:
        raise UsageError(f"--reuse-from {path} is layer {old_meta['layer']}, --qkv layer {meta['layer']}: a mask "
                         "is reused by its own layer")
    if "step" in meta and "step" in old_meta and not old_meta["step"] < meta["step"]:
        raise UsageError(f"--reuse-from {path} is step {old_meta['step']}, not earlier than --qkv's step "
                         f"{meta['step']}")
    print(f"evaluating mask reuse: the mask of {args.reuse_from} {old_meta or ''} on {source}: "
          f"{tuple(q.shape)} {q.dtype}, {layout}", flush=True)
    report = evaluate_reuse((old_q.to(device), old_k.to(device)), q, k, v, layout, sparsities=args.sparsity,
                            block_size=args.block_size, backend=args.backend)
    print(report.table())
    return 0


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UsageError("this command draws with matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --------------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``rainfusion mask: error: argument --head: must be >= 0, got -1``."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _precision_help() -> str:
    from .precision import TABLE

    return "; ".join(f"{p.name}: {p.help}" for p in TABLE.values())


def build_parser() -> argparse.ArgumentParser:
    from .precision import DEFAULT_PRECISION, PRECISIONS

    fmt = _DefaultsFormatter
    parser = _Parser(prog="rainfusion", description="RainFusion2.0 sparse attention tools", formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("info", help="list the backends (available or why not) and the devices present",
                       description="List the backends, their devices and priority, whether each is available "
                                   "here and why not, and the devices torch sees.", formatter_class=fmt)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("parity", help="conformance table of a backend against the float64 golden",
                       description="Run the conformance kit on a backend and print one row per case and dtype; "
                                   "exit status 1 when any case fails.", formatter_class=fmt)
    p.add_argument("--backend", metavar="NAME", help="backend name to check (see rainfusion info)")
    p.add_argument("--all", action="store_true", help="check every available backend that runs on --device")
    p.add_argument("--device", help="device to run on, e.g. cpu or cuda:0 (default: the backend's first device "
                                    "type; cpu with --all)")
    p.add_argument("--dtypes", type=_dtypes, metavar="LIST",
                   help="comma-separated dtypes to check (default: " + ",".join(DTYPE_NAMES) + ")")
    p.add_argument("--quick", action="store_true", help="skip the cases above 4K tokens")
    p.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_PRECISION,
                   help="check the backend in this precision, against its low-precision reference: "
                        + _precision_help())
    p.set_defaults(func=cmd_parity)

    p = sub.add_parser("bench", help="time sparse against dense attention on a video shape",
                       description="Median time of dense SDPA and of rf.sparse_attention (forced sparse) on "
                                   "synthetic video-like q/k/v, with the backend that runs, the mask density of "
                                   "each sparsity, and whether the dense crossover would run the call dense "
                                   "by default.",
                       formatter_class=fmt)
    p.add_argument("--shape", type=_ints(6, "B,H,T,Hh,W,D"), metavar="B,H,T,Hh,W,D",
                   help="batch, heads, frames, height, width, head dim (default: "
                        f"{','.join(map(str, CPU_PRESET))} on CPU, "
                        f"{','.join(map(str, _wan_preset()))} (Wan2.1-1.3B 480p) on GPU)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: the best device present)")
    p.add_argument("--backend", help="backend name or device string (default: automatic)")
    p.add_argument("--sparsity", type=_sparsities, default=[0.5, 0.8, 0.9], metavar="LIST",
                   help="comma-separated sparsities in [0, 1)")
    p.add_argument("--repeats", type=POSITIVE, default=5, help="timed calls per measurement")
    p.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_PRECISION,
                   help="precision of the sparse attention: " + _precision_help())
    p.add_argument("--plot", metavar="PNG", help="write a plot of time against sparsity here")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("mask", help="draw the predicted block mask of a layout as a PNG",
                       description="Predict the RainFusion2.0 block mask of synthetic video-like q/k for a latent "
                                   "grid and draw one head's mask (black = kept tile).", formatter_class=fmt)
    p.add_argument("--frames", type=POSITIVE, required=True, help="latent frames after patching")
    p.add_argument("--height", type=POSITIVE, required=True, help="latent rows per frame after patching")
    p.add_argument("--width", type=POSITIVE, required=True, help="latent columns per frame after patching")
    p.add_argument("--text-len", type=NON_NEGATIVE, default=0, help="text tokens joined to the video")
    p.add_argument("--sparsity", type=sparsity_option, default=0.8, help="fraction of key blocks to skip per row")
    p.add_argument("--block-size", type=POSITIVE, default=128, help="tokens per block")
    p.add_argument("--head", type=NON_NEGATIVE, default=0, help="which head to draw")
    p.add_argument("--out", default="mask.png", help="PNG file to write (.png is added when there is no suffix)")
    p.set_defaults(func=cmd_mask)

    p = sub.add_parser("evaluate", help="recall and error of the mask variants on captured or synthetic q/k/v",
                       description="Compare rainfusion, no_permutation, no_sink, oracle and random masks, and "
                                   "rainfusion and dense attention in FP8 (fp8, fp8_dense): density, attention "
                                   "recall, output error against dense attention.",
                       formatter_class=fmt)
    p.add_argument("--qkv", metavar="FILE", help="a file written by rainfusion_core.quality.save_qkv")
    p.add_argument("--synthetic", type=_ints(3, "F,H,W"), metavar="F,H,W",
                   help="evaluate on synthetic video-DiT activations of this latent grid")
    p.add_argument("--heads", type=POSITIVE, default=2, help="heads of the synthetic activations")
    p.add_argument("--head-dim", type=POSITIVE, default=64, help="head dim of the synthetic activations")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the synthetic activations (0 to 2**63 - 1)")
    p.add_argument("--sparsity", type=_sparsities, default=[0.5, 0.8, 0.9], metavar="LIST",
                   help="comma-separated sparsities in [0, 1)")
    p.add_argument("--block-size", type=POSITIVE, default=128, help="tokens per block")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: the best device present)")
    p.add_argument("--backend", help="backend for the sparse outputs (default: the best one for the device)")
    p.add_argument("--plot", metavar="PNG", help="write a plot of recall against sparsity here")
    p.add_argument("--reuse-from", metavar="FILE",
                   help="a capture of the same layer at an earlier step: compare --qkv's own mask with the mask "
                        "of this earlier capture reused on it (what apply_rainfusion(refresh_every=N) costs)")
    p.set_defaults(func=cmd_evaluate)
    return parser


def main(argv=None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 a failed check, 2 bad input)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, already printed in one line)
        return exc.code if isinstance(exc.code, int) else 2
    for option in ("plot", "out"):
        try:
            if getattr(args, option, None) is not None:
                setattr(args, option, _output_png(f"--{option}", getattr(args, option)))
        except UsageError as exc:
            return _fail(args.command, exc)
    from .errors import BackendError  # after parsing: --help and usage errors never import torch

    try:
        return args.func(args)
    except (UsageError, BackendError, ValueError, TypeError, OSError) as exc:
        return _fail(args.command, exc)
    except RuntimeError as exc:  # an allocation the up-front size check did not foresee: one line, not a traceback
        text = str(exc)
        if "out of memory" not in text.lower() and "can't allocate memory" not in text:
            raise
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        return _fail(args.command, UsageError(f"not enough memory for this shape ({first}); give a smaller one"))


def _fail(command: str, exc: Exception) -> int:
    message = " ".join(str(exc).split()) or type(exc).__name__
    print(f"rainfusion {command}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
