"""The sync benchmark's parameter sets and a quick run of the suite; the CUDA-IPC path on a GPU."""

from __future__ import annotations

import pytest
import torch

from fastrl.bench import harness, registry
from fastrl.bench.floors import Ceilings
from fastrl.bench.harness import BenchContext
from fastrl.bench.sync import SHAPES, numel, qwen2_specs
from fastrl.engine.sync import sync_specs


@pytest.mark.parametrize("tied", [True, False])
def test_qwen2_specs_match_a_real_qwen2(tied):
    from transformers import AutoModelForCausalLM, Qwen2Config

    shape = dict(hidden=128, layers=2, inter=96, heads=2, kv=1, vocab=50, tied=tied)
    cfg = Qwen2Config(vocab_size=50, hidden_size=128, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)  # fmt: skip
    model = AutoModelForCausalLM.from_config(cfg)
    want = [(n, torch.float32, s) for n, _, s in sync_specs(model)]
    assert qwen2_specs(shape, torch.float32) == want


def test_parameter_counts_are_the_checkpoints():
    count = lambda name: sum(numel(s) for _, _, s in qwen2_specs(SHAPES[name], torch.bfloat16))  # noqa: E731
    assert count("qwen2-135m") == pytest.approx(135e6, rel=0.03)
    assert count("qwen2.5-1.5b") == pytest.approx(1.54e9, rel=0.01)  # Qwen2.5-1.5B: 1.54B
    assert count("qwen2.5-7b") == pytest.approx(7.62e9, rel=0.01)  # Qwen2.5-7B: 7.62B


def _run(device):
    ctx = BenchContext(device=torch.device(device), dtype=torch.float32, quick=True, repeats=2, warmup=1)
    rows = []
    for case in registry.suite_builder("sync")(ctx, Ceilings(tflops=1.0, tbps=1.0, source="test")):
        rows += harness.run_case(case, ctx)
    return {r.method: r for r in rows}


def test_quick_suite_runs_every_method_on_the_cpu():
    rows = _run("cpu")
    assert len(rows) == 5
    for r in rows.values():
        assert r.status == "ok", (r.method, r.status)
        assert "GB/s" in r.note
    assert sum(r.kind == "baseline" for r in rows.values()) == 1
    assert all("us/tensor" in r.note for r in rows.values() if r.kind != "baseline")


@pytest.mark.gpu
def test_cuda_ipc_sync_into_a_receiver_process():
    from fastrl.engine.sync import WeightSyncer
    from fastrl.engine.sync.receiver import ReceiverProcess
    from fastrl.engine.sync.transport import device_by_uuid, gpu_uuid

    assert device_by_uuid(gpu_uuid(0)) == torch.device("cuda", 0)
    specs = qwen2_specs(SHAPES["tiny"], torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(0)
    src = {n: torch.randn(s, generator=g, device="cuda").to(d) for n, d, s in specs}
    with ReceiverProcess(specs, device="cuda", timeout_s=60) as rx:
        syncer = WeightSyncer(rx.send_bucket, open_buffer=rx.open_buffer, device="cuda", bucket_bytes=1 << 16)
        assert syncer.sync_stream(specs, src.items(), verify=True).n_buckets > 2
        got = rx.params()
        syncer.close()
    for n, t in src.items():
        assert torch.equal(got[n], t.cpu()), n
    rows = _run("cuda")
    assert all(r.status == "ok" or r.status.startswith("skipped: CPU only") for r in rows.values())
