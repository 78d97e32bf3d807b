"""lora_edu.adapters: PEFT's adapter files, written atomically and read with full checks."""

import json
import os

import pytest
import torch
from model_state import assert_unchanged, snapshot
from safetensors.torch import load_file, save_file

from lora_edu import adapters
from lora_edu.adapters import load_adapter, save_adapter
from lora_edu.experiments import MLP
from lora_edu.inject import LoRAConfig, add_lora
from lora_edu.lora import LoRALinear


def _base(seed=0):
    torch.manual_seed(seed)
    return MLP(d_in=8, d_hidden=16, d_out=4)


def _adapted(targets=("fc1", "fc3"), r=3, seed=0):
    model = _base(seed)
    torch.manual_seed(seed + 100)
    cfg = LoRAConfig(r=r, lora_alpha=6, target_modules=list(targets), init_lora_weights=False)
    return add_lora(model, cfg)


def _x():
    return torch.randn(5, 8, generator=torch.Generator().manual_seed(1))


def test_save_writes_peft_keys_shapes_and_config(tmp_path):
    save_adapter(_adapted(targets=("fc3", "fc1")), tmp_path / "a")
    assert sorted(os.listdir(tmp_path)) == ["a"]  # no temporary directory left behind
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "base_model.model.fc1.lora_A.weight": (3, 8),
        "base_model.model.fc1.lora_B.weight": (16, 3),
        "base_model.model.fc3.lora_A.weight": (3, 16),
        "base_model.model.fc3.lora_B.weight": (4, 3),
    }
    assert all(t.is_contiguous() for t in tensors.values())
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    expected = {"peft_type": "LORA", "r": 3, "lora_alpha": 6, "target_modules": ["fc1", "fc3"],
                "lora_dropout": 0.0, "use_rslora": False, "use_dora": False, "bias": "none",
                "fan_in_fan_out": False, "init_lora_weights": False, "task_type": None,
                "base_model_name_or_path": None, "inference_mode": True, "modules_to_save": None}  # fmt: skip
    assert expected.items() <= config.items()


def test_save_then_load_gives_the_same_outputs_frozen_unless_trainable(tmp_path):
    model, x = _adapted(), _x()
    save_adapter(model, tmp_path / "a")
    loaded = load_adapter(_base(), tmp_path / "a")
    assert torch.equal(loaded(x), model(x))
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = load_adapter(_base(), tmp_path / "a", is_trainable=True)
    assert sum(p.requires_grad for p in trainable.parameters()) == 4


def test_load_adds_a_named_adapter_to_a_model_that_has_lora(tmp_path):
    save_adapter(_adapted(), tmp_path / "a")
    model = add_lora(_base(), LoRAConfig(r=2, target_modules=["fc1", "fc2"]))
    load_adapter(model, tmp_path / "a", adapter_name="loaded")
    assert set(model.fc1.lora_A) == {"default", "loaded"} and model.fc1.active_adapters == [
        "loaded"
    ]
    assert isinstance(model.fc3, LoRALinear) and set(model.fc3.lora_A) == {"loaded"}
    assert set(model.lora_configs) == {"default", "loaded"}


def test_save_overwrites_an_adapter_directory_and_keeps_its_readme(tmp_path):
    save_adapter(_adapted(seed=0), tmp_path / "a")
    (tmp_path / "a" / "README.md").write_text("card")
    model = _adapted(seed=5)
    save_adapter(model, tmp_path / "a")
    assert (tmp_path / "a" / "README.md").read_text() == "card"
    assert torch.equal(load_adapter(_base(seed=5), tmp_path / "a")(_x()), model(_x()))
    assert sorted(os.listdir(tmp_path)) == ["a"]


def test_save_refuses_a_directory_holding_other_files(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "train.log").write_text("keep me")
    with pytest.raises(FileExistsError, match="train.log"):
        save_adapter(_adapted(), tmp_path / "a")
    assert os.listdir(tmp_path / "a") == ["train.log"]


@pytest.mark.parametrize("existing", [False, True])
def test_an_interrupted_save_leaves_the_old_adapter_or_nothing(tmp_path, monkeypatch, existing):
    target = tmp_path / "a"
    if existing:
        save_adapter(_adapted(seed=0), target)
    before = {p.name: p.read_bytes() for p in target.iterdir()} if existing else None
    real_fsync, calls = os.fsync, []

    def crash_on_second_file(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process is stopped halfway through the save
        real_fsync(fd)

    monkeypatch.setattr(adapters.os, "fsync", crash_on_second_file)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(_adapted(seed=7), target)
    assert sorted(os.listdir(tmp_path)) == (["a"] if existing else [])
    if existing:
        assert {p.name: p.read_bytes() for p in target.iterdir()} == before


def test_an_interrupted_two_rename_swap_puts_the_old_adapter_back(tmp_path, monkeypatch):
    target = tmp_path / "a"
    save_adapter(_adapted(seed=0), target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    real_rename = os.rename
    monkeypatch.setattr(adapters, "_exchange", lambda a, b: False)  # no atomic swap here

    def rename(src, dst):
        if ".tmp-" in str(src):
            raise OSError("disk went away")
        real_rename(src, dst)

    monkeypatch.setattr(adapters.os, "rename", rename)
    with pytest.raises(OSError):
        save_adapter(_adapted(seed=7), target)
    assert sorted(os.listdir(tmp_path)) == ["a"]
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


def _corrupt(directory, how):
    cfg_path, w_path = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    cfg, tensors = json.loads(cfg_path.read_text()), load_file(w_path)
    if how == "no dir":
        return directory.parent / "missing"
    if how == "no weights":
        w_path.unlink()
        (directory / "adapter_model.bin").write_bytes(b"pickle")
    elif how == "no config":
        cfg_path.unlink()
    elif how == "bad json":
        cfg_path.write_text("{ not json")
    elif how == "not lora":
        cfg_path.write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    elif how == "bad safetensors":
        w_path.write_bytes(b"\x00" * 20)
    elif how == "unknown module":
        tensors["base_model.model.fc9.lora_A.weight"] = tensors[
            "base_model.model.fc1.lora_A.weight"
        ].clone()
        tensors["base_model.model.fc9.lora_B.weight"] = tensors[
            "base_model.model.fc1.lora_B.weight"
        ].clone()
        cfg_path.write_text(json.dumps({**cfg, "target_modules": ["fc1", "fc3", "fc9"]}))
        save_file(tensors, w_path)
    elif how == "extra key":
        tensors["base_model.model.fc9.lora_A.weight"] = tensors[
            "base_model.model.fc1.lora_A.weight"
        ].clone()
        save_file(tensors, w_path)
    elif how == "missing key":
        del tensors["base_model.model.fc3.lora_B.weight"]
        save_file(tensors, w_path)
    elif how == "rank mismatch":
        cfg_path.write_text(json.dumps({**cfg, "r": 4}))
    elif how == "dora":
        cfg_path.write_text(json.dumps({**cfg, "use_dora": True}))
    return directory


@pytest.mark.parametrize(
    "how, error, message",
    [
        ("no dir", FileNotFoundError, "no adapter directory"),
        ("no weights", FileNotFoundError, "pickle"),
        ("no config", FileNotFoundError, "adapter_config.json"),
        ("bad json", ValueError, "not valid JSON"),
        ("not lora", ValueError, "peft_type"),
        ("bad safetensors", ValueError, "not a readable safetensors"),
        ("unknown module", ValueError, "modules the model lacks"),
        ("extra key", ValueError, "modules the model lacks"),
        ("missing key", ValueError, "lacks lora_A/lora_B"),
        ("rank mismatch", ValueError, r"shape \(3, 8\), but r=4"),
        ("dora", ValueError, "lacks lora_A/lora_B weights or lora_magnitude_vector"),
    ],
)
def test_a_bad_adapter_raises_clearly_and_leaves_the_model_unchanged(tmp_path, how, error, message):
    save_adapter(_adapted(), tmp_path / "a")
    directory = _corrupt(tmp_path / "a", how)
    model = add_lora(_base(), LoRAConfig(r=2, target_modules=["fc2"]))
    snap = snapshot(model)
    with pytest.raises(error, match=message):
        load_adapter(model, directory, adapter_name="new")
    assert_unchanged(model, snap)


def test_loading_under_an_existing_name_fails_and_changes_nothing(tmp_path):
    save_adapter(_adapted(), tmp_path / "a")
    model = _adapted(seed=3)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        load_adapter(model, tmp_path / "a")
    assert_unchanged(model, snap)


def test_saving_an_unknown_adapter_lists_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match=r"no adapter 'x'; it has \['default'\]"):
        save_adapter(_adapted(), tmp_path / "a", adapter_name="x")
    assert not (tmp_path / "a").exists()
