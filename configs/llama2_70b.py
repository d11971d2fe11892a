"""Llama-2-70B supervised fine-tuning: configs/base.py plus the published SFT recipe.

70B does NOT fit on 8 chips: fp32 weights + Adam are 12 B/param = 828 GB, 103 GB per chip
over 8 chips before any activation. `python -m sftjax.plan` (TPU compiler, per chip, as
shipped, splash attention) says it needs 32 v5p chips (a v5p-64 slice, 8 hosts): 24.1 GiB of
arguments + 27.6 of temporaries = 51.7 of 95.7 GiB. On 16 chips (v5p-32) it does NOT fit: 48.2
+ 53.0 = 101.2 GiB; more microbatches make it worse (2: 144.0, 4: 112.8: the fp32 gradient
accumulator is another copy of the gradients); --config.train.batch_size=32 fits there (48.2 +
39.8 = 88.0, 92%) at half the tokens per step. GPUs: not planned here; by the same arithmetic
>= 32 × 80 GB. Launch with launch/tpu_pod.sh or launch/slurm.sbatch, which run on every host:
  python -m sftjax.main --multihost --config=configs/llama2_70b.py --workdir=/shared/runs/70b \
    --config.model.hf_path=/data/Llama-2-70b-hf --config.data.tokenizer=/data/Llama-2-70b-hf \
    --config.data.train_files=/data/sft/train.jsonl

Owns only the overrides below; every key and its meaning is in base.py. Recipe values that base
already holds are restated on purpose, so this file stays the 70B recipe if base's defaults move.
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
    c.model.param_dtype = "float32"  # fp32 master weights and Adam moments
    c.model.dtype = "bfloat16"  # bf16 matmuls and activations
    c.model.scan_layers = True  # one layer compiled, scanned 80 times: unrolled won't compile fast
    c.model.remat = "full"  # keep only each layer's input; memory goes to weights and Adam
    c.model.attention = "auto"  # splash on TPU, cuDNN on NVIDIA GPUs, XLA elsewhere
    c.data.tokenizer = "/path/to/Llama-2-70b-hf"  # placeholder: the model's own tokenizer
    c.data.train_files = "/path/to/train.jsonl"  # placeholder: JSONL rows (alpaca or chat)
    c.data.seq_len = 2048  # tokens per packed row; 4096 (full context) doubles activations
    c.data.num_epochs = 3  # Alpaca-style upper bound; early stopping usually ends sooner
    c.train.batch_size = 64  # 64 rows × 2048 tokens ≈ 131k tokens per optimizer step
    c.optim.lr = 1e-5  # half the 7B/13B LR: common practice for the largest size
    c.optim.warmup_ratio = 0.03  # Alpaca: 3% linear warmup, then cosine to 0
    c.optim.weight_decay = 0.0  # Alpaca/FastChat use none (the Llama-2 paper used 0.1)
    c.eval.every_steps = 200  # validation loss every ~26M training tokens
    c.eval.patience = 3  # stop after 3 evaluations (600 steps) without improvement
    c.eval.min_delta = 0.0  # any improvement resets patience
    c.mesh.fsdp = -1  # FSDP over every device; needs >= 32 v5p chips (see docstring)
    return c
