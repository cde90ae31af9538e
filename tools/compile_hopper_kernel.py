"""Compile the Hopper (sm_90a) attention kernel on any machine and count what it became.

    python tools/compile_hopper_kernel.py [--head-dim 128] [--fp8 | --lse] [--json]

No GPU is needed: Triton compiles Gluon for a named target and ships ``ptxas`` and
``cuobjdump``. Prints the shared memory the kernel takes and how many of each
instruction of interest its machine code holds: tensor-core products (``HGMMA`` for
16-bit, ``QGMMA`` for FP8), float8/bf16 packing (``F2FP``), local-memory spills
(``LDL``/``STL``), quarter-rate conversions (``I2F``) and ``EX2_UNDER_PV``, the softmax's
exponentials that run while the tensor cores compute ``P_t V_t`` (``SCHEDULES``'s late wait), and
``BAR_UNDER_SOFTMAX``, warpgroup barriers between the two waits of a tile (``SCHEDULES``'s joint
release leaves none), and ``LOOP``, the instructions of one consumer's loop over the kept tiles (what
each of its threads issues per tile; its rarely taken branches count too).
``tests/test_ws_kernel.py`` runs it to prove the kernel still builds where no Hopper GPU is present. Triton 3.6
(what the GPU test machines run) and later compile it; exits 3 when this Triton cannot compile Gluon ahead
of time. Run it without ``TRITON_INTERPRET``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

INSTRUCTIONS = ("HGMMA", "QGMMA", "F2FP", "LDL", "STL", "I2F")


def compile_kernel(head_dim: int, fp8: bool, lse: bool = False) -> tuple[int, str]:
    """``(shared memory bytes, SASS)`` of the kernel for one head dim and precision (``lse``: the
    16-bit build that also writes each row's log-sum-exp)."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from rainfusion_core.backends.triton.hopper import attention as ws

    k_dtype = torch.float8_e4m3fn if fp8 else torch.bfloat16
    block = ws.BLOCK
    desc_k = ws.kv_descriptor(torch.empty(1, 2, 4 * block, head_dim, dtype=k_dtype), "k")  # as launch makes them
    desc_v = ws.v8t_descriptor(torch.empty(1, 2, head_dim, 4 * block, dtype=k_dtype)) if fp8 else desc_k
    kernel = ws.block_sparse_attention_fwd_ws
    types = {"Q": "*bf16", "Out": "*bf16", "desc_k": descriptor_type(desc_k), "desc_v": descriptor_type(desc_v),
             "KV_COUNTS": "*i32", "KV_INDICES": "*i32", "ORDER": "*i64", "K_DESCALE": "*fp32",
             "V_DESCALE": "*fp32", "LSE": "*fp32", "qk_scale": "fp32"}
    constants = ws.kernel_constants(head_dim, fp8, lse)
    signature = {name: "constexpr" if name in constants else types.get(name, "i32") for name in kernel.arg_names}
    source = GluonASTSource(kernel, signature,
                            constexprs={(kernel.arg_names.index(n),): v for n, v in constants.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=4, maxnreg=(2 * ws.CONSUMER_REGS + ws.LOADER_REGS) // 3))
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        sass = subprocess.run([cuobjdump, "--dump-sass", cubin.name], capture_output=True, text=True,
                              check=True).stdout
    return compiled.metadata.shared, sass


def descriptor_type(desc) -> str:
    """A tensor descriptor's type in a kernel signature: ``__mangle__`` where Triton has it (3.7 and
    later), else the launcher's own mangling (Triton 3.6, what the GPU machines of the tests run)."""
    mangle = getattr(desc, "__mangle__", None)
    if mangle is not None:
        return mangle()
    from triton.runtime.jit import mangle_type

    return mangle_type(desc)


def exponentials_under_pv(sass: str) -> int:
    """How many ``MUFU.EX2`` lie between a wait that leaves one product in flight (``P_t V_t``, once
    ``S_{t+1}`` is done) and the next wait for all: the softmax that runs under ``P_t V_t``."""
    count, under = 0, False
    for line in sass.splitlines():
        if "WARPGROUP.DEPBAR.LE" in line:
            under = "gsb0, 0x1" in line
        elif under and "MUFU.EX2" in line:
            count += 1
    return count


def barriers_under_softmax(sass: str) -> int:
    """How many warpgroup barriers (``BAR.SYNC ..., 0x80``) lie between a wait that leaves one product in
    flight and the next wait for all: the barriers before a k slot's release in the middle of a tile's
    softmax, which ``SCHEDULES``'s joint release moves next to the v slot's."""
    count, under = 0, False
    for line in sass.splitlines():
        if "WARPGROUP.DEPBAR.LE" in line:
            under = "gsb0, 0x1" in line
        elif under and re.search(r"BAR\.SYNC(\.\w+)*\s+0x[0-9a-f]+,\s*0x80\s*;", line):
            count += 1
    return count


def loop_instructions(sass: str) -> int:
    """Instructions in the smallest loop that issues tensor-core products: one consumer's loop over the kept
    tiles, as compiled (its rarely taken branches, the ragged last tile and FP8's flush, included). The
    out-of-line retries of barrier waits after the kernel's last ``EXIT`` jump back too; they are not loops."""
    code = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    end = max((a for a, t in code if t.strip().endswith("EXIT")), default=0)
    best = 0
    for address, text in code:
        jump = re.search(r"BRA(?:\.\w+)*\s+\S*?0x([0-9a-f]+)", text)
        if jump and int(jump.group(1), 16) < address < end:
            body = [t for a, t in code if int(jump.group(1), 16) <= a <= address]
            if any("GMMA" in t for t in body) and (best == 0 or len(body) < best):
                best = len(body)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head-dim", type=int, default=128, choices=(64, 128))
    parser.add_argument("--fp8", action="store_true", help="the FP8 build (precision='fp8')")
    parser.add_argument("--lse", action="store_true", help="the 16-bit build that writes the log-sum-exp")
    parser.add_argument("--json", action="store_true", help="print the counts as one JSON line")
    args = parser.parse_args()
    if args.fp8 and args.lse:
        parser.error("the FP8 kernel does not write the log-sum-exp: --fp8 or --lse, not both")
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter does not compile kernels")
        return 2
    try:
        import triton
        from triton.experimental.gluon._runtime import GluonASTSource  # noqa: F401
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    except ImportError as exc:
        print(f"this Triton cannot compile Gluon kernels ahead of time ({exc})")
        return 3
    try:
        from triton.runtime.jit import mangle_type  # noqa: F401
    except ImportError:
        if not hasattr(TensorDescriptor, "__mangle__"):  # no ahead-of-time signature for descriptors
            print(f"Triton {triton.__version__} cannot compile Gluon kernels with tensor descriptors ahead of time")
            return 3
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")):
        print("this Triton ships no cuobjdump to read the compiled kernel")
        return 3
    shared, sass = compile_kernel(args.head_dim, args.fp8, args.lse)
    counts = {name: sass.count(name) for name in INSTRUCTIONS}
    counts["EX2_UNDER_PV"] = exponentials_under_pv(sass)
    counts["BAR_UNDER_SOFTMAX"] = barriers_under_softmax(sass)
    counts["LOOP"] = loop_instructions(sass)
    counts["shared_bytes"] = shared
    if args.json:
        print(json.dumps(counts))
    else:
        build = "FP8" if args.fp8 else "16-bit with lse" if args.lse else "16-bit"
        print(f"head dim {args.head_dim}, {build}: " +
              ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
