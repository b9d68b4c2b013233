"""`medtune submit train`: the job a cluster receives, and a real submission to a local Ray head."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

from medtune.errors import MedtuneError
from medtune.training import checkpoints as ckpt
from medtune.training.build import build
from medtune.training.submit import build_submission, follow_job, ray_client_auth, submit_train

from conftest import qa, write_jsonl


def test_token_travels_in_env_not_in_entrypoint(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value_123")
    entrypoint, runtime_env = build_submission(["--model-name", "meta-llama/Llama-2-7b-hf", "-nd", "16", "--dataset-dir", "/mnt/d"])
    assert entrypoint == "medtune train --model-name meta-llama/Llama-2-7b-hf -nd 16 --dataset-dir /mnt/d"
    assert "hf_secret" not in entrypoint
    assert runtime_env["env_vars"]["HF_TOKEN"] == "hf_secret_value_123"


def test_token_pasted_into_flags_is_refused(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value_123")
    with pytest.raises(MedtuneError, match="HF_TOKEN value appears"):
        build_submission(["--model-name", "m", "--run-name", "hf_secret_value_123"])


def test_bad_flags_fail_before_submission():
    with pytest.raises(MedtuneError, match="invalid train flags"):
        build_submission(["--num-devices", "many"])
    with pytest.raises(MedtuneError, match="'dataset_dir' is required"):
        build_submission(["--model-name", "m"])
    # The shipped YAML with overrides passes (its paths are the cluster's and are not looked up).
    build_submission(["--config", "training/configs/llama2_7b.yaml", "-nd", "8"])


def test_ray_token_turns_on_token_auth_for_the_client(monkeypatch, caplog):
    token = "ray_secret_token_abc"
    monkeypatch.delitem(sys.modules, "ray._raylet", raising=False)  # Ray reads the mode on import
    env = {"RAY_AUTH_TOKEN": token}
    with caplog.at_level("INFO", logger="medtune.submit"):
        assert ray_client_auth(env) == "RAY_AUTH_TOKEN"
    assert env["RAY_AUTH_MODE"] == "token"
    assert "RAY_AUTH_MODE=token" in caplog.text and token not in caplog.text
    # An explicit mode is left alone, and without a token nothing changes.
    assert ray_client_auth(env := {"RAY_AUTH_TOKEN_PATH": "/t", "RAY_AUTH_MODE": "disabled"}) is None
    assert env["RAY_AUTH_MODE"] == "disabled"
    assert ray_client_auth(env := {}) is None and env == {}
    # Once Ray is imported, setting the mode has no effect: say what to export instead.
    monkeypatch.setitem(sys.modules, "ray._raylet", object())
    with pytest.raises(MedtuneError, match="RAY_AUTH_TOKEN_PATH is set but RAY_AUTH_MODE is not.*export RAY_AUTH_MODE=token"):
        ray_client_auth({"RAY_AUTH_TOKEN_PATH": "/t"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
def test_submit_to_local_ray_head_and_follow(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import ray
    from ray.job_submission import JobSubmissionClient

    from medtune.training.train import ray_runtime_env

    src = write_jsonl(tmp_path / "ds.jsonl", [qa(i, ["yes", "no"][i % 2]) for i in range(40)])
    build(src, "1", str(tiny_model_dir), tmp_path / "built", ctx_len=128)
    # The job's driver runs `medtune` from PATH, as in the cluster image.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("HF_TOKEN", "hf_job_secret")
    port = _free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
             runtime_env=ray_runtime_env())
    try:
        address = f"http://127.0.0.1:{port}"
        storage = tmp_path / "storage"
        argv = ["--model-name", str(tiny_model_dir), "--dataset-dir", str(tmp_path / "built"), "--output-dir", str(storage),
                "-nd", "2", "-bs", "2", "--max-steps", "2", "--ctx-len", "128", "--run-name", "submitted"]
        assert submit_train(argv, address, follow=True) == 0
        out = capsys.readouterr().out
        assert "submitted medtune-train-" in out and "ray job logs --address" in out
        assert "run submitted: 2 steps" in out, "the job's own summary streamed back"
        job = next(j for j in JobSubmissionClient(address).list_jobs() if (j.metadata or {}).get("medtune") == "train")
        assert "hf_job_secret" not in job.entrypoint
        assert job.runtime_env["env_vars"]["HF_TOKEN"] == "hf_job_secret"
        assert ckpt.verify_checkpoint(ckpt.latest_checkpoint(storage, "submitted"))["step"] == 2
    finally:
        ray.shutdown()
