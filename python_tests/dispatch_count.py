"""Counting the ops a piece of code dispatches (views and detach left out: they launch nothing),
for the tests that hold the glue to one op per job."""
from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class OpCounter(TorchDispatchMode):
    """`with OpCounter() as seen: ...` then `seen.ops`, a Counter of op overload names."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func is not torch.ops.aten.detach.default:
            self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))
