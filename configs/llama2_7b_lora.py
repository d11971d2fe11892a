"""Llama-2-7B LoRA fine-tuning: configs/base.py plus a common LoRA recipe, on ONE accelerator.

Full fine-tuning of 7B needs 8 v5p chips (configs/llama2_7b.py: 12 B/param of fp32 weights and
Adam); here only rank-16 adapters train (40M parameters, fp32 with their Adam moments: 0.45
GiB) beside a frozen bf16 base (12.6 GiB). `python -m sftjax.plan` (per device, as shipped):
  --topology=v5p:1x1x1 (one v5p chip, TPU compiler): arguments 13.0 GiB (trainable 0.15 +
    Adam 0.30 + frozen base 12.6) + temporaries 9.7 = 22.7 of 95.7 GiB, 24 %. With the room,
    --config.model.remat=save_dots (no forward recompute, faster) plans 13.0 + 47.8 = 60.8, 63 %.
  --devices=1 --hbm_gib=80 (one 80 GB GPU): 13.0 + 40.3 = 53.3 of 80 GiB, 67 % (72 % of 74.5
    GiB, i.e. 80 GB). No GPU compiler here: this is the CPU compiler's estimate, which computes
    bf16 matmuls in fp32 and materialises attention scores, so it overstates temporaries; it is
    also erratic (threefry-mask era: microbatches 8: 92 GiB, 4: 59 GiB), hence full remat and
    16 microbatches.
  --topology=v6e:1x1 (a v6e-1, one Trillium chip, 31.25 GiB): 13.0 + 10.0 = 23.0 GiB, 73 %.
Google's smallest v5p slice is a v5p-8 (4 chips); "one chip" is the per-chip question.
The paths are placeholders; override them on the command line:
  python -m sftjax.main --config=configs/llama2_7b_lora.py --workdir=runs/7b_lora \
    --config.model.hf_path=/data/Llama-2-7b-hf --config.data.tokenizer=/data/Llama-2-7b-hf \
    --config.data.train_files=/data/sft/train.jsonl

Owns only the overrides below; every key and its meaning is in base.py. Memory figures come
from sftjax.plan (the compiler's plan), not from a run on a TPU or GPU.
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

    c.model.hf_path = "/path/to/Llama-2-7b-hf"  # placeholder: HF directory with safetensors
    c.model.preset = "llama2_7b"  # the architecture when hf_path is "" (random init)
    c.model.param_dtype = "float32"  # fp32 adapters and Adam moments: 0.5 GB in all
    c.model.base_dtype = "bfloat16"  # frozen base: 13.5 GB in bf16 (27 GB in fp32)
    c.model.remat = "full"  # keep only each layer's input (save_dots: see docstring)
    c.model.lora.rank = 16  # 40M trainable parameters, 0.6% of 7B
    c.model.lora.alpha = 32.0  # alpha = 2 x rank, the usual pairing: update scale 2
    c.model.lora.targets = "all"  # every projection: QLoRA (2023) found it needed to match full FT
    c.model.lora.dropout = 0.05  # alpaca-lora's and PEFT examples' value
    c.data.tokenizer = "/path/to/Llama-2-7b-hf"  # placeholder: the model's own tokenizer
    c.data.train_files = "/path/to/train.jsonl"  # placeholder: JSONL rows (alpaca or chat)
    c.data.seq_len = 2048  # tokens per packed row, as the full fine-tuning config
    c.data.num_epochs = 3  # Alpaca-style upper bound; early stopping usually ends sooner
    c.train.batch_size = 64  # as llama2_7b.py: same steps and evaluations as full FT
    c.train.microbatches = 16  # 4 rows per pass on one device (see docstring)
    c.optim.lr = 2e-4  # QLoRA's LR for 7B/13B adapters: ~10x full fine-tuning's
    c.optim.warmup_ratio = 0.03  # 3% linear warmup, then cosine to 0 (base's end_lr_ratio)
    c.optim.weight_decay = 0.0  # none on the adapters (PEFT's and alpaca-lora's default)
    c.eval.every_steps = 200  # validation loss every ~26M training tokens
    c.mesh.fsdp = -1  # one chip: 1; on more devices the base is sharded over all of them
    return c
