"""Where training data comes from: a Hugging Face dataset by name, a local dataset directory, or a local
JSON / JSONL / CSV / parquet file, all through ``datasets.load_dataset``; plus the column checks that name
what is missing."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from fastrl.data.sources import LOCAL_FORMATS, check_data_file, check_dataset_source


@dataclass(kw_only=True)
class DataConfig:
    """Which dataset to read and how long its sequences may be."""

    dataset: str = field(
        default="",
        metadata={"help": "Hugging Face dataset name, or a local .json/.jsonl/.csv/.parquet file or folder."},
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "Configuration (subset) name of a Hugging Face dataset."}
    )
    split: str = field(default="train", metadata={"help": "Split to train on."})
    max_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N examples (None: all)."}
    )
    prompt_column: str = field(
        default="prompt", metadata={"help": "Column holding the prompt (GRPO), e.g. 'question' for GSM8K."}
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "If set, plain-text prompts become [system, user] chats (GRPO)."}
    )
    max_prompt_length: int = field(
        default=512, metadata={"help": "Prompts longer than this many tokens keep their last tokens."}
    )
    max_length: int = field(
        default=1024, metadata={"help": "Longest prompt+completion in tokens (SFT/DPO); longer are cut."}
    )
    pad_to_multiple_of: int | None = field(
        default=None, metadata={"help": "Pad every batch's length up to a multiple of this (None: no)."}
    )
    padding_side: str = field(
        default="right", metadata={"help": "Pad SFT/DPO batches on the 'right' or the 'left'."}
    )
    eval_dataset: str = field(
        default="",
        metadata={"help": "Held-out data for train.eval_steps, named like dataset ('': none)."},
    )
    eval_split: str | None = field(
        default=None,
        metadata={
            "help": "Split of eval_dataset ('train' when unset), or with no eval_dataset a split of "
            "dataset to evaluate on (TRL: dataset_test_split)."
        },
    )
    eval_fraction: float = field(
        default=0.0,
        metadata={"help": "Hold out this fraction of the training rows (seeded by train.seed) as eval data."},
    )

    def __post_init__(self):
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"data.max_samples must be >= 1 or None, got {self.max_samples}")
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"data.padding_side must be 'left' or 'right', got {self.padding_side!r}")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"data.pad_to_multiple_of must be >= 1 or None, got {self.pad_to_multiple_of}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.eval_fraction and (self.eval_dataset or self.eval_split is not None):
            raise ValueError("data.eval_fraction cannot be combined with data.eval_dataset / data.eval_split")
        if self.max_prompt_length < 1 or self.max_length < 2:
            raise ValueError(
                f"data.max_prompt_length must be >= 1 and data.max_length >= 2, got "
                f"{self.max_prompt_length} and {self.max_length}"
            )


def load_data(cfg: DataConfig):
    """The ``datasets.Dataset`` that ``cfg`` names (local file, local directory or hub name). A local path
    that does not exist, an empty or malformed file (with its line number) and a dataset without rows raise
    ``ValueError`` naming ``data.dataset``."""
    kind = check_dataset_source(cfg.dataset)
    import datasets

    path = Path(cfg.dataset).expanduser()
    if kind == "file":
        try:
            builder = LOCAL_FORMATS[path.suffix.lower()]
            with _no_bars(datasets):  # a local file reads in moments: its bar would be noise on stderr
                ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as err:  # datasets' errors do not say where; find the line, else pass its words on
            check_data_file(path, limit=None)
            cause = err.__cause__ or err
            raise ValueError(
                f"data.dataset {str(path)!r} could not be read: {type(cause).__name__}: {cause}"
            ) from err
    elif kind == "dir" and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if cfg.split not in ds:
                raise ValueError(f"data.split {cfg.split!r} is not in {str(path)!r}; it has {sorted(ds)}")
            ds = ds[cfg.split]
    else:
        name = str(path) if kind == "dir" else cfg.dataset
        ds = datasets.load_dataset(name, cfg.dataset_config, split=cfg.split)
    if len(ds) == 0:
        raise ValueError(f"data.dataset {cfg.dataset!r} (split {cfg.split!r}) has no rows")
    if cfg.max_samples is not None:
        ds = ds.select(range(min(cfg.max_samples, len(ds))))
    return ds


def has_eval_data(cfg: DataConfig) -> bool:
    return bool(cfg.eval_dataset) or cfg.eval_split is not None or cfg.eval_fraction > 0


def load_eval_data(cfg: DataConfig, train_ds, *, seed: int):
    """(train dataset, eval dataset or None) for ``cfg``'s eval fields: ``eval_dataset`` (split
    ``eval_split`` or 'train'), ``eval_split`` of ``dataset``, or ``eval_fraction`` of the training rows
    split off by ``datasets.Dataset.train_test_split(seed=seed)`` (the training set loses them).
    ``max_samples`` does not apply to the eval data."""
    import dataclasses

    if cfg.eval_fraction > 0:
        n_eval = max(1, round(cfg.eval_fraction * len(train_ds)))
        if n_eval >= len(train_ds):
            raise ValueError(
                f"data.eval_fraction {cfg.eval_fraction} of {len(train_ds)} rows leaves no training rows"
            )
        parts = train_ds.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
        return parts["train"], parts["test"]
    if not has_eval_data(cfg):
        return train_ds, None
    name = cfg.eval_dataset or cfg.dataset
    split = cfg.eval_split or "train"
    if not cfg.eval_dataset and split == cfg.split:
        raise ValueError(f"data.eval_split {split!r} is the training split; evaluate on held-out data")
    if not cfg.eval_dataset and check_dataset_source(cfg.dataset) == "file":
        raise ValueError(
            f"data.eval_split {split!r}: the local file {cfg.dataset!r} has a single split; give the eval "
            "rows as data.eval_dataset (another file) or hold some out with data.eval_fraction"
        )
    sub = dataclasses.replace(cfg, dataset=name, split=split, max_samples=None)
    try:
        return train_ds, load_data(sub)
    except ValueError as err:  # load_data names data.dataset / data.split: say which field it was
        text = str(err)
        if cfg.eval_dataset:
            text = text.replace("data.dataset", "data.eval_dataset")
        raise ValueError(text.replace("data.split", "data.eval_split")) from None


@contextlib.contextmanager
def _no_bars(datasets):
    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was:
            datasets.enable_progress_bars()


def require_columns(ds, required: list[str | tuple[str, ...]], *, task: str) -> None:
    """Raise ``ValueError`` naming the missing column. A tuple entry is a set of alternatives (any one will
    do), e.g. ``("prompt", "messages")``."""
    columns = set(ds.column_names)
    for need in required:
        options = need if isinstance(need, tuple) else (need,)
        if not any(c in columns for c in options):
            wanted = " or ".join(repr(c) for c in options)
            raise ValueError(
                f"{task} dataset is missing the column {wanted}; it has columns {sorted(columns)}"
            )


def check_kept(kept: int, total: int, *, task: str, why: str) -> None:
    """After dropping examples: ``ValueError`` when none is left, a warning saying how many went when some
    did (``why``: the reason, naming the limit)."""
    if kept == 0:
        raise ValueError(f"all {total} {task} examples were dropped: {why}; raise the limit or shorten them")
    if kept < total:
        import warnings

        from fastrl import FastRLWarning

        message = f"{total - kept} of {total} {task} examples were dropped: {why}"
        warnings.warn(message, FastRLWarning, stacklevel=2)
