"""Training data: loading (hub name or local file), tokenization with loss masks, padding and packing, and a
resumable sampler."""

from fastrl.data.collate import collate_dpo, collate_lm, collate_packed, collate_prompt_completion, pad
from fastrl.data.loading import DataConfig, load_data, require_columns
from fastrl.data.sampler import EpochSampler
from fastrl.data.tokenize import dpo_example, encode_completion, encode_prompt, sft_example

__all__ = [
    "DataConfig",
    "EpochSampler",
    "collate_dpo",
    "collate_lm",
    "collate_packed",
    "collate_prompt_completion",
    "dpo_example",
    "encode_completion",
    "encode_prompt",
    "load_data",
    "pad",
    "require_columns",
    "sft_example",
]
