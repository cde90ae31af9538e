"""The ``rainfusion`` command (also ``python -m rainfusion_core``).

    rainfusion info                                  backends and devices
    rainfusion parity --backend NAME [--device DEV]  conformance table; exit 1 on failure
    rainfusion parity --all [--device DEV]           every available backend on the device
    rainfusion bench [--shape B,H,T,Hh,W,D] [--plot out.png]
    rainfusion mask --frames 4 --height 16 --width 24 --out mask.png
    rainfusion evaluate (--qkv FILE | --synthetic F,H,W) [--plot recall.png]
"""
from __future__ import annotations

import argparse
import sys

import torch

from . import registry
from .errors import BackendError


def _devices() -> list[str]:
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]
    npu = getattr(torch, "npu", None)  # present once torch_npu has been imported
    if npu is not None and npu.is_available():
        found += [f"npu:{i}" for i in range(npu.device_count())]
    return found


def cmd_info(args) -> int:
    rows = registry.list_backends()
    width = max(len("backend"), *(len(r.name) for r in rows))
    print(f"{'backend':<{width}} {'devices':<10} {'priority':>8}  {'available':<9}  reason")
    for r in rows:
        devices = ",".join(r.device_types) or "-"
        print(f"{r.name:<{width}} {devices:<10} {r.priority:>8}  {'yes' if r.available else 'no':<9}  {r.reason}")
    print("\ndevices present: " + ", ".join(_devices()))
    return 0


def cmd_parity(args) -> int:
    from .testing import DTYPES, check_backend, default_cases

    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")] if args.dtypes else list(DTYPES)
    device = args.device
    if args.all:
        device = device or "cpu"
        names = [r.name for r in registry.list_backends()
                 if r.available and registry.get_backend(name=r.name).runs_on(torch.device(device).type)]
    elif args.backend:
        names = [args.backend]
    else:
        print("rainfusion parity: give --backend NAME or --all", file=sys.stderr)
        return 2
    failed = False
    for name in names:
        backend = registry.get_backend(name=name)
        cases = default_cases(tuple(backend.head_dims or (32, 64, 128)), long=not args.quick)
        print(f"== {name} ==", flush=True)
        report = check_backend(backend, device=device, dtypes=dtypes, cases=cases)
        print(report.table(), flush=True)
        if args.all and all(r.verdict == "refused" for r in report.rows):
            print(f"({name} refuses every case with these dtypes: not compared)")
            continue
        failed |= not report.passed
    return 1 if failed else 0


PRESETS = {"small": (1, 4, 8, 16, 32, 64), "wan1.3b": (1, 12, 21, 30, 52, 128), "wan14b": (1, 40, 21, 45, 80, 128)}


def cmd_bench(args) -> int:
    import torch.nn.functional as F

    from .api import sparse_attention
    from .benchmarking import median_ms
    from .layout import VideoLayout
    from .synthetic import video_like_qkv

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.shape:
        try:
            batch, heads, frames, height, width, dim = (int(x) for x in args.shape.split(","))
        except ValueError:
            print(f"--shape must be six integers B,H,T,Hh,W,D, got {args.shape!r}", file=sys.stderr)
            return 2
    else:
        batch, heads, frames, height, width, dim = PRESETS["wan1.3b" if device.type == "cuda" else "small"]
    layout = VideoLayout(frames, height, width)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = video_like_qkv(layout, heads, dim, batch=batch, device=device, dtype=dtype, seed=0)
    print(f"bench on {device}: B={batch} H={heads} {frames}x{height}x{width} (S={layout.seq_len}) D={dim} {dtype}",
          flush=True)
    dense_ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v), device, repeats=args.repeats)
    print(f"  dense SDPA: {dense_ms:.2f} ms", flush=True)
    sparsities = [float(s) for s in args.sparsity.split(",")]
    results = []
    for i, sparsity in enumerate(sparsities, 1):
        ms = median_ms(lambda: sparse_attention(q, k, v, layout, sparsity=sparsity, backend=args.backend),
                       device, repeats=args.repeats)
        results.append(ms)
        print(f"  [{i}/{len(sparsities)}] sparsity {sparsity:.2f}: {ms:.2f} ms ({dense_ms / ms:.2f}x dense)", flush=True)
    if args.plot:
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(sparsities, results, "o-", label="rf.sparse_attention")
        ax.axhline(dense_ms, color="gray", linestyle="--", label="dense SDPA")
        ax.set(xlabel="sparsity", ylabel="ms (median)", title=f"S={layout.seq_len} H={heads} D={dim} on {device}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot written to {args.plot}")
    return 0


def cmd_mask(args) -> int:
    from .layout import VideoLayout
    from .permutation import build_permutation
    from .prediction import predict_block_mask
    from .synthetic import video_like_qkv

    layout = VideoLayout(args.frames, args.height, args.width, text_len=args.text_len)
    q, k, _ = video_like_qkv(layout, args.head + 1, 64, seed=0)
    perm = build_permutation(layout)
    mask = predict_block_mask(perm.apply(q, 2), perm.apply(k, 2), layout, sparsity=args.sparsity,
                              block_size=args.block_size)
    image = mask.dense[0, args.head].float().numpy()
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.imshow(image, cmap="Greys", interpolation="nearest", vmin=0, vmax=1)
    ax.set(xlabel="key block", ylabel="query block",
           title=f"{layout.frames}x{layout.height}x{layout.width}, sparsity {args.sparsity}, density {mask.density:.2f}")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"{mask.shape[2]}x{mask.shape[3]} blocks, density {mask.density:.3f}; written to {args.out}")
    return 0


def cmd_evaluate(args) -> int:
    from .layout import VideoLayout
    from .quality import evaluate, load_qkv
    from .synthetic import video_dit_qkv

    if bool(args.qkv) == bool(args.synthetic):
        print("rainfusion evaluate: give --qkv FILE or --synthetic F,H,W", file=sys.stderr)
        return 2
    if args.qkv:
        q, k, v, layout, meta = load_qkv(args.qkv)
        source = f"{args.qkv} {meta or ''}".strip()
    else:
        try:
            frames, height, width = (int(x) for x in args.synthetic.split(","))
        except ValueError:
            print(f"--synthetic must be three integers F,H,W, got {args.synthetic!r}", file=sys.stderr)
            return 2
        layout = VideoLayout(frames, height, width)
        q, k, v = video_dit_qkv(layout, args.heads, args.head_dim, seed=args.seed)
        source = f"synthetic video-DiT q/k/v, seed {args.seed}"
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    q, k, v = (x.to(device) for x in (q, k, v))
    print(f"evaluating {source}: {tuple(q.shape)} {q.dtype}, {layout}", flush=True)
    report = evaluate(q, k, v, layout, sparsities=[float(s) for s in args.sparsity.split(",")],
                      block_size=args.block_size, backend=args.backend)
    print(report.table())
    if args.plot:
        _pyplot()
        report.plot(args.plot)
        print(f"plot written to {args.plot}")
    return 0


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("this command draws with matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rainfusion", description="RainFusion2.0 sparse attention tools")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="backends and devices").set_defaults(func=cmd_info)

    p = sub.add_parser("parity", help="conformance table of a backend against the float64 golden")
    p.add_argument("--backend", help="backend name")
    p.add_argument("--all", action="store_true", help="every available backend that runs on --device")
    p.add_argument("--device", help="device to run on (default: the backend's first device type)")
    p.add_argument("--dtypes", help="comma-separated, e.g. float16,bfloat16 (default: all four)")
    p.add_argument("--quick", action="store_true", help="skip the cases above 4K tokens")
    p.set_defaults(func=cmd_parity)

    p = sub.add_parser("bench", help="sparse vs dense time on a video shape")
    p.add_argument("--shape", help="B,H,T,Hh,W,D (default: small on CPU, Wan2.1-1.3B on GPU)")
    p.add_argument("--device")
    p.add_argument("--backend")
    p.add_argument("--sparsity", default="0.5,0.8,0.9", help="comma-separated sparsities")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--plot", help="write a PNG of time vs sparsity here")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("mask", help="draw the predicted block mask of a layout as a PNG")
    p.add_argument("--frames", type=int, required=True)
    p.add_argument("--height", type=int, required=True)
    p.add_argument("--width", type=int, required=True)
    p.add_argument("--text-len", type=int, default=0)
    p.add_argument("--sparsity", type=float, default=0.8)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--head", type=int, default=0)
    p.add_argument("--out", default="mask.png")
    p.set_defaults(func=cmd_mask)

    p = sub.add_parser("evaluate", help="recall and error of the mask variants on captured or synthetic q/k/v")
    p.add_argument("--qkv", help="a file written by rainfusion_core.quality.save_qkv")
    p.add_argument("--synthetic", help="F,H,W: evaluate on synthetic video-DiT activations of this grid")
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sparsity", default="0.5,0.8,0.9")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--device")
    p.add_argument("--backend", help="backend for the sparse outputs (default: best for the device)")
    p.add_argument("--plot", help="write a PNG of recall vs sparsity here")
    p.set_defaults(func=cmd_evaluate)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (BackendError, ValueError, TypeError) as exc:
        print(f"rainfusion {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
