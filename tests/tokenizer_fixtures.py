"""Tokenizers of today's model families, built here with `tokenizers` (tiny trained vocabularies,
the families' pre-tokenizers, special tokens and chat templates written from their documented
forms): Llama-3 (byte-level BPE with Meta's split regex, specials at 128000..), Qwen2.5/Qwen3
(ChatML, no BOS, NFC) and Mistral (sentencepiece-style Metaspace BPE with byte fallback,
`[INST]`). Each is saved as a transformers tokenizer directory, as a checkpoint ships it."""

import itertools
import json
import pathlib

import transformers
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Meta's Llama-3.1 form (without tools): a system header always, turns trimmed, <|eot_id|>.
LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
{%- set system_message = messages[0]['content'] | trim %}
{%- set messages = messages[1:] %}
{%- else %}
{%- set system_message = '' %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}
{{- 'Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n' }}
{{- system_message + '<|eot_id|>' }}
{%- for message in messages %}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
{{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}"""

# Qwen2.5's ChatML form: a default system turn, <|im_start|>role ... <|im_end|>\n.
QWEN_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
{{- '<|im_start|>system\\nYou are Qwen, a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if not (message['role'] == 'system' and loop.first) %}
{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""

# Qwen3's form: reasoning (<think>...</think>) is kept only for answers after the last user
# turn; earlier answers are rendered without it, so a longer conversation rewrites them.
QWEN3_TEMPLATE = """{%- set ns = namespace(last_query=0) %}
{%- for message in messages %}
{%- if message['role'] == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}
{%- endfor %}
{%- for message in messages %}
{%- if message['role'] == 'assistant' %}
{%- set content = message['content'] %}
{%- set reasoning = '' %}
{%- if '</think>' in content %}
{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}
{%- set content = content.split('</think>')[-1].lstrip('\\n') %}
{%- endif %}
{%- if loop.index0 > ns.last_query %}
{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content }}
{%- else %}
{{- '<|im_start|>assistant\\n' + content }}
{%- endif %}
{{- '<|im_end|>\\n' }}
{%- else %}
{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""

# Mistral's [INST] form: BOS once, a system turn folded into the first user turn, roles must
# alternate (raise_exception otherwise), ' answer</s>' after [/INST].
MISTRAL_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
{%- set system = messages[0]['content'] + '\\n\\n' %}
{%- set messages = messages[1:] %}
{%- else %}
{%- set system = '' %}
{%- endif %}
{{- bos_token }}
{%- for message in messages %}
{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
{%- endif %}
{%- if message['role'] == 'user' %}
{{- '[INST] ' + (system if loop.first else '') + message['content'] + '[/INST]' }}
{%- else %}
{{- ' ' + message['content'] + eos_token }}
{%- endif %}
{%- endfor %}"""

# The original Mistral-7B-Instruct form: no system turn at all.
MISTRAL_NO_SYSTEM = MISTRAL_TEMPLATE.replace(
    "{%- if messages[0]['role'] == 'system' %}",
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}",
    1,
)

WORDS = (
    "the a of to and in is it you that he was for on are with as his they be at one have this "
    "from or had by word but what some we can out other were all there when up use your how "
    "said an each she which do their time if will way about many then them write would like "
    "answer question colour blue red list name give explain summarise translate reverse sort"
).split()


def corpus(n: int = 400) -> list[str]:
    """Training text for the tiny vocabularies: template markers, words, digits, unicode."""
    lines = []
    for i in range(n):
        words = " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(3 + i % 9))
        lines += [
            f"### Instruction:\n{words.capitalize()}.\n\n### Response:\n{words} {i * 37}",
            f"{words}:\n\n- {words[::-1]}\n  Über 日本語 🙂 ({i})",
        ]
    return lines


def _train(tokenizer: Tokenizer, vocab_size: int, **trainer) -> dict:
    tokenizer.train_from_iterator(
        corpus(), trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, **trainer)
    )
    return json.loads(tokenizer.to_str())


def _added(ids_and_contents, special: bool = True) -> list[dict]:
    return [
        dict(
            id=i,
            content=c,
            single_word=False,
            lstrip=False,
            rstrip=False,
            normalized=False,
            special=special,
        )
        for i, c in ids_and_contents
    ]


def _save(spec: dict, directory: pathlib.Path, template: str, **tokens) -> pathlib.Path:
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), **tokens
    )
    hf.chat_template = template
    hf.save_pretrained(directory)
    return directory


def _byte_level(split: str) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


LLAMA3_SPECIALS = {
    128000: "<|begin_of_text|>",
    128001: "<|end_of_text|>",
    **{128000 + i: f"<|reserved_special_token_{i - 2}|>" for i in range(2, 6)},
    128006: "<|start_header_id|>",
    128007: "<|end_header_id|>",
    128008: "<|eom_id|>",
    128009: "<|eot_id|>",
}


def llama3_tokenizer(directory: pathlib.Path) -> pathlib.Path:
    """Llama-3.1-Instruct style: BOS <|begin_of_text|> 128000, EOS <|eot_id|> 128009.

    The trained vocabulary (~600 entries, with ":\\n\\n" and "\\n\\n") is padded with
    unreachable three-byte entries to 128000, so the special tokens have Meta's ids."""
    spec = _train(
        _byte_level(LLAMA3_SPLIT), 600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    vocab = spec["model"]["vocab"]
    assert ":ĊĊ" in vocab  # the merge that joins ":\n" + "\n"
    filler = (
        "".join(p) for p in itertools.product(sorted(pre_tokenizers.ByteLevel.alphabet()), repeat=3)
    )
    while len(vocab) < 128000:
        piece = next(filler)
        vocab.setdefault(piece, len(vocab))
    spec["added_tokens"] = _added(sorted(LLAMA3_SPECIALS.items()))
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
        ],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {
            "<|begin_of_text|>": {
                "id": "<|begin_of_text|>",
                "ids": [128000],
                "tokens": ["<|begin_of_text|>"],
            }
        },
    }
    return _save(
        spec,
        directory,
        LLAMA3_TEMPLATE,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
    )


def qwen_tokenizer(directory: pathlib.Path, *, qwen3: bool = False) -> pathlib.Path:
    """Qwen2.5/Qwen3-Instruct style: no BOS, EOS <|im_end|>, pad <|endoftext|>, NFC.

    The vocabulary stays small (~500), so the specials follow it instead of sitting at
    151643..; Qwen3 adds <think> and </think> as plain (non-special) added tokens."""
    tokenizer = _byte_level(QWEN_SPLIT)
    tokenizer.normalizer = normalizers.NFC()
    spec = _train(tokenizer, 500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    n = len(spec["model"]["vocab"])
    spec["added_tokens"] = _added(
        [(n, "<|endoftext|>"), (n + 1, "<|im_start|>"), (n + 2, "<|im_end|>")]
    ) + (_added([(n + 3, "<think>"), (n + 4, "</think>")], special=False) if qwen3 else [])
    return _save(
        spec,
        directory,
        QWEN3_TEMPLATE if qwen3 else QWEN_TEMPLATE,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )


def mistral_tokenizer(directory: pathlib.Path) -> pathlib.Path:
    """Mistral-7B-Instruct style: sentencepiece BPE (Metaspace, dummy prefix, byte fallback),
    <unk> 0, <s> 1, </s> 2, [INST] 3, [/INST] 4."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    specials = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    spec = _train(tokenizer, 700, special_tokens=specials + byte_pieces)
    spec["added_tokens"] = _added(enumerate(specials))
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": "<s>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
        ],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
    }
    return _save(
        spec,
        directory,
        MISTRAL_TEMPLATE,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
