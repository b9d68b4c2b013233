"""Training config, flags, shipped YAML/DeepSpeed files, batching and weight checks (no Ray)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from medtune.errors import MedtuneError
from medtune.training.config import CONFIG_DIR, TrainConfig, add_arguments, build_config, config_from_args, load_yaml, validate_config
from medtune.training.loop import check_saved_weights, lr_lambda, plan_sequences, resolve_ds_config

from conftest import REPO


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_seed_flags_and_short_forms_override_yaml(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("model_name: m\ndataset_dir: d\nnum_devices: 8\nlearning_rate: 1.0e-4\n")
    args = _parse(["--config", str(yml), "-nd", "2", "-bs", "3", "-ebs", "5", "-ga", "4", "-mn", "other", "-ne", "2",
                   "-dc", "x.json", "--ctx-len", "256", "--mx", "no", "-lr", "3e-4", "--stop-perplexity", "4.5",
                   "--num-checkpoints-to-keep", "3", "--full", "--packing", "--resume", "never",
                   "--save-every-steps", "10", "--max-steps", "50", "--seed", "7", "--output-dir", "out"])
    cfg = config_from_args(args)
    assert (cfg.num_devices, cfg.batch_size_per_device, cfg.eval_batch_size_per_device, cfg.grad_accum) == (2, 3, 5, 4)
    assert (cfg.model_name, cfg.num_epochs, cfg.ds_config, cfg.ctx_len, cfg.mx) == ("other", 2, "x.json", 256, "no")
    assert (cfg.learning_rate, cfg.stop_perplexity, cfg.num_checkpoints_to_keep) == (3e-4, 4.5, 3)
    assert (cfg.lora, cfg.packing, cfg.resume, cfg.save_every_steps, cfg.max_steps, cfg.seed) == (False, True, "never", 10, 50, 7)
    assert cfg.dataset_dir == "d" and cfg.config_name == "c"
    # The seed's underscore spellings work too.
    cfg = config_from_args(_parse(["--model_name", "m", "--dataset_dir", "d", "--num_devices", "4", "--grad_accum", "2"]))
    assert (cfg.num_devices, cfg.grad_accum) == (4, 2)
    assert (cfg.compile, cfg.attn_implementation) == (True, "auto")
    cfg = config_from_args(_parse(["-mn", "m", "--data", "d", "--no-compile", "--attn-implementation", "medtune_cpu"]))
    assert (cfg.compile, cfg.attn_implementation) == (False, "medtune_cpu")


def test_unknown_yaml_key_fails_loudly(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("model_name: m\ndataset_dir: d\nlearning_rat: 0.1\n")
    with pytest.raises(MedtuneError, match="unknown setting 'learning_rat'"):
        config_from_args(_parse(["--config", str(yml)]))


def test_yaml_mapping_reader_names_the_file_and_the_problem(tmp_path):
    from medtune.fileio import read_yaml_mapping

    with pytest.raises(MedtuneError, match=r"training config .*nothing\.yaml: file not found \(look in configs/\)"):
        read_yaml_mapping(tmp_path / "nothing.yaml", "training config", "look in configs/")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 1\n  ctx_len: 2\n")
    with pytest.raises(MedtuneError, match=r"serving config .*bad\.yaml:2:10: invalid YAML \(mapping values"):
        read_yaml_mapping(bad, "serving config")
    listing = tmp_path / "list.yaml"
    listing.write_text("- lr: 1\n")
    with pytest.raises(MedtuneError, match=r"list\.yaml: expected a mapping of settings at the top level, got list"):
        read_yaml_mapping(listing, "training config")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert read_yaml_mapping(empty, "training config") == {}


def test_validation_lists_every_problem(tmp_path):
    cfg = TrainConfig(model_name=str(tmp_path / "nomodel"), dataset_dir=str(tmp_path / "nodata"), num_devices=0,
                      batch_size_per_device=0, learning_rate=5.0, mx="fp16", stop_perplexity=0.5,
                      ds_config=str(tmp_path / "missing.json"), resume=str(tmp_path / "nockpt"), run_name="../escape",
                      packing=True, group_by_length=True, attn_implementation="flash_attention_2")
    problems = validate_config(cfg, gpu_available=False)
    text = "\n".join(problems)
    for expected in ("num_devices = 0", "batch_size_per_device = 0", "learning_rate = 5.0", "fp16 needs a GPU",
                     "stop_perplexity = 0.5", "not a built dataset", "no config.json", "missing.json: file not found",
                     "not a published checkpoint", "escape", "packing and group_by_length", "flash_attention_2 needs a GPU"):
        assert expected in text, expected
    assert len(problems) >= 12


def test_every_shipped_yaml_loads_and_validates_its_shape():
    yamls = sorted(CONFIG_DIR.glob("*.yaml"))
    assert yamls
    for path in yamls:
        first = path.read_text().splitlines()[0]
        assert first.startswith("#") and "medtune train" in first, f"{path.name} must open with its command"
        cfg = build_config(load_yaml(path), where=str(path))
        assert (REPO / cfg.ds_config).is_file(), f"{path.name}: ds_config {cfg.ds_config} missing"


@pytest.mark.parametrize("name", sorted(p.name for p in (CONFIG_DIR / "deepspeed").glob("*.json")))
def test_shipped_deepspeed_configs_resolve_without_auto(name):
    raw = json.loads((CONFIG_DIR / "deepspeed" / name).read_text())
    cfg = TrainConfig(model_name="m", dataset_dir="d", batch_size_per_device=4, grad_accum=2)
    for use_gpu in (False, True):
        ds = resolve_ds_config(raw, cfg, world=8, hidden=4096, use_gpu=use_gpu)
        assert "auto" not in json.dumps(ds)
        assert ds["train_batch_size"] == 4 * 2 * 8
        assert ds["bf16"]["enabled"] is use_gpu
        if "optimizer" in ds:
            assert ds["optimizer"]["params"]["lr"] == cfg.learning_rate


def test_seed_70b_config_offloads_the_optimizer():
    raw = json.loads((CONFIG_DIR / "deepspeed" / "zero_3_llama_2_70b.json").read_text())
    assert raw["zero_optimization"]["stage"] == 3
    assert raw["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_packing_places_every_example_once_within_ctx_len():
    lengths = [5, 90, 30, 60, 10, 100, 45, 20, 70, 15] * 3
    plan = plan_sequences(lengths, ctx_len=128, packing=True, seed=1, epoch=0)
    flat = sorted(i for seq in plan for i in seq)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in seq) <= 128 for seq in plan)
    assert len(plan) < len(lengths) / 2, "packing merges short examples"
    unpacked = plan_sequences(lengths, 128, packing=False, seed=1, epoch=0)
    assert sorted(i for (i,) in unpacked) == list(range(len(lengths)))
    assert unpacked == plan_sequences(lengths, 128, packing=False, seed=1, epoch=0)
    assert unpacked != plan_sequences(lengths, 128, packing=False, seed=1, epoch=1), "each epoch reshuffles"


def test_group_by_length_batches_similar_lengths_and_keeps_every_example_once():
    import random

    rng = random.Random(3)
    lengths = [rng.randint(20, 500) for _ in range(203)]
    group = 8  # examples per micro-batch across all workers
    plan = plan_sequences(lengths, 512, packing=False, seed=1, epoch=0, group=group)
    assert sorted(i for (i,) in plan) == list(range(len(lengths)))
    assert plan == plan_sequences(lengths, 512, packing=False, seed=1, epoch=0, group=group)
    assert plan != plan_sequences(lengths, 512, packing=False, seed=1, epoch=1, group=group), "each epoch reshuffles"
    micros = [[lengths[i] for (i,) in plan[k:k + group]] for k in range(0, len(plan), group)]
    assert len(micros[-1]) == len(lengths) % group, "the short remainder comes last, where the loop drops it"
    full = micros[:-1]

    def padding(batches):  # padded positions when each micro-batch pads to its longest
        return sum(max(b) * len(b) - sum(b) for b in batches)

    shuffled = [[lengths[i] for (i,) in plan_sequences(lengths, 512, False, 1, 0)[k:k + group]] for k in range(0, 200, group)]
    assert padding(full) < 0.2 * padding(shuffled), (padding(full), padding(shuffled))
    firsts = [b[0] for b in full]
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True), "micro-batch order stays random"


def test_answer_loss_keeps_the_mask_of_a_left_padded_batch(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from medtune.training.loop import answer_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    batch = {"input_ids": torch.tensor([[0, 0, 1, 10, 11, 12], [1, 5, 6, 7, 8, 9]]),
             "attention_mask": torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]),
             "labels": torch.tensor([[-100, -100, -100, -100, 11, 12], [-100, -100, -100, 7, 8, 9]])}
    reference = model(**batch).loss
    assert torch.allclose(answer_loss(model, batch), reference, atol=1e-6)


def test_lr_schedule_warms_up_then_decays_to_zero():
    f = lr_lambda(total_steps=100, warmup_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)


def test_check_saved_weights_refuses_empty_or_short_files(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"a.lora_A.weight": torch.ones(2, 3), "a.lora_B.weight": torch.zeros(0)}, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(MedtuneError, match="is empty"):
        check_saved_weights(tmp_path, lora=True, expected_numel=6)
    save_file({"a.lora_A.weight": torch.ones(2, 3)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(MedtuneError, match="saved 6 weight elements, expected 12"):
        check_saved_weights(tmp_path, lora=True, expected_numel=12)
    check_saved_weights(tmp_path, lora=True, expected_numel=6)  # complete: no error
    with pytest.raises(MedtuneError, match="no adapter weights"):
        check_saved_weights(tmp_path / "x", lora=True, expected_numel=1)


def test_shipped_config_paths_work_from_any_directory(tmp_path, monkeypatch):
    from medtune.training.config import read_ds_config, shipped_path

    monkeypatch.chdir(tmp_path)
    assert read_ds_config("training/configs/deepspeed/zero_2.json")["zero_optimization"]["stage"] == 2
    assert load_yaml("training/configs/smollm2_sample.yaml")["num_devices"] == 2
    assert shipped_path("elsewhere/nothing.json") == Path("elsewhere/nothing.json")  # unknown paths pass through


def test_answer_loss_equals_the_standard_masked_loss_and_its_gradients(tiny_model_dir):
    """The answer-only head path must give the same loss and gradients as the full forward."""
    import torch
    from transformers import AutoModelForCausalLM

    from medtune.training.build import collate_batch
    from medtune.training.loop import answer_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    feats = [{"input_ids": [1, 5, 6, 7, 8, 9], "labels": [-100, -100, -100, 7, 8, 9]},
             {"input_ids": [1, 10, 11, 12], "labels": [-100, -100, 11, 12]}]
    batch = collate_batch(feats, pad_id=0)
    reference = model(**batch).loss
    reference.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ours = answer_loss(model, batch)
    ours.backward()
    assert torch.allclose(ours, reference, atol=1e-6)
    for name, grad in ref_grads.items():
        assert torch.allclose(model.get_parameter(name).grad, grad, atol=1e-6), name
