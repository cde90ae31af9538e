"""Built-in backends, installed as ``rainfusion_core.backends``.

One module per backend; each imports its optional dependencies (Triton,
``torch_npu``, the C++ extension) lazily, so importing this package is cheap
and never fails for a missing accelerator stack.
"""
