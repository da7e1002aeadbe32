"""GGUF sources fail in one clear line before anything is loaded: a missing file, a file that is not GGUF, an
architecture transformers cannot dequantise, a missing folder; the CLI prints that one line."""

from __future__ import annotations

import pytest

from fastrl.models import ModelConfig, load_model_and_tokenizer

gguf = pytest.importorskip("gguf")


def _write_gguf(path, arch: str):
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_missing_file_names_the_folder_and_what_is_there(tmp_path):
    _write_gguf(tmp_path / "other.Q4_0.gguf", "llama")
    with pytest.raises(ValueError, match=r"no file 'x.gguf' in .*GGUF files there: \['other.Q4_0.gguf'\]"):
        load_model_and_tokenizer(ModelConfig(name_or_path=str(tmp_path), gguf_file="x.gguf"))


def test_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="is not a folder"):
        load_model_and_tokenizer(ModelConfig(name_or_path=str(tmp_path / "nope"), gguf_file="x.gguf"))


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ValueError, match="is not a GGUF file"):
        load_model_and_tokenizer(ModelConfig(name_or_path=str(tmp_path), gguf_file="x.gguf"))


def test_unsupported_architecture_is_one_line(tmp_path):
    _write_gguf(tmp_path / "m.gguf", "mamba2")
    with pytest.raises(ValueError, match="'mamba2' model, which transformers cannot dequantise") as err:
        load_model_and_tokenizer(ModelConfig(name_or_path=str(tmp_path), gguf_file="m.gguf"))
    assert "\n" not in str(err.value) and "llama" in str(err.value)  # names what is supported


def test_gguf_file_must_end_in_gguf():
    with pytest.raises(ValueError, match="gguf_file must name a .gguf file"):
        ModelConfig(name_or_path="x", gguf_file="model.safetensors")


def test_cli_prints_one_line(tmp_path, capsys):
    from fastrl.cli import main

    _write_gguf(tmp_path / "m.gguf", "mamba2")
    data = tmp_path / "x.jsonl"  # a valid dataset, so the GGUF is what the run trips on
    data.write_text('{"prompt": "1+1=", "completion": "2"}\n')
    args = ["--model.name_or_path", str(tmp_path), "--model.gguf_file", "m.gguf", "--data.dataset", str(data)]
    args += ["--train.output_dir", str(tmp_path / "run")]
    assert main(["sft", *args]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot dequantise" in err, err
