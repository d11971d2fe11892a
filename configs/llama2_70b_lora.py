"""Llama-2-70B LoRA fine-tuning: configs/base.py plus a common LoRA recipe, on a v5p-8.

Full fine-tuning of 70B needs 32 v5p chips (configs/llama2_70b.py: 828 GB of fp32 weights and
Adam); here only rank-16 adapters train (207M parameters) beside a frozen bf16 base (128.5 GiB,
32.1 per chip over 4). `python -m sftjax.plan --topology=v5p-8` (TPU compiler, per chip, as
shipped, one host of 4 chips, FSDP over them): arguments 33.8 GiB (trainable 0.57 + Adam 1.13
+ frozen base 32.1) + temporaries 25.9 = 59.7 of 95.7 GiB, 62 %. (Each adapter's factor on
the heads/mlp side follows axes that the default rules split over `tensor`, not `fsdp`, so a
chip holds 152M of the 207M trainable parameters: 1.7 GiB with Adam, 3 % of the total.) GPUs:
not planned here (no GPU compiler); 60 GiB per chip would be 80 % of an 80 GB GPU, so 4 × 80
GB may do: `--devices=4` on a GPU host plans it with the GPU compiler.
The paths are placeholders; override them on the command line:
  python -m sftjax.main --config=configs/llama2_70b_lora.py --workdir=runs/70b_lora \
    --config.model.hf_path=/data/Llama-2-70b-hf --config.data.tokenizer=/data/Llama-2-70b-hf \
    --config.data.train_files=/data/sft/train.jsonl

Owns only the overrides below; every key and its meaning is in base.py. Memory figures come
from sftjax.plan (the TPU compiler's plan), not from a run on a TPU.
"""

import importlib.util
import pathlib

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    # configs/ is not a package and config_flags loads files by path, so base.py is loaded by
    # path as well, relative to this file so that any working directory works.
    spec = importlib.util.spec_from_file_location(
        "sftjax_configs_base", pathlib.Path(__file__).resolve().parent / "base.py"
    )
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    c = base.get_config()

    c.model.hf_path = "/path/to/Llama-2-70b-hf"  # placeholder: HF directory with safetensors
    c.model.preset = "llama2_70b"  # the architecture when hf_path is "" (random init)
    c.model.param_dtype = "float32"  # fp32 adapters and Adam moments: 2.5 GB in all
    c.model.base_dtype = "bfloat16"  # frozen base: 138 GB in bf16, 34 GB per chip on 4 chips
    c.model.remat = "full"  # keep only each layer's input: memory goes to the frozen base
    c.model.lora.rank = 16  # 207M trainable parameters, 0.3% of 70B
    c.model.lora.alpha = 32.0  # alpha = 2 x rank, the usual pairing: update scale 2
    c.model.lora.targets = "all"  # every projection: QLoRA (2023) found it needed to match full FT
    c.model.lora.dropout = 0.05  # alpaca-lora's and PEFT examples' value
    c.data.tokenizer = "/path/to/Llama-2-70b-hf"  # placeholder: the model's own tokenizer
    c.data.train_files = "/path/to/train.jsonl"  # placeholder: JSONL rows (alpaca or chat)
    c.data.seq_len = 2048  # tokens per packed row, as the full fine-tuning config
    c.data.num_epochs = 3  # Alpaca-style upper bound; early stopping usually ends sooner
    c.train.batch_size = 64  # as llama2_70b.py: same steps and evaluations as full FT
    c.train.microbatches = 4  # 4 rows per chip per pass (see docstring)
    c.optim.lr = 1e-4  # QLoRA's LR for its 33B/65B adapters, half the 7B/13B one
    c.optim.warmup_ratio = 0.03  # 3% linear warmup, then cosine to 0 (base's end_lr_ratio)
    c.optim.weight_decay = 0.0  # none on the adapters (PEFT's and alpaca-lora's default)
    c.eval.every_steps = 200  # validation loss every ~26M training tokens
    c.mesh.fsdp = -1  # FSDP over the 4 chips: base, adapters and Adam split 4 ways
    return c
