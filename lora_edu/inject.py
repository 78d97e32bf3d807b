"""LoRA inside a model: pick layers by name, wrap them in LoRALinear, freeze the rest.

`add_lora` walks `model.named_modules()`, replaces every targeted linear layer
by a `LoRALinear` and freezes everything but the new adapter, so an optimizer
over the parameters that require grad trains only r * (in + out) numbers per
layer. Targets are chosen as in PEFT: a list of names (a module matches when its
full name equals an entry or ends with "." + entry), a regex string matched
against the whole name, or "all-linear". Counting shows the point of LoRA
(Hu et al., 2021, https://arxiv.org/abs/2106.09685): on LLaMA-7B, r = 8 on
q_proj and v_proj trains 4,194,304 of 6,742,609,920 numbers (0.06 %).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from numbers import Real

from torch import nn

from lora_edu.dora import DoRALinear
from lora_edu.lora import INIT_CHOICES, LoRALinear, is_linear_like
from lora_edu.scaling import lora_scaling

__all__ = [
    "LoRAConfig", "add_lora", "find_targets", "lora_layers", "count_parameters",
    "print_trainable_parameters", "merge_and_unload", "unload", "set_adapter",
    "disable_adapter",
]  # fmt: skip

# PEFT config fields that describe the file, not the adapter's math: ignored on read.
PEFT_METADATA = {
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode",
    "peft_version", "auto_mapping", "megatron_core", "qalora_group_size", "loftq_config",
    "eva_config", "corda_config", "lora_ga_config", "ensure_weight_tying",
}  # fmt: skip
LAYER_ARGS = ("r", "lora_alpha", "lora_dropout", "init_lora_weights", "use_rslora")
OFF = (None, False, {}, [])  # a PEFT option with one of these values is switched off


@dataclass
class LoRAConfig:
    """Which layers get LoRA and how; the field names are PEFT's `LoraConfig` names.

    Every field is checked here, with a message that names the bad value and what is
    allowed; an unknown option is a TypeError that lists the options. As in PEFT, r may
    reach or exceed min(in, out) of a layer: allowed, though it saves no parameters
    there (see `LoRALinear`).
    """

    r: int = 8  # rank of every update, a positive integer
    lora_alpha: float = 8  # scaling = lora_alpha / r
    target_modules: list[str] | str | None = None  # names, a regex, or "all-linear"
    lora_dropout: float = 0.0  # dropout on the adapter's input only
    use_rslora: bool = False  # scaling = lora_alpha / sqrt(r) instead
    use_dora: bool = False  # DoRA (lora_edu.dora): a trainable magnitude per output row
    bias: str = "none"  # only "none": biases stay frozen
    init_lora_weights: bool | str = True  # True, "gaussian", or False (random B, for tests)
    modules_to_save: list[str] | None = None  # not supported yet: must stay None

    def __new__(cls, *args, **kwargs):
        """Before the dataclass's __init__ runs: a misspelt option is named beside the known ones."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(kwargs) - set(known))
        if unknown:
            raise TypeError(f"LoRAConfig has no option(s) {unknown}; its options are {known}")
        return super().__new__(cls)

    def __post_init__(self):
        lora_scaling(self.lora_alpha, self.r, self.use_rslora)  # validates r and lora_alpha
        d = self.lora_dropout
        if isinstance(d, bool) or not isinstance(d, Real) or not 0 <= d < 1:
            raise ValueError(f"lora_dropout must be a number in [0, 1), got {d!r}")
        for flag in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if self.bias != "none":
            raise ValueError(f'bias must be "none" (lora_edu trains no biases), got {self.bias!r}')
        if self.init_lora_weights not in INIT_CHOICES:
            raise ValueError(
                f"init_lora_weights must be in {INIT_CHOICES}, got {self.init_lora_weights!r}"
            )
        if self.modules_to_save:
            raise NotImplementedError("modules_to_save is not supported by lora_edu; leave it None")
        _check_targets(self.target_modules)

    def to_peft_dict(self) -> dict:
        """The adapter_config.json fields PEFT writes; a list of targets is sorted."""
        targets = self.target_modules
        return {
            "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None,
            "revision": None, "inference_mode": True, "r": self.r, "lora_alpha": self.lora_alpha,
            "target_modules": targets if isinstance(targets, str) else sorted(targets),
            "lora_dropout": self.lora_dropout, "use_rslora": self.use_rslora,
            "use_dora": self.use_dora, "bias": self.bias, "fan_in_fan_out": False,
            "init_lora_weights": self.init_lora_weights, "modules_to_save": None,
            "lora_bias": False, "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": {}, "alpha_pattern": {}, "exclude_modules": None,
            "target_parameters": None,
        }  # fmt: skip

    @classmethod
    def from_peft_dict(cls, d: dict) -> LoRAConfig:
        """Read an adapter_config.json dict written by PEFT or by `to_peft_dict`.

        Ignored: the fields in `PEFT_METADATA`, and every other PEFT field left off (null,
        false, {} or []: fan_in_fan_out, lora_bias, rank_pattern, alpha_pattern,
        layers_to_transform, layers_pattern, exclude_modules, target_parameters, use_qalora,
        layer_replication, ...). A field switched on would change the adapter: refused.
        """
        if d.get("peft_type") != "LORA":
            raise ValueError(
                f"peft_type must be 'LORA' (a LoRA adapter), got {d.get('peft_type')!r}"
            )
        own = {f.name for f in fields(cls)}
        on = {k: v for k, v in d.items() if k not in own | PEFT_METADATA and v not in OFF}
        if on:
            raise ValueError(
                f"the config sets PEFT options lora_edu does not support: {on}. lora_edu reads "
                f"{sorted(own)}; any other option must be off (null, false, {{}} or [])"
            )
        return cls(**{k: d[k] for k in own if k in d})


def _check_targets(targets) -> None:
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as e:
            raise ValueError(f"target_modules {targets!r} is not a valid regex: {e}") from None
        return
    names = isinstance(targets, (list, tuple, set)) and all(isinstance(t, str) for t in targets)
    if not names:
        raise ValueError(
            "target_modules is required: names such as ['q_proj', 'v_proj'], a regex matched "
            f"against full module names, or 'all-linear'; got {targets!r}"
        )


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """Every LoRALinear in the model, with its full name."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def _linear(m: nn.Module) -> bool:
    return is_linear_like(m) or isinstance(m, LoRALinear)


def _is_target(name: str, targets) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_targets(model: nn.Module, config: LoRAConfig) -> dict[str, nn.Module]:
    """The modules `config` targets, by full name; raises if one is not linear or none matches."""
    inside = tuple(f"{n}." for n, _ in lora_layers(model))  # lora_A, base_layer... never targets
    candidates = [(n, m) for n, m in model.named_modules() if n and not n.startswith(inside)]
    if config.target_modules == "all-linear":
        get_head = getattr(model, "get_output_embeddings", None)  # transformers models have it
        head = get_head() if callable(get_head) else None
        found = {n: m for n, m in candidates if _linear(m) and m is not head}
    else:
        found = {n: m for n, m in candidates if _is_target(n, config.target_modules)}
    for n, m in found.items():
        if not _linear(m):
            raise TypeError(
                f"target {n!r} is a {type(m).__name__}, not a linear layer; LoRA wraps nn.Linear "
                "(or a module with in_features, out_features and a weight): target its linear children"
            )
    if not found:
        linear = [n for n, m in candidates if _linear(m)]
        kinds = sorted({n.rpartition(".")[2] for n in linear})
        raise ValueError(
            f"target_modules {config.target_modules!r} matched no module. The model's {len(linear)} "
            f"linear layers are named {kinds}; give names, '.'-suffixes, a full-match regex or 'all-linear'"
        )
    return found


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def add_lora(model: nn.Module, config: LoRAConfig, adapter_name: str = "default") -> nn.Module:
    """Add adapter `adapter_name` to the layers `config` targets, in place; returns the model.

    Targets become `LoRALinear` (`DoRALinear` with `use_dora`), or get one more adapter if
    they already are. Every parameter is frozen except the new adapter's lora_A and lora_B
    (and its DoRA magnitude), and the new adapter
    becomes the active one (PEFT's `add_adapter` instead leaves the active one as it was).
    Everything is checked before the model changes, so a failing call changes nothing.
    """
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a LoRAConfig, got {type(config).__name__}")
    configs = getattr(model, "lora_configs", {})
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(
            f"adapter_name must be a non-empty string without '.', got {adapter_name!r}"
        )
    if adapter_name in configs:
        raise ValueError(f"the model already has an adapter named {adapter_name!r}")
    targets = find_targets(model, config)
    held = [(n, m) for n, m in targets.items() if isinstance(m, LoRALinear)]
    blocked = [n for n, m in held if type(m) is LoRALinear or m.merged]
    if config.use_dora and blocked:
        raise ValueError(
            f"cannot add a DoRA adapter to {blocked[:4]}: it needs a DoRALinear with nothing merged, "
            "and these are plain LoRALinear layers or hold merged adapters. Add DoRA adapters "
            "first (a DoRALinear holds plain ones too), unmerge, or unload()"
        )
    args = [getattr(config, f) for f in LAYER_ARGS]
    kind = DoRALinear if config.use_dora else LoRALinear
    new = [(n, m) for n, m in targets.items() if not isinstance(m, LoRALinear)]
    wrapped = {n: kind(m, *args, adapter_name=adapter_name) for n, m in new}
    dora = {"use_dora": True} if config.use_dora else {}
    # From here on the model changes; nothing below can fail on a valid config.
    for name, module in targets.items():
        if name in wrapped:
            _replace(model, name, wrapped[name])
        else:
            module.update_layer(adapter_name, *args, **dora)
    stored = sorted(targets) if config.target_modules == "all-linear" else config.target_modules
    model.lora_configs = {**configs, adapter_name: replace(config, target_modules=stored)}
    model.requires_grad_(False)
    set_adapter(model, adapter_name)
    return model


def set_adapter(model: nn.Module, adapter_name: str | list[str]) -> None:
    """Make these adapters active (and trainable, as PEFT does) in every LoRA layer."""
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    known = sorted({a for _, layer in lora_layers(model) for a in layer.lora_A})
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; the model has {known}")
    for _, layer in lora_layers(model):
        layer._activate(names)


@contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Within this block the model computes with its base layers only."""
    layers = [layer for _, layer in lora_layers(model)]  # a merged one raises in forward
    before = [layer.disable_adapters for layer in layers]
    for layer in layers:
        layer.disable_adapters = True
    try:
        yield model
    finally:
        for layer, flag in zip(layers, before):
            layer.disable_adapters = flag


def count_parameters(model: nn.Module) -> dict:
    """Trainable and total parameter counts as PEFT counts them (LoRA weights are in the total).

    A module that stores packed values (a 4-bit layer) may define `logical_numel()`, the
    number of weights its own parameters stand for; they then count as that number, and as
    trainable if any of them requires grad. Works on the meta device (only shapes are read).
    """
    trainable = total = 0
    seen = set()  # tied weights count once
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in own)
        if callable(getattr(module, "logical_numel", None)):
            n = int(module.logical_numel())
            total, trainable = total + n, trainable + n * any(p.requires_grad for p in own)
            continue
        total += sum(p.numel() for p in own)
        trainable += sum(p.numel() for p in own if p.requires_grad)
    percent = 100 * trainable / total if total else 0.0
    return {"trainable": trainable, "total": total, "percent": percent}


def print_trainable_parameters(model: nn.Module) -> None:
    """Print PEFT's line: `trainable params: 4,194,304 || all params: ... || trainable%: 0.0622`."""
    t, a, p = count_parameters(model).values()
    print(f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {p:.4f}")


def _plain_linear(base: nn.Module) -> nn.Linear:
    if type(base) is nn.Linear:
        return base
    bias = getattr(base, "bias", None)
    new = nn.Linear(base.in_features, base.out_features, bias=bias is not None, device="meta")
    new.weight = nn.Parameter(base.weight.detach(), requires_grad=False)  # (out, in), merged
    new.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
    return new


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every active adapter into its base weight and put plain nn.Linear layers back."""
    layers = lora_layers(model)
    for _, layer in layers:
        layer._writable_weight()  # a quantized base raises here, before anything changes
    for name, layer in layers:
        active = [a for a in layer.active_adapters if a in layer.lora_A]
        layer.merge([a for a in active if a not in layer.merged_adapters])
        _replace(model, name, _plain_linear(layer.base_layer))
    vars(model).pop("lora_configs", None)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Drop every adapter (unmerging first) and put the original base layers back (still frozen)."""
    for name, layer in lora_layers(model):
        layer.unmerge()
        _replace(model, name, layer.base_layer)
    vars(model).pop("lora_configs", None)
    return model
