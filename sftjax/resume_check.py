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
Does not own: reading the checkpoint or logging (the caller logs `check`'s result).
"""

import dataclasses
import json
from typing import Any

from sftjax import config as config_lib

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
ADDED_DEFAULTS = {"model.lora.rank": 0}

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
)

# Run length: the batches so far stay the same when it grows (each epoch is shuffled and
# packed on its own and appended), so longer is allowed; cutting below the saved step is not.
LENGTH_KEYS = ("train.num_steps", "data.num_epochs")


class ConfigChanged(config_lib.ConfigError):
    """A resume whose config differs from the checkpoint's in keys that change the run."""


@dataclasses.dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key}: {_show(self.old)} -> {_show(self.new)}"


_ABSENT = object()


def _show(value: Any) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value)


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; values normalised as a JSON round trip (tuples -> lists)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
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


def compare(saved: dict, new: dict, saved_step: int) -> Verdict:
    """Sort every differing key of two config dicts (ConfigDict.to_dict() or its JSON)."""
    old_flat, new_flat = {**ADDED_DEFAULTS, **_flatten(saved)}, _flatten(new)
    verdict = Verdict([], [], [])
    for key in sorted(old_flat.keys() | new_flat.keys()):
        old, now = old_flat.get(key, _ABSENT), new_flat.get(key, _ABSENT)
        if old == now:
            continue
        change = Change(key, old, now)
        if old is _ABSENT or now is _ABSENT:
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


def _changes_optimizer_layout(key: str, old: Any, new: Any) -> bool:
    """Gradient clipping on <-> off adds or removes a state in the optimizer chain."""
    return key == "optim.grad_clip_norm" and (old > 0) != (new > 0)


def check(saved: dict, new: dict, saved_step: int) -> list[Change]:
    """The allowed changes (to log), or ConfigChanged listing what stops the resume and why."""
    verdict = compare(saved, new, saved_step)
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
            + f". Put the old values back, use a new --workdir, or set "
            f"--config.{OVERRIDE_KEY}=True to continue with them anyway"
        )
    if lines:
        raise ConfigChanged("cannot resume: " + "\n  ".join(lines))
    return verdict.allowed + (verdict.refused if override else [])


def describe(changes: list[Change]) -> str:
    """One log line for the changes a resume goes on with."""
    if not changes:
        return "config unchanged since the checkpoint"
    notes = []
    if any(c.key in LENGTH_KEYS for c in changes):
        notes.append(" (the learning-rate schedule follows the new length from here on)")
    return "config changed since the checkpoint: " + "; ".join(map(str, changes)) + "".join(notes)
