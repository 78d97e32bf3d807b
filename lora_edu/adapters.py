"""Save and load LoRA adapters in PEFT's file format, so each library reads the other's.

An adapter is a directory of two files. `adapter_config.json` holds the
LoraConfig fields (peft_type "LORA", r, lora_alpha, target_modules, ...), and
`adapter_model.safetensors` holds, for each wrapped layer at module path P,

    base_model.model.P.lora_A.weight          (r x in)
    base_model.model.P.lora_B.weight          (out x r)
    base_model.model.P.lora_magnitude_vector  (out,), DoRA adapters only (no ".weight")

The prefix is PEFT's: a `PeftModel` holds a `LoraModel` (`base_model`) that holds
your model (`model`); for a transformers LlamaForCausalLM, P itself starts with
"model.layers.". The adapter's name is not in the keys, so a file loads under any
name. Safetensors, never pickle: reading an adapter cannot run code.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import nn

from lora_edu.inject import LoRAConfig, add_lora, find_targets, lora_layers

__all__ = ["save_adapter", "load_adapter", "adapter_state_dict", "read_adapter"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
KEY = re.compile(r"base_model\.model\.(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)")
LORA_PARTS = ("lora_A.weight", "lora_B.weight")
DORA_PARTS = (*LORA_PARTS, "lora_magnitude_vector")
KEPT = ("README.md",)  # PEFT's model card: kept when an adapter directory is overwritten


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's keys, as contiguous CPU copies."""
    tensors = {}
    for path, layer in lora_layers(model):
        if adapter_name not in layer.lora_A:
            continue
        for part, weight in _adapter_tensors(layer, adapter_name).items():
            if weight.is_meta:
                raise ValueError(
                    f"{path}.{part} lives on the meta device: it holds no values to save"
                )
            tensors[f"{PREFIX}{path}.{part}"] = weight.detach().to("cpu", copy=True).contiguous()
    return tensors


def _adapter_tensors(layer: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """One layer's tensors of the adapter by file key suffix: A, B, and DoRA's magnitude."""
    parts = {
        "lora_A.weight": layer.lora_A[adapter_name].weight,
        "lora_B.weight": layer.lora_B[adapter_name].weight,
    }
    magnitudes = getattr(layer, "lora_magnitude_vector", {})
    if adapter_name in magnitudes:
        parts["lora_magnitude_vector"] = magnitudes[adapter_name]
    return parts


def save_adapter(
    model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default"
) -> Path:
    """Write adapter `adapter_name` as adapter_model.safetensors + adapter_config.json.

    Both files are written into a temporary directory beside `directory`, which then
    takes its place: where the file system can swap two directories in one step (Linux's
    renameat2 with RENAME_EXCHANGE), at every moment `directory` holds either the whole
    previous adapter or the whole new one; elsewhere two renames leave a moment with no
    directory, and an exception in between puts the previous one back. An existing
    `directory` may hold only a previous adapter (and PEFT's README.md).

    Returns:
        the adapter directory.
    """
    configs = getattr(model, "lora_configs", {})
    if adapter_name not in configs:
        raise ValueError(f"the model has no adapter {adapter_name!r}; it has {sorted(configs)}")
    config = json.dumps(configs[adapter_name].to_peft_dict(), indent=2, sort_keys=True) + "\n"
    weights = save(adapter_state_dict(model, adapter_name), metadata={"format": "pt"})
    target = Path(os.path.abspath(directory))
    _write_directory(target, {WEIGHTS_NAME: weights, CONFIG_NAME: config.encode()})
    return target


def _write_directory(target: Path, files: dict[str, bytes]) -> None:
    """Replace `target` by a directory holding `files`, in one rename once they are on disk."""
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory")
    if target.is_dir():
        extra = sorted(p.name for p in target.iterdir() if p.name not in {*files, *KEPT})
        if extra:
            raise FileExistsError(
                f"{target} holds other files {extra}; save_adapter replaces the whole directory, "
                "so save into an empty or adapter-only directory"
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp, old = (target.parent / f".{target.name}.{kind}-{tag}" for kind in ("tmp", "old"))
    tmp.mkdir()
    try:
        for name, data in files.items():
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())  # on disk before the rename makes it visible
        for name in KEPT:
            if (target / name).is_file():
                shutil.copy2(target / name, tmp / name)
        if target.exists() and _exchange(tmp, target):
            old = tmp  # one atomic step: target is the new adapter, tmp holds the old one
        else:  # no exchange here: two renames, with a moment when target does not exist
            if target.exists():
                os.rename(target, old)
            os.rename(tmp, target)
    except BaseException:
        if old.exists() and not target.exists():
            os.rename(old, target)  # put the previous adapter back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux renameat2); False where that is missing."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):  # not glibc/Linux: fall back to two renames
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p] * 2 + [ctypes.c_uint]  # dirfd, path x2
    at_fdcwd, rename_exchange = -100, 2  # <fcntl.h>, <linux/fs.h>
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # the file system cannot swap
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def read_adapter(directory: str | os.PathLike) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """The config and tensors of an adapter directory (written by lora_edu or PEFT), checked."""
    d = Path(directory)
    config_path, weights_path = d / CONFIG_NAME, d / WEIGHTS_NAME
    if not d.is_dir():
        raise FileNotFoundError(f"no adapter directory at {d}")
    if not config_path.is_file():
        raise FileNotFoundError(f"{d} has no {CONFIG_NAME}: it is not a PEFT/lora_edu adapter")
    if not weights_path.is_file():
        pickle = (d / "adapter_model.bin").exists()
        hint = " (adapter_model.bin is pickle, which lora_edu never loads)" if pickle else ""
        raise FileNotFoundError(f"{d} has no {WEIGHTS_NAME}{hint}")
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{config_path} must hold a JSON object, got {type(raw).__name__}")
    try:
        config = LoRAConfig.from_peft_dict(raw)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{config_path}: {e}") from None
    try:
        tensors = load_file(weights_path)
    except Exception as e:  # safetensors raises its own error type for a damaged file
        raise ValueError(f"{weights_path} is not a readable safetensors file: {e}") from None
    return config, tensors


def _check_fits(model: nn.Module, config: LoRAConfig, tensors: dict, adapter_name: str) -> dict:
    """Raise unless the tensors fit the model's targeted layers exactly; group them by module."""
    if adapter_name in getattr(model, "lora_configs", {}):
        raise ValueError(
            f"the model already has an adapter named {adapter_name!r}; load it under another name"
        )
    targets = find_targets(model, config)
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    bad = []
    for key, tensor in tensors.items():
        m = KEY.fullmatch(key)
        if m is None or not tensor.is_floating_point():
            bad.append(key)
        else:
            by_module.setdefault(m[1], {})[m[2]] = tensor
    if bad:
        raise ValueError(
            f"unexpected tensors {bad[:4]}: expected float {PREFIX}<module>.lora_A/lora_B.weight "
            "(and .lora_magnitude_vector for DoRA)"
        )
    unknown = sorted(set(by_module) - set(targets))
    if unknown:
        raise ValueError(
            f"the adapter has weights for modules the model lacks or the config does not target: {unknown[:4]}"
        )
    parts = DORA_PARTS if config.use_dora else LORA_PARTS
    wrong = sorted(p for p in targets if set(by_module.get(p, {})) != set(parts))
    if wrong:
        dora = " or lora_magnitude_vector" if config.use_dora else ""
        raise ValueError(
            f"the adapter lacks lora_A/lora_B weights{dora} for targeted modules {wrong[:4]}, or "
            f"holds a magnitude while use_dora is false: each needs {list(parts)}, "
            f"{wrong[0]} has {sorted(by_module.get(wrong[0], {}))}"
        )
    for path, module in targets.items():
        d_in, d_out = module.in_features, module.out_features
        want = {"lora_A.weight": (config.r, d_in), "lora_B.weight": (d_out, config.r),
                "lora_magnitude_vector": (d_out,)}  # fmt: skip
        for part in parts:
            got = tuple(by_module[path][part].shape)
            if got != want[part]:
                raise ValueError(
                    f"{path}.{part} has shape {got}, but r={config.r} (adapter_config.json) and "
                    f"the layer's {d_in} -> {d_out} need {want[part]}"
                )
    return by_module


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter_name: str = "default",
    is_trainable: bool = False,
) -> nn.Module:
    """Load an adapter saved by `save_adapter` or by PEFT's `save_pretrained`, in place.

    The adapter is added with `add_lora` from its config, its tensors copied in, and it
    becomes the active adapter. As in PEFT it is frozen unless `is_trainable`. Files,
    config, keys and shapes are all checked first: on any error the model is unchanged.
    """
    config, tensors = read_adapter(directory)
    by_module = _check_fits(model, config, tensors, adapter_name)
    add_lora(model, config, adapter_name)
    with torch.no_grad():
        for path, layer in lora_layers(model):
            if adapter_name in layer.lora_A:
                for part, weight in _adapter_tensors(layer, adapter_name).items():
                    weight.copy_(by_module[path][part]).requires_grad_(is_trainable)
    return model
