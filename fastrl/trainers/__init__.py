"""The trainers: one loop core (``core.train``) and the step each trainer adds.

    fastrl.trainers.sft.SFTRunConfig,  run_sft(cfg, *, model=None, tokenizer=None, dataset=None)
    fastrl.trainers.dpo.DPORunConfig,  run_dpo(cfg, *, model=None, tokenizer=None, dataset=None)
    fastrl.trainers.grpo.GRPORunConfig, run_grpo(cfg, *, model=None, tokenizer=None, dataset=None,
                                                 reward_funcs=None, engine=None)

Each returns the last metrics record plus ``history`` (every record, also in ``output_dir/metrics.jsonl``).
"""
