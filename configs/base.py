"""Every configuration key, once, with a comment. Other configs override a few of these.

Run: python -m sftjax.main --config=configs/base.py --config.optim.lr=1e-5
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.data = ml_collections.ConfigDict()
    c.data.train_files = ""  # JSONL / JSON-array file, glob, or comma-separated list of them
    c.data.validation_files = ""  # "" = a seeded, content-hashed split of the training rows
    c.data.validation_fraction = 0.05  # share of training rows held out when no validation files
    c.data.template = "alpaca"  # "alpaca" (instruction/input/response) or "chat" (messages)
    c.data.instruction_field = "instruction"  # row key of the instruction
    c.data.input_field = "input"  # row key of the optional input (context)
    c.data.response_field = "response"  # row key of the response ("output" if it is absent)
    c.data.messages_field = "messages"  # row key of chat turns [{role, content}]
    c.data.tokenizer = ""  # local Hugging Face tokenizer directory (needs an EOS token)
    c.data.seq_len = 2048  # tokens per packed row
    c.data.bad_rows = "fail"  # "fail": report and exit before training; "skip": count and go on
    c.data.drop_duplicates = True  # drop exact duplicate rows (counted in the report)
    c.data.overlong = "drop"  # over-long examples: "drop" (counted) or "truncate_prompt"
    c.data.pack = True  # pack several examples per row (segment ids keep them apart)
    c.data.pack_validation = True  # pack validation rows too (same loss value, fewer eval steps)
    c.data.packing_bins = 16  # open rows of the first-fit packer (more: fuller rows, slower plan)
    c.data.shuffle_seed = 0  # seed of the per-epoch shuffle and the validation split
    c.data.num_epochs = 3  # passes over the training rows

    return c
