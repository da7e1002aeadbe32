"""Worker for tests/distributed/test_eval_fsdp.py (``torchrun --nproc_per_node 2 -m <this>``): SFT and DPO
with held-out evaluation, and GRPO's held-out reward, on 2 CPU ranks under FSDP2. The eval sets have an
odd number of rows, so one rank's share runs out first and it must run a weight-0 batch to keep the
collectives in step. Rank 0 writes the eval histories to ``<out>/result.json``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tests.distributed._eval_fsdp_cases import dpo_case, grpo_case, sft_case


def main() -> None:
    import torch.distributed as dist

    from fastrl.distributed.env import dist_info

    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--model", required=True)
    args = p.parse_args()
    out = Path(args.out)
    result = {}
    for name, case in (("sft", sft_case), ("dpo", dpo_case), ("grpo", grpo_case)):
        result[name] = case(args.model, out / f"{name}_ws2")["eval_history"]
    if dist_info().rank == 0:
        (out / "result.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
