"""Every path a user gives (workdir, data, model, tokenizer, export) as an `etils.epath.Path`.

Owns turning strings into paths that may be local or URLs (`gs://bucket/run`, any scheme
fsspec knows), glob expansion for both, and the few operations that differ between a local disk
and object storage: a local copy for libraries that only read local files (transformers'
tokenizers), and writing whole files where a bucket cannot append. Nothing else in sftjax calls
`pathlib` or `open` on a user's path. `pathlib.Path("gs://b/x")` would silently become the local
relative path `gs:/b/x`; this module is the one place that prevents it.
"""

import functools
import glob as local_glob
import os
import shutil
import tempfile

from etils import epath

Path = epath.Path


def resolve(path: str | os.PathLike) -> epath.Path:
    """A user's path: URLs stay URLs, local paths become absolute."""
    text = os.fspath(path)
    if is_remote(text):
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def is_remote(path: str | os.PathLike) -> bool:
    """True for URLs such as gs://bucket/x (anything with a scheme), False for local paths."""
    return "://" in os.fspath(path)


def expand(spec: str | list | tuple) -> list[str]:
    """Files named by a comma-separated string or a list, each a path or a glob (local or URL).

    Returns the matches of each entry in sorted order; an entry without glob characters is
    returned as is (its existence is the caller's question).
    """
    entries = spec if isinstance(spec, (list, tuple)) else str(spec).split(",")
    files = []
    for entry in (str(e).strip() for e in entries):
        if not entry:
            continue
        if not local_glob.has_magic(entry):
            files.append(entry)
        elif is_remote(entry):
            files += sorted(os.fspath(p) for p in _remote_glob(entry))
        else:
            files += sorted(local_glob.glob(entry))
    return files


def _remote_glob(pattern: str) -> list[epath.Path]:
    """Glob a URL: the part before the first wildcard is the directory listed."""
    parts = pattern.split("/")
    first_magic = next(i for i, p in enumerate(parts) if local_glob.has_magic(p))
    base = epath.Path("/".join(parts[:first_magic]))
    if not base.exists():
        return []
    return list(base.glob("/".join(parts[first_magic:])))


def local_copy(path: str | os.PathLike) -> str:
    """A local directory with the files of `path` (itself when local): for local-only readers."""
    source = resolve(path)
    if not is_remote(path):
        return os.fspath(source)
    return _download(os.fspath(source))


@functools.cache  # one copy per process: the tokenizer is loaded several times per run
def _download(url: str) -> str:
    source = epath.Path(url)
    target = tempfile.mkdtemp(prefix="sftjax-")
    for item in source.iterdir():
        if item.is_file():
            item.copy(epath.Path(target) / item.name)
    return target


def upload_tree(local_dir: str | os.PathLike, remote_dir: epath.Path) -> None:
    """Copy every file under a local directory to `remote_dir`, keeping relative paths."""
    for root, _, names in os.walk(local_dir):
        rel = os.path.relpath(root, local_dir)
        target_dir = remote_dir if rel == "." else remote_dir / rel
        target_dir.mkdir(parents=True, exist_ok=True)
        for name in names:
            epath.Path(os.path.join(root, name)).copy(target_dir / name, overwrite=True)


def remove_tree(path: epath.Path) -> None:
    """Delete a directory tree, local or remote; missing is fine."""
    if not path.exists():
        return
    if is_remote(path):
        path.rmtree()
    else:
        shutil.rmtree(os.fspath(path), ignore_errors=True)
