"""``fastrl demo --model smollm2 --quick``: the whole pipeline (held-out evaluation, GRPO, evaluation again)
writes its summary and plot, with every rate in [0, 1] and one curve point per step. (The accuracy gain
itself needs the full run: ``fastrl demo --model smollm2``.)"""

from __future__ import annotations

import json

from fastrl.demo import main


def test_smollm2_demo_quick(smol_dir, tmp_path):
    summary = main(["--model", "smollm2", "--quick", "--output-dir", str(tmp_path), "--no-progress"])
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["held_out"].keys() == {"before", "after"} == summary["held_out"].keys()
    assert (tmp_path / "reward_curve.png").stat().st_size > 1000
    for when in ("before", "after"):
        ev = on_disk["held_out"][when]
        for key in ("accuracy", "strict_accuracy", "format_rate"):
            assert 0.0 <= ev[key] <= 1.0, (when, key, ev[key])
        assert ev["strict_accuracy"] <= min(ev["accuracy"], ev["format_rate"])
    steps = on_disk["plan"]["steps"]
    assert all(len(v) == steps for v in on_disk["curves"].values()), on_disk["curves"]
