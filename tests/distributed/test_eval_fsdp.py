"""Held-out evaluation under torchrun: 2 CPU ranks (gloo, FSDP2) against one process. Each rank evaluates
its share and the sums are all-reduced, so the eval loss is the one process's (SFT token-weighted, DPO
pair-weighted); the uneven shares (odd eval sets) would hang the collectives without the weight-0 batches
(the launch has a timeout)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed._eval_fsdp_cases import dpo_case, grpo_case, sft_case

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    from fastrl.models.tiny import save_tiny

    out = tmp_path_factory.mktemp("eval-fsdp")
    save_tiny(out / "model", hidden_size=64, num_layers=1)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tests.distributed._eval_fsdp_worker", "--out", str(out),
           "--model", str(out / "model")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    return out, json.loads((out / "result.json").read_text())


@pytest.mark.parametrize(("name", "case", "keys"), [
    ("sft", sft_case, ("eval_loss", "eval_num_loss_tokens")),
    ("dpo", dpo_case, ("eval_loss", "eval_rewards/margins", "eval_logps/chosen", "eval_num_pairs")),
])  # fmt: skip
def test_eval_on_two_ranks_matches_one_process(two_ranks, tmp_path, name, case, keys):
    out, result = two_ranks
    want = case(str(out / "model"), tmp_path / name)["eval_history"]
    got = result[name]
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2]
    for g, w in zip(got, want):
        for k in keys:
            assert g[k] == pytest.approx(w[k], rel=1e-4, abs=1e-6), (name, g["step"], k)


def test_grpo_eval_on_two_ranks_covers_every_prompt(two_ranks, tmp_path):
    out, result = two_ranks
    (ev,) = result["grpo"]
    want = grpo_case(str(out / "model"), tmp_path / "grpo")["eval_history"][-1]
    # 3 prompts x 2 completions, split 2 / 1 over the ranks (rank 1 runs one weight-0 batch)
    assert ev["eval_num_completions"] == want["eval_num_completions"] == 6
    assert ev["eval_reward/tokens"] == pytest.approx(ev["eval_completion_length"])
