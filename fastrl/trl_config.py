"""A TRL config file (the YAML ``trl grpo|dpo|sft --config`` reads) turned into fastrl's nested config.

The file may hold the fields of TRL 1.16's ``GRPOConfig`` / ``DPOConfig`` / ``SFTConfig`` (with their
``transformers.TrainingArguments`` fields), of ``trl.ModelConfig`` (``model_name_or_path``, ``dtype``,
``use_peft``, ``lora_*``...) and of ``trl.ScriptArguments`` (``dataset_name``, ``dataset_train_split``...),
plus GRPO's ``reward_funcs``. Rule: every field the file states is mapped onto its fastrl key
(``MAPPED`` below, and the few that need a rule of their own in ``_special``), or accepted when its value
is what fastrl does anyway (``SAME``); every other field is refused, all of them named in one
``ValueError``. Fields the file leaves out keep fastrl's defaults; where TRL's default differs in a way
that changes the run, ``convert`` returns a note saying so (``DEFAULT_NOTES``)::

    data, notes = convert(read_yaml("trl_grpo.yaml"), "grpo")   # {"optim": {"lr": ...}, ...}, [str]

Imports no torch; ``fastrl.cli`` validates the result against the trainer's run config.
"""

from __future__ import annotations

import math

TRAINERS = ("sft", "dpo", "grpo")
_ALL = frozenset(TRAINERS)
_G, _D, _S = frozenset({"grpo"}), frozenset({"dpo"}), frozenset({"sft"})

# TRL field -> (fastrl dotted key, trainers it applies to).
MAPPED: dict[str, tuple[str, frozenset]] = {
    # TrainingArguments
    "output_dir": ("train.output_dir", _ALL),
    "per_device_train_batch_size": ("train.per_device_batch_size", _ALL),
    "gradient_accumulation_steps": ("train.gradient_accumulation_steps", _ALL),
    "learning_rate": ("optim.lr", _ALL),
    "weight_decay": ("optim.weight_decay", _ALL),
    "adam_beta1": ("optim.adam_beta1", _ALL),
    "adam_beta2": ("optim.adam_beta2", _ALL),
    "adam_epsilon": ("optim.adam_eps", _ALL),
    "max_grad_norm": ("optim.max_grad_norm", _ALL),
    "save_total_limit": ("train.save_total_limit", _ALL),
    "seed": ("train.seed", _ALL),
    "bf16": ("train.bf16", _ALL),
    "gradient_checkpointing": ("model.gradient_checkpointing", _ALL),
    "activation_checkpointing": ("model.gradient_checkpointing", _ALL),  # transformers 5's new name
    "overwrite_output_dir": ("train.overwrite_output_dir", _ALL),
    "activation_offloading": ("train.activation_offloading", _D | _S),
    # trl.ModelConfig
    "model_name_or_path": ("model.name_or_path", _ALL),
    "model_revision": ("model.revision", _ALL),
    "dtype": ("model.torch_dtype", _ALL),
    "torch_dtype": ("model.torch_dtype", _ALL),
    "attn_implementation": ("model.attn_implementation", _ALL),
    "trust_remote_code": ("model.trust_remote_code", _ALL),
    "use_peft": ("lora.enabled", _ALL),
    "lora_r": ("lora.r", _ALL),
    "lora_alpha": ("lora.alpha", _ALL),
    "lora_dropout": ("lora.dropout", _ALL),
    "lora_target_modules": ("lora.target_modules", _ALL),
    # trl.ScriptArguments
    "dataset_name": ("data.dataset", _ALL),
    "dataset_config": ("data.dataset_config", _ALL),
    "dataset_train_split": ("data.split", _ALL),
    # SFT / DPO
    "max_length": ("data.max_length", _D | _S),
    "max_prompt_length": ("data.max_prompt_length", _ALL),
    "packing": ("sft.packing", _S),
    "completion_only_loss": ("sft.completion_only_loss", _S),
    "assistant_only_loss": ("sft.assistant_only_loss", _S),
    "precompute_ref_log_probs": ("dpo.precompute_ref_log_probs", _D),
    "loss_weights": ("dpo.loss_weights", _D),
    "ld_alpha": ("dpo.ld_alpha", _D),
    "f_divergence_type": ("dpo.f_divergence_type", _D),
    "f_alpha_divergence_coef": ("dpo.f_alpha_divergence_coef", _D),
    "label_smoothing": ("dpo.label_smoothing", _D),
    "use_weighting": ("dpo.use_weighting", _D),
    # GRPO
    "num_generations": ("grpo.num_generations", _G),
    "max_completion_length": ("grpo.max_completion_length", _G),
    "generation_batch_size": ("grpo.generation_batch_size", _G),
    "steps_per_generation": ("grpo.steps_per_generation", _G),
    "num_iterations": ("grpo.num_iterations", _G),
    "temperature": ("grpo.temperature", _G),
    "top_p": ("grpo.top_p", _G),
    "top_k": ("grpo.top_k", _G),
    "reward_funcs": ("grpo.reward_funcs", _G),
    "reward_weights": ("grpo.reward_weights", _G),
    "mask_truncated_completions": ("grpo.mask_truncated_completions", _G),
    "epsilon": ("loss.epsilon_low", _G),
    "epsilon_high": ("loss.epsilon_high", _G),
    "delta": ("loss.delta", _G),
    "importance_sampling_level": ("loss.importance_sampling_level", _G),
    "use_bias_correction_kl": ("loss.use_bias_correction_kl", _G),
    "sapo_temperature_pos": ("loss.sapo_temperature_pos", _G),
    "sapo_temperature_neg": ("loss.sapo_temperature_neg", _G),
    "vespo_k_pos": ("loss.vespo_k_pos", _G),
    "vespo_lambda_pos": ("loss.vespo_lambda_pos", _G),
    "vespo_k_neg": ("loss.vespo_k_neg", _G),
    "vespo_lambda_neg": ("loss.vespo_lambda_neg", _G),
    "top_entropy_quantile": ("loss.top_entropy_quantile", _G),
    "entropy_coef": ("loss.entropy_coef", _G),
    "off_policy_mask_threshold": ("loss.off_policy_mask_threshold", _G),
    "vllm_gpu_memory_utilization": ("engine.gpu_memory_utilization", _G),
    "vllm_tensor_parallel_size": ("engine.tensor_parallel_size", _G),
    "vllm_enable_sleep_mode": ("engine.enable_sleep_mode", _G),
    "vllm_max_model_length": ("engine.max_model_len", _G),
    "vllm_importance_sampling_mode": ("loss.is_mode", _G),
    "vllm_importance_sampling_clip_min": ("loss.is_clip_min", _G),
    "vllm_importance_sampling_clip_max": ("loss.is_clip_max", _G),
}

_ANY = object()  # any value: the field changes nothing fastrl does (bookkeeping, another backend's knob)
# TRL field -> the values fastrl accepts without mapping them (it does that anyway), or _ANY.
SAME: dict[str, object] = {
    "optim": ("adamw_torch", "adamw_torch_fused"),
    "logging_strategy": ("steps",),
    "logging_first_step": (False,),
    "fp16": (False,),
    "tf32": (None, False),
    "use_cpu": (False,),
    "optim_args": (None,),
    "torch_compile": (False,),
    "auto_find_batch_size": (False,),
    "push_to_hub": (False,),
    "load_best_model_at_end": (False,),
    "fsdp": (None, "", []),
    "deepspeed": (None,),
    "do_train": _ANY, "do_eval": _ANY, "do_predict": _ANY,
    "run_name": _ANY, "logging_dir": _ANY, "log_level": _ANY, "log_level_replica": _ANY,
    "logging_nan_inf_filter": _ANY, "project": _ANY, "save_only_model": _ANY, "save_safetensors": _ANY,
    "remove_unused_columns": _ANY, "dataloader_num_workers": _ANY, "dataloader_pin_memory": _ANY,
    "dataset_num_proc": _ANY, "ddp_timeout": _ANY, "ddp_find_unused_parameters": _ANY,
    "use_liger_kernel": _ANY,  # fastrl's own fused log-prob losses play that part
    "ds3_gather_for_generation": _ANY, "skip_memory_metrics": _ANY, "include_num_input_tokens_seen": _ANY,
    "model_init_kwargs": (None, {}),
    "router_aux_loss_coef": (None,),
    "pad_token": (None,),
    "pad_to_multiple_of": ("auto", None),
    "padding_free": _ANY,  # the same loss; fastrl pads (or packs with position ids)
    "disable_dropout": _ANY,  # see DEFAULT_NOTES
    "cast_lm_head_to_fp32": (False,),
    "lora_task_type": ("CAUSAL_LM",),
    "use_rslora": (False,), "use_dora": (False,), "load_in_8bit": (False,), "load_in_4bit": (False,),
    "lora_target_parameters": (None,), "lora_modules_to_save": (None,),
    "dataset_streaming": (False,),
    "ignore_bias_buffers": (False,),
    "sync_ref_model": (False,),
    "ref_model_mixup_alpha": _ANY, "ref_model_sync_steps": _ANY,  # only with sync_ref_model
    # SFT
    "dataset_text_field": ("text",),
    "truncation_mode": ("keep_start",),
    "packing_strategy": ("bfd", "ffd"),  # fastrl packs first-fit decreasing
    "eos_token": (None,), "chat_template_path": (None,), "dataset_kwargs": (None,), "eval_packing": (None,),
    # DPO
    "precompute_ref_batch_size": _ANY,
    # GRPO
    "min_p": (None, 0, 0.0),
    "repetition_penalty": (1, 1.0),
    "generation_kwargs": (None, {}),
    "chat_template_kwargs": (None,),
    "cache_implementation": (None,),
    "multi_objective_aggregation": ("sum_then_normalize",),
    "log_unique_prompts": (False,), "log_multimodal": _ANY, "log_completions_hub_repo": (None,),
    "max_tool_calling_iterations": (None,),
    "use_transformers_paged": (False,), "use_transformers_continuous_batching": (False,),
    "transformers_continuous_batching_config": (None,), "vllm_importance_sampling_cap": (None,),
    "vllm_structured_outputs_regex": (None,), "vllm_model_impl": ("vllm",),
    "vllm_server_timeout": _ANY, "vllm_group_port": _ANY,
    "use_adaptive_entropy": (False,),
    "entropy_coef_min": _ANY, "entropy_coef_max": _ANY, "entropy_coef_delta": _ANY, "entropy_target": _ANY,
}

# Handled by _special (several fields, or a value to translate).
SPECIAL = {
    "max_steps", "num_train_epochs", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps",
    "warmup_ratio", "logging_steps", "save_strategy", "save_steps", "eval_strategy", "eval_steps",
    "per_device_eval_batch_size", "dataset_test_split", "report_to", "disable_tqdm", "resume_from_checkpoint",
    "gradient_checkpointing_kwargs", "activation_checkpointing_kwargs", "beta", "loss_type", "scale_rewards",
    "discopop_tau", "use_vllm",
    "vllm_mode", "vllm_server_base_url", "vllm_server_host", "vllm_server_port",
    "vllm_importance_sampling_correction", "log_completions", "num_completions_to_print",
    "num_generations_eval", "shuffle_dataset",
}  # fmt: skip

# (field, trainers, TRL's default, what fastrl does instead): said when the file leaves the field out.
DEFAULT_NOTES = [
    ("learning_rate", _G | _D, "1e-6", "optim.lr 1e-5"),
    ("learning_rate", _S, "2e-5", "optim.lr 1e-5"),
    ("lr_scheduler_type", _ALL, "linear", "optim.schedule cosine"),
    ("max_steps", _ALL, "3 epochs (num_train_epochs 3)", "train.max_steps 100"),
    ("logging_steps", _ALL, "10", "train.logging_steps 1"),
    ("seed", _ALL, "42", "train.seed 0"),
    ("save_steps", _ALL, "a checkpoint every 500 steps", "train.save_steps 0 (none)"),
    ("gradient_checkpointing", _ALL, "True", "model.gradient_checkpointing False"),
    ("max_completion_length", _G, "512", "grpo.max_completion_length 256"),
    ("disable_dropout", _D, "True (dropout off)", "the model's own dropout (0 for Qwen/Llama-style models)"),
]
WARMUP_NOTE = (
    "warmup: TRL's lr is lr * s / warmup_steps at step s (0 at the first step), fastrl's "
    "lr * (s + 1) / (warmup_steps + 1)"
)


def _set(out: dict, dotted: str, value) -> None:
    node = out
    *parents, leaf = dotted.split(".")
    for name in parents:
        node = node.setdefault(name, {})
    node[leaf] = value


def _get(out: dict, dotted: str, default=None):
    node = out
    for name in dotted.split("."):
        if not isinstance(node, dict) or name not in node:
            return default
        node = node[name]
    return node


def _same_ok(key: str, trainer: str, value) -> bool | None:
    """True / False when ``SAME`` lists ``key`` (value accepted or not), None when it does not."""
    allowed = SAME.get(key)
    if allowed is None:
        return None
    if allowed is _ANY:
        return True
    return any(value == a and type(value) is type(a) or (value is None and a is None) for a in allowed)


def convert(trl: dict, trainer: str) -> tuple[dict, list[str]]:
    """(fastrl nested config data, notes) of the TRL config mapping ``trl`` for ``trainer``; ``ValueError``
    naming every field fastrl does not support (or supports with other values)."""
    if trainer not in TRAINERS:
        raise ValueError(f"--trainer must be one of {TRAINERS}, got {trainer!r}")
    out: dict = {}
    notes: list[str] = []
    refused: list[str] = []
    for key, value in trl.items():
        if key in SPECIAL:
            continue
        if key in MAPPED and trainer in MAPPED[key][1]:
            _set(out, MAPPED[key][0], value)
            continue
        ok = _same_ok(key, trainer, value)
        if ok:
            continue
        refused.append(f"{key}={value!r}" if ok is False else key)
    refused += _special(trl, trainer, out, notes)
    if refused:
        raise ValueError(
            f"this TRL {trainer} config has fields fastrl does not support: {', '.join(refused)} "
            "(drop them, or set the closest fastrl keys after converting)"
        )
    for name, trainers, trl_default, ours in DEFAULT_NOTES:
        stated = name in trl or (name == "max_steps" and "num_train_epochs" in trl)
        if trainer in trainers and not stated:
            notes.append(f"{name} is not in the file: TRL's default is {trl_default}, fastrl keeps {ours}")
    return out, notes


def _special(trl: dict, trainer: str, out: dict, notes: list[str]) -> list[str]:
    """The fields that need a rule of their own; returns the refused ones."""
    refused: list[str] = []
    has = trl.__contains__

    # length: TRL's max_steps > 0 wins over num_train_epochs
    steps = trl.get("max_steps", -1)
    if steps is not None and steps > 0:
        _set(out, "train.max_steps", steps)
        if has("num_train_epochs"):
            notes.append("max_steps > 0 overrides num_train_epochs (as in TRL): num_train_epochs dropped")
    elif has("num_train_epochs") or has("max_steps"):  # max_steps -1: TRL's epochs, 3 unless stated
        _set(out, "train.num_train_epochs", trl.get("num_train_epochs", 3.0))

    sched = trl.get("lr_scheduler_type")
    kwargs = trl.get("lr_scheduler_kwargs") or {}
    if sched is not None:
        names = {"linear": "linear", "cosine": "cosine", "constant": "constant"}
        names.update({"constant_with_warmup": "constant", "cosine_with_min_lr": "cosine"})
        if sched not in names:
            refused.append(f"lr_scheduler_type={sched!r} (fastrl has linear, cosine, constant)")
        else:
            _set(out, "optim.schedule", names[sched])
    if kwargs:
        if sched == "cosine_with_min_lr" and set(kwargs) == {"min_lr_rate"}:
            _set(out, "optim.min_lr_ratio", kwargs["min_lr_rate"])
        else:
            refused.append(f"lr_scheduler_kwargs={kwargs!r} (only {{min_lr_rate}} with cosine_with_min_lr)")
    warm = trl.get("warmup_steps", 0) or 0
    ratio = trl.get("warmup_ratio", 0) or 0
    if 0 < warm < 1:  # transformers 5 reads a warmup_steps below 1 as a ratio of the run
        ratio, warm = warm, 0
    if ratio:
        total = _get(out, "train.max_steps")
        if total is None:
            refused.append("warmup_ratio (as a ratio it needs max_steps in the file; give warmup_steps)")
        else:
            warm = math.ceil(ratio * total)
    if warm:
        if sched == "constant":
            notes.append("TRL's 'constant' schedule has no warmup: optim.warmup_steps left at 0")
        else:
            _set(out, "optim.warmup_steps", int(warm))
            notes.append(WARMUP_NOTE)

    every = trl.get("logging_steps")
    if every is not None:
        if not (isinstance(every, int) or float(every).is_integer()) or every < 1:
            refused.append(f"logging_steps={every!r} (a ratio of the run; give a step count)")
        else:
            _set(out, "train.logging_steps", int(every))

    save = trl.get("save_strategy", "steps")
    if save == "no":
        _set(out, "train.save_steps", 0)
    elif save == "steps":
        n = trl.get("save_steps", 500)
        if n is not None and 0 < n < 1:
            refused.append(f"save_steps={n!r} (a ratio of the run; give a step count)")
        elif has("save_steps") or has("save_strategy"):
            _set(out, "train.save_steps", int(n))
    else:
        refused.append(f"save_strategy={save!r} (fastrl saves every train.save_steps)")

    ev = trl.get("eval_strategy", "no")
    if ev == "steps":
        n = trl.get("eval_steps") or trl.get("logging_steps") or 10  # transformers: unset -> logging_steps
        if n < 1:
            refused.append(f"eval_steps={n!r} (a ratio of the run; give a step count)")
        _set(out, "train.eval_steps", max(1, int(n)))
        if has("dataset_test_split"):
            _set(out, "data.eval_split", trl["dataset_test_split"])
        else:
            notes.append("eval_strategy steps: give the eval data as data.eval_dataset or data.eval_split")
        if has("per_device_eval_batch_size"):
            bs = trl["per_device_eval_batch_size"]
            if trainer == "grpo":  # TRL counts completions, fastrl's GRPO eval batch counts prompts
                bs = max(1, bs // trl.get("num_generations", 8))
            _set(out, "train.per_device_eval_batch_size", bs)
    elif ev != "no":
        refused.append(f"eval_strategy={ev!r} (fastrl evaluates every train.eval_steps)")

    report = trl.get("report_to", "none")
    report = [report] if isinstance(report, str) else list(report or [])
    report = [r for r in report if r != "none"]
    if report == ["tensorboard"]:
        _set(out, "train.tensorboard", True)
    elif report:
        refused.append(f"report_to={trl['report_to']!r} (fastrl writes metrics.jsonl, and tensorboard)")
    if has("disable_tqdm"):
        _set(out, "train.progress_bar", not trl["disable_tqdm"])
    resume = trl.get("resume_from_checkpoint")
    if resume:
        _set(out, "train.resume_from_checkpoint", "auto" if resume is True else str(resume))
    gk = trl.get("gradient_checkpointing_kwargs") or trl.get("activation_checkpointing_kwargs")
    if gk and gk != {"use_reentrant": False}:
        refused.append(f"gradient_checkpointing_kwargs={gk!r} (fastrl checkpoints non-reentrantly)")
    # SFT's shuffle_dataset is a pre-shuffle (its sampler shuffles anyway), as fastrl's sampler does
    if trainer != "sft" and has("shuffle_dataset") and trl["shuffle_dataset"] is not True:
        refused.append("shuffle_dataset=False (fastrl always shuffles)")

    if has("beta"):
        if trainer == "sft":
            refused.append("beta")
        else:
            _set(out, "loss.beta" if trainer == "grpo" else "dpo.beta", trl["beta"])
    if has("loss_type") and trainer != "sft":
        _set(out, "loss.loss_type" if trainer == "grpo" else "dpo.loss_type", trl["loss_type"])
    elif has("loss_type") and trl["loss_type"] != "nll":
        refused.append(f"loss_type={trl['loss_type']!r}")
    if has("discopop_tau") and trainer == "dpo":
        types = trl.get("loss_type", "sigmoid")
        if "discopop" in ([types] if isinstance(types, str) else types):
            _set(out, "dpo.loss_options", {"discopop_tau": trl["discopop_tau"]})
    elif has("discopop_tau"):
        refused.append("discopop_tau")

    grpo_only = {"scale_rewards", "use_vllm", "vllm_mode", "vllm_server_base_url", "vllm_server_host",
                 "vllm_server_port", "vllm_importance_sampling_correction", "log_completions",
                 "num_completions_to_print", "num_generations_eval"}  # fmt: skip
    if trainer != "grpo":
        refused += sorted(k for k in grpo_only if has(k))
        return refused
    if has("scale_rewards"):
        s = trl["scale_rewards"]
        _set(out, "grpo.scale_rewards", ("group" if s else "none") if isinstance(s, bool) else s)
    if trl.get("use_vllm"):
        mode = trl.get("vllm_mode", "colocate")
        if mode == "server":
            url = trl.get("vllm_server_base_url") or (
                f"http://{trl.get('vllm_server_host', '0.0.0.0')}:{trl.get('vllm_server_port', 8000)}"
            )
            _set(out, "engine.kind", "vllm_server")
            _set(out, "engine.base_url", url)
            notes.append("vllm_mode server: start the server with `fastrl vllm-serve`, not `trl vllm-serve`")
        else:
            _set(out, "engine.kind", "vllm")
        # TRL corrects for the engine/trainer mismatch by default (vllm_importance_sampling_correction True)
        _set(out, "grpo.use_engine_logprobs", bool(trl.get("vllm_importance_sampling_correction", True)))
    num_gen = trl.get("num_generations_eval")
    if num_gen is not None and num_gen != trl.get("num_generations", 8):
        refused.append(f"num_generations_eval={num_gen!r} (fastrl evaluates with num_generations)")
    if trl.get("log_completions"):
        _set(out, "train.log_completions_steps", int(trl.get("logging_steps", 10)))
        n = trl.get("num_completions_to_print")
        _set(out, "train.num_completions_to_print", 0 if n is None else n)
    return refused
