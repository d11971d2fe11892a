"""Text generation with a KV cache: one prefill, then one token per step, batched; and its CLI.

Owns sampling (greedy, temperature, top-k, top-p), the jitted prefill + decode loop, and
`python -m sftjax.generate`. It does not own the model or the cache layout (model/llama.py) nor
reading weights (model/hf_io.py): `generate` takes any `llama.Llama`, so a model restored from
a training checkpoint is passed in the same way as one read from a Hugging Face directory.

Batching: prompts are left-padded to one bucket length (a power of two, so few compiles), and
every row then writes its step-t token to the same cache slot. Padding has segment id 0, and
positions start at 0 on each row's first real token, so a row's logits don't depend on what
it was batched with. Decoding runs a fixed `max_new_tokens` steps in a `jax.lax.while_loop`
that stops early once every row has produced `eos_id`; returned tokens stop before EOS.
Single-host: the prompts are host numpy arrays that jit places on the model's mesh.
Prompts are encoded with the template the model was trained with, read from the workdir's
checkpoint record (its config, and the text of a data.chat_template file as training read it:
the file may have been edited or deleted since) or from an export's `sftjax_format.json`; a
Hugging Face model from elsewhere is prompted with its own chat_template, or alpaca when it has
none. A workdir is only read: a damaged checkpoint is skipped, never moved (checkpoint.py).
Shapes: B rows, L prompt bucket, T max_new_tokens, V vocab (cache slots S = L + T).

    python -m sftjax.generate --checkpoint=HF_DIR --prompt="Name three primary colors."
    python -m sftjax.generate --checkpoint=HF_DIR --input=rows.jsonl --output=answers.jsonl
"""

import dataclasses
import functools
import json
import pathlib
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx

from sftjax import config as config_lib
from sftjax import paths
from sftjax.data import chat_templates, records, templates, tokenize
from sftjax.model import hf_export, hf_io, llama

MIN_BUCKET = 16  # shortest prefill length: small prompts share one compile


class TooLong(config_lib.ConfigError):
    """A prompt plus max_new_tokens past the model's max_seq_len: the user shortens one."""


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is picked; hashable because it shapes the compiled program."""

    temperature: float = 0.0  # 0: greedy (argmax); top_k and top_p are then ignored
    top_k: int = 0  # keep the k most likely tokens; 0 keeps all
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p


def sample(logits_BV: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """Next token per row [B] from last-position logits, with temperature, top-k and top-p."""
    if sampling.temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV.astype(jnp.float32) / sampling.temperature
    lowest = jnp.finfo(jnp.float32).min
    if sampling.top_k > 0:
        top_k = min(sampling.top_k, logits_BV.shape[-1])
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, lowest, logits_BV)
    if sampling.top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        # A token stays if the tokens more likely than it hold less than top_p, so the most
        # likely token always stays and top_p -> 0 becomes greedy.
        before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
        kept_BV = jnp.where(before_BV < sampling.top_p, sorted_BV, jnp.inf)
        threshold_B1 = jnp.min(kept_BV, axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV < threshold_B1, lowest, logits_BV)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampling"))
def _generate_ids(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    tokens_BL: jax.Array,
    positions_BL: jax.Array,
    segment_ids_BL: jax.Array,
    eos_id: jax.Array,
    key: jax.Array,
    *,
    max_new_tokens: int,
    sampling: Sampling,
) -> jax.Array:
    """[B, max_new_tokens] new tokens, EOS included, -1 after a row's EOS and on filler rows."""
    model = nnx.merge(graphdef, state)
    batch, bucket = tokens_BL.shape
    # Decode step t writes slot L + t; the last step's cache write is never read back.
    cache = llama.init_cache(model.cfg, batch, bucket + max_new_tokens)
    logits_BLV, cache = model(tokens_BL, positions_BL, segment_ids_BL, cache)
    key, step_key = jax.random.split(key)
    # Left padding puts every row's last prompt token at the bucket's last slot.
    token_B = sample(logits_BLV[:, -1], step_key, sampling)
    next_position_B = positions_BL[:, -1] + 1

    def keep_going(carry):
        step, _, done_B, *_ = carry
        return (step < max_new_tokens) & ~jnp.all(done_B)

    def decode_step(carry):
        step, token_B, done_B, out_BT, cache, key = carry
        out_BT = out_BT.at[:, step].set(jnp.where(done_B, -1, token_B))
        done_B = done_B | (token_B == eos_id)
        positions_B1 = (next_position_B + step)[:, None]
        logits_B1V, cache = model(
            token_B[:, None], positions_B1, jnp.ones_like(positions_B1), cache
        )
        key, step_key = jax.random.split(key)
        return step + 1, sample(logits_B1V[:, 0], step_key, sampling), done_B, out_BT, cache, key

    out_BT = jnp.full((batch, max_new_tokens), -1, jnp.int32)
    # Filler rows (all padding) start done, so they never hold back the early exit.
    done_B = segment_ids_BL[:, -1] == 0
    carry = (jnp.int32(0), token_B, done_B, out_BT, cache, key)
    return jax.lax.while_loop(keep_going, decode_step, carry)[3]


def _bucket(length: int, minimum: int = MIN_BUCKET) -> int:
    """The next power of two >= length, at least `minimum`: shapes that recur across calls."""
    return max(minimum, 1 << (length - 1).bit_length())


def _left_pad(prompts: Sequence[Sequence[int]], rows: int, bucket: int):
    """tokens, positions, segment_ids [rows, bucket]; rows past the prompts are all padding."""
    tokens = np.zeros((rows, bucket), np.int32)
    positions = np.zeros((rows, bucket), np.int32)
    segment_ids = np.zeros((rows, bucket), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, bucket - len(prompt) :] = prompt
        positions[row, bucket - len(prompt) :] = np.arange(len(prompt))
        segment_ids[row, bucket - len(prompt) :] = 1
    return tokens, positions, segment_ids


def _mesh(model: llama.Llama) -> jax.sharding.Mesh:
    return jax.tree.leaves(nnx.state(model))[0].sharding.mesh


def generate(
    model: llama.Llama,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_id: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[list[int]]:
    """New token ids for each prompt, up to `max_new_tokens`, ending before `eos_id` (excluded).

    Prompts are token ids with BOS already in place. The same `seed` gives the same samples for
    the same batch; greedy (temperature 0) ignores it.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (BOS)")
    if max_new_tokens < 1:
        raise TooLong(f"max_new_tokens={max_new_tokens}: give at least 1")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > model.cfg.max_seq_len:
        raise TooLong(
            f"a prompt of {longest} tokens + max_new_tokens={max_new_tokens} is longer than "
            f"the model's max_seq_len {model.cfg.max_seq_len}: shorten the prompt or lower "
            "max_new_tokens"
        )
    mesh = _mesh(model)
    # Rows: a power of two (few compiles across batch sizes; decoding is memory-bound, so
    # filler rows are nearly free) that the batch axis, split over data x fsdp, divides.
    shards = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
    rows = -(-_bucket(len(prompts), minimum=1) // shards) * shards
    tokens, positions, segment_ids = _left_pad(prompts, rows, _bucket(longest))
    graphdef, state = nnx.split(model)
    sampling = Sampling(float(temperature), int(top_k), float(top_p))
    with jax.set_mesh(mesh):
        out = _generate_ids(
            graphdef,
            state,
            tokens,
            positions,
            segment_ids,
            jnp.int32(eos_id),
            jax.random.key(seed),
            max_new_tokens=max_new_tokens,
            sampling=sampling,
        )
    answers = []
    for row in np.asarray(jax.device_get(out))[: len(prompts)].tolist():
        ids = [t for t in row if t != -1]
        answers.append(ids[: ids.index(eos_id)] if eos_id in ids else ids)
    return answers


Template = templates.Template | chat_templates.RenderedTemplate


def prompt_ids(row: dict, template: str | Template, tok: tokenize.SegmentTokenizer) -> list[int]:
    """The prompt's ids exactly as training encoded them: the template's leading untrained part.

    Rows: {"instruction", "input"?} or {"messages"} ending in a user turn, for any template
    (a name or one from chat_templates.make_template), or {"prompt"} (template "none": raw text
    after BOS).
    """
    if template == "none":
        return tokenize.encode([templates.Segment(row["prompt"], False)], tok).ids.tolist()
    if isinstance(template, str):
        template = chat_templates.make_template(template, tok.hf)
    messages = tuple((m["role"], m["content"]) for m in row.get("messages", ()))
    as_row = records.Row(
        source="prompt",
        instruction=row.get("instruction", ""),
        input=row.get("input") or "",
        messages=messages,
    )
    segments = template.prompt(as_row)
    return tokenize.encode(segments, tok, framed=template.framed).ids.tolist()


def respond(
    model: llama.Llama,
    tok: tokenize.SegmentTokenizer,
    rows: Sequence[dict],
    *,
    template: str | Template = "alpaca",
    **kwargs,
) -> list[str]:
    """Answer text per row, prompted with the training template; `kwargs` go to `generate`."""
    if isinstance(template, str) and template != "none":
        template = chat_templates.make_template(template, tok.hf)
    prompts = [prompt_ids(row, template, tok) for row in rows]
    new_ids = generate(model, prompts, eos_id=tok.eos_id, **kwargs)
    return [tok.hf.decode(ids, skip_special_tokens=True) for ids in new_ids]


def _read_rows(path: pathlib.Path, raw: bool) -> list[dict]:
    """JSONL rows with a string "instruction" or a "messages" list ("prompt" when raw); a bad
    line is reported as file:line."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise records.DataError(f"{path}:{number}: not JSON ({error})") from None
        keys = {"prompt": str} if raw else {"instruction": str, "messages": list}
        if not isinstance(row, dict) or not any(isinstance(row.get(k), t) for k, t in keys.items()):
            raise records.DataError(f"{path}:{number}: expected an object with {' or '.join(keys)}")
        rows.append(row)
    return rows


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The CLI's flags, defined on demand: importing this module (the trainer does) adds none."""
    if "checkpoint" in FLAGS:
        return
    flags.DEFINE_string(
        "checkpoint",
        None,
        "A Hugging Face Llama directory (weights + tokenizer), "
        "or a training workdir (its best checkpoint).",
    )
    flags.DEFINE_string("prompt", None, "One instruction to answer; the answer is printed.")
    flags.DEFINE_string("prompt_input", "", "Optional alpaca 'input' field for --prompt.")
    flags.DEFINE_string(
        "input", None, "JSONL rows: 'instruction' (+ 'input') or 'messages'; 'prompt' if raw."
    )
    flags.DEFINE_string("output", None, "JSONL to write: each --input row plus 'generated'.")
    flags.DEFINE_enum(
        "template",
        None,
        [*chat_templates.NAMES, "none"],
        "Override the training template read from the checkpoint; none: raw text.",
    )
    flags.DEFINE_integer("max_new_tokens", 256, "New tokens per answer at most.")
    flags.DEFINE_float("temperature", 0.0, "0 is greedy.")
    flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens; 0 keeps all.")
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass; 1 keeps all.")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_integer("batch_size", 8, "Rows decoded together with --input.")
    flags.DEFINE_string("dtype", "bfloat16", "Weights and compute dtype (float32 for exactness).")


# What a training workdir holds before its first checkpoint (metrics, the lock, the export).
WORKDIR_FILES = ("checkpoints", "metrics.jsonl", ".lock")


def _load(path: paths.Path, dtype: str) -> tuple[llama.Llama, str, dict]:
    """(model, tokenizer dir, training data settings) from a HF directory or a training workdir.

    The settings are config.data of the checkpoint's record (with "chat_template_text", the
    template file's text as training read it, when the record keeps it), or an export's
    sftjax_format.json; empty for a model sftjax did not train.
    """
    if any((path / name).exists() for name in WORKDIR_FILES):
        from sftjax import checkpoint  # the trainer's imports only when a workdir is given

        model, record = checkpoint.read_best(path, dtype=dtype)
        return model, record["config"]["data"]["tokenizer"], training_data_config(record)
    model = hf_io.load_pretrained(path, dtype=dtype, param_dtype=dtype)
    recorded = path / hf_export.TRAINING_FORMAT_FILE
    return model, path, json.loads(recorded.read_text()) if recorded.exists() else {}


def training_data_config(record: dict) -> dict:
    """config.data of a checkpoint's JSON record, with the chat template's recorded text."""
    settings = dict(record["config"]["data"])
    template_files = record.get("inputs", {}).get("data.chat_template")
    if template_files:  # records from before content fingerprints keep only the path
        settings["chat_template_text"] = template_files[0]["text"]
    return settings


def training_template(settings: dict, tok: tokenize.SegmentTokenizer, override: str | None):
    """The template to prompt with: the recorded one; for a foreign model its own chat
    template, else alpaca. An override that differs from the record is warned about."""
    recorded = settings.get("template")
    if override and recorded and override != recorded:
        logging.warning("--template=%s, but the model was trained with %r", override, recorded)
    name = override or recorded
    if name is None:
        name = "tokenizer" if getattr(tok.hf, "chat_template", None) else "alpaca"
        logging.warning("no training record: prompting with the %r template", name)
    if name == "none":
        return name
    chat_template = ""
    if name == "tokenizer" and settings.get("chat_template"):  # a workdir's data.chat_template
        chat_template = _recorded_template(settings)
    return chat_templates.make_template(name, tok.hf, chat_template)


def _recorded_template(settings: dict) -> str:
    """The data.chat_template text training rendered: the record's copy, which outlives the
    file (edited or deleted since, it is warned about); the file for an older record."""
    file = paths.resolve(settings["chat_template"])
    recorded = settings.get("chat_template_text")
    if recorded is not None:
        if not file.exists() or file.read_text() != recorded:
            logging.warning(
                "%s is %s since training; prompting with the template the model was trained "
                "with (kept in its checkpoint)",
                file,
                "edited" if file.exists() else "gone",
            )
        return recorded
    if not file.exists():
        raise chat_templates.TemplateError(
            f"data.chat_template={file}, the template the model was trained with, is gone "
            "(this checkpoint predates keeping its text): put the file back, or choose one "
            "with --template"
        )
    return file.read_text()


def main(argv: Sequence[str]) -> None:
    del argv
    from sftjax import checkpoint, cli

    cli.setup_logging()  # no libtpu noise on a CPU host; JAX's INFO lines only with --verbose
    checkpoint.quiet_background_failures()  # a damaged checkpoint is one warning, as in training
    if (FLAGS.prompt is None) == (FLAGS.input is None):
        raise app.UsageError("give exactly one of --prompt or --input")
    if FLAGS.input is not None and FLAGS.output is None:
        raise app.UsageError("--input needs --output")
    model, tokenizer_dir, settings = _load(paths.resolve(FLAGS.checkpoint), FLAGS.dtype)
    tokenizer = tokenize.load_tokenizer(tokenizer_dir)
    template = training_template(settings, tokenizer, FLAGS.template)
    options = dict(
        template=template,
        max_new_tokens=FLAGS.max_new_tokens,
        seed=FLAGS.seed,
        temperature=FLAGS.temperature,
        top_k=FLAGS.top_k,
        top_p=FLAGS.top_p,
    )
    if FLAGS.prompt is not None:
        row = {"instruction": FLAGS.prompt, "input": FLAGS.prompt_input}
        if template == "none":
            row = {"prompt": FLAGS.prompt}
        print(respond(model, tokenizer, [row], **options)[0])
        return
    rows = _read_rows(pathlib.Path(FLAGS.input), raw=template == "none")
    with open(FLAGS.output, "w") as out:
        for start in range(0, len(rows), FLAGS.batch_size):
            chunk = rows[start : start + FLAGS.batch_size]
            for row, text in zip(chunk, respond(model, tokenizer, chunk, **options), strict=True):
                out.write(json.dumps({**row, "generated": text}, ensure_ascii=False) + "\n")
            logging.info("answered %d/%d rows", start + len(chunk), len(rows))
    print(f"wrote {len(rows)} answers to {FLAGS.output}", file=sys.stderr)


if __name__ == "__main__":
    from sftjax import cli  # user errors: one line, exit 2 (--verbose: the traceback)

    define_flags()
    flags.mark_flag_as_required("checkpoint")
    cli.run(main)
