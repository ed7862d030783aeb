"""Session set-up shared by the test modules.

Triton decides between compiling a kernel for the GPU and running it under its CPU interpreter when
the kernel is decorated, from ``TRITON_INTERPRET``. A CPU-only torch build can only ever use the
interpreter, so the variable is set here, before any test module imports the kernels: the Triton
tests (tests/test_kernels_triton.py) then run on CPU tensors in the plain ``pytest`` run. With a CUDA
build of torch the variable is left as the user set it (the kernels compile; those CPU tests skip).
Nothing here queries a GPU.
"""

import os

import torch

if torch.version.cuda is None and torch.version.hip is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
