"""The storage contract for checkpoints on shared storage: layout, manifest, publish, LATEST.

The trainer writes a checkpoint into a hidden staging directory, calls `write_manifest` (last),
then `publish`; the serving layer calls `latest_checkpoint` and `verify_checkpoint`. Layout:

    <storage>/LATEST                          "runs/<run_id>/step_000123\\n"
    <storage>/runs/<run_id>/LATEST            "step_000123\\n"
    <storage>/runs/<run_id>/step_000123/      published: any files, MANIFEST.json written last
    <storage>/runs/<run_id>/.step_000123.tmp-<nonce>/   staging, never read by readers

A step directory only appears by renaming a complete staging directory, and the LATEST files
move only after that rename, so a crash at any point leaves LATEST on the last complete
checkpoint. Stdlib only at import time: the serving layer imports this without torch or Ray.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from medtune.errors import MedtuneError
from medtune.fileio import atomic_write, fsync_tree, replace_directory, sha256_file

MANIFEST = "MANIFEST.json"
LATEST = "LATEST"
FORMAT = "medtune-checkpoint/1"

_RUN_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_STEP = re.compile(r"step_(\d{6,})")
_STALE = re.compile(r"\.step_\d{6,}\.(tmp|old)-(.+)")  # staging dirs, and old copies moved aside
_MAX_PROBLEMS = 10


class CheckpointError(MedtuneError):
    """A checkpoint is missing, incomplete or corrupt, or an argument breaks the layout rules."""


def storage_root(explicit: str | Path | None = None) -> Path:
    """The storage root: `explicit` if given, else `$MEDTUNE_STORAGE`, else `./storage`."""
    chosen = explicit if explicit is not None else os.environ.get("MEDTUNE_STORAGE") or "storage"
    return Path(chosen).expanduser()


def run_dir(storage: Path, run_id: str) -> Path:
    """`<storage>/runs/<run_id>`, after checking that run_id is a single safe path component."""
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        raise CheckpointError(
            f"invalid run id {run_id!r}: use only letters, digits, '.', '_' and '-', "
            "non-empty and not starting with '.'"
        )
    return Path(storage) / "runs" / run_id


def step_dir_name(step: int) -> str:
    """`step_000123`: zero-padded to 6 digits (wider when needed) so names sort by step."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"invalid step {step!r}: must be an integer >= 0")
    return f"step_{step:06d}"


def parse_step(name: str) -> int | None:
    """The step of a name `step_dir_name` produced ("step_000123" -> 123), else None."""
    match = _STEP.fullmatch(name)
    # Reject spellings step_dir_name never makes ("step_0001234"), so name <-> step is one-to-one.
    if match is None or step_dir_name(int(match.group(1))) != name:
        return None
    return int(match.group(1))


def staging_dir(run_dir: Path, step: int, nonce: str) -> Path:
    """The hidden staging path for `step` (not created here); the nonce keeps writers apart."""
    if not _RUN_ID.fullmatch(nonce):
        raise CheckpointError(f"invalid staging nonce {nonce!r}: use only letters, digits, '.', '_' and '-'")
    return Path(run_dir) / f".{step_dir_name(step)}.tmp-{nonce}"


def write_manifest(ckpt_dir: Path, info: dict) -> dict:
    """List, size and hash every file under ckpt_dir, then write MANIFEST.json atomically, last."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{ckpt_dir}: cannot write a manifest, the directory does not exist")
    files = []
    for root, _dirs, names in os.walk(ckpt_dir):
        for name in names:
            path = Path(root) / name
            rel = path.relative_to(ckpt_dir).as_posix()
            if rel == MANIFEST:
                continue
            files.append({"path": rel, "size": path.stat().st_size, "sha256": sha256_file(path)})
    files.sort(key=lambda item: item["path"])
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    manifest = {**info, "format": FORMAT, "created": created, "files": files}
    try:
        # Serialise before opening the file, so bad info leaves no manifest rather than half of one.
        text = json.dumps(manifest, indent=2, default=os.fspath) + "\n"
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{ckpt_dir}: manifest info is not JSON serialisable ({err})") from None
    with atomic_write(ckpt_dir / MANIFEST) as fh:
        fh.write(text)
    return manifest


def read_manifest(ckpt_dir: Path) -> dict:
    """Parse `<ckpt_dir>/MANIFEST.json`; CheckpointError if it is missing or not a JSON object."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir}: incomplete checkpoint: no {MANIFEST} (the save did not finish)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: manifest is not valid JSON ({err})") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path}: manifest must be a JSON object, got {type(manifest).__name__}")
    return manifest


def _check_entry(ckpt_dir: Path, entry: object, check_hashes: bool) -> str | None:
    """What is wrong with one manifest file entry, or None when the file matches it."""
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not isinstance(entry.get("size"), int):
        return f"malformed file entry {entry!r}"
    rel = PurePosixPath(entry["path"])
    # A manifest is data from shared storage: never let it point a reader outside the checkpoint.
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        return f"{entry['path']}: unsafe path in manifest"
    path = ckpt_dir.joinpath(*rel.parts)
    if not path.is_file():
        return f"{entry['path']}: missing"
    actual = path.stat().st_size
    if actual != entry["size"]:
        return f"{entry['path']}: size mismatch (expected {entry['size']} bytes, found {actual})"
    if check_hashes and sha256_file(path) != entry.get("sha256"):
        return f"{entry['path']}: sha256 mismatch (expected {entry.get('sha256')}, file content differs)"
    return None


def verify_checkpoint(ckpt_dir: Path, check_hashes: bool = True) -> dict:
    """Return the manifest if every listed file is present with its size (and hash); else raise once."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{ckpt_dir}: checkpoint directory does not exist")
    manifest = read_manifest(ckpt_dir)
    problems = []
    if manifest.get("format") != FORMAT:
        problems.append(f"unknown format {manifest.get('format')!r} (expected {FORMAT!r})")
    files = manifest.get("files")
    if not isinstance(files, list):
        problems.append("manifest has no 'files' list")
        files = []
    problems += [p for p in (_check_entry(ckpt_dir, entry, check_hashes) for entry in files) if p is not None]
    if problems:
        shown = problems[:_MAX_PROBLEMS]
        if len(problems) > _MAX_PROBLEMS:
            shown.append(f"... and {len(problems) - _MAX_PROBLEMS} more")
        raise CheckpointError(
            f"{ckpt_dir}: checkpoint is corrupt ({len(problems)} problem(s)):\n  " + "\n  ".join(shown)
        )
    return manifest


def _write_pointer(path: Path, text: str) -> None:
    with atomic_write(path) as fh:
        fh.write(text + "\n")


def publish(staging: Path, storage: Path, run_id: str, step: int) -> Path:
    """Make a complete staging dir the checkpoint for `step` and point both LATEST files at it."""
    staging, storage = Path(staging), Path(storage)
    rdir = run_dir(storage, run_id)
    name = step_dir_name(step)
    if not staging.is_dir():
        raise CheckpointError(f"cannot publish {staging}: staging directory does not exist")
    manifest = read_manifest(staging)  # raises "incomplete checkpoint" when the save did not finish
    for key, expected in (("run_id", run_id), ("step", step)):
        if key in manifest and manifest[key] != expected:
            raise CheckpointError(
                f"cannot publish {staging} as {run_id}/{name}: its manifest says {key}={manifest[key]!r}"
            )
    fsync_tree(staging)
    target = rdir / name
    # If LATEST names this very step (a re-publish), it dangles for the moment of the swap;
    # a normal retry publishes a newer step, so this is rare.
    replace_directory(staging, target)
    # Only now do readers move on: run pointer first, then the storage-wide one.
    _write_pointer(rdir / LATEST, name)
    _write_pointer(storage / LATEST, f"runs/{run_id}/{name}")
    return target


def _read_pointer(path: Path) -> str | None:
    if not path.is_file():
        return None
    return path.read_text(encoding="utf-8").strip()


def latest_checkpoint(storage: Path, run_id: str | None = None) -> Path | None:
    """The checkpoint LATEST names (of run_id, else storage-wide); None if no LATEST. Does not hash."""
    storage = Path(storage)
    base = run_dir(storage, run_id) if run_id is not None else storage
    pointer_file = base / LATEST
    pointer = _read_pointer(pointer_file)
    if pointer is None:
        return None
    parts = PurePosixPath(pointer).parts
    # Accept exactly the shape publish writes, so a hand-edited pointer cannot leave the storage.
    expected = ("step_000123",) if run_id is not None else ("runs", "<run_id>", "step_000123")
    valid = len(parts) == len(expected) and parse_step(parts[-1]) is not None
    if valid and run_id is None:
        valid = parts[0] == "runs" and _RUN_ID.fullmatch(parts[1]) is not None
    if not valid:
        raise CheckpointError(f"{pointer_file}: holds {pointer!r}, expected a path like {'/'.join(expected)!r}")
    ckpt = base.joinpath(*parts)
    if not ckpt.is_dir():
        raise CheckpointError(f"{pointer_file} points to {ckpt}, which does not exist")
    if not (ckpt / MANIFEST).is_file():
        raise CheckpointError(f"{pointer_file} points to {ckpt}, an incomplete checkpoint: no {MANIFEST}")
    return ckpt


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Published checkpoints of a run (step name and MANIFEST.json), oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for child in run_dir.iterdir():
        step = parse_step(child.name)
        if step is not None and child.is_dir() and (child / MANIFEST).is_file():
            found.append((step, child))
    return sorted(found)


def prune_checkpoints(run_dir: Path, keep: int, *, active_nonce: str | None = None) -> list[Path]:
    """Delete all but the newest `keep` checkpoints (never LATEST's target) and stale staging dirs."""
    run_dir = Path(run_dir)
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise CheckpointError(f"invalid keep {keep!r}: must be an integer >= 1 (keep at least the latest)")
    protected = _read_pointer(run_dir / LATEST)
    checkpoints = list_checkpoints(run_dir)
    doomed = [path for _step, path in checkpoints[:-keep] if path.name != protected]
    if run_dir.is_dir():
        for child in sorted(run_dir.iterdir()):
            match = _STALE.fullmatch(child.name)
            # The active nonce is a save in progress right now; its staging dir is not stale.
            if match and child.is_dir() and not (match.group(1) == "tmp" and match.group(2) == active_nonce):
                doomed.append(child)
    for path in doomed:
        shutil.rmtree(path)
    return doomed
