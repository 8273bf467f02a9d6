"""Triton kernels of the FlexDraft hot path, each beside its plain-PyTorch reference.

Every module has the same shape: ``<name>_reference`` (torch, the oracle and the CPU path),
``<name>_triton`` (the launch wrapper of the Triton kernel, same signature), and ``<name>`` (dispatch on the active
backend, see ``kernels.backend``).

On a CPU, three modules hold C kernels instead (generated, compiled on first use by ``kernels.cpu_build``), each op
``<name>`` (dispatch: the C kernel where its inputs allow, else the reference) beside its reference:
``cpu_matmul`` (few-row products on packed weights), ``cpu_rowwise`` (a decode step's RMSNorm, RoPE and KV-cache
write) and ``cpu_attention`` (a decode step's block attention, which ``block_attention`` dispatches to on the torch
backend).

Without CUDA the only way to run a Triton kernel is the interpreter, and triton reads TRITON_INTERPRET when it
decorates a function: its own ``tl.max``/``tl.sum`` helpers when ``triton`` is first imported, ours when these modules
are. So on a machine without a GPU the package turns the interpreter on before it imports triton (an explicit
TRITON_INTERPRET wins); import ``kernels`` (or set TRITON_INTERPRET=1) before anything imports triton.
"""
import os as _os

import torch as _torch

if not _torch.cuda.is_available():
    _os.environ.setdefault("TRITON_INTERPRET", "1")
