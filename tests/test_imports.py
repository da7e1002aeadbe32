"""``import fastrl`` and the torch path of the ops on CPU tensors import neither Triton nor torch._dynamo.

Both cost about 1 s and 150 MiB on first import (torch._dynamo imports Triton); a CPU user of the torch
path never needs them. Each check runs in a fresh interpreter, since this test process has long imported
both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_HEAVY = ("triton", "torch._dynamo")

_SCRIPT = r"""
import json, sys
import torch
import fastrl

torch.manual_seed(0)
h = torch.randn(5, 8, requires_grad=True)
w = torch.randn(11, 8, requires_grad=True)
y = torch.tensor([0, 3, -100, 10, 7])
logits = torch.randn(5, 11, requires_grad=True)
lp = torch.randn(2, 3, requires_grad=True)
calls = {
    "import": lambda: None,
    "linear_logprobs": lambda: fastrl.linear_logprobs(h, w, y, return_entropy=True)[0].sum().backward(),
    "logprobs": lambda: fastrl.logprobs(logits, y, inplace_backward=False).sum().backward(),
    "logprobs_inplace": lambda: fastrl.logprobs(logits * 1, y, inplace_backward=True).sum().backward(),
    "grpo_loss": lambda: fastrl.grpo_loss(lp, lp.detach() - 0.1, torch.randn(2), torch.ones(2, 3))[0].backward(),
}
calls[sys.argv[1]]()
print(json.dumps({m: m in sys.modules for m in %r}))
""" % (_HEAVY,)


@pytest.mark.parametrize("call", ["import", "linear_logprobs", "logprobs", "logprobs_inplace", "grpo_loss"])
def test_cpu_torch_path_imports_no_triton_or_dynamo(call):
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, call], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert not any(loaded.values()), f"{call} imported {[m for m, v in loaded.items() if v]}"
