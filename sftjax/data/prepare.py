"""`python -m sftjax.data.prepare --config=… --out=DIR`: read, validate, dedup, split and encode
once; training then reads flat arrays.

Owns the prepared dataset: DIR/{train,validation}/<array>.bin (flat.py's layout) and
DIR/manifest.json (the sources, the split's counts, the data report, and the fingerprint of
everything the arrays depend on), writing it so that a reader never sees half of one (local:
staged beside it and renamed; object storage: the manifest is written last), and deciding
whether a prepared dataset still matches a config (`ensure`, what `fit` calls).
Does not own reading or encoding (pipeline.py) nor batching (batches.py).

Why: without it every process of every host reads, groups and tokenizes every row at every
start and holds each example as Python objects (a 1M-row mix: minutes and ~25 GiB per start).
A fingerprint is a sha256 over the data keys that shape the arrays, the contents of the data
files (in glob order), of the tokenizer's files and of the chat template (contents.py), so a
rewritten file is noticed while a moved one is not.

Many hosts: process 0 prepares, the others wait for its manifest. Grouping and near-duplicate
detection need every row in one place, and on one host encoding is 40-60 % of preparation; a
split encode would save part of that once, at the price of a second protocol (shards, merge).
"""

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time

import ml_collections
import numpy as np
import tqdm
from absl import flags
from ml_collections import config_flags

from sftjax import cli, contents, paths
from sftjax import config as config_lib
from sftjax.data import flat, mixture, pipeline, records, tokenize

log = logging.getLogger("sftjax")

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "validation")
CHUNK_ROWS = 8192  # rows encoded per batched call: bounds the memory of Python objects
# data keys that do not change the arrays (packing, epochs, the mixture's sampling, where to
# read them from): changing them reuses a prepared dataset
NOT_IN_ARRAYS = ("prepared", "pack", "pack_validation", "packing_bins", "num_epochs",
                 "mixture_unit")  # fmt: skip
# keys naming files: their contents are in the fingerprint (inputs), not where they lie, so a
# moved file, or a prepared dataset read on another machine, still matches
PATH_KEYS = ("train_files", "validation_files", "tokenizer", "chat_template")
WAIT_SECONDS = 2.0  # how often a waiting process looks for process 0's manifest


@dataclasses.dataclass(frozen=True)
class Prepared:
    directory: paths.Path
    manifest: dict
    train: flat.Split
    validation: flat.Split
    sources: list[mixture.Source]  # [] without data.mixture

    @property
    def source_names(self) -> list[str]:
        return [s["name"] for s in self.manifest["sources"]]


def array_keys(data: ml_collections.ConfigDict, mix: list[mixture.Source]) -> dict:
    """The data keys the arrays depend on (a mixture by its sources' files, formats, names)."""
    keys = {k: v for k, v in data.to_dict().items() if k not in NOT_IN_ARRAYS + PATH_KEYS}
    keys["mixture"] = [{"name": s.name, "format": s.format} for s in mix]
    keys["chat_template"] = bool(data.chat_template)  # its text is an input
    return json.loads(json.dumps(keys, default=str))  # tuples → lists, as read back


def fingerprint(keys: dict, inputs: dict) -> str:
    """sha256 of what the arrays depend on; file identities without their names (moves are
    fine) but with the template's text."""
    unnamed = {k: [{f: v for f, v in i.items() if f != "name"} for i in files]
               for k, files in inputs.items()}  # fmt: skip
    text = json.dumps({"version": FORMAT_VERSION, "data": keys, "inputs": unnamed}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def prepare(
    data: ml_collections.ConfigDict,
    out: str | os.PathLike,
    tok: tokenize.SegmentTokenizer | None = None,
    template=None,
    *,
    inputs: dict | None = None,
    progress: bool = True,
) -> dict:
    """Prepare data.* into `out` (local or URL), replacing what is there; returns the manifest.

    Raises what pipeline.read_splits raises (bad rows, leakage), DataError when no training
    example is left, MixtureError for a malformed data.mixture.
    """
    start = time.perf_counter()
    out = paths.resolve(out)
    _check_replaceable(out)
    tok = tokenize.load_tokenizer(data.tokenizer) if tok is None else tok
    template = pipeline.make_template(data, tok) if template is None else template
    mix = pipeline.sources(data)
    inputs = contents.run_inputs(data, template) if inputs is None else inputs
    keys = array_keys(data, mix)
    log.info("reading, checking and splitting the rows (then encoding them)")
    train_rows, validation_rows, report = pipeline.read_splits(
        data, pipeline.overlong_rows(data, tok, template)
    )
    log.info(
        "%d training and %d validation rows after %.1f s (grouping %.1f s)",
        len(train_rows), len(validation_rows), time.perf_counter() - start,
        report.grouping_seconds,
    )  # fmt: skip
    source_of_file = _source_of_file(mix)
    staging = _staging_dir(out)
    counts, per_source, max_id = {}, [], 0
    bar = tqdm.tqdm(
        total=len(train_rows) + len(validation_rows), unit="row", desc="encode",
        disable=not progress, dynamic_ncols=True,
    )  # fmt: skip
    try:
        with bar:
            for name, rows in (("train", train_rows), ("validation", validation_rows)):
                writer = flat.Writer(os.path.join(staging, name))
                by_source = np.zeros((2, max(len(mix), 1)), np.int64)  # examples, tokens
                for first in range(0, len(rows), CHUNK_ROWS):
                    chunk = rows[first : first + CHUNK_ROWS]
                    kept, examples = pipeline.encode_indexed(
                        chunk, template, tok, config=data, report=report
                    )
                    ids = [source_of_file(chunk[i].source) for i in kept]
                    writer.append(examples, ids)
                    np.add.at(by_source[0], ids, 1)
                    np.add.at(by_source[1], ids, [len(e) for e in examples])
                    bar.update(len(chunk))
                counts[name] = writer.close()
                max_id = max(max_id, writer.max_token_id)
                per_source.append(by_source)
    except BaseException:  # a stop or a failure mid-way leaves nothing behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    report.train_examples = counts["train"]["examples"]
    report.validation_examples = counts["validation"]["examples"]
    if not report.train_examples:
        shutil.rmtree(staging, ignore_errors=True)
        raise pipeline.no_examples_error(data, report, len(train_rows))
    table = _source_table(mix, report, per_source)
    manifest = {
        "version": FORMAT_VERSION,
        "fingerprint": fingerprint(keys, inputs),
        "data": keys,
        "inputs": inputs,
        "sources": table,
        "splits": counts,
        "max_token_id": max_id,
        "report": "\n".join([report.summary(), *map(_source_line, table if mix else [])]),
        "prepare_seconds": round(time.perf_counter() - start, 2),
    }
    _publish(staging, out, manifest)
    return manifest


def _source_of_file(mix: list[mixture.Source]):
    """row.source ("path:line") → source index; every file in exactly one source."""
    if not mix:
        return lambda where: 0
    owner: dict[str, int] = {}
    for s, source in enumerate(mix):
        for file in records.expand_paths(source.files):
            if owner.setdefault(file, s) != s:
                raise mixture.MixtureError(
                    f"data.mixture: {file} is in two sources ({mix[owner[file]].name} and "
                    f"{source.name}); give each file to one source"
                )
    return lambda where: owner[where.rsplit(":", 1)[0]]


def _source_table(mix, report: pipeline.DataReport, per_source: list[np.ndarray]) -> list[dict]:
    """Per source: rows read/bad/duplicates, examples and tokens per split, over-long rows
    dropped (rows kept by reading that are in neither split)."""
    counted = [
        {f"{split}_{what}": int(per_source[i][j][s]) for i, split in enumerate(SPLITS)
         for j, what in enumerate(("examples", "tokens"))}
        for s in range(max(len(mix), 1))
    ]  # fmt: skip
    if not mix:
        return [{"name": "", "files": "", "format": report.train_records.format, "weight": 1.0,
                 "unit": "tokens", **counted[0]}]  # fmt: skip
    table = []
    for source, counts, own in zip(mix, report.source_records, counted, strict=True):
        table.append(
            {**dataclasses.asdict(source), "rows_read": counts.rows_read,
             "bad_rows": counts.bad_rows, "duplicates": counts.duplicates, **own,
             "dropped_overlong": counts.rows_kept - own["train_examples"]
             - own["validation_examples"]}
        )  # fmt: skip
    return table


def _source_line(s: dict) -> str:
    return (
        f"source {s['name']} ({s['files']}, weight {s['weight']:g} in {s['unit']}): rows read "
        f"{s['rows_read']}, bad {s['bad_rows']}, duplicates {s['duplicates']}, over-long dropped "
        f"{s['dropped_overlong']}; train {s['train_examples']} examples, {s['train_tokens']} "
        f"tokens; validation {s['validation_examples']} examples, {s['validation_tokens']} tokens"
    )


def _staging_dir(out: paths.Path) -> str:
    """A local directory to write into: beside `out` when local (one rename publishes it)."""
    if paths.is_remote(out):
        return tempfile.mkdtemp(prefix="sftjax-prepare-")
    os.makedirs(os.fspath(out.parent), exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=os.fspath(out.parent))


def _publish(staging: str, out: paths.Path, manifest: dict) -> None:
    """Make `staging` the prepared dataset at `out`: never half of one visible."""
    text = json.dumps(manifest, indent=1)
    if paths.is_remote(out):  # no rename in a bucket: the manifest, written last, says done
        paths.remove_tree(out)
        paths.upload_tree(staging, out)
        (out / MANIFEST).write_text(text)
        shutil.rmtree(staging, ignore_errors=True)
        return
    with open(os.path.join(staging, MANIFEST), "w") as f:
        f.write(text)
    old = None
    if out.exists():
        old = tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=os.fspath(out.parent))
        os.replace(os.fspath(out), os.path.join(old, "data"))
    os.replace(staging, os.fspath(out))
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _check_replaceable(out: paths.Path) -> None:
    """Only an earlier prepared dataset (or nothing) is replaced: never a user's other files."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not (out / MANIFEST).exists():
        raise config_lib.ConfigError(
            f"{out} exists and is not a prepared dataset (no {MANIFEST}); name a new directory"
        )


def read_manifest(directory: paths.Path) -> dict | None:
    file = directory / MANIFEST
    if not file.exists():
        return None
    manifest = json.loads(file.read_text())
    return manifest if manifest.get("version") == FORMAT_VERSION else None


def open_prepared(
    directory: paths.Path, manifest: dict, mix: list[mixture.Source] | None = None
) -> Prepared:
    """The arrays of a prepared dataset. mix: the run's sources, whose weights and units may
    differ from preparation (they only steer the draw); None: as prepared."""
    if mix is None:
        keys = ("name", "files", "weight", "format", "unit")
        mix = [mixture.Source(**{k: s[k] for k in keys}) for s in manifest["sources"]]
        mix = mix if manifest["data"]["mixture"] else []
    return Prepared(
        directory, manifest, *(flat.open_split(directory / s) for s in SPLITS), sources=mix
    )


def ensure(
    data: ml_collections.ConfigDict,
    workdir: paths.Path,
    tok: tokenize.SegmentTokenizer,
    template,
    *,
    process_index: int = 0,
) -> tuple[Prepared, dict]:
    """The prepared dataset a run trains on, and the run's input fingerprints.

    data.prepared=DIR: that directory, refused (ConfigError, exit 2) if it was prepared from
    other data. Otherwise WORKDIR/data, prepared on the first start by process 0 (the others
    wait) and reused while its fingerprint matches; prepared again when it does not (a resume
    is then refused by resume_check if the files changed, never trained on silently).
    """
    mix = pipeline.sources(data)
    if data.get("prepared"):
        directory = paths.resolve(data.prepared)
        manifest = read_manifest(directory)
        if manifest is None:
            raise config_lib.ConfigError(
                f"data.prepared={data.prepared} holds no prepared dataset ({MANIFEST}); run "
                f"python -m sftjax.data.prepare --config=… --out={data.prepared} first"
            )
        inputs = _check_matches(data, mix, template, manifest)
        return open_prepared(directory, manifest, mix if data.train_files or mix else None), inputs
    inputs = contents.run_inputs(data, template)
    expected = fingerprint(array_keys(data, mix), inputs)
    directory = workdir / "data"
    manifest = read_manifest(directory)
    half_written = process_index > 0  # (process 0 may be uploading into it right now)
    if manifest is None and not half_written and directory.exists() and any(directory.iterdir()):
        raise config_lib.ConfigError(
            f"{directory} holds files that are not a prepared dataset, and fit prepares the "
            "data there: move them out, or prepare elsewhere (python -m sftjax.data.prepare "
            "--out=DIR) and set data.prepared=DIR"
        )
    if manifest is None or manifest["fingerprint"] != expected:
        if process_index == 0:
            log.info("preparing the data into %s (once: later starts reuse it)", directory)
            manifest = prepare(data, directory, tok, template, inputs=inputs)
        else:
            manifest = _wait_for(directory, expected)
    else:
        log.info("reusing the prepared data in %s", directory)
    return open_prepared(directory, manifest, mix), inputs


def _wait_for(directory: paths.Path, expected: str) -> dict:
    """Poll for process 0's manifest with this fingerprint (it may take minutes)."""
    start = last_log = time.monotonic()
    while True:
        manifest = read_manifest(directory)
        if manifest is not None and manifest["fingerprint"] == expected:
            return manifest
        if time.monotonic() - last_log > 60:
            last_log = time.monotonic()
            log.info("waiting for process 0 to prepare the data (%.0f s)", last_log - start)
        time.sleep(WAIT_SECONDS)


def _check_matches(data, mix, template, manifest: dict) -> dict:
    """The run's inputs; ConfigError naming what differs if the dataset has other sources.

    Without data files in the config (train_files and mixture empty) the rows are taken as
    prepared: only the other keys, the tokenizer and the template are compared.
    """
    keys, prepared_keys = array_keys(data, mix), manifest["data"]
    differ = [
        f"data.{k}={keys.get(k)!r} (prepared with {prepared_keys.get(k)!r})"
        for k in sorted(keys.keys() | prepared_keys.keys())
        if keys.get(k) != prepared_keys.get(k)
    ]
    with_files = bool(data.train_files or mix)
    inputs = contents.run_inputs(data, template, data_files=with_files)
    if not with_files:
        kept = {k: v for k, v in manifest["inputs"].items() if k in contents.DATA_KEYS}
        inputs = {**kept, **inputs}
    for key in sorted(inputs.keys() | manifest["inputs"].keys()):
        found = contents.differences(manifest["inputs"].get(key, []), inputs.get(key, []))
        differ += [f"{key}: {d}" for d in found]
    if differ:
        raise config_lib.ConfigError(
            f"data.prepared={data.prepared} was prepared from other data: {'; '.join(differ)}; "
            "prepare it again (python -m sftjax.data.prepare) or drop data.prepared"
        )
    return inputs


def main(argv) -> None:
    del argv
    cli.setup_logging()
    out = flags.FLAGS.out
    if not out:
        raise config_lib.ConfigError("--out is missing: name the directory to prepare into")
    config_lib.validate_keys(flags.FLAGS.config, "data")
    manifest = prepare(flags.FLAGS.config.data, out)
    print(manifest["report"])
    split = manifest["splits"]["train"]
    print(
        f"prepared {out}: {split['examples']} training examples, {split['tokens']} "
        f"tokens, in {manifest['prepare_seconds']:.1f} s; train with "
        f"--config.data.prepared={out}",
        file=sys.stderr,
    )


if __name__ == "__main__":  # flags defined here only: the trainer imports this module
    config_flags.DEFINE_config_file("config", help_string="config file, e.g. configs/base.py")
    flags.DEFINE_string("out", None, "directory (local or gs://) to write the prepared data")
    cli.run(main)
