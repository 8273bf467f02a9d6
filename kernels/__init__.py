"""Triton kernels of the FlexDraft hot path, each beside its plain-PyTorch reference.

Every module has the same shape: ``<name>_reference`` (torch, the oracle and the CPU path),
``<name>_triton`` (the launch wrapper of the Triton kernel, same signature), and ``<name>`` (dispatch on the active
backend, see ``kernels.backend``).

Without CUDA the only way to run a Triton kernel is the interpreter, and triton reads TRITON_INTERPRET when a kernel
is decorated, i.e. when its module is imported. So the package turns the interpreter on before any kernel module is
imported on a machine without a GPU (an explicit TRITON_INTERPRET wins).
"""
import os as _os

import torch as _torch

if not _torch.cuda.is_available():
    _os.environ.setdefault("TRITON_INTERPRET", "1")
