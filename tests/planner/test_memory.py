"""Memory planner arithmetic on hand-computed small cases; sizes; errors; the seed's headline."""


import pytest

from lowbit.errors import LowbitError
from lowbit.planner.memory import GIB, largest, parse_size, plan

TINY = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True)


def test_hand_computed_tiny_case():
    p = plan(TINY, sequence_len=8, micro_batch_size=2, lora_r=4, blocksize=64, double_quant=True, optimizer="adamw",
             device="cpu")
    # per layer: q 64x64, k 64x32, v 64x32, o 64x64, gate/up 64x128, down 128x64
    per_layer = 4096 + 2048 + 2048 + 4096 + 3 * 8192
    n = 2 * per_layer                                             # 73,728 quantized parameters
    assert p.items["quantized_weights"] == n // 2
    blocks = 2 * (64 + 32 + 32 + 64 + 3 * 128)                    # one absmax byte per 64 values
    nested = 2 * 7                                                 # each tensor has < 256 blocks: one nested absmax
    assert p.items["quant_constants"] == blocks + 4 * nested + 4 * 14
    # tied embedding + 2 norms/layer + final norm, bf16
    assert p.items["unquantized_params"] == 2 * (256 * 64 + 5 * 64)
    lora = 2 * 4 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64))
    assert p.items["lora_params"] == p.items["gradients"] == 4 * lora
    assert p.items["optimizer_state"] == 8 * lora
    assert p.total_bytes == sum(p.items.values())


def test_options_move_the_right_items():
    base = plan(TINY, sequence_len=64, micro_batch_size=2, device="cpu")
    nodq = plan(TINY, sequence_len=64, micro_batch_size=2, double_quant=False, device="cpu")
    blocks = 2 * (64 + 32 + 32 + 64 + 3 * 128)
    assert nodq.items["quant_constants"] == 4 * blocks                # float32 absmax: 0.5 bit/param
    assert base.items["quant_constants"] == blocks + 4 * 14 + 4 * 14   # uint8 absmax + nested + offsets
    assert plan(TINY, optimizer="adamw_8bit",
                device="cpu").items["optimizer_state"] < base.items["optimizer_state"] / 3
    paged = plan(TINY, optimizer="paged_adamw", device="cpu", page_bytes=1024)
    assert paged.items["optimizer_state"] == 1024 and paged.host_bytes == base.items["optimizer_state"] - 1024
    ckpt = plan(TINY, sequence_len=512, micro_batch_size=8, gradient_checkpointing=True, device="cpu")
    assert ckpt.items["activations"] < plan(TINY, sequence_len=512, micro_batch_size=8,
                                            device="cpu").items["activations"]
    lora16 = plan(TINY, load_in_4bit=False, device="cpu")
    assert lora16.items["quantized_weights"] == 0
    assert lora16.items["unquantized_params"] > base.items["unquantized_params"]
    doubled = plan(TINY, sequence_len=128, micro_batch_size=2, device="cpu").items["activations"]
    assert doubled > 1.9 * plan(TINY, sequence_len=64, micro_batch_size=2, device="cpu").items["activations"]


def test_parse_size():
    assert parse_size("48GB") == 48 * GIB == parse_size("48GiB") == parse_size("48g") == parse_size(48)
    assert parse_size("24000MB") == 24000 * 2**20
    for bad in ("48XB", "", "-1GB", "GB"):
        with pytest.raises(LowbitError):
            parse_size(bad)


def test_errors():
    with pytest.raises(LowbitError, match="known family"):
        plan("llama-7")
    with pytest.raises(LowbitError, match="larger than"):
        plan(TINY, lora_r=100)
    with pytest.raises(LowbitError, match="positive"):
        plan(TINY, sequence_len=-5)


def test_seed_headline_65b_on_48gb():
    kw = dict(sequence_len=512, micro_batch_size=1, lora_r=16, gradient_checkpointing=True,
              optimizer="paged_adamw_8bit")
    p = plan("llama-65b", device_memory="48GB", **kw)
    assert p.fits and 30 * GIB < p.total_bytes < 48 * GIB
    assert not plan("llama-65b", device_memory="24GB", **kw).fits
    n = largest("llama-65b", "sequence_len", "48GB", **kw)
    assert 512 <= n and plan("llama-65b", device_memory="48GB", **{**kw, "sequence_len": n}).fits
    assert not plan("llama-65b", device_memory="48GB", **{**kw, "sequence_len": n + 1}).fits


def test_per_rank_plans_for_fsdp_and_ddp():
    kw = dict(sequence_len=64, micro_batch_size=2, device="cpu")
    one = plan(TINY, **kw)
    assert plan(TINY, **kw, world_size=1, distributed="fsdp").items == one.items  # one process is one process
    fsdp = plan(TINY, **kw, world_size=2, distributed="fsdp")
    for k in ("quantized_weights", "quant_constants", "unquantized_params", "lora_params", "gradients",
              "optimizer_state"):
        assert fsdp.items[k] == -(-one.items[k] // 2), k
    layer = (one.items["quantized_weights"] + one.items["quant_constants"]) / 2  # TINY has 2 layers
    lora_layer = one.items["lora_params"] / 2
    assert fsdp.items["fsdp_gathered"] == int(2 * layer + one.items["unquantized_params"] + 2 * lora_layer)
    assert fsdp.items["activations"] == one.items["activations"]
    ddp = plan(TINY, **kw, world_size=2, distributed="auto")
    assert ddp.settings["distributed"] == "ddp" and ddp.items["ddp_gradient_buckets"] == one.items["gradients"]
    with pytest.raises(LowbitError, match="distributed: none"):
        plan(TINY, **kw, world_size=2, distributed="none")
    with pytest.raises(LowbitError, match="world_size must be a positive integer"):
        plan(TINY, **kw, world_size=0)
    big = dict(sequence_len=512, micro_batch_size=1, gradient_checkpointing=True, optimizer="paged_adamw_8bit",
               distributed="fsdp")
    # the seed's setting on several 24 GB GPUs: more ranks, less of the 70B base each
    assert not plan("llama-2-70b", **big, world_size=1, device_memory="24GB").fits
    assert plan("llama-2-70b", **big, world_size=4, device_memory="24GB").fits


def test_eight_bit_base_and_modules_trained_whole():
    """load_in_8bit: a byte per weight and a float32 scale per output row; lora_modules_to_save: float32 embeddings
    with gradients and optimizer state (once when tied)."""
    four = plan("llama-2-7b", sequence_len=128)
    eight = plan("llama-2-7b", sequence_len=128, load_in_4bit=False, load_in_8bit=True)
    n = four.settings["quantized_params"]
    assert eight.items["quantized_weights"] == n and eight.items["quant_constants"] > 0
    assert eight.items["quant_constants"] < n // 1000  # 4 bytes per row
    assert eight.settings["load_in_8bit"] and eight.total_bytes > four.total_bytes
    whole = plan("llama-2-7b", sequence_len=128, lora_modules_to_save=["embed_tokens", "lm_head"])
    emb = 32000 * 4096  # LLaMA-2-7B: untied embeddings and head, both trained
    assert whole.items["trained_full_precision"] == int(2 * emb * (8 + 8) - 2 * emb * 2)
    assert "trained_full_precision" not in four.items


def test_a_preference_run_plans_two_rows_per_pair():
    """rl: dpo trains the chosen and the rejected completion of each pair: twice the tokens of the same batch in
    activations and logits; the reference pass keeps nothing; orpo likewise, kto one row per example."""
    from lowbit.planner.memory import plan_config
    from lowbit.training.config import TrainConfig

    sft = plan_config(TrainConfig(base_model="llama-2-7b", sequence_len=512, micro_batch_size=2))
    dpo = plan_config(TrainConfig(base_model="llama-2-7b", sequence_len=512, micro_batch_size=2, rl="dpo"))
    kto = plan_config(TrainConfig(base_model="llama-2-7b", sequence_len=512, micro_batch_size=2, rl="kto"))
    same = plan_config(TrainConfig(base_model="llama-2-7b", sequence_len=512, micro_batch_size=4))
    assert dpo.items["activations"] == same.items["activations"] > sft.items["activations"]
    assert dpo.total_bytes == same.total_bytes > sft.total_bytes == kto.total_bytes
    assert dpo.settings["rows_per_sample"] == 2 and kto.settings["rows_per_sample"] == 1


def test_a_grpo_run_plans_prompt_plus_completion_rows_and_the_sampling_cache():
    """rl: grpo trains rows of prompt + completion; its sampling between steps holds a KV cache of 2·kv per token and
    layer for every row it generates: counted where it exceeds the training step's activations, which it never
    coexists with."""
    from lowbit.planner.catalog import load_model_config
    from lowbit.planner.memory import plan_config
    from lowbit.planner.shapes import shapes
    from lowbit.training.config import TrainConfig

    def cfg(**kw):
        return TrainConfig(**{**dict(base_model="llama-2-7b", sequence_len=512, micro_batch_size=2, rl="grpo",
                                     val_set_size=0, trl={"num_generations": 4, "max_completion_length": 256,
                                                          "reward_funcs": ["m.f"]}), **kw})

    grpo = plan_config(cfg())
    same = plan_config(TrainConfig(base_model="llama-2-7b", sequence_len=768, micro_batch_size=2))
    assert grpo.items["activations"] == same.items["activations"]
    assert grpo.items["generation_kv_cache"] == 0  # 2 rows' cache is smaller than their activations
    many = plan_config(cfg(gradient_checkpointing=True, gradient_accumulation_steps=64))
    f = shapes(load_model_config("llama-2-7b"))
    kv = 128 * 768 * f.L * 2 * f.kv * 2 + 3 * 4 * 128 * f.vocab  # bf16 cache, three float32 logit rows
    training = sum(many.items[k] for k in ("activations", "logits_and_loss", "backward_and_allocator"))
    assert many.items["generation_kv_cache"] == kv - training > 0
    assert many.settings["generation_rows"] == 128 and many.settings["completion_len"] == 256


def test_tiled_mlp_plans_one_shard_of_mlp_intermediates():
    """tiled_mlp: a dense MLP's 4·i per token (bf16 units) becomes 4·i/shards + 2h; auto from 8,192-token rows."""
    from lowbit.nn.mlp_shards import shard_count

    kw = dict(sequence_len=8192, micro_batch_size=1, gradient_checkpointing=True, device="cpu")
    whole, tiled = plan(TINY, **kw), plan(TINY, **kw, tiled_mlp=True)
    shards = shard_count(8192, 64, 128)
    assert tiled.settings["mlp_shards"] == shards == 8
    assert whole.settings["compute_dtype"] == "bfloat16"  # the torch-free planner's CPU default
    saved = 8192 * (4 * 128 - 4 * 128 / shards - 2 * 64)  # bf16: 2 bytes per unit of 2
    assert whole.items["activations"] - tiled.items["activations"] == pytest.approx(saved, abs=2)
    assert plan(TINY, **kw, tiled_mlp="auto").items == tiled.items
    short = dict(kw, sequence_len=4096)
    assert plan(TINY, **short, tiled_mlp="auto").items == plan(TINY, **short).items


def test_levers_list_what_each_technique_adds():
    from lowbit.planner.levers import levers

    rows = levers("llama-3.1-8b", "24GB", sequence_len=512, micro_batch_size=1, device="cuda")
    assert [r["change"] for r in rows] == ["as configured", "gradient_checkpointing: true", "tiled_mlp: true",
                                           "gradient_checkpointing: offload"]  # disk: the same device bytes
    lengths = [r["max_sequence_len"] for r in rows]
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1] and len(set(lengths)) == 4
    on = levers("llama-3.1-8b", "24GB", sequence_len=512, device="cpu", gradient_checkpointing=True, tiled_mlp=True)
    assert [r["change"] for r in on] == ["as configured", "gradient_checkpointing: offload_disk"]
    assert on[1]["max_sequence_len"] > on[0]["max_sequence_len"]
    done = levers("llama-3.1-8b", "24GB", device="cuda", gradient_checkpointing="offload_disk", tiled_mlp=True)
    assert [r["change"] for r in done] == ["as configured"]  # nothing left to switch on


def test_offload_disk_plans_the_checkpoints_on_disk():
    """offload_disk: the decoder layers' inputs (2h·layers per token, bf16 units) leave the device's total, on any
    device, and the table says where they are."""
    for device in ("cpu", "cuda"):
        kw = dict(sequence_len=4096, micro_batch_size=1, device=device)
        plain = plan(TINY, **kw, gradient_checkpointing=True)
        disk = plan(TINY, **kw, gradient_checkpointing="offload_disk")
        checkpoints = 4096 * TINY["hidden_size"] * TINY["num_hidden_layers"] * 2
        assert plain.items["activations"] - disk.items["activations"] == checkpoints
        assert disk.settings["disk_bytes"] == checkpoints and disk.host_bytes == plain.host_bytes
        assert "checkpoints on disk" in disk.table() and "checkpoints on disk" not in plain.table()


def test_trained_block_scales_are_planned_as_the_run_makes_them(setup):
    """train_quant_scales: one float32 scale and gradient per block of every 4-bit linear (as many as the run
    creates), Adam state for each, and the weight gradient's room in the transient weight."""
    import torch

    from lowbit.planner.memory import plan_config
    from lowbit.training import recipe
    from lowbit.training.config import TrainConfig

    cfg = TrainConfig(base_model=str(setup[1]), datasets=str(setup[2]), compute_dtype="float32", lora_r=4,
                      train_quant_scales=True, output_dir=str(setup[0] / "plan-scales"), optimizer="adamw")
    net = recipe.load_model(cfg, torch.float32, lambda *a: None)
    made = sum(m.scale_log.numel() for m in net.modules() if getattr(m, "scale_log", None) is not None)
    with_scales = plan_config(cfg, device="cpu")
    cfg.train_quant_scales = False
    without = plan_config(cfg, device="cpu")
    assert with_scales.settings["block_scales"] == made > 0
    assert with_scales.items["block_scales"] == 8 * made and "block_scales" not in without.items
    assert with_scales.items["optimizer_state"] - without.items["optimizer_state"] == 8 * made
    assert with_scales.items["transient_weight"] == 2 * without.items["transient_weight"]
