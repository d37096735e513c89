"""Every Axolotl config key that lowbit neither spells the same way nor translates (``axolotl.py`` translates the
rest): each is an implementation choice lowbit makes itself, or a feature lowbit does not have. Torch-free.

    CHOICES       accepted whatever the value: the key picks *how* something is computed (attention kernels,
                  fused kernels, compile flags, dataloader workers, caches), never *what*; or it configures
                  something with nothing to do here (hub uploads — nothing leaves this machine). ``lowbit train``
                  lists the ones a config sets, with the reason.
    UNSUPPORTED   a feature lowbit does not have: accepted while unset (null, false, 0, empty, or Axolotl's own
                  default), refused in one line naming the key, the value and what to do instead otherwise.

The keys are those of Axolotl's schema (``src/axolotl/utils/schemas/`` and its plugins' ``args.py``, read at commit
067b021 of July 2026) plus a few older keys configs still carry (``gptq_groupsize``); a key in no schema is an
error with a did-you-mean.
"""

from __future__ import annotations

__all__ = ["CHOICES", "UNSUPPORTED", "PLUGINS"]

_ATTN = "lowbit runs attention with PyTorch's scaled_dot_product_attention (same math)"
_KERNELS = "lowbit's own fused kernels (4-bit dequantize, chunked loss, RMSNorm/SwiGLU backward) are used"
_COMPILE = "lowbit compiles its decoder layers with inductor's defaults (torch_compile: → compile:)"
_DATA = "lowbit's data layer decides this (memory-mapped Arrow tables, tokenization cached by content)"
_NOTHING_UPLOADED = "nothing is uploaded: no model hub is reachable, the result stays in output_dir"
_INTERNAL = "Axolotl's own bookkeeping"
_MOE = "lowbit runs mixture-of-experts layers with its own expert kernels (nn/experts.py)"
_DIST = "lowbit runs several processes with torchrun (distributed: ddp | fsdp) and chooses these itself"
_TRACKER = "not built in; lowbit logs to wandb_project, mlflow_tracking_uri or tensorboard: true"
_RL = ("reward models are not built in (rl: grpo takes reward functions, trl.reward_funcs; preference tuning: "
       "rl: dpo, ipo, orpo, kto, simpo)")

CHOICES = {
    # attention and kernels
    **dict.fromkeys(("attn_implementation", "flash_attention", "sdp_attention", "xformers_attention",
                     "flex_attention", "flex_attn_compile_kwargs", "sage_attention", "eager_attention",
                     "gemma4_hybrid_attn_impl", "large_head_attention", "flash_attn_d512", "sdpa_varlen",
                     "s2_attention", "flash_optimum"), _ATTN),
    **dict.fromkeys(("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel",
                     "fused_attn_kernel", "flash_attn_cross_entropy", "flash_attn_fuse_mlp", "flash_attn_rms_norm",
                     "use_kernels", "liger_rope", "liger_rms_norm", "liger_rms_norm_gated", "liger_layer_norm",
                     "liger_swiglu", "liger_glu_activation", "liger_cross_entropy", "liger_use_token_scaling",
                     "tiled_mlp_use_original_mlp", "dpo_use_liger_kernel"), _KERNELS),
    **dict.fromkeys(("chunked_cross_entropy", "chunked_cross_entropy_num_chunks", "cut_cross_entropy",
                     "liger_fused_linear_cross_entropy"),
                    "lowbit's loss is already chunked: the full logits tensor never exists"),
    **dict.fromkeys(("torch_compile_backend", "torch_compile_mode", "torch_compile_options"), _COMPILE),
    **dict.fromkeys(("experts_implementation", "use_scattermoe", "use_sonicmoe", "llama4_linearized_experts",
                     "expert_backend", "moe_grouped_backend", "moe_dequant_chunk_size", "moe_bnb_fast",
                     "dsv4_fp4_grouped_mode", "dsv4_fp8_nonexpert_mode", "dsv4_fp8_lora_kernel",
                     "dsv4_shared_mlp_lora_kernel", "dsv4_bf16_all", "use_dsv4_kernels", "use_glm_dsa_kernels",
                     "gemma4_fp8_nonexpert", "gemma4_nf4_nonexpert", "nonexpert_quantization"), _MOE),
    "quantize_moe_experts": "lowbit quantizes expert weights with the rest of the base whenever the base is 4-bit",
    "lora_fan_in_fan_out": "lowbit finds GPT-2-style Conv1D layouts itself",
    "dpo_padding_free": "preference batches are right-padded rows (the pad is never attended to or learned)",
    "dpo_use_logits_to_keep": "the log-probs are computed only where the completions are (in chunks)",
    "vllm": "rl: grpo samples in-process from the model being trained (no vLLM server is started or used)",
    "peft_ensure_weight_tying": "tied embeddings stay tied: one set of trained rows serves both",
    "tf32": "TF32 matmuls are a GPU setting lowbit leaves to PyTorch",
    "gradient_checkpointing_kwargs": "lowbit's checkpointing is non-reentrant whatever this says (same gradients)",
    "embeddings_skip_upcast": "lowbit keeps trained embedding rows in float32",
    "peft_autocast_adapter_dtype": "lowbit keeps LoRA factors in float32 and computes in compute_dtype",
    "low_cpu_mem_usage": "lowbit streams the checkpoint one tensor at a time anyway",
    "qlora_sharded_model_loading": "lowbit quantizes while streaming, one tensor at a time",
    "lora_on_cpu": "lowbit adds LoRA where the base is",
    "experimental_skip_move_to_device": "lowbit quantizes while streaming, one tensor at a time",
    "model_quantization_config": "lowbit reads float or bitsandbytes checkpoints and quantizes them itself",
    "model_quantization_config_kwargs": "lowbit reads float or bitsandbytes checkpoints and quantizes them itself",
    # model / tokenizer loading: lowbit reads what the folder holds
    **dict.fromkeys(("model_type", "type_of_model", "tokenizer_type", "cls_model_config", "is_falcon_derived_model",
                     "is_llama_derived_model", "is_mistral_derived_model", "is_qwen_derived_model"),
                    "lowbit reads the model class and tokenizer from the folder's config.json / tokenizer files"),
    "tokenizer_use_fast": "lowbit uses the fast (Rust) tokenizer the folder carries",
    "tokenizer_legacy": "lowbit uses the tokenizer the folder carries, as its tokenizer_config.json says",
    "tokenizer_save_jinja_files": "lowbit saves the chat template inside tokenizer_config.json",
    "revision_of_model": "the local folder is read as it is (no hub)",
    "model_revision": "the local folder is read as it is (no hub)",
    "hf_use_auth_token": "nothing is downloaded: no token is needed",
    # data pipeline
    **dict.fromkeys(("dataset_prepared_path", "skip_prepare_dataset", "num_dataset_shards_to_save",
                     "dataset_keep_in_memory", "preprocess_iterable", "is_preprocess", "dataloader_pin_memory",
                     "dataloader_num_workers", "dataloader_prefetch_factor", "dataloader_drop_last",
                     "remove_unused_columns", "sample_packing_group_size", "sample_packing_bin_size",
                     "sample_packing_mp_start_method", "sample_packing_sequentially", "multipack_real_batches",
                     "eval_sample_packing", "batch_flattening", "streaming", "streaming_multipack_buffer_size",
                     "pretrain_multipack_buffer_size", "dataset_num_proc_shards", "shuffle_before_merging_datasets"),
                    _DATA),
    # outputs and hubs
    **dict.fromkeys(("hub_model_id", "hub_strategy", "hub_revision", "push_dataset_to_hub"), _NOTHING_UPLOADED),
    "save_safetensors": "lowbit always saves safetensors",
    "save_only_model": "lowbit's checkpoints keep the optimizer state too, for an exact resume",
    "merge_lora": "merge with `lowbit merge` after training",
    "merge_method": "`lowbit merge` reads one tensor at a time",
    "include_tokens_per_second": "lowbit always reports tokens/s",
    "include_tkps": "lowbit always reports tokens/s",
    "hf_mlflow_log_artifacts": "the adapter and checkpoints stay in output_dir",
    "wandb_watch": "gradients are not sent to W&B; lowbit logs loss, lr, grad_norm and eval loss",
    "wandb_log_model": "the adapter stays in output_dir; it is not uploaded as an artifact",
    "gc_steps": "memory housekeeping is lowbit's", "torch_empty_cache_steps": "memory housekeeping is lowbit's",
    "gc_collect_steps": "memory housekeeping is lowbit's",
    # several processes
    **dict.fromkeys(("ddp", "world_size", "local_rank", "ddp_bucket_cap_mb", "ddp_broadcast_buffers",
                     "ddp_find_unused_parameters", "fp32_norms", "fp32_norm_classes", "fsdp_final_state_dict_type",
                     "accelerator_config", "device_map"), _DIST),
    # Axolotl's own
    **dict.fromkeys(("strict", "axolotl_config_path", "total_num_tokens", "total_supervised_tokens",
                     "sample_packing_eff_est", "debug"), _INTERNAL),
    "freeze_mm_modules": "the vision tower and projector are frozen, as every module but LoRA (and what you unfreeze)",
    "processor_type": "lowbit reads the processor the model folder holds (transformers' AutoProcessor)",
    "logging_dir": "lowbit writes metrics.jsonl (and tensorboard/) into output_dir",
    "eval_table_size": "lowbit evaluates the held-out loss",
    "eval_max_new_tokens": "lowbit evaluates the held-out loss",
}

# key → (why it is refused, Axolotl's default — also accepted — where that default is not null/false)
UNSUPPORTED: dict[str, tuple[str, object]] = {
    **{k: ("DeepSpeed is not used: launch several processes with torchrun (distributed: ddp | fsdp)", None)
       for k in ("deepspeed", "deepcompile")},
    "gptq": ("GPTQ-quantized bases are not read: give the float checkpoint (lowbit quantize --calibrate DATA "
             "--method gptq rounds it the GPTQ way)", None),
    **{k: ("old GPTQ loader settings: GPTQ bases are not read", None)
       for k in ("gptq_groupsize", "gptq_model_v1", "gptq_disable_exllama")},
    **{k: ("ReLoRA is not built in: train one LoRA run", d) for k, d in
       (("relora", None), ("relora_prune_ratio", None), ("relora_prune_method", "magnitude"),
        ("relora_cpu_offload", None), ("jagged_restart_steps", None), ("jagged_restart_warmup_steps", None),
        ("jagged_restart_anneal_steps", None))},
    "tokenizer_use_mistral_common": ("mistral-common tokenizers are not read: give a folder with a Hugging Face "
                                     "tokenizer (tokenizer.json)", None),
    "processor_kwargs": ("processor options are read from the model folder (preprocessor_config.json): set them "
                         "there", None),
    **{k: ("images reach the model's processor at their own size; it resizes them as the model expects", None)
       for k in ("image_size", "image_resize_algorithm")},
    "role_boundaries": ("turn boundaries come from the chat template (learned turns: roles_to_train)", None),
    "peft_use_dora": ("DoRA is not built in: use LoRA (lora_r, lora_alpha)", None),
    "peft_layer_replication": ("layer replication is not built in", None),
    "peft_layers_pattern": ("set lora_target_modules to a regex over the layers you want", None),
    "peft_layers_to_transform": ("set lora_target_modules to a regex over the layers you want, e.g. "
                                 r"'model\.layers\.(0|1)\..*_proj'", None),
    "lora_rank_pattern": ("one rank for every adapted layer: set lora_r", None),
    "lora_alpha_pattern": ("one alpha for every adapted layer: set lora_alpha", None),
    "loraplus_lr_embedding": ("LoRA on embeddings is not built in (train them whole: lora_modules_to_save)", 1e-6),
    "optim_args": ("extra optimizer arguments are not passed: lowbit's AdamW takes adam_beta1/2, adam_epsilon, "
                   "weight_decay", None),
    "optim_target_modules": ("GaLore-style optimizers are not built in", None),
    "torchdistx_path": ("the anyprecision optimizer is not built in", None),
    "lr_scheduler_kwargs": ("scheduler arguments are lowbit's own keys: warmup_steps / warmup_ratio, "
                            "cosine_min_lr_ratio, cosine_constant_lr_ratio", None),
    "lr_div_factor": ("the one_cycle schedule is not built in", None),
    "lr_groups": ("per-module learning rates are not built in (embedding_lr / loraplus_lr_ratio are)", None),
    "adam_epsilon2": ("the CAME optimizer is not built in", None), "adam_beta3": ("the CAME optimizer is not built in",
                                                                                  None),
    **{k: ("the Dion optimizer is not built in", d) for k, d in (("dion_lr", None), ("dion_momentum", None),
                                                               ("dion_rank_fraction", 1.0),
                                                               ("dion_rank_multiple_of", 1))},
    **{k: ("the Q-GaLore optimizer is not built in", d) for k, d in (
        ("qgalore_rank", 256), ("qgalore_update_proj_gap", 200), ("qgalore_scale", 0.25), ("qgalore_proj_type", "std"),
        ("qgalore_proj_quant", True), ("qgalore_proj_bits", 4), ("qgalore_proj_group_size", 256),
        ("qgalore_cos_threshold", 0.4), ("qgalore_gamma_proj", 2), ("qgalore_queue_size", 5))},
    "auto_find_batch_size": ("lowbit checks memory before the run and names the micro_batch_size that fits "
                             "(lowbit plan); set it", None),
    **{k: ("Comet is " + _TRACKER, None) for k in ("use_comet", "comet_api_key", "comet_workspace",
                                                   "comet_project_name", "comet_experiment_key", "comet_mode",
                                                   "comet_online", "comet_experiment_config")},
    **{k: ("Trackio is " + _TRACKER, None) for k in ("use_trackio", "trackio_project_name", "trackio_run_name",
                                                     "trackio_space_id")},
    **{k: ("SwanLab is " + _TRACKER, None) for k in (
        "use_swanlab", "swanlab_project", "swanlab_experiment_name", "swanlab_description", "swanlab_mode",
        "swanlab_workspace", "swanlab_api_key", "swanlab_log_model", "swanlab_web_host", "swanlab_api_host",
        "swanlab_lark_webhook_url", "swanlab_lark_secret", "swanlab_log_completions",
        "swanlab_completion_log_interval", "swanlab_completion_max_buffer")},
    **{k: ("OpenTelemetry metrics are " + _TRACKER, d) for k, d in (("use_otel_metrics", None),
                                                                  ("otel_metrics_host", "localhost"),
                                                                  ("otel_metrics_port", 8000))},
    **{k: ("LISA layer sampling is not built in", d) for k, d in (
        ("lisa_n_layers", None), ("lisa_step_interval", None), ("lisa_layers_attribute", "model.layers"))},
    **{k: ("the Gradio UI is not built in: chat with lowbit chat / lowbit generate", None)
       for k in ("gradio_title", "gradio_share", "gradio_server_name", "gradio_server_port", "gradio_max_new_tokens",
                 "gradio_temperature")},
    **{k: ("Ray is not used: launch several processes with torchrun", d) for k, d in (
        ("use_ray", None), ("ray_run_name", None), ("ray_num_workers", 1), ("resources_per_worker", {"GPU": 1}))},
    "overrides_of_model_kwargs": ("from_pretrained arguments are lowbit's own (compute_dtype, trust_remote_code)",
                                  None),
    "max_packed_sequence_len": ("set sample_packing: true and sequence_len", None),
    "use_onebitllms": ("1.58-bit BitNet training is not built in", None),
    "added_tokens_overrides": ("reserved tokens are not renamed: add new ones with tokens:", None),
    "fix_untrained_tokens": ("embedding rows are not rewritten: train them with lora_modules_to_save: "
                             "[embed_tokens]", None),
    "reinit_weights": ("lowbit fine-tunes the checkpoint's weights; random re-initialisation is not built in", None),
    "trainer_cls": ("custom trainer classes are not loaded: lowbit.train(cfg, callbacks=[...]) takes callbacks",
                    None),
    "load_best_model_at_end": ("the adapter is the last step's; pick an earlier one from checkpoints/ (each holds "
                               "its eval loss in metrics.jsonl)", None),
    "metric_for_best_model": ("lowbit's runs compare eval loss only (early_stopping_patience)", None),
    "greater_is_better": ("lowbit's runs compare eval loss only (early_stopping_patience)", None),
    "profiler_steps": ("the profiler is not wired into training: see bench/ for profiles", None),
    "profiler_steps_start": ("the profiler is not wired into training: see bench/ for profiles", 0),
    "dynamic_checkpoint": ("checkpoints are written every save_steps and on Ctrl-C (lowbit train --resume "
                           "continues)", None),
    "selective_checkpointing": ("set gradient_checkpointing: true (whole decoder layers are recomputed)", None),
    "layer_offloading": ("layer weights stay where the model is; the 4-bit base is small", None),
    "fp8": ("FP8 training is not built in: the base is 4-bit and LoRA computes in compute_dtype", None),
    "fp8_enable_fsdp_float8_all_gather": ("FP8 training is not built in", None),
    "qat": ("quantization-aware training is not built in", None),
    "quantization": ("post-training quantization configs are not read: use lowbit quantize", None),
    "scaling_softmax": ("SSMax attention changes the model: not built in", None),
    "scaling_softmax_factor": ("SSMax attention changes the model: not built in", None),
    "scaling_softmax_bias": ("SSMax attention changes the model: not built in", None),
    "use_eaft": ("the EAFT loss is not built in (cross-entropy over the learned tokens)", None),
    "eaft_alpha": ("the EAFT loss is not built in", 1.0), "eaft_k": ("the EAFT loss is not built in", 20),
    **{k: ("PoSE position sampling is not built in", None)
       for k in ("use_pose", "pose_split_on_token_ids", "pose_max_context_len", "pose_num_chunks")},
    "pretraining_dataset": ("streamed pretraining data is not read: give the files in datasets: (type: completion)",
                            None),
    "pretraining_sample_concatenation": ("streamed pretraining data is not read", None),
    "pretrain_multipack_attn": ("streamed pretraining data is not read", True),
    "dataset_shard_num": ("data sharding is not built in: split the file", None),
    "dataset_shard_idx": ("data sharding is not built in: split the file", None),
    "shuffle_merged_datasets": ("lowbit always shuffles (curriculum_sampling: true keeps file order)", True),
    "eval_sequence_len": ("held-out samples are cut at sequence_len like the training ones", None),
    "max_memory": ("per-device memory maps are not used: set memory_limit for the pre-flight", None),
    **{k: ("evaluation is the held-out loss: generation metrics and benchmarks are not built in", None)
       for k in ("do_causal_lm_eval", "eval_causal_lm_metrics", "do_bench_eval", "bench_dataset", "bench_split",
                 "lm_eval_tasks", "lm_eval_batch_size", "lm_eval_post_train", "lm_eval_model")},
    **{k: ("samples are not generated during training: run lowbit generate on a checkpoint", d) for k, d in (
        ("generate_samples", None), ("num_generation_samples", 3), ("generation_max_new_tokens", 50),
        ("generation_temperature", 0.7), ("generation_top_p", None), ("generation_top_k", None),
        ("generation_prompt_ratio", 0.5), ("generation_do_sample", True))},
    **{k: ("context / tensor parallelism is not built in (DDP or FSDP over torchrun ranks is)", d) for k, d in (
        ("context_parallel_size", 1), ("sequence_parallel_degree", 1), ("heads_k_stride", None),
        ("ring_attn_func", None), ("tensor_parallel_size", 1), ("dp_replicate_size", 1), ("dp_shard_size", 1))},
    **{k: ("expert parallelism is not built in (each rank holds every expert)", d) for k, d in (
        ("expert_parallel_size", 1), ("expert_parallel_backend", None), ("expert_parallel_num_nvl_bytes", None),
        ("expert_parallel_num_rdma_bytes", None), ("expert_parallel_token_capacity", None),
        ("expert_parallel_fallback_on_unsupported", None))},
    "nvfp4_merge_aware": ("NVFP4 bases are not read", None), "nvfp4_merge_aware_start_step": ("NVFP4 bases are not "
                                                                                             "read", None),
    "ebft": ("energy-based fine-tuning (EBFT) is not built in (RL with reward functions is: rl: grpo; preference "
             "tuning: rl: dpo, ipo, orpo, kto, simpo)", None),
    **{k: (_RL, None) for k in ("reward_model", "process_reward_model", "center_rewards_coefficient",
                                "num_labels")},
    "dpo_use_weighting": ("WPO weighting is not built in (DPO's losses: sigmoid, hinge, ipo, robust)", None),
    "rpo_alpha": ("RPO's extra NLL term is not built in (ORPO and SimPO's cpo_alpha learn the chosen answers)", None),
    "dpo_norm_loss": ("the length-normalised sigmoid loss is not built in (dpo_loss_type: ipo normalises by length)",
                      None),
    "dpo_generate_during_eval": ("samples are not generated during training: run lowbit generate on a checkpoint",
                                 None),
    # plugins' keys (src/axolotl/integrations/*/args.py) for plugins lowbit has no counterpart of
    **{k: ("knowledge distillation is not built in", None) for k in (
        "kd_trainer", "kd_ce_alpha", "kd_alpha", "kd_temperature", "kd_beta", "kd_normalize_topk",
        "kd_online_server_base_url", "kd_online_topk", "kd_online_server", "kd_online_timeout", "kd_temperature_min")},
    **{k: ("diffusion training is not built in", None) for k in ("diffusion",)},
    **{k: ("Grokfast is not built in", None) for k in ("grokfast_alpha", "grokfast_lamb")},
    **{k: ("Spectrum layer selection is not built in: choose lora_target_modules", None)
       for k in ("spectrum_top_fraction", "spectrum_model_name")},
    "dense_mixer": ("DenseMixer is not built in", None), "mora": ("MoRA is not built in", None),
    "hatchery": ("remote training backends are not used", None), "llmcompressor": ("LLM Compressor is not used", None),
    **{k: ("NeMo Gym is not used", None) for k in (
        "nemo_gym_enabled", "nemo_gym_dir", "nemo_gym_auto_clone", "nemo_gym_config_paths", "nemo_gym_head_port",
        "nemo_gym_server_timeout", "nemo_gym_verify_timeout", "nemo_gym_run_timeout", "nemo_gym_datasets",
        "nemo_gym_auto_start", "nemo_gym_model_name", "nemo_gym_multi_turn", "nemo_gym_max_turns")},
}

# Axolotl plugins (``plugins:``) whose work lowbit does itself; any other plugin is refused
PLUGINS = {
    "cut_cross_entropy": "lowbit's loss is already chunked: the full logits tensor never exists",
    "liger": _KERNELS,
    "kernels": _MOE,
}

assert not set(CHOICES) & set(UNSUPPORTED)
