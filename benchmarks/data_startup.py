"""A training start's data phase, before and after prepared data: seconds and peak RSS.

Run: python benchmarks/data_startup.py [--sizes 10000,100000,1000000 --before_max_rows 100000]

For each size, distinct synthetic Alpaca-style rows (instruction, optional input, response;
words drawn at random from the Llama-2 vocabulary's whole-word pieces, so no two prompts are
near duplicates; ~190 tokens an example with the Alpaca template) are written as JSONL files of
at most 100,000 rows. Each phase then runs in a fresh subprocess, so its peak RSS is that
phase's alone (the child's own VmHWM; wait4's ru_maxrss, which Linux starts from the spawning
parent's peak, is kept as a cross-check), and times the data phase the way
`sftjax/loop.py::_prepare` does it: load the tokenizer, make the template, get the data, plan
data.num_epochs of training rows, build the training dataset, materialise the validation
batches, draw the first training batch (through `batches.iterate`, as the loop does). The
config is configs/base.py with data.seq_len 2048, train.batch_size 64, data.num_epochs 3.
Imports happen before the clock starts (their RSS is reported as rss_after_imports_mib).

Phases:
- `before`: the start as it was before prepared data, measured as `pipeline.load_splits` (read,
  validate, dedup, group, split, encode every row into Example objects), then
  `batches.train_dataset(flat.from_examples(train), ...)` and
  `list(batches.validation_batches(flat.from_examples(validation), ...))`. It runs only up to
  `--before_max_rows` rows (1M rows need ~25 GiB this way); larger sizes say "not run".
- `first`: `prepare.ensure` into an empty workdir (the first start: prepares WORKDIR/data).
- `restart`: `prepare.ensure` again on the same workdir (reuses the prepared arrays).

`--repeats N` runs the three phases N times, interleaved, and keeps each phase's fastest run
(every run's seconds are in the JSON; peak RSS is the highest of the runs). Prints one JSON
line per size on stdout, then a table on stderr with first/before and restart/before ratios of
time and peak RSS per size. Goals (issue 21): at 1M rows the restart's data phase <= 10 s and
its peak RSS <= 4 GiB; the first preparation no slower than the old start.
`--profile restart` (or a comma list of phases) runs each named phase once more, after the
timed runs, under cProfile: its stats go to --profile_dir/<phase>-<rows>.prof and its top
functions to stderr; the profiled run's numbers are in the JSON as "profiled_<phase>", apart
from the timed ones (the profiler slows a phase down).
"""

import argparse
import json
import os
import pathlib
import random
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = pathlib.Path(
    os.environ.get("SFTJAX_SHARED_DATA", ROOT.parent / "shared/data")
)  # as tests/conftest.py finds it
ROWS_PER_FILE = 100_000
PHASES = ("before", "first", "restart")
GOAL_RESTART_S = 10.0
GOAL_RSS_GIB = 4.0


def _words(tokenizer_dir: pathlib.Path) -> list[str]:
    """Whole-word pieces of the tokenizer ('▁word'): about one token each."""
    vocab = json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"]
    return sorted(p[1:] for p in vocab if p.startswith("▁") and p[1:].isalpha() and len(p) > 4)


def write_rows(directory: pathlib.Path, n: int, words: list[str], seed: int) -> None:
    """n distinct Alpaca rows as JSONL files of <= ROWS_PER_FILE rows each, written a line at a
    time so this (parent) process stays small: a child's peak RSS starts from it."""
    rng = random.Random(seed)
    directory.mkdir(parents=True)
    for first in range(0, n, ROWS_PER_FILE):
        with open(directory / f"rows-{first // ROWS_PER_FILE:05d}.jsonl", "w") as f:
            for _ in range(min(ROWS_PER_FILE, n - first)):
                has_input = rng.random() < 0.4
                row = {
                    "instruction": " ".join(rng.choices(words, k=rng.randint(8, 30))) + "?",
                    "input": " ".join(rng.choices(words, k=rng.randint(10, 50)))
                    if has_input
                    else "",
                    "response": " ".join(rng.choices(words, k=rng.randint(90, 190))) + ".",
                }
                f.write(json.dumps(row) + "\n")


def _config(files: str, tokenizer: str):
    from configs import base

    config = base.get_config()
    config.data.update(train_files=files, tokenizer=tokenizer, seq_len=2048, num_epochs=3)
    config.train.batch_size = 64
    return config


def data_phase(phase: str, config, workdir: str) -> dict:
    """loop._prepare's data part for one phase; seconds per step and what it built."""
    from sftjax import paths
    from sftjax.data import batches, flat, pipeline, prepare, tokenize

    times = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        times[name] = round(now - clock, 3)
        clock = now

    tok = tokenize.load_tokenizer(config.data.tokenizer)
    template = pipeline.make_template(config.data, tok)
    lap("tokenizer_template_s")
    if phase == "before":
        train, validation, _ = pipeline.load_splits(config.data, tok, template)
        train, validation = flat.from_examples(train), flat.from_examples(validation)
        sources = []
        lap("load_splits_s")
    else:
        data, _ = prepare.ensure(config.data, paths.resolve(workdir), tok, template)
        train, validation, sources = data.train, data.validation, data.sources
        lap("ensure_s")
    kwargs = dict(seq_len=config.data.seq_len, process_index=0, process_count=1,
                  num_bins=config.data.packing_bins)  # fmt: skip
    plan = batches.train_plan(
        train, seq_len=config.data.seq_len, seed=config.data.shuffle_seed,
        num_epochs=config.data.num_epochs, pack=config.data.pack,
        num_bins=config.data.packing_bins, mix=sources,
    )  # fmt: skip
    lap("train_plan_s")
    train_data = batches.train_dataset(
        train, batch_size=config.train.batch_size, seed=config.data.shuffle_seed,
        num_epochs=config.data.num_epochs, pack=config.data.pack, plan=plan, **kwargs,
    )  # fmt: skip
    lap("train_dataset_s")
    assert not sources, "the benchmark's data has no mixture (loop._validation_sets' one set)"
    val = list(
        batches.validation_batches(
            validation, batch_size=config.eval.batch_size, pack=config.data.pack_validation,
            **kwargs,
        )
    )  # fmt: skip
    lap("validation_s")
    batch = next(batches.iterate(train_data))
    lap("first_batch_s")
    return {
        "seconds": round(sum(times.values()), 3),
        **times,
        "train_examples": len(train),
        "train_tokens": int(train.offsets[-1]),
        "validation_examples": len(validation),
        "steps": len(train_data),
        "validation_batches": len(val),
        "first_batch_real_tokens": int((batch["segment_ids"] > 0).sum()),
    }


def _status_kib(*keys: str) -> dict[str, int]:
    """Fields of /proc/self/status in KiB (Linux)."""
    found = {}
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in keys:
            found[key] = int(value.split()[0])
    return found


def _own_peak_kib() -> int:
    """This process's own peak RSS (VmHWM, KiB): unlike ru_maxrss, not raised by the RSS of
    the parent it was spawned from."""
    return _status_kib("VmHWM")["VmHWM"]


def child(args) -> None:
    """One phase in this (fresh) process; its result as JSON in args.result."""
    config = _config(args.files, args.tokenizer)
    from sftjax.data import batches, pipeline, prepare  # noqa: F401  (imports before the clock)

    rss_imports = _own_peak_kib()
    if args.profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        result = profiler.runcall(data_phase, args.child, config, args.workdir)
        profiler.dump_stats(args.profile)
        stats = pstats.Stats(args.profile, stream=sys.stderr).sort_stats("cumulative")
        stats.print_stats(40)
        stats.sort_stats("tottime").print_stats(25)
    else:
        result = data_phase(args.child, config, args.workdir)
    result["rss_after_imports_mib"] = round(rss_imports / 1024)
    result["peak_rss_gib"] = round(_own_peak_kib() / 2**20, 3)
    # at the end: anonymous memory vs mapped file pages (the prepared arrays' page cache,
    # which the kernel maps in large folios and may drop: it is not memory the start needs)
    now = _status_kib("RssAnon", "RssFile")
    result["end_rss_anon_mib"] = round(now["RssAnon"] / 1024)
    result["end_rss_file_mib"] = round(now["RssFile"] / 1024)
    pathlib.Path(args.result).write_text(json.dumps(result))


def run_phase(
    phase: str, files: str, workdir: pathlib.Path, args, tmp: pathlib.Path, profile: str = ""
) -> dict:
    """A fresh subprocess for `phase`: its result plus its own peak RSS (wait4)."""
    result_file = tmp / f"{phase}-result.json"
    command = [sys.executable, __file__, "--child", phase, "--files", files,
               "--workdir", str(workdir), "--tokenizer", args.tokenizer,
               "--result", str(result_file)]  # fmt: skip
    if profile:
        command += ["--profile", profile]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=sys.stderr)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if process.returncode:
        raise SystemExit(f"{phase} failed (exit {process.returncode})")
    result = json.loads(result_file.read_text())
    # wait4's ru_maxrss of the child: at least its VmHWM (a cross-check; Linux starts it from
    # the spawning parent's peak, small here)
    result["ru_maxrss_gib"] = round(usage.ru_maxrss / 2**20, 3)
    result["process_wall_s"] = round(wall, 1)
    return result


def _fastest(runs: list[dict]) -> dict | None:
    """The fastest of a phase's repeats (the least disturbed on a shared machine), with every
    repeat's seconds and the highest peak RSS among them."""
    if not runs:
        return None
    best = dict(min(runs, key=lambda r: r["seconds"]))
    best["all_seconds"] = [r["seconds"] for r in runs]
    best["peak_rss_gib"] = max(r["peak_rss_gib"] for r in runs)
    return best


def _ratio(a: dict | None, b: dict | None, key: str) -> float | None:
    return round(a[key] / b[key], 3) if a and b else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--before_max_rows", "--before-max-rows", type=int, default=100_000)
    parser.add_argument("--tokenizer", default=str(SHARED / "llama2_tokenizer"))
    parser.add_argument("--tmp", default=None, help="where rows and workdirs go (deleted)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each phase; the fastest")
    parser.add_argument("--profile", default="", help="comma list of phases to profile")
    parser.add_argument(
        "--profile_dir", default=os.path.join(tempfile.gettempdir(), "data_startup")
    )
    # one phase in a child process (run_phase)
    for name in ("--child", "--files", "--workdir", "--result"):
        parser.add_argument(name, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if set(filter(None, args.profile.split(","))) - set(PHASES):
        raise SystemExit(f"--profile={args.profile}: name phases among {','.join(PHASES)}")
    if not pathlib.Path(args.tokenizer, "tokenizer.json").exists():
        raise SystemExit(f"{args.tokenizer}: no tokenizer.json; pass --tokenizer=DIR")
    words = _words(pathlib.Path(args.tokenizer))
    sizes = [int(s) for s in args.sizes.split(",")]
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="data_startup-", dir=args.tmp))
    table = []
    try:
        for n in sizes:
            rows_dir = tmp / f"rows-{n}"
            start = time.perf_counter()
            write_rows(rows_dir, n, words, args.seed)
            print(f"{n} rows written in {time.perf_counter() - start:.1f} s", file=sys.stderr)
            files = str(rows_dir / "*.jsonl")
            results: dict = {"rows": n}
            runs: dict[str, list[dict]] = {p: [] for p in PHASES}
            workdir = tmp / f"workdir-{n}"
            for _ in range(args.repeats):  # phases interleaved: load drifts hit each alike
                if n <= args.before_max_rows:
                    runs["before"].append(run_phase("before", files, tmp / "none", args, tmp))
                shutil.rmtree(workdir, ignore_errors=True)
                workdir.mkdir()
                runs["first"].append(run_phase("first", files, workdir, args, tmp))
                runs["restart"].append(run_phase("restart", files, workdir, args, tmp))
            for phase, found in runs.items():
                results[phase] = _fastest(found)
            for phase in filter(None, args.profile.split(",")):
                if phase == "before" and n > args.before_max_rows:
                    continue
                if phase == "first":  # an empty workdir again
                    shutil.rmtree(workdir)
                    workdir.mkdir()
                os.makedirs(args.profile_dir, exist_ok=True)
                stats = os.path.abspath(os.path.join(args.profile_dir, f"{phase}-{n}.prof"))
                found = run_phase(phase, files, workdir, args, tmp, profile=stats)
                results[f"profiled_{phase}"] = found
            if not runs["before"]:
                results["before_not_run"] = (
                    f"not run: {n} rows > --before_max_rows {args.before_max_rows} (the old "
                    "start holds every example as Python objects, ~25 GiB at 1M rows)"
                )
            before, first, restart = (results[p] for p in PHASES)
            results["ratios"] = {
                "first_vs_before_s": _ratio(first, before, "seconds"),
                "restart_vs_before_s": _ratio(restart, before, "seconds"),
                "first_vs_before_rss": _ratio(first, before, "peak_rss_gib"),
                "restart_vs_before_rss": _ratio(restart, before, "peak_rss_gib"),
            }
            print(json.dumps(results), flush=True)
            table.append(results)
            shutil.rmtree(rows_dir)
            shutil.rmtree(workdir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _print_table(table)


def _cell(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def _print_table(table: list[dict]) -> None:
    out = sys.stderr
    print(
        "\n| rows | phase | data phase s | peak RSS GiB | s vs before | RSS vs before |", file=out
    )
    print("|---|---|---|---|---|---|", file=out)
    for r in table:
        for phase in PHASES:
            m = r[phase]
            if m is None:
                print(f"| {r['rows']:,} | {phase} | {r['before_not_run']} | | | |", file=out)
                continue
            ratios = ["", ""]
            if phase != "before":
                ratios = [_cell(r["ratios"][f"{phase}_vs_before_{k}"]) for k in ("s", "rss")]
            print(
                f"| {r['rows']:,} | {phase} | {m['seconds']:.1f} | {m['peak_rss_gib']:.2f} | "
                f"{ratios[0]} | {ratios[1]} |",
                file=out,
            )
    if table:
        largest = table[-1]
        restart, first = largest["restart"], largest["first"]
        print(
            f"goals at {largest['rows']:,} rows: restart {restart['seconds']:.1f} s "
            f"(<= {GOAL_RESTART_S:.0f} s: {restart['seconds'] <= GOAL_RESTART_S}), restart peak "
            f"RSS {restart['peak_rss_gib']:.2f} GiB (<= {GOAL_RSS_GIB:.0f} GiB: "
            f"{restart['peak_rss_gib'] <= GOAL_RSS_GIB}; the first start's "
            f"{first['peak_rss_gib']:.2f})",
            file=out,
        )
    for r in table:
        if r["before"]:
            first_ok = r["first"]["seconds"] <= r["before"]["seconds"]
            print(f"first start no slower than before at {r['rows']:,} rows: {first_ok}", file=out)
        else:
            print(f"first start vs before at {r['rows']:,} rows: {r['before_not_run']}", file=out)


if __name__ == "__main__":
    main()
