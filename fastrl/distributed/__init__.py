"""Scale-out on torch.distributed, one file per technique (torchtitan's layout):

    env.py                    dist_info, init_distributed, is_main_process, barrier, all_reduce_mean
    fsdp.py                   apply_fsdp: FSDP2 fully_shard per decoder layer, then the root
    activation_checkpoint.py  apply_ac: non-reentrant checkpointing of every / every n-th decoder layer
    checkpoint.py             save_checkpoint / load_checkpoint (atomic, exact resume), latest_checkpoint,
                              rotate_checkpoints, export_hf (from export.py)

Apply in this order: activation checkpointing, then (optionally) compile, then FSDP.
"""
