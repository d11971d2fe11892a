"""What every command line (`sftjax.main`, `sftjax.demo`, `sftjax.data.report`) shares.

Owns: turning a user's mistake into one message and exit code 2 instead of a traceback (a
mistyped `--config.a.b` key gets the closest existing keys), `--verbose` to see the traceback
anyway, and the log levels. Does not own: the commands themselves or their other exit codes.
"""

import difflib
import glob
import importlib.util
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import jax
from absl import app, flags

from sftjax import config as config_lib
from sftjax import workdir_lock
from sftjax.data import chat_templates, records, tokenize
from sftjax.model import hf_io

VERBOSE = flags.DEFINE_bool(
    "verbose", False, "Also print the traceback of user errors (bad config, data, paths)."
)

# Mistakes a user fixes in their command, config or files: one message each, exit code 2.
USER_ERRORS = (
    config_lib.ConfigError,
    records.DataError,
    tokenize.TokenizerError,
    chat_templates.TemplateError,
    hf_io.CheckpointError,
    workdir_lock.WorkdirBusy,
    workdir_lock.WorkdirError,
)
USER_ERROR_EXIT = 2

_CONFIG_FILE = re.compile(r"^--?config(?:=(.*))?$")
_OVERRIDE = re.compile(r"^--?(?:no)?config\.([\w.]+)(?:=|$)")
_VERBOSE_FLAG = re.compile(r"^--?verbose(?:=(?:true|True|1))?$")


def setup_logging() -> None:
    """INFO for sftjax; only warnings and errors from absl and JAX.

    JAX logs at INFO every platform it probes and cannot open ("Unable to initialize backend
    'tpu'" on each CPU or GPU start); its warnings and errors still show. --verbose keeps it all.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not VERBOSE.value:
        logging.getLogger("absl").setLevel(logging.WARNING)
        logging.getLogger("jax").setLevel(logging.WARNING)
    _skip_absent_tpu()


def _skip_absent_tpu() -> None:
    """On a CPU-only host with libtpu installed (the planner's TPU compiler), use the CPU.

    Otherwise JAX initialises libtpu at the first device query, which prints several lines
    about a TPU it cannot find, from C++, past any logging setting. Only where the CPU is the
    one other backend and no TPU device file exists; JAX_PLATFORMS, when set, always wins.
    """
    if os.environ.get("JAX_PLATFORMS") or glob.glob("/dev/accel*") or os.path.exists("/dev/vfio"):
        return
    from jax._src import xla_bridge  # the registered backends; no public list exists

    if set(xla_bridge._backend_factories) == {"cpu", "tpu"}:
        jax.config.update("jax_platforms", "cpu")


def _user_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(USER_ERROR_EXIT)


def _load_config_file(argv: Sequence[str]) -> Any:
    """The ConfigDict the --config flag names (or defaults to), or None if it cannot be loaded."""
    path = None
    for i, arg in enumerate(argv):
        match = _CONFIG_FILE.match(arg)
        if match and match.group(1) is not None:  # --config=path
            path = match.group(1)
        elif match and i + 1 < len(argv):  # --config path
            path = argv[i + 1]
    if path is None:
        try:
            default = flags.FLAGS["config"].default_as_str
        except KeyError:
            return None
        path = (default or "").strip("'")
    try:
        spec = importlib.util.spec_from_file_location("_config_for_hint", path.split(":")[0])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config()
    except Exception:  # the flag parser's own message will say what is wrong with the file
        return None


def _keys(tree: dict, prefix: str = "") -> list[str]:
    """Dotted paths of every section and leaf of a nested dict."""
    out = []
    for key, value in tree.items():
        out.append(prefix + key)
        if isinstance(value, dict):
            out += _keys(value, f"{prefix}{key}.")
    return out


def unknown_key_message(key: str, config: dict) -> str | None:
    """None if `key` (dotted) names a config entry, else the closest existing keys."""
    known = _keys(config)
    if key in known:
        return None
    section, _, _ = key.rpartition(".")
    node = config
    for part in section.split(".") if section else []:
        node = node.get(part) if isinstance(node, dict) else None
    same_depth = [k for k in known if k.count(".") == key.count(".")]
    close = _closest(key, same_depth) or _closest(key, known)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    if isinstance(node, dict):
        hint += f" (config.{section} has: {', '.join(node)})"
    return f"--config.{key}: no such config key{hint}"


def _closest(key: str, leaves: list[str]) -> list[str]:
    """Existing keys nearest to a mistyped one: an abbreviation first (learning_rate -> lr)."""
    section, _, name = key.rpartition(".")
    initials = "".join(word[:1] for word in name.split("_"))
    short = [k for k in leaves if k == f"{section}.{initials}".lstrip(".")]
    close = difflib.get_close_matches(key, leaves, n=3, cutoff=0.5)
    return (short + [k for k in close if k not in short])[:3]


def _config_load_error() -> str | None:
    """Why the --config file did not load (ml_collections defers that error to first use)."""
    if "config" not in flags.FLAGS or flags.FLAGS["config"].value is None:
        return None
    try:
        flags.FLAGS["config"].value.to_dict()
    except OSError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        return f"--config: cannot load the config file ({lines[-1]})"
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing; a mistake in a flag or a config key ends in one line and exit 2."""
    try:
        rest = flags.FLAGS(argv)
    except Exception as e:  # flag errors, and the KeyError/AttributeError of ml_collections
        if any(_VERBOSE_FLAG.match(arg) for arg in argv):  # FLAGS is not parsed: read argv
            traceback.print_exc()
        config = _load_config_file(argv)
        tree = config.to_dict() if config is not None else {}
        for match in filter(None, map(_OVERRIDE.match, argv[1:] if tree else [])):
            message = unknown_key_message(match.group(1), tree)
            if message:
                _user_error(message)
        first_line = (str(e).strip() or type(e).__name__).splitlines()[0]
        _user_error(f"{first_line} (--verbose shows the traceback)")
    problem = _config_load_error()
    if problem:
        _user_error(problem)
    return rest


def run(main: Callable[[list[str]], None]) -> None:
    """app.run(main) where USER_ERRORS become `error: message` and exit code 2."""

    def guarded(argv: list[str]) -> None:
        try:
            main(argv)
        except USER_ERRORS as e:
            if VERBOSE.value:
                traceback.print_exc()
            _user_error(str(e))

    app.run(guarded, flags_parser=parse_flags)
