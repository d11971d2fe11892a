"""Resuming with a changed config: refuse what changes the run, allow (and list) what does not.

Owns `check(saved, new, saved_step)`: it compares the config saved with a checkpoint
(`meta["config"]`) with the one a restart brings, key by key, and sorts each difference:
- incompatible: the saved arrays cannot be restored into the new state (architecture, param
  dtype, optimizer state layout). Refused always; only a new workdir helps.
- refused: the arrays would restore but the run would silently become another one: different
  math (optimizer, model numerics, global batch) or another data order (files, template,
  tokenizer, packing, shuffle, split). The saved data-iterator index would point into a
  different batch list. Refused unless the new config sets train.allow_config_change=True.
- allowed: cadence, logging, prompts, checkpoint options, mesh shape (restore reshards),
  microbatches (accumulation sums before it divides: the same step), remat, the attention
  kernel, a longer run (more epochs, or num_steps still past the saved step; the learning-rate
  schedule then stretches or shrinks to the new total from here on, which `describe` says).
Keys present on one side only come from another sftjax version and are allowed, with a note.

Files are compared by content where the record holds their fingerprints (contents.py: the data
files in glob order, the tokenizer's files, the chat template; the LoRA base's identity): a
file moved to another path with the same contents is allowed (and listed), a file rewritten in
place is refused like a changed key, naming the file and how it changed. A record from before
fingerprints (none saved) is compared by paths alone, as it always was (the caller warns with
NO_FINGERPRINTS).
Does not own: reading the checkpoint or logging (the caller logs `check`'s result).
"""

import dataclasses
import json
from typing import Any

from sftjax import config as config_lib
from sftjax import contents

OVERRIDE_KEY = "train.allow_config_change"

# Arrays of a checkpoint only fit a state of the same architecture and dtypes.
# A LoRA checkpoint holds only the adapters (targets x rank); a full one holds every weight.
INCOMPATIBLE = (
    "model.preset",
    "model.vocab_size",
    "model.scan_layers",
    "model.param_dtype",
    "model.lora.rank",
    "model.lora.targets",
)
# Keys newer than some checkpoints, and the value a checkpoint without them was trained with.
ADDED_DEFAULTS = {"model.lora.rank": 0, "model.rope_scaling": None}
# Keys whose value is a dict or None: compared whole. Flattened, None -> {"rope_type": ...}
# would read as a key removed and keys added by another version (allowed), not as a change.
WHOLE_VALUES = ("model.rope_scaling",)

# Changes that leave the math and the data order of every step as it was. Prefix matches.
ALLOWED = (
    "eval.",
    "checkpoint.",
    "mesh.",
    "model.remat",  # recomputation only: same values
    "model.attention",  # kernel choice: same function within float tolerance
    "train.microbatches",
    "train.log_every_steps",
    "train.peak_tflops_per_device",
    OVERRIDE_KEY,
    "data.bad_rows",  # a run that started had no bad rows, or skipped them either way
    "data.pack_validation",  # same validation loss, other row layout
    # where the prepared arrays are read from: their sources are compared by content (inputs)
    "data.prepared",
)

# Run length: the batches so far stay the same when it grows (each epoch is shuffled and
# packed on its own and appended), so longer is allowed; cutting below the saved step is not.
LENGTH_KEYS = ("train.num_steps", "data.num_epochs")


# Config keys that name files: compared by the files' contents when both sides fingerprint them.
CONTENT_KEYS = (
    "data.train_files",
    "data.validation_files",
    "data.tokenizer",
    "data.chat_template",
    "model.hf_path",  # the LoRA base (base_model.identity); a full fine-tune keeps no base
)
NO_FINGERPRINTS = (
    "the checkpoint predates content fingerprints: data, tokenizer and template files are "
    "compared by path only for this resume (the checkpoints saved from now on carry them)"
)


class ConfigChanged(config_lib.ConfigError):
    """A resume whose config differs from the checkpoint's in keys that change the run."""


@dataclasses.dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key}: {_show(self.old)} -> {_show(self.new)}"


@dataclasses.dataclass(frozen=True)
class Moved(Change):
    """A path key whose files moved with their contents unchanged: not a change of the run."""

    def __str__(self) -> str:
        return f"{super().__str__()} (same contents)"


@dataclasses.dataclass(frozen=True)
class ContentChange(Change):
    """Files rewritten in place (or swapped) under a path key: `new` says what differs."""

    def __str__(self) -> str:
        return f"{self.key}: {self.new}"


_ABSENT = object()


def _show(value: Any) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value)


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; values normalised as a JSON round trip (tuples -> lists)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and f"{prefix}{key}" not in WHOLE_VALUES:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.loads(json.dumps(value))
    return out


def _is_longer(key: str, old: Any, new: Any, saved_step: int) -> bool:
    """A length change that keeps every batch so far and leaves steps to train."""
    if key == "train.num_steps":  # 0 = as many steps as the epochs give
        return new == 0 or new > saved_step
    return new > old


@dataclasses.dataclass(frozen=True)
class Verdict:
    incompatible: list[Change]
    refused: list[Change]
    allowed: list[Change]  # log these: the run goes on with them


def compare(
    saved: dict,
    new: dict,
    saved_step: int,
    saved_inputs: dict | None = None,
    new_inputs: dict | None = None,
) -> Verdict:
    """Sort every differing key of two config dicts (ConfigDict.to_dict() or its JSON); path
    keys whose files both sides fingerprinted (`*_inputs`, {key: fingerprint}) by contents."""
    old_flat, new_flat = {**ADDED_DEFAULTS, **_flatten(saved)}, _flatten(new)
    saved_inputs, new_inputs = saved_inputs or {}, new_inputs or {}
    by_content = {k for k in CONTENT_KEYS if k in saved_inputs and k in new_inputs}
    verdict = Verdict([], [], [])
    for key in sorted(by_content):
        what = _content_difference(saved_inputs[key], new_inputs[key])
        if what:
            verdict.refused.append(ContentChange(key, old_flat.get(key), what))
    for key in sorted(old_flat.keys() | new_flat.keys()):
        old, now = old_flat.get(key, _ABSENT), new_flat.get(key, _ABSENT)
        if old == now:
            continue
        change = Change(key, old, now)
        if key in by_content:
            if not any(c.key == key for c in verdict.refused):
                verdict.allowed.append(Moved(key, old, now))
        elif old is _ABSENT or now is _ABSENT:
            verdict.allowed.append(change)  # another sftjax version added or removed the key
        elif key in INCOMPATIBLE or _changes_optimizer_layout(key, old, now):
            verdict.incompatible.append(change)
        elif key.startswith(ALLOWED) or (
            key in LENGTH_KEYS and _is_longer(key, old, now, saved_step)
        ):
            verdict.allowed.append(change)
        else:
            verdict.refused.append(change)
    return verdict


def _content_difference(old, new) -> str:
    """'' when two fingerprints agree, else what differs (file by file for file lists)."""
    if old == new:
        return ""
    if isinstance(old, list) and isinstance(new, list):
        return "; ".join(contents.differences(old, new)[:3])
    return "different contents"


def _changes_optimizer_layout(key: str, old: Any, new: Any) -> bool:
    """Gradient clipping on <-> off adds or removes a state in the optimizer chain."""
    return key == "optim.grad_clip_norm" and (old > 0) != (new > 0)


def check(
    saved: dict,
    new: dict,
    saved_step: int,
    saved_inputs: dict | None = None,
    new_inputs: dict | None = None,
) -> list[Change]:
    """The allowed changes (to log), or ConfigChanged listing what stops the resume and why."""
    verdict = compare(saved, new, saved_step, saved_inputs, new_inputs)
    override = _flatten(new).get(OVERRIDE_KEY, False)
    lines = []
    if verdict.incompatible:
        lines.append(
            f"the checkpoint at step {saved_step} cannot be restored into this model: "
            + "; ".join(map(str, verdict.incompatible))
            + ". Use a new --workdir (or put the old values back)"
        )
    if verdict.refused and not override:
        lines.append(
            f"these changes would silently turn the run saved at step {saved_step} into another "
            "(different math or data order): "
            + "; ".join(map(str, verdict.refused))
            + f". Put the old values (or files) back, use a new --workdir, or set "
            f"--config.{OVERRIDE_KEY}=True to continue with them anyway"
        )
    if lines:
        raise ConfigChanged("cannot resume: " + "\n  ".join(lines))
    return verdict.allowed + (verdict.refused if override else [])


def inputs(files: dict, base_identity: dict | None) -> dict:
    """{key: fingerprint} of one side: `files` (contents.run_inputs, or a record's "inputs")
    plus the LoRA base's identity without its path."""
    base = {k: v for k, v in (base_identity or {}).items() if k != "hf_path"}
    return {**files, **({"model.hf_path": base} if base else {})}


def check_record(record: dict, new: dict, new_inputs: dict, step: int) -> list[Change]:
    """`check` against a checkpoint's JSON record; `new_inputs` from `inputs(...)` of this run.

    A record without fingerprints still resumes (compared by paths, as when it was saved);
    its LoRA base identity, kept since LoRA came, still lets model.hf_path move.
    """
    saved_inputs = inputs(record.get("inputs", {}), record.get("base_model"))
    if "inputs" not in record:
        saved_inputs = {k: v for k, v in saved_inputs.items() if k == "model.hf_path"}
    return check(record["config"], new, step, saved_inputs, new_inputs)


def describe(changes: list[Change]) -> str:
    """One log line for the changes a resume goes on with."""
    if not changes:
        return "config unchanged since the checkpoint"
    notes = []
    if any(c.key in LENGTH_KEYS for c in changes):
        notes.append(" (the learning-rate schedule follows the new length from here on)")
    return "config changed since the checkpoint: " + "; ".join(map(str, changes)) + "".join(notes)
