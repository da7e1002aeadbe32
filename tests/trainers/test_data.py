"""Data: loading, column errors, loss masks (completion-only, assistant-only, formatting functions),
padding, packing and the resumable sampler."""

from __future__ import annotations

import json
import os

import pytest
import torch

from fastrl.data import (
    DataConfig,
    EpochSampler,
    collate_dpo,
    collate_lm,
    collate_packed,
    collate_prompt_completion,
    load_data,
    require_columns,
    sft_example,
)
from fastrl.models.tiny import build_char_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def _write(tmp_path, rows, suffix):
    path = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        import datasets

        datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
def test_load_local_files(tmp_path, suffix):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(5)]
    ds = load_data(DataConfig(dataset=str(_write(tmp_path, rows, suffix)), max_samples=3))
    assert len(ds) == 3 and ds[2] == rows[2]


def test_load_errors(tmp_path):
    bad = tmp_path / "data.tsv"
    bad.write_text("a\tb\n1\t2\n")
    with pytest.raises(ValueError, match="data.dataset.*must end in one of"):
        load_data(DataConfig(dataset=str(bad)))
    with pytest.raises(ValueError, match="max_samples"):
        DataConfig(max_samples=0)
    with pytest.raises(ValueError, match="data.dataset"):
        load_data(DataConfig(dataset=""))
    with pytest.raises(ValueError, match="padding_side"):
        DataConfig(padding_side="middle")


def test_missing_column_is_named(tmp_path):
    ds = load_data(DataConfig(dataset=str(_write(tmp_path, [{"prompt": "a", "chosen": "b"}], ".jsonl"))))
    with pytest.raises(ValueError, match="'rejected'"):
        require_columns(ds, ["prompt", "chosen", "rejected"], task="DPO")
    with pytest.raises(ValueError, match="'messages' or 'text'"):
        require_columns(ds, [("messages", "text")], task="SFT")


def _masked_text(tok, enc):
    return tok.decode([t for t, m in zip(enc["input_ids"], enc["loss_mask"]) if m])


def test_completion_only_loss_masks_exactly_the_prompt(tok):
    ex = {"prompt": "12+34=", "completion": "46"}
    enc = sft_example(tok, ex, max_length=64, completion_only_loss=None, assistant_only_loss=False)
    n_prompt = len(tok("12+34=", add_special_tokens=False)["input_ids"])
    assert enc["loss_mask"] == [0] * n_prompt + [1] * (len(enc["input_ids"]) - n_prompt)
    assert enc["input_ids"][-1] == tok.eos_token_id
    assert _masked_text(tok, enc) == "46" + tok.eos_token
    off = sft_example(tok, ex, max_length=64, completion_only_loss=False, assistant_only_loss=False)
    assert off["input_ids"] == enc["input_ids"] and all(off["loss_mask"])


def test_completion_only_loss_with_formatting_func(tok):
    def fmt(ex):
        return {"prompt": f"Q: {ex['q']}\nA: ", "completion": ex["a"]}

    enc = sft_example(
        tok, {"q": "2+2", "a": "4"}, max_length=64, completion_only_loss=None, assistant_only_loss=False,
        formatting_func=fmt,
    )  # fmt: skip
    assert tok.decode(enc["input_ids"]) == "Q: 2+2\nA: 4" + tok.eos_token
    assert _masked_text(tok, enc) == "4" + tok.eos_token
    text = sft_example(
        tok, {"q": "x"}, max_length=64, completion_only_loss=None, assistant_only_loss=False,
        formatting_func=lambda ex: "plain " + ex["q"],
    )  # fmt: skip
    assert all(text["loss_mask"])
    with pytest.raises(ValueError, match="completion_only_loss"):
        sft_example(tok, {"text": "abc"}, max_length=64, completion_only_loss=True, assistant_only_loss=False)


def test_assistant_only_loss(tok):
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "ok"},
    ]
    enc = sft_example(
        tok, {"messages": msgs}, max_length=256, completion_only_loss=None, assistant_only_loss=True
    )
    full = tok.apply_chat_template(msgs, tokenize=False)
    assert tok.decode(enc["input_ids"]) == full
    assert _masked_text(tok, enc) == f"yo{tok.eos_token}\nok{tok.eos_token}\n"
    every = sft_example(
        tok, {"messages": msgs}, max_length=256, completion_only_loss=None, assistant_only_loss=False
    )
    assert every["input_ids"] == enc["input_ids"] and all(every["loss_mask"])
    cut = sft_example(
        tok, {"messages": msgs}, max_length=7, completion_only_loss=None, assistant_only_loss=True
    )
    assert len(cut["input_ids"]) == 7


@pytest.mark.parametrize("side", ["left", "right"])
def test_collate_lm_padding(side):
    ids = [[5, 6, 7], [8, 9, 10, 11, 12]]
    masks = [[0, 1, 1], [0, 0, 1, 1, 1]]
    b = collate_lm(ids, masks, 0, side=side, multiple_of=4)
    assert b["input_ids"].shape == (2, 8)
    for row, s, m in zip(range(2), ids, masks):
        real = b["attention_mask"][row].bool()
        assert b["input_ids"][row][real].tolist() == s
        assert b["position_ids"][row][real].tolist() == list(range(len(s)))
        assert b["labels"][row][real].tolist() == [t if f else -100 for t, f in zip(s, m)]
        assert (b["labels"][row][~real] == -100).all()
    first_real = b["attention_mask"][0].nonzero()[0].item()
    assert (first_real == 0) == (side == "right")


def test_collate_dpo_chosen_then_rejected():
    exs = [
        {"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5, 6]},
        {"prompt_ids": [7], "chosen_ids": [8, 9], "rejected_ids": [10]},
    ]
    b = collate_dpo(exs, 0, side="left", multiple_of=None)
    assert b["input_ids"].shape == (4, 5)
    assert b["input_ids"][2].tolist() == [1, 2, 4, 5, 6]
    assert b["labels"][0].tolist() == [-100, -100, -100, -100, 3]
    assert b["labels"][3].tolist() == [-100, -100, -100, -100, 10]


def test_collate_packed_positions_restart():
    pack = [([1, 2, 3], [0, 1, 1]), ([4, 5], [1, 1])]
    b = collate_packed([pack, [([6], [1])]], 0, multiple_of=8)
    assert b["attention_mask"] is None
    assert b["input_ids"][0].tolist() == [1, 2, 3, 4, 5, 0, 0, 0]
    assert b["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    assert b["labels"][0].tolist() == [-100, 2, 3, 4, 5, -100, -100, -100]
    assert b["position_ids"][1].tolist() == [0, 0, 1, 2, 3, 4, 5, 6]


def test_collate_prompt_completion_layout():
    b = collate_prompt_completion([[1, 2, 3], [4]], [[5], [6, 7]], 0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 5, 0], [0, 0, 4, 6, 7]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 0], [0, 0, 0, 1, 2]]
    assert b["completion_mask"].tolist() == [[1, 0], [1, 1]]


def test_sampler_epochs_and_resume(seed):
    s = EpochSampler(7, 3, seed=seed)
    seen = [s.next_batch() for _ in range(7)]  # 21 indices: three full epochs
    flat = sum(seen, [])
    for e in range(3):
        assert sorted(flat[7 * e : 7 * e + 7]) == list(range(7))
    twin = EpochSampler(7, 3, seed=seed)
    for _ in range(4):
        twin.next_batch()
    resumed = EpochSampler(7, 3, seed=seed)
    resumed.load_state_dict(twin.state_dict())
    assert [resumed.next_batch() for _ in range(3)] == seen[4:]
    with pytest.raises(ValueError, match="empty"):
        EpochSampler(0, 2, seed=0)
    assert torch.tensor(flat).max() < 7


# ---------------------------------------------------------------------------------------------------------
# Issue 9 item 4: a bad data source is one clear ValueError, with the line number where there is one.


def test_csv_loads(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,completion\n"a, b",c\nd,e\n')
    ds = load_data(DataConfig(dataset=str(path)))
    assert ds.column_names == ["prompt", "completion"] and ds[0] == {"prompt": "a, b", "completion": "c"}


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("e.jsonl", b"", r"is empty \(0 bytes\)"),
        ("blank.jsonl", b"\n  \n", r"has no records \(only blank lines\)"),
        ("m.jsonl", b'{"a": 1}\n{"a": 2}\n{"a" 3}\n', r"line 3: not valid JSON \(Expecting ':' delimiter"),
        ("l.jsonl", b'{"a": 1}\n[1, 2]\n', r"line 2: each JSON Lines record must be an object"),
        ("u.jsonl", b'{"a": 1}\n{"a": "\xff"}\n', r"line 2: not UTF-8 text"),
        ("d.json", b'[{"a": 1},\n {"a": 2,}]', r"line 2: not valid JSON"),
        ("n.json", b"[]", r"has no records \(an empty list\)"),
        ("s.json", b'"text"', r"line 1: each JSON Lines record must be an object"),
        ("c.json", b'{"a": [1, 2], "b": [1]}', r"columns have different lengths \[1, 2\]"),
        ("h.csv", b"a,b\n", r"has a header but no rows"),
        ("f.csv", b"a,b\n1,2\n3,4,5\n", r"line 3: 3 fields, the header has 2"),
        ("q.csv", b'a,b\n"1,2\n', r"line \d+: "),
        ("p.parquet", b"PAR1 not really", r"is not a parquet file"),
        ("x.parquet", b"PAR1" + b"\0" * 16 + b"PAR1", r"is not a readable parquet file"),
    ],
)
def test_bad_local_files_are_named_with_their_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"data.dataset '.*" + name + "'.* ?" + message):
        load_data(DataConfig(dataset=str(path)))


def test_json_lines_in_a_json_file_and_a_columns_document(tmp_path):
    lines = tmp_path / "lines.json"
    lines.write_text('{"a": 1}\n{"a": 2}\n')
    assert len(load_data(DataConfig(dataset=str(lines)))) == 2
    cols = tmp_path / "cols.json"
    cols.write_text('{"data": [{"a": 1}, {"a": 2}, {"a": 3}]}')
    from fastrl.data.sources import check_data_file

    check_data_file(cols)  # {"data": [...]}: one list of records under a single key


def test_empty_parquet_and_folders(tmp_path):
    import datasets

    empty = tmp_path / "e.parquet"
    datasets.Dataset.from_dict({"a": []}).to_parquet(str(empty))
    with pytest.raises(ValueError, match="has no rows"):
        load_data(DataConfig(dataset=str(empty)))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.md").write_text("hi")
    with pytest.raises(ValueError, match="is a folder without data files"):
        load_data(DataConfig(dataset=str(folder)))
    (folder / "train.jsonl").write_text('{"a": 1}\n')
    assert len(load_data(DataConfig(dataset=str(folder)))) == 1


@pytest.mark.parametrize(
    "name", ["./missing.jsonl", "missing.jsonl", "/no/such/dir", "data/train/x", "~/nope"]
)
def test_a_local_looking_path_that_does_not_exist_is_missing_at_once(name):
    with pytest.raises(ValueError, match=r"data.dataset '.*': no such file or folder"):
        load_data(DataConfig(dataset=name))


def test_an_uncached_hub_id_fails_fast_when_the_hub_is_unreachable(tmp_path, monkeypatch):
    import time

    from fastrl import _hub

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _hub.hub_unreachable.cache_clear()
    t0 = time.perf_counter()
    with pytest.raises(
        ValueError, match=r"data.dataset 'someorg/nothing' is not a local path and not in the Hugging"
    ):
        load_data(DataConfig(dataset="someorg/nothing"))
    assert time.perf_counter() - t0 < 5  # not a minute of retries
    cached = tmp_path / "hf" / "hub" / "datasets--someorg--cached" / "snapshots" / "abc"
    cached.mkdir(parents=True)
    _hub.check_hub_id("data.dataset", "someorg/cached", "dataset")  # cached: allowed, offline
    _hub.hub_unreachable.cache_clear()


def test_hub_id_rules():
    from fastrl._hub import is_hub_id, looks_local

    assert is_hub_id("Qwen/Qwen2.5-0.5B") and is_hub_id("gpt2") and is_hub_id("org/x.y_z")
    assert (
        not is_hub_id("a/b/c") and not is_hub_id("a--b/c") and not is_hub_id("./x") and not is_hub_id("x y")
    )
    assert looks_local("x.jsonl", (".jsonl",)) and looks_local("../x") and not looks_local("org/name")


def test_check_kept_says_how_many_and_why():
    from fastrl import FastRLWarning
    from fastrl.data.loading import check_kept

    with pytest.raises(ValueError, match=r"all 7 SFT examples were dropped: too long"):
        check_kept(0, 7, task="SFT", why="too long")
    with pytest.warns(FastRLWarning, match=r"3 of 7 SFT examples were dropped: too long"):
        check_kept(4, 7, task="SFT", why="too long")


def test_an_unreachable_hub_is_probed_once_and_a_cached_id_goes_offline(tmp_path, monkeypatch):
    from fastrl import _hub

    for var in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    _hub.hub_unreachable.cache_clear()
    import sys

    for name in ("huggingface_hub.constants", "datasets.config"):  # go_offline flips them: restore after
        if name in sys.modules:
            monkeypatch.setattr(sys.modules[name], "HF_HUB_OFFLINE", sys.modules[name].HF_HUB_OFFLINE)
    try:
        assert "127.0.0.1 cannot be reached" in _hub.hub_unreachable()
        (tmp_path / "hub" / "models--org--m" / "snapshots" / "x").mkdir(parents=True)
        _hub.check_hub_id("model.name_or_path", "org/m", "model")
        assert os.environ["HF_HUB_OFFLINE"] == "1"  # cached: read from the cache without any request
        with pytest.raises(ValueError, match="model.name_or_path 'org/other' is not a local path"):
            _hub.check_hub_id("model.name_or_path", "org/other", "model")
    finally:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        _hub.hub_unreachable.cache_clear()
