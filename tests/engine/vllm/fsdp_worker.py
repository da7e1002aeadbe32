"""Worker of test_server.py::test_fsdp2_two_ranks_sync_into_the_server, run under torchrun (2 gloo ranks):
``python -m torch.distributed.run --nproc_per_node 2 -m tests.engine.vllm.fsdp_worker URL MODEL_DIR OUT``.

Both ranks shard the same perturbed tiny model with FSDP2 and sync it into one vllm-serve server (rank 0
sends, rank 1 takes part in the full_tensor gathers); rank 0 then checks the server's log-probs against
the unsharded model and writes the error to OUT."""

from __future__ import annotations

import sys

import torch


def main(url: str, model_dir: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from fastrl.distributed.env import init_distributed
    from fastrl.distributed.fsdp import apply_fsdp_policy
    from fastrl.engine import EngineConfig, SamplingParams, build_engine
    from fastrl.models.policy import Policy
    from tests.engine.vllm import checks

    torch.set_num_threads(1)
    info = init_distributed("gloo")
    mesh = init_device_mesh("cpu", (info.world_size,))

    def perturbed():
        model, tok = checks.load(model_dir)
        g = torch.Generator().manual_seed(21)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        return model, tok

    full, tok = perturbed()  # the same on both ranks
    model, _ = perturbed()
    policy = apply_fsdp_policy(Policy(model), mesh)
    engine = build_engine(EngineConfig(kind="vllm_server", base_url=url, verify_sync=True), policy, tok)
    engine.syncer.bucket_bytes = 16384
    engine.sync_weights(policy)
    if info.rank == 0:
        assert engine.last_sync.n_buckets > 3, engine.last_sync
        params = SamplingParams(max_new_tokens=6, seed=3, temperature=0.7, top_k=12, top_p=0.8)
        prompts = checks.prompts(tok, 4)
        res = engine.generate(prompts, params)
        err = checks.max_error(
            res.logprobs, checks.reference_logprobs(full, prompts, res.completion_ids, params)
        )
        with open(out, "w") as f:
            f.write(f"{err}\n")
    engine.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
