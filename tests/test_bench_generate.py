"""Suite ``generate``: every method gives an ok row with tokens/s on the quick shape, both early-stop
cases; the weight-byte count behind the floor matches the model; compile is skipped without --compile."""

from __future__ import annotations

import torch

from fastrl.bench import generate
from fastrl.bench.floors import ceilings
from fastrl.bench.harness import BenchContext, run_case
from fastrl.bench.registry import suite_builder

CPU = torch.device("cpu")


def _ctx(**kw) -> BenchContext:
    return BenchContext(device=CPU, dtype=torch.float32, quick=True, repeats=1, warmup=0, **kw)


def test_registered():
    assert suite_builder("generate") is generate.build


def test_quick_suite_rows():
    ctx = _ctx()
    cases = generate.build(ctx, ceilings(CPU, torch.float32))
    assert [c.name.rsplit(", ", 1)[1] for c in cases] == ["no early stop", "early stops"]
    s = generate.shape(ctx)
    n = s.prompts * s.generations
    for case in cases:
        rows = run_case(case, ctx)
        by_name = {r.method: r for r in rows}
        assert by_name["transformers generate"].kind == "baseline"
        assert by_name["hf engine (static cache, compiled)"].status.startswith("skipped: torch.compile off")
        for name in ("transformers generate", "hf engine (dynamic cache)", "hf engine (static cache)",
                     "hf engine (bf16 weight copy)"):  # fmt: skip
            row = by_name[name]
            assert row.status == "ok", (name, row.status)
            assert row.ms > 0 and row.extra_mib is not None
            tps, tokens = row.note.split("; ")[:2]
            assert tps.endswith("tokens/s") and float(tps.split()[0].replace(",", "")) > 0
            count = float(tokens.split()[0].replace(",", ""))
            if case.floor_ms:  # no early stop: every row generates exactly `new` tokens, on both sides
                assert count == n * s.new_tokens, (name, row.note)
                assert "weight-read floor" in row.note and row.x_floor > 0
            else:
                assert n <= count <= n * s.new_tokens
        assert "x generate's tokens/s" in by_name["hf engine (dynamic cache)"].note


def test_weight_bytes_match_the_model():
    for ctx in (_ctx(), BenchContext(device=CPU, dtype=torch.float32)):
        s = generate.shape(ctx)
        model, tok = generate.build_model(s, CPU, seed=0)
        actual = sum(p.numel() * p.element_size() for p in model.parameters())
        assert generate._param_bytes(s, len(tok)) == actual


def test_stop_ids():
    assert generate.stop_ids(102, 2, early=False) == []
    assert generate.stop_ids(102, 2, early=True) == [2]
    ids = generate.stop_ids(151936, 2, early=True)
    assert len(ids) == 1519 and ids[0] == 2 and max(ids) == 151935
