"""Every configuration key, once, with a comment. Other configs override a few of these.

Run: python -m sftjax.main --config=configs/base.py --config.optim.lr=1e-5
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.hf_path = ""  # Hugging Face Llama directory to fine-tune; "" = random init of preset
    c.model.preset = "tiny"  # architecture when hf_path is "": tiny, llama2_7b, llama2_13b, ...
    c.model.vocab_size = 0  # >0 overrides the preset's vocabulary (random init only)
    c.model.param_dtype = "float32"  # master weights and optimizer state
    c.model.dtype = "bfloat16"  # compute dtype of matmuls and activations
    c.model.scan_layers = True  # stack layers and lax.scan them: fast compiles at 70B
    c.model.remat = "save_dots"  # activation checkpointing: none, full, save_dots
    c.model.attention = "auto"  # auto: splash on TPU, cudnn on NVIDIA GPUs, else xla (reference)
    # Rotary scaling in Hugging Face's dict spelling, e.g. dict(rope_type="llama3", factor=8.0,
    # low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192); kinds:
    # linear, llama3, yarn. None: the preset's (plain RoPE) or, with hf_path, the checkpoint's
    # own config.json (a different value there is refused, not applied). A placeholder of any
    # type, so the command line can set it: --config.model.rope_scaling="{'rope_type': ...}"
    c.model.rope_scaling = ml_collections.config_dict.placeholder(object)
    # LoRA only: dtype of the frozen base weights; "int8" stores the projections as int8 codes
    # with per-channel scales (QLoRA-style, about half of bf16's memory)
    c.model.base_dtype = "bfloat16"
    c.model.lora = ml_collections.ConfigDict()
    c.model.lora.rank = 0  # LoRA rank; 0 = full fine-tuning. >0 trains only the adapters
    c.model.lora.alpha = 16.0  # the update is scaled by alpha / rank (PEFT's lora_alpha)
    # projections with adapters, or "all"; PEFT's names work too (q_proj, ..., all-linear)
    c.model.lora.targets = "q,k,v,o,gate,up,down"
    c.model.lora.dropout = 0.0  # dropout on the adapters' input while training

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 2e-5  # peak learning rate after warmup
    c.optim.warmup_ratio = 0.03  # share of total steps spent warming up linearly from 0
    c.optim.end_lr_ratio = 0.0  # cosine decays to lr * end_lr_ratio at the last step
    c.optim.weight_decay = 0.0  # AdamW decoupled weight decay
    c.optim.decay_norms_and_embeddings = False  # also decay RMSNorm scales, biases, embeddings
    c.optim.b1 = 0.9  # Adam first-moment decay
    c.optim.b2 = 0.95  # Adam second-moment decay
    c.optim.eps = 1e-8  # Adam epsilon
    c.optim.grad_clip_norm = 1.0  # clip the global gradient norm; 0 disables

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 64  # global rows of data.seq_len tokens per optimizer step
    c.train.microbatches = 1  # gradient accumulation: batch_size split into this many parts
    c.train.num_steps = 0  # >0 caps training; 0 = data.num_epochs worth of steps
    c.train.seed = 0  # seeds parameter init (random init only)
    c.train.log_every_steps = 10  # metrics to TensorBoard, metrics.jsonl and the progress bar
    c.train.peak_tflops_per_device = 0.0  # for MFU; 0 = look up the device kind (unknown: none)
    # Resume even though keys that change the run's math or data order differ from the
    # checkpoint's config (they are listed, then used). Shape-changing keys stay refused.
    c.train.allow_config_change = False

    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 200  # evaluate the whole validation set every this many steps
    c.eval.batch_size = 64  # global rows per evaluation step (last batch padded, never dropped)
    c.eval.patience = 3  # stop after this many evaluations without improvement
    c.eval.min_delta = 0.0  # an improvement must lower validation loss by more than this
    c.eval.prompts = ()  # instructions answered (greedy) and logged at every evaluation
    c.eval.max_new_tokens = 64  # answer length limit for eval.prompts

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1  # pure data parallelism (replicated params); -1 = remaining devices
    c.mesh.fsdp = -1  # parameter + optimizer sharding (ZeRO-3 style); -1 = remaining devices
    c.mesh.tensor = 1  # tensor (Megatron) parallelism over heads / mlp / vocab
    c.mesh.rules = ()  # ((logical, mesh axes), ...) replacing sharding.DEFAULT_RULES if set

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.max_to_keep = 2  # newest checkpoints kept (the best one is kept as well)
    c.checkpoint.async_save = True  # write checkpoints in the background
    c.checkpoint.export_hf = True  # at the end, write the best params to WORKDIR/hf_export
    c.checkpoint.export_dtype = "bfloat16"  # dtype of the exported safetensors

    c.data = ml_collections.ConfigDict()
    c.data.train_files = ""  # JSONL / JSON-array file, glob, or comma-separated list of them
    c.data.validation_files = ""  # "" = a seeded split of the training rows by prompt group
    c.data.validation_fraction = 0.05  # share of training rows held out when no validation files
    # Validation rows whose prompt is (nearly) a training prompt, with validation_files given:
    # "warn" (log the file:line pairs), "drop" (remove them from validation) or "fail" (exit 2).
    c.data.leakage = "warn"
    # Rows: "alpaca" (instruction/input/response), "prompt_completion" (prompt/completion),
    # "sharegpt" (conversations [{from, value}]), "messages" ([{role, content}]), or "auto"
    # (the first row's keys decide, per set of files).
    c.data.format = "auto"
    # What the model sees: "alpaca" (### Instruction/### Response), "chat" (Llama-2 [INST] turns)
    # or "tokenizer" (the tokenizer's own jinja chat_template, or data.chat_template). Any format
    # goes with any template; the export carries it as its chat_template.
    c.data.template = "alpaca"
    c.data.chat_template = ""  # .jinja file used instead of the tokenizer's (template "tokenizer")
    c.data.train_on = "all_assistant_turns"  # or "last_assistant_turn" (earlier turns: context)
    c.data.instruction_field = "instruction"  # row key of the instruction
    c.data.input_field = "input"  # row key of the optional input (context)
    c.data.response_field = "response"  # row key of the response ("output" if it is absent)
    c.data.prompt_field = "prompt"  # row key of the prompt (format prompt_completion)
    c.data.completion_field = "completion"  # row key of the completion (prompt_completion)
    c.data.messages_field = "messages"  # row key of chat turns [{role, content}]
    c.data.conversations_field = "conversations"  # row key of ShareGPT turns [{from, value}]
    c.data.tokenizer = ""  # local Hugging Face tokenizer directory (needs an EOS token)
    c.data.seq_len = 2048  # tokens per packed row
    c.data.bad_rows = "fail"  # "fail": report and exit before training; "skip": count and go on
    c.data.drop_duplicates = True  # drop rows equal up to case/punctuation/space (counted)
    # Over-long examples: "drop" (counted), "truncate_prompt" (cut the prompt from the left) or
    # "truncate_history" (drop the earliest whole turns, keeping a system turn, until it fits).
    c.data.overlong = "drop"
    c.data.pack = True  # pack several examples per row (segment ids keep them apart)
    c.data.pack_validation = True  # pack validation rows too (same loss value, fewer eval steps)
    c.data.packing_bins = 16  # open rows of the first-fit packer (more: fuller rows, slower plan)
    c.data.shuffle_seed = 0  # seed of the per-epoch shuffle and the validation split
    c.data.num_epochs = 3  # passes over the training rows
    # Several sources mixed by weight, used instead of train_files: on the command line
    # "alpaca/*.jsonl:3,chats.jsonl:1", or here a tuple of dict(files=..., weight=...,
    # format=..., unit=..., name=...). Validation: each source's data.validation_fraction.
    c.data.mixture = ml_collections.config_dict.placeholder(object)
    c.data.mixture_unit = "tokens"  # what a weight measures by default: "tokens" or "rows"
    # A directory written by `python -m sftjax.data.prepare`; "" = prepare into WORKDIR/data
    # on the first start and reuse it on every restart.
    c.data.prepared = ""

    return c
