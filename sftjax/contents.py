"""Files identified by what they hold, not where they lie: what a resume compares.

Owns the one hasher of the project (a file's size plus a sha256 of sampled spans) and the
fingerprint of everything a run's data order and token ids depend on: the training and
validation files in the order their globs resolve, the tokenizer's files, the chat template.
A file moved or renamed keeps its fingerprint; a file rewritten in place (reordered rows, a
retrained tokenizer, an edited template) does not. Does not own the decision (resume_check.py)
nor the LoRA base's identity (base_model.py, which hashes its weight files here).
"""

import hashlib
import io
from typing import BinaryIO

from sftjax import paths
from sftjax.data import mixture, records

# Bytes hashed per span: spans at the start, middle and end of a file (a safetensors file: of
# its data, after the header, which is hashed whole). Telling two versions of a file apart
# needs no full read (a 70B base is 130 GiB from object storage on every host); files up to
# 3 MiB (data shards often, tokenizers and templates always) are hashed whole.
SAMPLE_BYTES = 1 << 20

# Files in a tokenizer directory that never define tokenization: weights (the tokenizer may
# sit in the model's own directory) are skipped rather than read.
NOT_TOKENIZER = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".index.json")


def file_identity(file: paths.Path, *, safetensors: bool = False) -> dict:
    """{"bytes", "sampled_sha256"} of one file (local or URL); `safetensors`: its header whole."""
    with file.open("rb") as f:
        return _identity(f, file.stat().length, safetensors)


def text_identity(text: str) -> dict:
    """file_identity of a file holding `text` in UTF-8, from the text already read."""
    data = text.encode()
    return _identity(io.BytesIO(data), len(data), False)


def _identity(f: BinaryIO, size: int, safetensors: bool) -> dict:
    digest = hashlib.sha256()
    data_start = 0
    if safetensors:
        header_length = int.from_bytes(f.read(8), "little")
        digest.update(f.read(header_length))
        data_start = 8 + header_length
    for offset in (data_start, (data_start + size) // 2, size - SAMPLE_BYTES):
        f.seek(max(data_start, offset))
        digest.update(f.read(SAMPLE_BYTES))
    return {"bytes": size, "sampled_sha256": digest.hexdigest()}


def _named(file: paths.Path) -> dict:
    return {"name": file.name, **file_identity(file)}


DATA_KEYS = ("data.train_files", "data.validation_files", "data.mixture")  # the rows' files


def run_inputs(data: dict, template, *, data_files: bool = True) -> dict[str, list[dict]]:
    """{config key: [{name, bytes, sampled_sha256}, ...]} for the files of config.data.

    template (pipeline.make_template): with a data.chat_template file, the text it renders is
    fingerprinted and recorded, not the file read again (it may have changed since).

    Data files keep the order their globs resolve to (rows are read, deduplicated and shuffled
    in that order; for validation files the first decides data.format="auto"); the tokenizer's
    files are sorted by name (their order means nothing). Names are kept only to say what
    changed: two lists are the same when their contents are, in the same order. A data.mixture
    is one list: each source's files in mixture order. data_files=False: the tokenizer and
    template only (training from prepared arrays whose rows are not at hand).
    """
    inputs = {}
    mix = mixture.parse(data.get("mixture"), data["format"], data.get("mixture_unit", "tokens"))
    if data_files and mix:
        inputs["data.mixture"] = _data_files([source.files for source in mix])
    elif data_files:
        inputs["data.train_files"] = _data_files(data["train_files"])
    if data_files and data["validation_files"]:
        inputs["data.validation_files"] = _data_files(data["validation_files"])
    tokenizer = paths.resolve(data["tokenizer"])
    inputs["data.tokenizer"] = [
        _named(f)
        for f in sorted(tokenizer.iterdir(), key=lambda f: f.name)
        if f.is_file() and not f.name.startswith(".") and not f.name.endswith(NOT_TOKENIZER)
    ]
    if data["chat_template"] and data["template"] == "tokenizer":  # else it is never read
        # Its text too (a few KiB): generate prompts with what training rendered, whatever
        # became of the file since.
        name, text = paths.resolve(data["chat_template"]).name, template.chat_template
        inputs["data.chat_template"] = [{"name": name, **text_identity(text), "text": text}]
    return inputs


def _data_files(spec) -> list[dict]:
    return [_named(paths.resolve(f)) for f in records.expand_paths(spec)]


def differences(old: list[dict], new: list[dict]) -> list[str]:
    """What differs between two fingerprinted file lists, by name where names still match."""
    strip = lambda files: [{k: f[k] for k in ("bytes", "sampled_sha256")} for f in files]  # noqa: E731
    if strip(old) == strip(new):
        return []
    if sorted(map(_key, strip(old))) == sorted(map(_key, strip(new))):
        return ["the same contents in another file order (rows are shuffled from file order)"]
    found, old_by_name = [], {f["name"]: f for f in old}
    new_by_name = {f["name"]: f for f in new}
    for name in sorted(old_by_name.keys() | new_by_name.keys()):
        was, now = old_by_name.get(name), new_by_name.get(name)
        if was is None:
            found.append(f"{name} is new ({now['bytes']} bytes)")
        elif now is None:
            found.append(f"{name} ({was['bytes']} bytes) is gone")
        elif was["bytes"] != now["bytes"]:
            found.append(f"{name}: {now['bytes']} bytes (was {was['bytes']})")
        elif was["sampled_sha256"] != now["sampled_sha256"]:
            found.append(f"{name}: same size, different content")
    return found or ["the files differ in content or order"]


def _key(identity: dict) -> tuple:
    return identity["bytes"], identity["sampled_sha256"]
