"""The one training loop the SFT, DPO and GRPO trainers share.

Per optimizer step: ``gradient_accumulation_steps`` micro-steps, each ``loss, metrics = step.micro_step(i)``
followed by ``(loss / gradient_accumulation_steps).backward()`` (bf16 autocast on CUDA); then gradient
clipping, AdamW, the learning-rate schedule, a JSONL metrics record (TensorBoard too when installed and
asked for), a progress bar, and every ``save_steps`` an atomic checkpoint (weights or LoRA adapter,
optimizer, scheduler, RNG states and the step's own state, e.g. the data position). A run whose
``output_dir`` holds a checkpoint resumes from it with ``resume_from_checkpoint="auto"``; the final model is
exported in Hugging Face format to ``output_dir/final``.

Runs and their folders (``run_state.py``): a fresh run refuses an ``output_dir`` that holds another
run's checkpoints unless ``train.overwrite_output_dir`` (which deletes them); every checkpoint records
the trainer, the model and a fingerprint of the config, and a resume is refused for another trainer,
another model, a config field that must match, or a checkpoint past ``train.max_steps``. Ctrl-C or
SIGTERM stops at the next step boundary with a checkpoint there and one line (``interrupt.py``; exit
status 130 / 143).

Logged metrics: each is the value of the optimizer step's global batch (all micro-steps, all ranks), so
it does not depend on the world size or on how the step is split into micro-batches
(``fastrl.trainers.metrics``): token- and sequence-averaged metrics are ``Metric.mean(sum, count)``
pairs whose sums and counts are added over micro-steps and ranks before dividing (GRPO's ``kl``,
``ratio/mean``, ``clip_ratio/*``, ``is_weight/*`` fractions, ``vespo/phi_mean``, ``*_mask/*`` fractions,
``entropy``, ``completion_length``); extremes (``ratio/min``, ``ratio/max``, ``completion_length_min``,
``completion_length_max``) are taken over the global batch; counts (keys ``num_*``, e.g.
``num_loss_tokens``, and GRPO's ``is_weight/nan_engine_logp``) are the step's total; everything else is a
plain mean over micro-steps and ranks, which is the global value because it is one already (``loss``,
whose normaliser is the global batch's; GRPO's round metrics from gathered rewards: ``reward``,
``reward_std``, ``frac_reward_zero_std``, the per-function rewards) or a mean over equal counts (DPO's
per-pair ``rewards/*`` and ``logps/*``; GRPO's ``advantage_abs_mean`` and ``truncated_frac``, every rank
holding as many completions). ``grad_norm`` is the global norm. A logging window of several steps logs
the mean of its steps' values.

Schedule: ``lr(s) = lr * (s + 1) / (warmup_steps + 1)`` for ``s < warmup_steps``; afterwards ``lr``
(constant), ``lr * (m + (1 - m) * (1 + cos(pi * p)) / 2)`` (cosine) or
``lr * (m + (1 - m) * max(0, (max_steps - s) / max(1, max_steps - warmup)))`` (linear: at ``m = 0``
transformers' ``get_linear_schedule_with_warmup``, TRL's default, after its warmup), with
``p = (s - warmup) / (max_steps - warmup)`` and ``m = min_lr_ratio``.

Length: ``train.max_steps``, or ``train.num_train_epochs`` passes over the data, which the trainer turns
into ``max_steps = ceil(epochs * ceil(ceil(N / (per_device_batch_size * world)) /
gradient_accumulation_steps))`` (TRL's count; ``fastrl.trainers.epochs``). Hooks (``evaluation.py``,
``samples.py``) run after each optimizer step: held-out evaluation every ``train.eval_steps`` (records
with ``eval_`` keys in ``metrics.jsonl``) and GRPO's sample completions.

Data parallelism (``torchrun``: ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``): the trainers shard the policy
with FSDP2 (``train.fsdp``, on by default when ``WORLD_SIZE > 1``; gloo on the CPU, NCCL on GPUs), each
rank draws a disjoint share of every global batch, and losses are normalised by counts of the optimizer
step's global batch (SFT: its loss tokens; GRPO's dapo/cispo/vespo: the generation batch's completion
tokens, bnpo: the step's), divided by the world size and the accumulation steps, so that FSDP's mean over
ranks of the accumulated gradients is the gradient of the global batch as one process computes it with
the whole batch in one micro-step. Checkpoints and the export are collective (every rank calls them,
rank 0 writes).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from fastrl.data import DataConfig
from fastrl.models import LoraConfig, ModelConfig

SCHEDULES = ("cosine", "constant", "linear")


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW, the learning-rate schedule and gradient clipping."""

    lr: float = field(default=1e-5, metadata={"help": "Peak learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decoupled weight decay."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    schedule: str = field(
        default="cosine",
        metadata={"help": "After warmup: 'cosine' or 'linear' decay to min_lr_ratio * lr, or 'constant'."},
    )
    warmup_steps: int = field(default=0, metadata={"help": "Linear warmup from 0 over this many steps."})
    min_lr_ratio: float = field(
        default=0.0, metadata={"help": "Floor of the cosine / linear decay as a fraction of lr."}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the global grad norm (0: no clip)."})
    fused: bool | None = field(
        default=None,
        metadata={
            "help": "AdamW's fused kernel (one pass over each parameter; transformers' default "
            "adamw_torch_fused). None: fused where torch has it for the parameters (CPU, CUDA), else the "
            "for-loop; True: fused or an error; False: the for-loop."
        },
    )

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.lr < 0 or self.warmup_steps < 0 or self.max_grad_norm < 0:
            raise ValueError("optim.lr, optim.warmup_steps and optim.max_grad_norm must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.fused not in (None, True, False):
            raise ValueError(f"optim.fused must be true, false or null (auto), got {self.fused!r}")


@dataclass(kw_only=True)
class TrainConfig:
    """Length of the run, batch shape, logging and checkpointing."""

    output_dir: str = field(default="runs/run", metadata={"help": "Checkpoints, metrics and the export."})
    max_steps: int | None = field(
        default=None,
        metadata={"help": "Optimizer steps to run (None: 100, or derived from num_train_epochs)."},
    )
    num_train_epochs: float | None = field(
        default=None,
        metadata={"help": "Passes over the training data instead of max_steps (the step count follows)."},
    )
    eval_steps: int = field(
        default=0,
        metadata={"help": "Evaluate on the eval dataset every N steps and at the end (0: never)."},
    )
    per_device_eval_batch_size: int | None = field(
        default=None, metadata={"help": "Eval examples (GRPO: prompts) per forward (None: the train one)."}
    )
    log_completions_steps: int = field(
        default=0,
        metadata={"help": "GRPO: write sample completions and rewards every N steps (0: never)."},
    )
    num_completions_to_print: int = field(
        default=4, metadata={"help": "GRPO: completions per sample record and console table."}
    )
    per_device_batch_size: int = field(default=8, metadata={"help": "Sequences per micro-step."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-steps per optimizer step."})
    seed: int = field(default=0, metadata={"help": "Seed for init, data order and sampling."})
    device: str = field(default="auto", metadata={"help": "'auto' (cuda when available), 'cpu' or 'cuda'."})
    bf16: bool = field(default=True, metadata={"help": "bf16 autocast on CUDA (ignored on the CPU)."})
    logging_steps: int = field(default=1, metadata={"help": "Write a metrics record every N steps."})
    tensorboard: bool = field(default=False, metadata={"help": "Also log to TensorBoard when installed."})
    progress_bar: bool = field(default=True, metadata={"help": "Show a tqdm progress bar."})
    save_steps: int = field(default=0, metadata={"help": "Checkpoint every N steps (0: never)."})
    save_total_limit: int | None = field(
        default=None, metadata={"help": "Keep only the newest N checkpoints."}
    )
    resume_from_checkpoint: str = field(
        default="", metadata={"help": "'' (fresh run), 'auto' (latest in output_dir, if any) or a path."}
    )
    checkpoint_format: str = field(
        default="auto",
        metadata={
            "help": "'full' (weights gathered into one model.safetensors), 'sharded' (each rank writes its "
            "shards with torch.distributed.checkpoint; resumable at another world size) or 'auto' "
            "(sharded under FSDP, full otherwise)."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Let a fresh run start in an output_dir holding another run's checkpoints (deletes them)."
        },
    )
    export_final: bool = field(default=True, metadata={"help": "Export output_dir/final in HF format."})
    fsdp: bool | None = field(
        default=None, metadata={"help": "Shard the policy with FSDP2 (None: on when WORLD_SIZE > 1)."}
    )
    fsdp_param_dtype: str = field(
        default="auto",
        metadata={
            "help": "FSDP MixedPrecisionPolicy: dtype the gathered parameters compute in ('auto': bfloat16 "
            "on CUDA with train.bf16, the stored dtype otherwise; 'float32', 'bfloat16', 'float16')."
        },
    )
    fsdp_reduce_dtype: str = field(
        default="float32", metadata={"help": "FSDP gradient reduce-scatter dtype ('float32', 'bfloat16')."}
    )
    fsdp_reshard_after_forward: bool = field(
        default=True,
        metadata={"help": "Free each gathered layer after its forward (ZeRO-3); False keeps it (ZeRO-2)."},
    )
    fsdp_cpu_offload: bool = field(
        default=False,
        metadata={
            "help": "FSDP CPUOffloadPolicy: sharded parameters, gradients and optimizer state in pinned CPU "
            "memory (unpinned, with a warning, where pinned memory is unavailable)."
        },
    )
    fsdp_replicate: int = field(
        default=1,
        metadata={
            "help": "HSDP: replicate groups on a 2-D mesh (replicate x shard), e.g. the number of nodes; "
            "must divide WORLD_SIZE (1: plain FSDP over all ranks)."
        },
    )
    fsdp_meta_init: bool = field(
        default=True,
        metadata={
            "help": "Under FSDP, build the model on the meta device and load each rank's shards straight "
            "from the safetensors files (a local model, full or LoRA; no rank holds the full model)."
        },
    )
    activation_checkpointing: str = field(
        default="none",
        metadata={
            "help": "Recompute activations in backward: 'none', 'full' (every decoder layer), "
            "'selective:<k>' (every k-th layer; 'selective' = k 2) or 'op' (save matmul and attention "
            "outputs except every 2nd matmul, recompute the rest)."
        },
    )
    activation_offloading: bool = field(
        default=False,
        metadata={
            "help": "Move the decoder layers' saved activations to pinned CPU memory on a side stream "
            "(CUDA) and back for the backward."
        },
    )
    compile_layers: bool = field(
        default=False,
        metadata={"help": "torch.compile each decoder layer (after checkpointing, before FSDP)."},
    )

    def __post_init__(self):
        from fastrl.distributed.activation_checkpoint import parse_ac_mode

        try:
            parse_ac_mode(self.activation_checkpointing)
        except ValueError as e:
            raise ValueError(f"train.activation_checkpointing: {e}") from None
        if self.num_train_epochs is not None:
            if self.max_steps is not None:
                raise ValueError(
                    f"train.max_steps ({self.max_steps}) and train.num_train_epochs "
                    f"({self.num_train_epochs}) are both set; give one of them"
                )
            if not self.num_train_epochs > 0:
                raise ValueError(f"train.num_train_epochs must be > 0, got {self.num_train_epochs}")
        elif self.max_steps is None:
            self.max_steps = 100
        for name in ("per_device_batch_size", "gradient_accumulation_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("fsdp_param_dtype", "fsdp_reduce_dtype"):
            allowed = ("float32", "bfloat16", "float16") + (("auto",) if name == "fsdp_param_dtype" else ())
            if getattr(self, name) not in allowed:
                raise ValueError(f"train.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not isinstance(self.fsdp_replicate, int) or self.fsdp_replicate < 1:
            raise ValueError(f"train.fsdp_replicate must be an integer >= 1, got {self.fsdp_replicate!r}")
        if self.checkpoint_format not in ("auto", "full", "sharded"):
            got = self.checkpoint_format
            raise ValueError(f"train.checkpoint_format must be 'auto', 'full' or 'sharded', got {got!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"train.max_steps must be >= 1, got {self.max_steps}")
        for name in ("save_steps", "eval_steps", "log_completions_steps", "num_completions_to_print"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.per_device_eval_batch_size is not None and self.per_device_eval_batch_size < 1:
            raise ValueError(
                f"train.per_device_eval_batch_size must be >= 1 or None, got "
                f"{self.per_device_eval_batch_size}"
            )


@dataclass(kw_only=True)
class RunConfig:
    """The sections every run has; each trainer's run config adds its own (``sft``, ``dpo``, ``grpo``...)."""

    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "The model to train."})
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "LoRA adapters (PEFT)."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Training data."})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "Optimizer and schedule."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "Loop, logging, checkpoints."})


class TrainStep(Protocol):
    """What a trainer adds to the loop: one micro-step, and the state a checkpoint must carry."""

    def micro_step(self, index: int) -> tuple[torch.Tensor, dict]: ...  # metrics: fastrl.trainers.metrics
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def setup_distributed(train_cfg: TrainConfig) -> tuple[torch.device, bool]:
    """(device, fsdp): join the process group ``torchrun`` describes (gloo for the CPU, NCCL for CUDA,
    each rank on GPU ``LOCAL_RANK``) and resolve ``train.fsdp``. A no-op at world size 1."""
    from fastrl.distributed.env import dist_info, init_distributed

    info = dist_info()
    device = resolve_device(train_cfg.device)
    fsdp = train_cfg.fsdp if train_cfg.fsdp is not None else info.world_size > 1
    if info.world_size == 1:
        if fsdp:
            raise ValueError("train.fsdp needs several processes (launch with torchrun, WORLD_SIZE > 1)")
        return device, False
    if not fsdp:
        raise ValueError("WORLD_SIZE > 1 needs train.fsdp (FSDP2 is the only data-parallel wrapper)")
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    init_distributed("nccl" if device.type == "cuda" else "gloo")
    return device, True


def adamw_fused(params: list[torch.Tensor], want: bool | None) -> bool | None:
    """``optim.fused`` resolved for ``params``: torch's fused AdamW kernel runs floating parameters that all
    live on one CPU or CUDA device type (DTensor shards included). ``None`` (auto) picks it there; ``True``
    where it cannot run is a ``ValueError``. Returns the ``fused`` argument of ``torch.optim.AdamW``."""
    if want is False:
        return None
    kinds = {p.device.type for p in params}
    ok = len(kinds) == 1 and kinds <= {"cpu", "cuda"} and all(p.is_floating_point() for p in params)
    if want and not ok:
        raise ValueError(
            "optim.fused=True needs floating parameters on one CPU or CUDA device type, "
            f"got devices {sorted(kinds)}"
        )
    return True if ok else None


def lr_factor(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Multiplier of ``optim.lr`` at optimizer step ``step`` (0-based), see the module docstring."""
    if step < optim.warmup_steps:
        return (step + 1) / (optim.warmup_steps + 1)
    if optim.schedule == "constant":
        return 1.0
    if optim.schedule == "linear":
        left = max(0.0, (max_steps - step) / max(1, max_steps - optim.warmup_steps))
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * left
    p = (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps)
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))


class MetricsLog:
    """``metrics.jsonl`` in the output dir (records after ``start_step`` from an interrupted run are
    dropped on resume), plus TensorBoard when asked for and installed."""

    def __init__(self, output_dir: Path, *, start_step: int, tensorboard: bool, enabled: bool):
        self.path = output_dir / "metrics.jsonl"
        self.enabled, self.tb = enabled, None
        if not enabled:
            return
        kept = []
        if start_step and self.path.exists():
            kept = [
                r for r in self.path.read_text().splitlines() if r and json.loads(r)["step"] <= start_step
            ]
        self.path.write_text("".join(r + "\n" for r in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(output_dir / "tensorboard"))
            except ImportError:
                print("tensorboard is not installed; logging to metrics.jsonl only")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step":
                    self.tb.add_scalar(k, v, record["step"])


def _scalar(v) -> float:
    return float(v.detach().float().mean()) if isinstance(v, torch.Tensor) else float(v)


def train(
    step: TrainStep,
    *,
    model: torch.nn.Module,
    tokenizer,
    train_cfg: TrainConfig,
    optim_cfg: OptimConfig,
    adapter_only: bool = False,
    desc: str = "train",
    run: dict | None = None,
    hooks: list | None = None,
) -> dict:
    """Run the loop (see the module docstring). Returns the last record plus ``history`` (all records)
    and ``eval_history`` (the hooks' records).

    ``hooks``: callables ``hook(step, max_steps) -> dict | None`` run after every optimizer step (``step``
    counts the steps done), on every rank (they may be collective); a dict is written to the metrics as
    ``{"step": step, **dict}``. A hook's optional ``begin(start_step)`` runs once before the loop.

    ``run``: this run's identity (``run_state.run_identity``), recorded in every checkpoint and checked
    against the checkpoint a resume starts from (``None``: neither). Raises ``TrainingInterrupted`` (a
    ``SystemExit``) when stopped by SIGINT / SIGTERM."""
    from tqdm.auto import tqdm

    from fastrl.distributed.checkpoint import (
        checkpoint_path,
        clean_debris,
        export_hf,
        latest_checkpoint,
        list_checkpoints,
        load_checkpoint,
        read_state,
        rotate_checkpoints,
        save_checkpoint,
    )
    from fastrl.distributed.env import barrier, dist_info
    from fastrl.distributed.fsdp import grad_norm_value
    from fastrl.trainers.interrupt import StopGuard, TrainingInterrupted, _StopNow, stop_message
    from fastrl.trainers.metrics import reduce_step
    from fastrl.trainers.run_state import check_resume, prepare_output_dir

    assert train_cfg.max_steps is not None, "resolve train.num_train_epochs first (trainers.epochs)"
    is_main = dist_info().rank == 0
    out = Path(train_cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    fused = adamw_fused(params, optim_cfg.fused)
    optimizer = torch.optim.AdamW(
        params,
        lr=optim_cfg.lr,
        betas=(optim_cfg.adam_beta1, optim_cfg.adam_beta2),
        eps=optim_cfg.adam_eps,
        weight_decay=optim_cfg.weight_decay,
        fused=fused,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, optim_cfg, train_cfg.max_steps)
    )

    start = 0
    resume = train_cfg.resume_from_checkpoint
    clean_debris(out)  # of saves killed outright (rank 0)
    if not resume:
        prepare_output_dir(out, train_cfg, existing=list_checkpoints(out), is_main=is_main)
    barrier()
    ckpt = latest_checkpoint(out) if resume == "auto" else (resume or None)
    if ckpt is not None:
        saved = read_state(ckpt)
        check_resume(saved.get("run"), run, ckpt, step=int(saved["step"]), max_steps=train_cfg.max_steps)
        state = load_checkpoint(ckpt, model=model, optimizer=optimizer, scheduler=scheduler)
        for group in optimizer.param_groups:  # a loaded state brings its run's kernel choice: keep this one's
            group["fused"], group["foreach"] = fused, None
        start = int(state["step"])
        step.load_state_dict(state["trainer"])
        if is_main:
            print(f"resumed from {ckpt} at step {start}")

    log = MetricsLog(out, start_step=start, tensorboard=train_cfg.tensorboard, enabled=is_main)
    hooks, evals = list(hooks or ()), []
    for hook in hooks:
        if hasattr(hook, "begin"):
            hook.begin(start)
    device = next(model.parameters()).device
    ga = train_cfg.gradient_accumulation_steps
    history, window = [], defaultdict(list)
    bar = tqdm(
        total=train_cfg.max_steps, initial=start, desc=desc, disable=not (train_cfg.progress_bar and is_main)
    )
    t0 = time.perf_counter()

    fmt = train_cfg.checkpoint_format
    if fmt == "auto":
        from fastrl.distributed.fsdp import is_fsdp

        fmt = "sharded" if is_fsdp(model) else "full"

    def save(n: int) -> Path:
        path = save_checkpoint(
            checkpoint_path(out, n),
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            state={"step": n, "trainer": step.state_dict(), "run": run},
            adapter_only=adapter_only,
            format=fmt,
        )
        if train_cfg.save_total_limit is not None:
            rotate_checkpoints(out, train_cfg.save_total_limit)
        return path

    def optimizer_step(s: int) -> None:
        model.train()
        micro: list[dict] = []
        for k in range(ga):
            with torch.autocast(
                "cuda", dtype=torch.bfloat16, enabled=train_cfg.bf16 and device.type == "cuda"
            ):
                loss, metrics = step.micro_step(s * ga + k)
            (loss / ga).backward()
            micro.append({"loss": _scalar(loss), **metrics})
        clip = optim_cfg.max_grad_norm if optim_cfg.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        # the global batch's value of every metric (fastrl.trainers.metrics; collective under FSDP)
        for key, value in reduce_step(micro).items():
            window[key].append(value)
        window["grad_norm"].append(grad_norm_value(grad_norm))
        bar.update(1)
        bar.set_postfix({k: f"{window[k][-1]:.4g}" for k in ("loss", "reward") if k in window})
        if (s + 1) % train_cfg.logging_steps == 0 or s + 1 == train_cfg.max_steps:
            means = {k: sum(v) / len(v) for k, v in window.items()}  # already global: no collective
            record = {"step": s + 1, "lr": lr, **means, "elapsed_s": time.perf_counter() - t0}
            history.append(record)
            log.write(record)
            window.clear()

    done = start
    try:
        with StopGuard(desc, announce=is_main) as guard:
            for s in range(start, train_cfg.max_steps):
                optimizer_step(s)
                done = s + 1
                for hook in hooks:  # evaluation, sample completions (collective: every rank runs them)
                    extra = hook(done, train_cfg.max_steps)
                    if extra:
                        evals.append({"step": done, **extra})
                        log.write(evals[-1])
                saved = None
                if train_cfg.save_steps and done % train_cfg.save_steps == 0 and done < train_cfg.max_steps:
                    saved = save(done)
                signum = guard.requested()  # collective: every rank stops at the same step
                if signum:
                    if saved is None:  # the boundary is consistent: save it, as save_steps would
                        saved = save(done)
                    msg = stop_message(desc, signum, done, train_cfg.max_steps, saved, None, out)
                    if is_main:
                        print(msg, file=sys.stderr, flush=True)
                    raise TrainingInterrupted(signum, done, str(saved), msg)
    except _StopNow as stop:
        msg = stop_message(desc, stop.signum, done, train_cfg.max_steps, None, latest_checkpoint(out), out)
        if is_main:
            print(msg, file=sys.stderr, flush=True)
        raise TrainingInterrupted(stop.signum, done, None, msg) from None
    finally:
        bar.close()
    if train_cfg.export_final:  # collective under FSDP: every rank calls, rank 0 writes
        export_hf(model, tokenizer, out / "final")
    return {**(history[-1] if history else {}), "history": history, "eval_history": evals}


def train_run(
    step: TrainStep, cfg: RunConfig, *, model: torch.nn.Module, tokenizer, desc: str, hooks=None
) -> dict:
    """``train`` with the sections of a run config (LoRA runs save and export only the adapter)."""
    from fastrl.distributed.env import dist_info
    from fastrl.trainers.run_state import run_identity

    return train(
        step,
        model=model,
        tokenizer=tokenizer,
        train_cfg=cfg.train,
        optim_cfg=cfg.optim,
        adapter_only=cfg.lora.enabled,
        desc=desc,
        run=run_identity(desc, cfg, model, dist_info().world_size),
        hooks=hooks,
    )
