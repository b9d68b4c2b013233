"""Crash-safe file output: write to a temporary sibling, fsync, then rename into place.

A reader (or a later stage) therefore sees either the old complete file or the new complete
file, never a half-written one; a failure mid-write leaves whatever was there before untouched.
Also the one reader of YAML settings files, so every config reports a bad file the same way.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import yaml

from medtune.errors import MedtuneError


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (the rename itself) to disk; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file next to `path`; on clean exit fsync it and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_tree(root: Path) -> None:
    """Flush every file and directory under `root` and give its files the read permissions an
    ordinary file would have (some writers, safetensors among them, create private files, and
    readers on shared storage run as other users)."""
    umask = os.umask(0)
    os.umask(umask)
    for here, _dirs, names in os.walk(root):
        for name in names:
            file = os.path.join(here, name)
            os.chmod(file, os.stat(file).st_mode | (0o444 & ~umask))
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(Path(here))


def replace_directory(src: Path, target: Path) -> None:
    """Rename `src` to `target`. Directories cannot be renamed over each other, so an existing
    target is moved aside first and deleted only once the new one is in place."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
        os.replace(target, old)
    os.replace(src, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `path`; on clean exit it replaces `path` whole.

    An interrupted run leaves either the old directory or the new one, never a mix.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    # mkdtemp makes the directory private (0700); shared storage must be readable by the other
    # users of the cluster, so give it the permissions an ordinary mkdir would have.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
        fsync_tree(tmp)
        replace_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_yaml_mapping(path: str | os.PathLike, what: str, missing_hint: str = "") -> dict:
    """The top-level mapping of a YAML file (an empty file is `{}`).

    `what` names the kind of file in every message ("training config"); `missing_hint` says
    where to find one when the path does not exist. Raises MedtuneError naming the path (and
    line:column for a syntax error).
    """
    path = Path(path)
    if not path.is_file():
        hint = f" ({missing_hint})" if missing_hint else ""
        raise MedtuneError(f"{what} {path}: file not found{hint}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise MedtuneError(f"{what} {path}: cannot read it ({getattr(err, 'strerror', None) or err})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = ": ".join(filter(None, (getattr(err, "context", None), getattr(err, "problem", None)))) or str(err)
        raise MedtuneError(f"{what} {path}{where}: invalid YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise MedtuneError(f"{what} {path}: expected a mapping of settings at the top level, got {type(data).__name__}")
    return data
