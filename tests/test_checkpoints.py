"""The checkpoint storage contract: manifest, verify, publish, LATEST under crashes, prune."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medtune.errors import MedtuneError
from medtune.training import checkpoints as ck
from medtune.training.checkpoints import (
    LATEST,
    MANIFEST,
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    parse_step,
    prune_checkpoints,
    publish,
    read_manifest,
    run_dir,
    staging_dir,
    step_dir_name,
    storage_root,
    verify_checkpoint,
    write_manifest,
)

REPO = Path(__file__).resolve().parents[1]
RUN = "run-1"


def stage(storage: Path, step: int, nonce: str = "n1", manifest: bool = True, run_id: str = RUN) -> Path:
    """A staging dir with a top-level file and one in a subdirectory, like an adapter + ds_state."""
    path = staging_dir(run_dir(storage, run_id), step, nonce)
    (path / "ds_state").mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 4 + step.to_bytes(4, "little"))
    (path / "ds_state" / "optim.pt").write_bytes(b"optimizer state " * 8)
    if manifest:
        write_manifest(path, {"run_id": run_id, "step": step, "epoch": 0, "kind": "lora"})
    return path


def save(storage: Path, step: int, nonce: str = "n1") -> Path:
    return publish(stage(storage, step, nonce), storage, RUN, step)


def pointers(storage: Path) -> tuple[str, str]:
    return (
        (storage / LATEST).read_text(encoding="utf-8"),
        (run_dir(storage, RUN) / LATEST).read_text(encoding="utf-8"),
    )


def test_publish_then_latest_and_verify(tmp_path):
    ckpt = save(tmp_path, 1)
    assert ckpt == tmp_path / "runs" / RUN / "step_000001"
    assert latest_checkpoint(tmp_path) == ckpt
    assert latest_checkpoint(tmp_path, RUN) == ckpt
    assert pointers(tmp_path) == (f"runs/{RUN}/step_000001\n", "step_000001\n")
    manifest = verify_checkpoint(ckpt)
    assert manifest["format"] == "medtune-checkpoint/1"
    assert manifest["step"] == 1 and manifest["run_id"] == RUN and manifest["kind"] == "lora"
    assert "T" in manifest["created"] and manifest["created"].endswith("+00:00")
    assert [f["path"] for f in manifest["files"]] == ["adapter_model.safetensors", "ds_state/optim.pt"]
    assert manifest["files"][0]["size"] == 1028
    assert read_manifest(ckpt) == manifest
    # The staging dir was renamed, not copied.
    assert not staging_dir(run_dir(tmp_path, RUN), 1, "n1").exists()


def test_manifest_lists_nested_files_sorted_and_not_itself(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("z")
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "c.txt").write_text("")
    manifest = write_manifest(tmp_path, {"step": 3})
    assert [f["path"] for f in manifest["files"]] == ["a.txt", "b/z.txt", "c.txt"]
    # Writing again must not list the first manifest as a file.
    again = write_manifest(tmp_path, {"step": 3})
    assert MANIFEST not in [f["path"] for f in again["files"]]
    assert json.loads((tmp_path / MANIFEST).read_text())["files"] == again["files"]


def test_corrupt_byte_is_a_sha256_mismatch_naming_the_file(tmp_path):
    ckpt = save(tmp_path, 1)
    target = ckpt / "ds_state" / "optim.pt"
    data = bytearray(target.read_bytes())
    data[5] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256") as err:
        verify_checkpoint(ckpt)
    assert "ds_state/optim.pt" in str(err.value) and str(ckpt) in str(err.value)
    assert "adapter_model.safetensors" not in str(err.value)
    # Without hashing, a same-size corruption goes unnoticed: that is the cheap mode's trade-off.
    verify_checkpoint(ckpt, check_hashes=False)


def test_truncated_file_is_a_size_mismatch(tmp_path):
    ckpt = save(tmp_path, 1)
    target = ckpt / "adapter_model.safetensors"
    target.write_bytes(target.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="size") as err:
        verify_checkpoint(ckpt, check_hashes=False)
    assert "adapter_model.safetensors" in str(err.value) and "1028" in str(err.value) and "100" in str(err.value)


def test_all_problems_are_reported_at_once(tmp_path):
    ckpt = save(tmp_path, 1)
    (ckpt / "adapter_model.safetensors").unlink()
    (ckpt / "ds_state" / "optim.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError) as err:
        verify_checkpoint(ckpt)
    message = str(err.value)
    assert "adapter_model.safetensors: missing" in message and "ds_state/optim.pt: size" in message


def test_missing_manifest_is_incomplete(tmp_path):
    ckpt = save(tmp_path, 1)
    (ckpt / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        verify_checkpoint(ckpt)
    # LATEST still names it, but readers are told it is incomplete rather than handed it.
    with pytest.raises(CheckpointError, match="incomplete"):
        latest_checkpoint(tmp_path)
    assert list_checkpoints(run_dir(tmp_path, RUN)) == []


def test_invalid_manifest_json_and_missing_dir(tmp_path):
    ckpt = save(tmp_path, 1)
    (ckpt / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        verify_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="does not exist"):
        verify_checkpoint(tmp_path / "nope")


def test_manifest_path_escaping_the_checkpoint_is_rejected(tmp_path):
    ckpt = save(tmp_path, 1)
    manifest = read_manifest(ckpt)
    manifest["files"].append({"path": "../../LATEST", "size": 1, "sha256": "0"})
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="unsafe path"):
        verify_checkpoint(ckpt)


def test_staging_without_manifest_cannot_be_published(tmp_path):
    staging = stage(tmp_path, 1, manifest=False)
    with pytest.raises(CheckpointError, match="incomplete"):
        publish(staging, tmp_path, RUN, 1)
    assert staging.is_dir()
    assert latest_checkpoint(tmp_path) is None and latest_checkpoint(tmp_path, RUN) is None
    assert list_checkpoints(run_dir(tmp_path, RUN)) == []


def test_manifest_for_another_step_cannot_be_published_as_this_one(tmp_path):
    staging = stage(tmp_path, 1)
    with pytest.raises(CheckpointError, match="step=1"):
        publish(staging, tmp_path, RUN, 2)


def test_crash_mid_save_leaves_latest_on_last_complete(tmp_path):
    first = save(tmp_path, 1)
    before = pointers(tmp_path)
    partial = stage(tmp_path, 2, nonce="n2", manifest=False)  # killed before the manifest
    (partial / "adapter_model.safetensors").write_bytes(b"half")
    assert pointers(tmp_path) == before
    assert latest_checkpoint(tmp_path) == first and latest_checkpoint(tmp_path, RUN) == first
    assert list_checkpoints(run_dir(tmp_path, RUN)) == [(1, first)]


def test_crash_after_rename_before_latest_by_hand(tmp_path):
    first = save(tmp_path, 1)
    staging = stage(tmp_path, 2, nonce="n2")
    os.replace(staging, run_dir(tmp_path, RUN) / step_dir_name(2))  # renamed, then killed
    assert pointers(tmp_path) == (f"runs/{RUN}/step_000001\n", "step_000001\n")
    assert latest_checkpoint(tmp_path) == first
    verify_checkpoint(first)


def test_crash_while_writing_latest_keeps_old_pointers(tmp_path, monkeypatch):
    first = save(tmp_path, 1)

    def killed(path, text):
        raise KeyboardInterrupt("killed before LATEST moved")

    monkeypatch.setattr(ck, "_write_pointer", killed)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 2, nonce="n2")
    assert pointers(tmp_path) == (f"runs/{RUN}/step_000001\n", "step_000001\n")
    assert latest_checkpoint(tmp_path) == first and latest_checkpoint(tmp_path, RUN) == first
    verify_checkpoint(first)
    # The re-run publishes step 2 again over the orphaned copy, and leaves no old copy behind.
    monkeypatch.undo()
    second = save(tmp_path, 2, nonce="n3")
    assert latest_checkpoint(tmp_path) == second
    verify_checkpoint(second)
    assert sorted(p.name for p in run_dir(tmp_path, RUN).iterdir()) == [LATEST, "step_000001", "step_000002"]


def test_publishing_step_2_moves_both_latest(tmp_path):
    save(tmp_path, 1)
    second = save(tmp_path, 2, nonce="n2")
    assert pointers(tmp_path) == (f"runs/{RUN}/step_000002\n", "step_000002\n")
    assert latest_checkpoint(tmp_path) == second and latest_checkpoint(tmp_path, RUN) == second
    assert [s for s, _ in list_checkpoints(run_dir(tmp_path, RUN))] == [1, 2]


def test_storage_latest_follows_the_last_published_run(tmp_path):
    save(tmp_path, 5)
    other = publish(stage(tmp_path, 1, run_id="run-2"), tmp_path, "run-2", 1)
    assert latest_checkpoint(tmp_path) == other
    assert latest_checkpoint(tmp_path, RUN) == run_dir(tmp_path, RUN) / "step_000005"


def test_latest_pointing_at_missing_or_bad_path_raises(tmp_path):
    save(tmp_path, 1)
    (run_dir(tmp_path, RUN) / LATEST).write_text("step_000009\n")
    with pytest.raises(CheckpointError, match="step_000009.*does not exist"):
        latest_checkpoint(tmp_path, RUN)
    (tmp_path / LATEST).write_text("../../etc\n")
    with pytest.raises(CheckpointError, match="expected a path like"):
        latest_checkpoint(tmp_path)


def test_prune_keeps_newest_and_latest_target_and_removes_stale_staging(tmp_path):
    rdir = run_dir(tmp_path, RUN)
    for step in range(1, 6):
        save(tmp_path, step, nonce=f"n{step}")
    (rdir / LATEST).write_text("step_000002\n")  # e.g. an operator rolled back to step 2
    stale = stage(tmp_path, 6, nonce="dead", manifest=False)
    active = stage(tmp_path, 6, nonce="live", manifest=False)
    deleted = prune_checkpoints(rdir, 2, active_nonce="live")
    assert sorted(p.name for p in deleted) == sorted(["step_000001", "step_000003", stale.name])
    assert [s for s, _ in list_checkpoints(rdir)] == [2, 4, 5]
    assert active.is_dir() and not stale.exists()
    assert latest_checkpoint(tmp_path, RUN) == rdir / "step_000002"
    # Without an active nonce every staging dir is stale.
    assert prune_checkpoints(rdir, 2) == [active]


@pytest.mark.parametrize("keep", [0, -1])
def test_prune_needs_keep_at_least_one(tmp_path, keep):
    save(tmp_path, 1)
    with pytest.raises(CheckpointError, match="keep"):
        prune_checkpoints(run_dir(tmp_path, RUN), keep)
    assert len(list_checkpoints(run_dir(tmp_path, RUN))) == 1


@pytest.mark.parametrize("bad", ["../x", "", ".hidden", "a/b", "..", "run 1"])
def test_run_id_validation(tmp_path, bad):
    with pytest.raises(CheckpointError, match="invalid run id") as err:
        run_dir(tmp_path, bad)
    assert repr(bad) in str(err.value)
    assert isinstance(err.value, MedtuneError)


def test_run_id_accepts_ordinary_names(tmp_path):
    assert run_dir(tmp_path, "pqal_lora-v1.2") == tmp_path / "runs" / "pqal_lora-v1.2"


def test_step_names():
    assert step_dir_name(7) == "step_000007"
    assert step_dir_name(0) == "step_000000"
    assert step_dir_name(1234567) == "step_1234567"
    for step in (0, 7, 123, 999999, 1234567):
        assert parse_step(step_dir_name(step)) == step
    for name in ("step_123", "step_0001234", "step_00012a", ".step_000001.tmp-x", "LATEST", "step_-00001"):
        assert parse_step(name) is None
    with pytest.raises(CheckpointError):
        step_dir_name(-1)


def test_list_checkpoints_ignores_staging_and_incomplete(tmp_path):
    first = save(tmp_path, 1)
    stage(tmp_path, 2, nonce="n2")  # complete but not published: still hidden
    (run_dir(tmp_path, RUN) / "step_000003").mkdir()  # no manifest
    assert list_checkpoints(run_dir(tmp_path, RUN)) == [(1, first)]
    assert list_checkpoints(tmp_path / "no-such-run") == []


def test_storage_root(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDTUNE_STORAGE", str(tmp_path / "shared"))
    assert storage_root() == tmp_path / "shared"
    assert storage_root(tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.delenv("MEDTUNE_STORAGE")
    assert storage_root() == Path("storage")


def test_import_pulls_in_no_heavy_libraries():
    code = (
        "import sys, medtune.training.checkpoints\n"
        "print(','.join(m for m in ('torch', 'ray', 'transformers', 'vllm') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_published_files_are_readable_by_other_users(tmp_path):
    """Serving replicas read checkpoints as another user; safetensors writes 0600 files."""
    storage = tmp_path / "storage"
    rdir = ck.run_dir(storage, "perm")
    staging = ck.staging_dir(rdir, 1, "n1")
    staging.mkdir(parents=True)
    private = staging / "adapter_model.safetensors"
    private.write_bytes(b"weights")
    private.chmod(0o600)
    ck.write_manifest(staging, {"run_id": "perm", "step": 1})
    final = ck.publish(staging, storage, "perm", 1)
    assert (final / "adapter_model.safetensors").stat().st_mode & 0o044 == 0o044
