"""``fastrl`` run as a user runs it (``python -m fastrl.cli ...`` in a subprocess) over a table of bad inputs.

Each row asserts: the exit status (2: found before any model loads; 1: the run stopped), exactly one line
on stderr, ``fastrl <command>: error: ...``, naming the culprit, no traceback anywhere, and the working
folder unchanged: no output folder created and the earlier run's checkpoint and metrics in ``run/``
untouched (rows that fail inside the training loop check that no checkpoint or export was written).

Cost: a row caught before torch is imported takes ~0.3 s; one caught after the config classes are
imported (torch + transformers) several seconds; the two rows that load a model and train are the
slowest. One parametrized test, one row per test, so xdist spreads them.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

REWARDS_PY = """
def good(completions, answer, **kwargs):
    return [float(a in c) for c, a in zip(completions, answer)]
def scalar(completions, **kwargs):
    return 1.0
def infinite(completions, **kwargs):
    return [float("inf")] * len(completions)
def needs_solution(completions, solution, **kwargs):
    return [0.0] * len(completions)
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Model folders (fake ones: the rows that never load a model only look at the files), data files,
    configs and a reward module beside the config (not on PYTHONPATH)."""
    w = tmp_path_factory.mktemp("world")
    files = {
        "model/config.json": "{}",
        "model/model.safetensors": "",
        "model/tokenizer.json": "{}",
        "notok/config.json": "{}",
        "notok/model.safetensors": "",
        "noconf/model.safetensors": "",
        "noconf/tokenizer.json": "{}",
        "noweights/config.json": "{}",
        "noweights/tokenizer.json": "{}",
        "sft.jsonl": '{"prompt": "1+1=", "completion": "2"}\n{"prompt": "2+2=", "completion": "4"}\n',
        "prompts_only.jsonl": '{"prompt": "1+1="}\n',
        "grpo.jsonl": "".join(f'{{"prompt": "{i}+{i}=", "answer": "{2 * i}"}}\n' for i in range(8)),
        "pairs.jsonl": '{"prompt": "a", "chosen": "b"}\n',
        "empty.jsonl": "",
        "blank.jsonl": "\n\n",
        "bad.jsonl": '{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n'
        '{"prompt" "e"}\n',
        "list.jsonl": '["prompt", "completion"]\n',
        "bad.json": '[{"prompt": "a"},\n {"prompt": "b",}]',
        "bad.csv": "prompt,completion\n1+1=,2\n2+2=,4,extra\n",
        "header.csv": "prompt,completion\n",
        "bad.parquet": "PAR1 this is not parquet",
        "notes/readme.md": "no data here",
        "data.txt": "prompt completion",
        "conf/rw.py": REWARDS_PY,
        "conf/grpo.yaml": (
            "data: {dataset: %s}\n"
            "grpo: {num_generations: 4, max_completion_length: 4}\n"
            "train: {per_device_batch_size: 4, max_steps: 2, progress_bar: false, output_dir: run}\n"
        )
        % (w / "grpo.jsonl"),
        "conf/bad.yaml": "train:\n  max_steps: 3\n   output_dir: x\n",
        "conf/list.yaml": "- a\n- b\n",
    }
    for name, text in files.items():
        path = w / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return w


@pytest.fixture(scope="module")
def real_model(tmp_path_factory) -> Path:
    from fastrl.models.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny") / "model", hidden_size=64, num_layers=1)


HAS_CUDA = importlib.util.find_spec("torch") is not None and __import__("torch").cuda.is_available()
HAS_TB = importlib.util.find_spec("tensorboard") is not None
HAS_VLLM = importlib.util.find_spec("vllm") is not None

M = "--model.name_or_path {W}/model"
SFT = f"sft {M} --data.dataset {{W}}/sft.jsonl --train.output_dir run"
GRPO = f"grpo --config {{W}}/conf/grpo.yaml {M} --grpo.reward_funcs rw:good"
DPO = f"dpo {M} --data.dataset {{W}}/sft.jsonl --train.output_dir run"

# (id, arguments, exit status, what stderr's one line must contain); {W} is the world folder.
CASES = [
    # --- found before torch is imported (paths, files, config syntax) ---
    ("model-missing-dotslash", "sft --model.name_or_path ./no_model --data.dataset {W}/sft.jsonl", 2,
     "model.name_or_path './no_model': no such file or folder"),
    ("model-missing-abs", "sft --model.name_or_path /no/such/model --data.dataset {W}/sft.jsonl", 2,
     "model.name_or_path '/no/such/model': no such file or folder"),
    ("model-hub-uncached-offline", "sft --model.name_or_path someorg/not-cached --data.dataset {W}/sft.jsonl",
     2, "model.name_or_path 'someorg/not-cached' is not a local path and not in the Hugging Face cache"),
    ("model-no-tokenizer", "sft --model.name_or_path {W}/notok --data.dataset {W}/sft.jsonl", 2,
     "notok' has no tokenizer files"),
    ("model-no-config", "sft --model.name_or_path {W}/noconf --data.dataset {W}/sft.jsonl", 2,
     "noconf' is a folder without config.json"),
    ("model-no-weights", "sft --model.name_or_path {W}/noweights --data.dataset {W}/sft.jsonl", 2,
     "noweights' has no weights"),
    ("model-is-a-file", "sft --model.name_or_path {W}/model/model.safetensors --data.dataset {W}/sft.jsonl",
     2, "model.safetensors' is a file; give the model's folder"),
    ("tokenizer-missing", f"{SFT} --model.tokenizer_name_or_path ./tok", 2,
     "model.tokenizer_name_or_path './tok': no such file or folder"),
    ("data-missing-dotslash", f"sft {M} --data.dataset ./missing.jsonl", 2,
     "data.dataset './missing.jsonl': no such file or folder"),
    ("data-missing-bare-file", f"sft {M} --data.dataset missing.jsonl", 2,
     "data.dataset 'missing.jsonl': no such file or folder"),
    ("data-missing-nested", f"sft {M} --data.dataset data/train/part", 2,
     "data.dataset 'data/train/part': no such file or folder"),
    ("data-hub-uncached-offline", f"sft {M} --data.dataset someorg/no-dataset", 2,
     "data.dataset 'someorg/no-dataset' is not a local path and not in the Hugging Face cache"),
    ("jsonl-empty", f"sft {M} --data.dataset {{W}}/empty.jsonl", 2, "empty.jsonl' is empty (0 bytes)"),
    ("jsonl-blank", f"sft {M} --data.dataset {{W}}/blank.jsonl", 2, "blank.jsonl' has no records"),
    ("jsonl-malformed", f"sft {M} --data.dataset {{W}}/bad.jsonl", 2,
     "bad.jsonl' line 3: not valid JSON (Expecting ':' delimiter at column 11)"),
    ("jsonl-not-objects", f"sft {M} --data.dataset {{W}}/list.jsonl", 2,
     "list.jsonl' line 1: each JSON Lines record must be an object"),
    ("json-malformed", f"sft {M} --data.dataset {{W}}/bad.json", 2, "bad.json' line 2: not valid JSON"),
    ("csv-ragged", f"sft {M} --data.dataset {{W}}/bad.csv", 2, "bad.csv' line 3: 3 fields, the header has 2"),
    ("csv-header-only", f"sft {M} --data.dataset {{W}}/header.csv", 2,
     "header.csv' has a header but no rows"),
    ("parquet-bad", f"sft {M} --data.dataset {{W}}/bad.parquet", 2, "bad.parquet' is not a parquet file"),
    ("data-folder-without-files", f"sft {M} --data.dataset {{W}}/notes", 2,
     "notes' is a folder without data files"),
    ("data-unknown-suffix", f"sft {M} --data.dataset {{W}}/data.txt", 2,
     "data.txt': local files must end in one of"),
    ("resume-missing", f"{SFT} --train.resume_from_checkpoint run/checkpoint-99", 2,
     "train.resume_from_checkpoint 'run/checkpoint-99': no such checkpoint folder"),
    ("output-dir-is-a-file", f"sft {M} --data.dataset {{W}}/sft.jsonl --train.output_dir {{W}}/sft.jsonl", 2,
     "train.output_dir '{W}/sft.jsonl' is a file"),
    ("config-missing", "grpo --config conf/nope.yaml", 2, "config file 'conf/nope.yaml' does not exist"),
    ("config-bad-yaml", "grpo --config {W}/conf/bad.yaml", 2, "bad.yaml' is not valid YAML at line 3"),
    ("config-not-a-mapping", "grpo --config {W}/conf/list.yaml", 2,
     "list.yaml' must hold a mapping at the top"),
    ("override-without-dashes", f"{SFT} max_steps 3", 2, "override 'max_steps' must look like --section.key"),
    ("config-flag-without-path", "sft --config", 2, "--config needs a path"),
    ("unknown-command", "sfx --config x.yaml", 2, "unknown command 'sfx'; did you mean 'sft'?"),
    # --- found once the config classes are imported, before any model loads ---
    ("unknown-key", f"{SFT} --optim.lrr 1e-5", 2, "unknown config key 'optim.lrr'"),
    ("wrong-type", f"{SFT} --train.max_steps many", 2, "'train.max_steps' expects int | None, got 'many'"),
    ("dpo-loss-type-typo", f"{DPO} --dpo.loss_type sigmoidd", 2,
     "config section 'dpo': loss_type must be one of"),
    ("grpo-loss-type-typo", f"{GRPO} --loss.loss_type dapoo", 2,
     "config section 'loss': loss_type must be one of"),
    ("reward-name-typo", f"{GRPO} --grpo.reward_funcs exact_matc", 2,
     "unknown reward function 'exact_matc'; did you mean 'exact_match'"),
    ("reward-module-missing", f"{GRPO} --grpo.reward_funcs no_such_module:f", 2,
     "reward function 'no_such_module:f': no module 'no_such_module'"),
    ("reward-function-missing", f"{GRPO} --grpo.reward_funcs rw:nope", 2,
     "reward function 'rw:nope': {W}/conf/rw.py has no 'nope'"),
    ("reward-column-missing", f"{GRPO} --grpo.reward_funcs rw:needs_solution", 2,
     "reward function 'needs_solution' needs ['solution']"),
    ("grpo-batch-not-groups", f"{GRPO} --grpo.num_generations 3", 2,
     "must be a multiple of grpo.num_generations (3)"),
    ("sft-column-missing", f"sft {M} --data.dataset {{W}}/prompts_only.jsonl", 2,
     "SFT dataset is missing the column 'completion'"),
    ("dpo-column-missing", f"dpo {M} --data.dataset {{W}}/pairs.jsonl", 2,
     "DPO dataset is missing the column 'rejected'"),
    ("no-model-given", "sft --data.dataset {W}/sft.jsonl", 2, "model.name_or_path is required"),
    # (a fifth entry: the reason to skip the row on this machine, or None)
    ("device-cuda-without-cuda", f"{SFT} --train.device cuda", 2,
     "train.device 'cuda': no CUDA device is available",
     "this machine has CUDA" if HAS_CUDA else None),
    ("tensorboard-missing", f"{SFT} --train.tensorboard", 2,
     "train.tensorboard needs the tensorboard package",
     "tensorboard is installed" if HAS_TB else None),
    ("engine-vllm", f"{GRPO} --engine.kind vllm", 2, "engine.kind 'vllm': vLLM is not installed",
     "vllm is installed" if HAS_VLLM else None),
    # --- starting from a TRL config (tests/test_trl_config.py has the mapping) ---
    ("trl-config-and-config", "grpo --config {W}/conf/grpo.yaml --trl-config {W}/conf/grpo.yaml", 2,
     "give --config or --trl-config, not both"),
    ("trl-config-missing", "grpo --trl-config conf/nope.yaml", 2,
     "config file 'conf/nope.yaml' does not exist"),
    ("trl-config-given-a-fastrl-file", "grpo --trl-config {W}/conf/grpo.yaml", 2,
     "this TRL grpo config has fields fastrl does not support: data, grpo, train"),
    ("convert-config-no-trainer", "convert-config {W}/conf/grpo.yaml", 2,
     "--trainer must be one of sft, dpo, grpo, got None"),
    ("convert-config-unsupported", "convert-config {W}/conf/grpo.yaml --trainer dpo", 2,
     "this TRL dpo config has fields fastrl does not support: data, grpo, train"),
]  # fmt: skip

# Rows that load the (real, tiny) model and stop inside the run: exit status 1.
RUN_CASES = [
    ("sft-every-example-too-long", "sft --model.name_or_path {R} --data.dataset {W}/sft.jsonl "
     "--data.max_length 3 --train.output_dir new --train.progress_bar false", "sft",
     "all 2 SFT examples were dropped: no loss token left within data.max_length=3"),
    ("reward-returns-a-scalar", "grpo --config {W}/conf/grpo.yaml --model.name_or_path {R} "
     "--grpo.reward_funcs rw:scalar --train.output_dir new", "grpo",
     "reward function 'scalar' must return a list of 4 rewards (one number or None per completion), "
     "got a float (1.0)"),
]  # fmt: skip


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _run(argv: str, cwd: Path, world: Path, real: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("FASTRL_DEBUG", "FASTRL_TRACEBACK", "PYTHONPATH")}
    env.update(
        PYTHONPATH=str(ROOT),  # fastrl itself; the reward module beside the config is found without it
        PYTHONDONTWRITEBYTECODE="1",
        HF_HOME=str(world / "hf"),  # an empty cache, outside the working folder
        HF_HUB_OFFLINE="1",  # the Hub rows behave the same with or without a network
        OMP_NUM_THREADS="1",
    )
    args = argv.replace("{W}", str(world)).replace("{R}", str(real)).split()
    return subprocess.run(
        [sys.executable, "-m", "fastrl.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _assert_one_line_error(proc, command: str, culprit: str, status: int) -> None:
    lines = proc.stderr.strip().splitlines()
    shown = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == status, shown
    assert "Traceback" not in proc.stderr + proc.stdout, shown
    assert len(lines) == 1, shown
    assert lines[0].startswith(f"fastrl {command}: error: ") or lines[0].startswith("fastrl: error: "), shown
    assert culprit in lines[0], shown


def _params(cases):
    """One pytest.param per row, its first entry as the id, a fifth entry (if any) as a skip reason."""
    out = []
    for c in cases:
        skip = c[4] if len(c) > 4 else None
        marks = [pytest.mark.skip(reason=skip)] if skip else []
        out.append(pytest.param(*c[1:4], id=c[0], marks=marks))
    return out


@pytest.mark.parametrize(("argv", "status", "culprit"), _params(CASES))
def test_bad_input_is_one_line_and_changes_nothing(argv, status, culprit, world, tmp_path):
    earlier = tmp_path / "run" / "checkpoint-2"  # an earlier run in the output folder
    earlier.mkdir(parents=True)
    (earlier / "model.safetensors").write_text("weights")
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 2, "loss": 1.0}\n')
    before = _snapshot(tmp_path)
    proc = _run(argv, tmp_path, world)
    _assert_one_line_error(proc, argv.split()[0], culprit.replace("{W}", str(world)), status)
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize(("argv", "command", "culprit"), _params(RUN_CASES))
def test_errors_inside_the_run_are_one_line_and_write_no_checkpoint(
    argv, command, culprit, world, real_model, tmp_path
):
    proc = _run(argv, tmp_path, world, real_model)
    _assert_one_line_error(proc, command, culprit, 1)
    new = tmp_path / "new"
    assert not list(new.glob("checkpoint-*")) and not (new / "final").exists()


def test_debug_shows_the_traceback(world, tmp_path):
    proc = _run(f"sft {M} --data.dataset ./missing.jsonl --debug", tmp_path, world)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "no such file or folder" in proc.stderr


def test_version_and_cheap_rows_do_not_import_torch(world, tmp_path):
    proc = _run("--version", tmp_path, world)
    assert proc.returncode == 0 and proc.stdout.startswith("fastrl ")
    probe = (
        "import sys; from fastrl import cli; rc = cli.main(sys.argv[1:]); print('torch' in sys.modules, rc)"
    )
    args = f"sft {M} --data.dataset ./missing.jsonl".replace("{W}", str(world)).split()
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", probe, *args], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.stdout.split() == ["False", "2"], out.stderr
