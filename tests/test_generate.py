"""KV-cache generation: equal to full forwards, to HF and to llama2.c; sampling rules; the CLI,
which only reads a training workdir and says one line for what the user must change."""

import functools
import json
import os
import pathlib
import shutil
import subprocess
import sys

import chat_fixtures
import jax
import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver
from conftest import shared_path
from flax import nnx
from hf_fixtures import make_hf_llama, our_logits
from train_fixtures import config_with, demo_corpus, short_run

import sftjax
from sftjax import checkpoint, cli, generate, loop, sharding
from sftjax.data import records, templates, tokenize
from sftjax.model import hf_io, llama

NEVER = -1  # an eos id no sampler returns, so rows run all max_new_tokens
PROMPTS = [[1, 17, 5], [1, 40, 2, 33, 9, 12, 60, 8, 3], [1]]  # three lengths, one left-pad bucket
STEPS = 6


@pytest.fixture(scope="module", autouse=True)
def quick_compiles():
    """XLA without most optimisations: ~3x faster compiles on CPU, still real computation."""
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


@functools.cache
def tiny_model(scan_layers: bool, mesh_axes: tuple = ()) -> llama.Llama:
    """A random tiny Llama, built once per layout; `mesh_axes` (data, fsdp, tensor) shards it."""
    # init_std 0.1 spreads the logits, so argmax is not decided by rounding noise.
    cfg = llama.preset(
        "tiny", dtype="float32", vocab_size=64, init_std=0.1, scan_layers=scan_layers
    )
    mesh = sharding.make_mesh(*mesh_axes, devices=None if mesh_axes else jax.devices()[:1])
    return llama.create(cfg, mesh, seed=0)


@pytest.fixture(params=[False, True], ids=["unscanned", "scanned"])
def tiny(request) -> llama.Llama:
    return tiny_model(request.param)


def full_forward_greedy(model, prompt, steps) -> list[int]:
    """Greedy by re-running the whole sequence (no cache) each step, one prompt, no padding."""
    buffer = np.zeros((1, 16), np.int32)  # one shape, one compile; causality hides the tail
    buffer[0, : len(prompt)] = prompt
    for t in range(len(prompt), len(prompt) + steps):
        buffer[0, t] = int(np.argmax(our_logits(model, buffer)[0, t - 1]))
    return buffer[0, len(prompt) : len(prompt) + steps].tolist()


def test_cached_greedy_equals_argmax_of_full_forwards(tiny):
    got = generate.generate(tiny, PROMPTS, max_new_tokens=STEPS, eos_id=NEVER)
    assert got == [full_forward_greedy(tiny, p, STEPS) for p in PROMPTS]


def test_prefill_logits_with_cache_equal_full_forward(tiny):
    tokens, positions, segment_ids = generate._left_pad(PROMPTS, len(PROMPTS), 16)
    prefill = nnx.jit(lambda m, *batch: m(*batch, llama.init_cache(m.cfg, len(PROMPTS), 20)))
    logits, cache = prefill(tiny, tokens, positions, segment_ids)
    assert int(cache.end) == 16 and cache.k.shape == (2, 3, 20, 4, 8)
    for row, prompt in enumerate(PROMPTS):
        alone = np.zeros((1, 16), np.int32)  # the shape full_forward_greedy compiled
        alone[0, : len(prompt)] = prompt
        expected = our_logits(tiny, alone)[0, : len(prompt)]
        np.testing.assert_allclose(logits[row, 16 - len(prompt) :], expected, atol=1e-5, rtol=1e-5)


def test_sample_keeps_only_top_k_and_nucleus():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 4000, np.float32))
    key = jax.random.key(0)
    top2 = np.asarray(generate.sample(logits, key, generate.Sampling(1.0, top_k=2)))
    nucleus = np.asarray(generate.sample(logits, key, generate.Sampling(1.0, top_p=0.7)))
    plain = np.asarray(generate.sample(logits, key, generate.Sampling(1.0)))
    assert set(top2.tolist()) == set(nucleus.tolist()) == {0, 1}  # 0.5 + 0.3 >= 0.7
    assert set(plain.tolist()) == {0, 1, 2, 3}
    assert abs((top2 == 0).mean() - 0.5 / 0.8) < 0.03  # renormalised over the kept tokens


def test_sharded_model_generates_the_same_tokens():
    sharded = tiny_model(False, (2, 2, 2))  # batch split 4 ways: 3 prompts run as 4 rows
    assert len(sharded.layers[0].mlp.up[...].sharding.device_set) == 8
    single = generate.generate(tiny_model(False), PROMPTS, max_new_tokens=STEPS, eos_id=NEVER)
    assert generate.generate(sharded, PROMPTS, max_new_tokens=STEPS, eos_id=NEVER) == single


def test_sampling_limits_seeds_and_eos():
    run = lambda **kw: generate.generate(tiny_model(False), PROMPTS, max_new_tokens=STEPS, **kw)
    greedy = run(eos_id=NEVER)
    assert run(eos_id=NEVER, temperature=0.7, top_k=1, seed=3) == greedy
    assert run(eos_id=NEVER, temperature=1.0, top_p=1e-6, seed=3) == greedy
    sampled = run(eos_id=NEVER, temperature=1.0, seed=5)
    assert run(eos_id=NEVER, temperature=1.0, seed=5) == sampled
    assert run(eos_id=NEVER, temperature=1.0, seed=6) != sampled != greedy

    eos = greedy[0][2]  # row 0 stops after 2 tokens; each row stops at its own first `eos`
    stopped = run(eos_id=eos)
    assert stopped == [row[: row.index(eos)] if eos in row else row for row in greedy]
    assert len({len(row) for row in stopped}) > 1


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> pathlib.Path:
    """A tiny random HF Llama (bos 1, eos 2) with a word-level tokenizer beside it."""
    import tokenizers
    import transformers

    directory = tmp_path_factory.mktemp("hf_generate")
    make_hf_llama(directory)
    words = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="<unk>"))
    words.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    trainer = tokenizers.trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"])
    text = "### Instruction: Input: Response: name a color the sky is blue red green why"
    words.train_from_iterator([text], trainer)
    assert words.get_vocab_size() <= 96 and words.token_to_id("<s>") == 1
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=words, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(directory)
    return directory


def test_greedy_equals_hf_generate(hf_dir):
    torch = pytest.importorskip("torch")
    import transformers

    hf_model = transformers.LlamaForCausalLM.from_pretrained(hf_dir).float().eval()
    model = hf_io.load_pretrained(hf_dir, dtype="float32")
    prompts = [[1, 50, 7, 33], [1, 9, 81, 4, 70, 12, 5]]
    ours = generate.generate(model, prompts, max_new_tokens=10, eos_id=2)
    for prompt, got in zip(prompts, ours, strict=True):
        with torch.no_grad():
            out = hf_model.generate(
                torch.tensor([prompt]),
                do_sample=False,
                max_new_tokens=10,
                eos_token_id=2,
                pad_token_id=0,
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            )
        theirs = out[0, len(prompt) :].tolist()
        assert got == (theirs[: theirs.index(2)] if 2 in theirs else theirs)


def test_stories260k_greedy_from_bos_matches_llama2c():
    directory = shared_path("stories260K_hf")
    golden = json.loads((directory / "golden_greedy_from_bos.json").read_text())[
        "greedy_next_ids_60"
    ]
    assert 2 not in golden  # EOS is never produced, so all 60 ids are compared
    model = hf_io.load_pretrained(directory, dtype="float32", scan_layers=True)
    assert generate.generate(model, [[1]], max_new_tokens=60, eos_id=2) == [golden]


def test_cli_prints_an_answer_and_writes_one_line_per_row(hf_dir, tmp_path):

    model = hf_io.load_pretrained(hf_dir, dtype="float32")
    tokenizer = tokenize.load_tokenizer(str(hf_dir))
    rows = [
        {"instruction": "name a color", "input": ""},
        {"instruction": "why is the sky blue", "input": "the sky", "output": "reference kept"},
        {"instruction": "name a red color"},
    ]
    expected = generate.respond(model, tokenizer, rows, max_new_tokens=8)
    # The prompt is the training encoding of the row minus its response and EOS.
    row = records.Row(source="t", instruction="why", input="sky", response="blue")
    trained = tokenize.encode(templates.alpaca(row), tokenizer).ids.tolist()
    prompt = generate.prompt_ids({"instruction": "why", "input": "sky"}, "alpaca", tokenizer)
    assert trained[: len(prompt)] == prompt and trained[len(prompt) :] == [
        tokenizer.hf.convert_tokens_to_ids("blue"),
        tokenizer.eos_id,
    ]

    # The real entry point, in a fresh process on one CPU device.
    root = pathlib.Path(sftjax.__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PYTHONPATH=str(root), JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1")
    command = [
        sys.executable,
        "-m",
        "sftjax.generate",
        f"--checkpoint={hf_dir}",
        "--prompt=name a color",
        "--max_new_tokens=8",
        "--dtype=float32",
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=root, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == expected[0] + "\n"

    # --input/--output through the same main() and flag parsing, in this process (saves ~10 s
    # of interpreter start, imports and compiles).
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "answers.jsonl"
    argv = [
        "generate",
        f"--checkpoint={hf_dir}",
        f"--input={tmp_path / 'rows.jsonl'}",
        f"--output={out}",
        "--max_new_tokens=8",
        "--batch_size=4",  # one chunk of 3 rows: the compile `expected` made is reused
        "--dtype=float32",
    ]
    generate.define_flags()
    with flagsaver.flagsaver():
        generate.main(flags.FLAGS(argv))
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert written == [{**r, "generated": e} for r, e in zip(rows, expected, strict=True)]


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
    """A 4-step tiny run on a chat template file: checkpoints at steps 2 and 4."""
    directory = tmp_path_factory.mktemp("trained")
    train, val, tok_dir, vocab = demo_corpus(directory / "corpus", n_train=120, n_val=20)
    template = directory / "corpus" / "chat.jinja"
    template.write_text(chat_fixtures.LLAMA2_CHAT)
    values = short_run(
        train,
        val,
        tok_dir,
        vocab,
        **{"data.template": "tokenizer", "data.chat_template": str(template)},
        **{"train.num_steps": 4, "eval.every_steps": 2, "data.seq_len": 64},
    )
    loop.fit(config_with(values), directory / "run")
    return directory / "run", template


def _tree(directory: pathlib.Path) -> dict:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*")}


def _answer(workdir, capsys, *extra: str) -> str:
    argv = ["generate", f"--checkpoint={workdir}", "--prompt=Name a color.", "--dtype=float32"]
    generate.define_flags()
    with flagsaver.flagsaver():
        generate.main(flags.FLAGS([*argv, "--max_new_tokens=4", *extra]))
    return capsys.readouterr().out


def test_generate_only_reads_a_workdir_and_keeps_to_the_trained_template(
    trained_workdir, capsys, caplog
):
    """The template file edited or deleted: the recorded text still prompts; a damaged best
    checkpoint: the other one answers and nothing in the workdir moves; too long: one line."""
    workdir, template = trained_workdir
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", max_to_keep=5, read_only=True)
    best, other = ckpt.steps_best_first()
    settings = generate.training_data_config(ckpt.restore_record(best))
    ckpt.close()
    tok = tokenize.load_tokenizer(settings["tokenizer"])
    answer = _answer(workdir, capsys)
    template.write_text(chat_fixtures.LLAMA2_CHAT.replace("[INST]", "Q:"))
    assert _answer(workdir, capsys) == answer
    assert f"{template} is edited since training" in caplog.text
    trained_with = generate.training_template(settings, tok, None).chat_template
    assert trained_with == chat_fixtures.LLAMA2_CHAT
    template.unlink()
    assert _answer(workdir, capsys) == answer
    assert generate.training_template(settings, tok, None).chat_template == trained_with

    for extra in ("--max_new_tokens=100000", f"--prompt={'red ' * 600}"):
        with pytest.raises(cli.USER_ERRORS, match="shorten the prompt or lower max_new_tokens"):
            _answer(workdir, capsys, extra)

    state_files = (workdir / "checkpoints" / str(best) / "state").rglob("d/*")
    largest = max(state_files, key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
    before = _tree(workdir)
    caplog.clear()
    _answer(workdir, capsys)
    assert f"checkpoint step {best} is damaged" in caplog.text
    assert f"using step {other} instead" in caplog.text
    assert _tree(workdir) == before  # nothing moved, created or cleaned up


def test_generate_on_a_workdir_without_checkpoints_is_one_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")  # a run stopped before its first checkpoint
    (tmp_path / "checkpoints").mkdir()
    root = pathlib.Path(sftjax.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "sftjax.generate", f"--checkpoint={tmp_path}", "--prompt=hi"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=root, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.splitlines() == [
        f"error: {tmp_path}/checkpoints holds no complete checkpoint yet: a run saves its first "
        "at its first evaluation (eval.every_steps) or when stopped by SIGTERM/Ctrl-C"
    ]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["checkpoints", "metrics.jsonl"]


def test_generate_on_a_workdir_whose_base_moved_is_one_line(trained_workdir, tmp_path):
    """The checkpoints hold every weight but not the architecture, which a run from
    model.hf_path reads from the base's config.json: with the base gone, generate says so
    once (exit 2) instead of calling every checkpoint damaged. The run's records are pointed
    at a base that is not there (the fixture trains a preset to stay small)."""
    workdir = tmp_path / "run"
    shutil.copytree(trained_workdir[0], workdir)
    gone = tmp_path / "moved-base"
    for meta in (workdir / "checkpoints").glob("*/meta/metadata"):
        record = json.loads(meta.read_text())
        record["config"]["model"]["hf_path"] = str(gone)
        meta.write_text(json.dumps(record))
    root = pathlib.Path(sftjax.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "sftjax.generate", f"--checkpoint={workdir}", "--prompt=hi"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=root, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.splitlines() == [
        f"error: reading {workdir} needs the architecture in model.hf_path={gone}/config.json "
        f"(the checkpoints hold weights only): {gone}: no such directory; put the base model "
        "back there"
    ]
