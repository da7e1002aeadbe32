"""``import fastrl`` and the torch path of the ops on CPU tensors import neither Triton nor torch._dynamo.

Both cost about 1 s and 150 MiB on first import (torch._dynamo imports Triton); a CPU user of the torch
path never needs them. The check runs in a fresh interpreter, since this test process has long imported
both; it records what is loaded after each call, in order, so the first call that pulls one in is named.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

_SCRIPT = r"""
import json, sys
import torch

HEAVY = ("triton", "torch._dynamo")
loaded = {}
def note(step):
    loaded[step] = [m for m in HEAVY if m in sys.modules]

note("import torch")
import fastrl
note("import fastrl")
torch.manual_seed(0)
h = torch.randn(5, 8, requires_grad=True)
w = torch.randn(11, 8, requires_grad=True)
y = torch.tensor([0, 3, -100, 10, 7])
logits = torch.randn(5, 11, requires_grad=True)
lp = torch.randn(2, 3, requires_grad=True)
fastrl.linear_logprobs(h, w, y, return_entropy=True)[0].sum().backward()
note("linear_logprobs")
fastrl.logprobs(logits, y).sum().backward()
note("logprobs")
fastrl.logprobs(logits * 1, y, inplace_backward=True).sum().backward()
note("logprobs inplace_backward")
fastrl.grpo_loss(lp, lp.detach() - 0.1, torch.randn(2), torch.ones(2, 3))[0].backward()
note("grpo_loss")
print(json.dumps(loaded))
"""


def test_cpu_torch_path_imports_no_triton_or_dynamo():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    cmd = [sys.executable, "-c", _SCRIPT]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(loaded) == 6, loaded
    assert all(mods == [] for mods in loaded.values()), f"heavy imports after each step: {loaded}"
