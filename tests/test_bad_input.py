"""Bad input, API by API: every call refuses it with an error naming the bad value and what is
allowed, and leaves the model (tests/model_state.py) and the files on disk exactly as they were.

Where each kind of bad input of issue 10 is tried ("here" is this file):

================================  ================================================================
Bad input                         Tests
================================  ================================================================
LoRAConfig r, alpha, dropout      here 19 values; test_inject (r=0, alpha=-1, dropout=1, bias,
                                  regex, init, modules_to_save, no targets); test_lora (7 r/alpha)
unknown options                   here: misspelt LoRAConfig options, PEFT file options switched on
targets that match nothing        test_inject (the error lists the linear layers); here: [] and a
                                  regex, model unchanged
a target that is not linear       test_inject (LayerNorm); here: GELU via a regex, Embedding, a
                                  module without a weight, LoRALinear(Embedding)
add_lora twice, bad names         test_inject, test_lora; here with model or layer unchanged
                                  (add_lora and update_layer, LoRA and DoRA), config not a LoRAConfig
set_adapter unknown               test_inject, test_lora; here with the model unchanged
merge twice, unmerge unmerged     test_lora (message); here: layer unchanged, a name given twice,
                                  unmerge a no-op, a DoRA adapter onto a merged layer
disable / enable                  test_lora; here: flags restored after an error, merged model
load_adapter                      test_adapters (11 cases, model unchanged); here 17 more, model
                                  and every file byte unchanged (truncated safetensors, JSON not
                                  an adapter config, bad config values, shapes, dtypes, DoRA)
save_adapter                      test_adapters (other files, unknown name, 3 interruptions);
                                  here: a file in the way, no LoRA, an exception at each of 11
                                  steps and a hard crash (os._exit) at each of 9, both with the
                                  atomic exchange and with two renames; no pickle in lora_edu
quantize_4bit, dequantize_4bit    test_quant (blocksize 48/8192, "int4", int32, float64, empty,
                                  NaN, inf, another tensor's state); here 18 more, bitsandbytes'
                                  own behaviour, 6 code/state mismatches, QuantState, Linear4bit
================================  ================================================================

NaN and inf in `quantize_4bit`: refused (ValueError). bitsandbytes 0.50 on CPU quantizes them
silently: the block's absmax becomes NaN or inf and every value of the block decodes to NaN or
inf (pinned below). An empty tensor is refused too; bitsandbytes returns empty codes.

A limit, not tested: packed codes carry no shape, so a state of another tensor whose codes
take as many bytes (the same numel, or 2k - 1 against 2k) decodes without error, here as in
bitsandbytes. Every other mismatch of codes and state is refused.
"""

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from model_state import assert_unchanged, snapshot
from safetensors.torch import load_file, save_file
from torch import nn

from lora_edu import adapters
from lora_edu.adapters import load_adapter, save_adapter
from lora_edu.dora import DoRALinear
from lora_edu.experiments import MLP
from lora_edu.inject import LoRAConfig, add_lora, disable_adapter, set_adapter
from lora_edu.lora import LoRALinear
from lora_edu.quant import Linear4bit, QuantState, dequantize_4bit, quantize_4bit

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def _base(seed=0):
    torch.manual_seed(seed)
    return MLP(d_in=8, d_hidden=16, d_out=4)


def _adapted(seed=0, targets=("fc1", "fc3"), **kw):
    model = _base(seed)
    torch.manual_seed(seed + 100)
    kw = {"r": 3, "lora_alpha": 6, "init_lora_weights": False, **kw}
    return add_lora(model, LoRAConfig(target_modules=list(targets), **kw))


def _x():
    return torch.randn(5, 8, generator=torch.Generator().manual_seed(1))


def _files(root):
    """Every file under `root` (hidden ones too) by relative path, with its bytes."""
    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _refuses(error, call, *words):
    """`call()` raises `error` whose message contains every one of `words`."""
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    missing = [w for w in words if w not in message]
    assert not missing, f"{missing} not in: {message}"


# --- LoRAConfig ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("r", -1, "positive integer"),
        ("r", 2.5, "positive integer"),
        ("r", "8", "positive integer"),
        ("r", None, "positive integer"),
        ("lora_alpha", 0, "> 0"),
        ("lora_alpha", float("inf"), "finite positive number"),
        ("lora_alpha", "16", "finite positive number"),
        ("lora_alpha", True, "finite positive number"),
        ("lora_dropout", -0.1, "[0, 1)"),
        ("lora_dropout", 1.5, "[0, 1)"),
        ("lora_dropout", float("nan"), "[0, 1)"),
        ("lora_dropout", "0.1", "[0, 1)"),
        ("lora_dropout", True, "[0, 1)"),
        ("use_rslora", "yes", "True or False"),
        ("use_dora", 1, "True or False"),
        ("use_dora", None, "True or False"),
        ("target_modules", [1], "'all-linear'"),
        ("target_modules", 5, "'all-linear'"),
        ("init_lora_weights", "loftq", "gaussian"),
    ],
)
def test_config_refuses_a_bad_value_naming_it_and_what_is_allowed(field, value, allowed):
    kwargs = {"target_modules": ["fc1"], field: value}
    _refuses(ValueError, lambda: LoRAConfig(**kwargs), field, repr(value), allowed)


@pytest.mark.parametrize("option", ["target_module", "alpha", "lora_rank"])
def test_config_unknown_option_is_named_with_the_known_ones(option):
    call = lambda: LoRAConfig(target_modules=["fc1"], **{option: 4})  # noqa: E731
    _refuses(TypeError, call, repr(option), "'target_modules'", "'lora_alpha'", "'r'")


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"fan_in_fan_out": True}, ["fan_in_fan_out", "lora_edu reads", "'r'"]),
        ({"rank_pattern": {"fc1": 4}}, ["rank_pattern", "must be off"]),
        ({"some_future_option": 1}, ["some_future_option", "lora_edu reads"]),
        ({"peft_type": "LOHA"}, ["peft_type", "'LORA'", "'LOHA'"]),
    ],
)
def test_peft_dict_with_an_option_switched_on_names_it_and_what_is_read(changes, words):
    d = {**LoRAConfig(target_modules=["fc1"]).to_peft_dict(), **changes}
    _refuses(ValueError, lambda: LoRAConfig.from_peft_dict(d), *words)


# --- add_lora: targets and names ------------------------------------------------------------


class NoWeight(nn.Module):
    """Has in_features and out_features but neither a weight nor dequantize(): not linear-like."""

    in_features, out_features = 16, 16

    def forward(self, x):
        return x


def _targets_model():
    model = _adapted()  # fc1 and fc3 already hold an adapter
    model.emb = nn.Embedding(10, 8)
    model.gate = NoWeight()
    return model


@pytest.mark.parametrize(
    "targets, error, words",
    [
        ([], ValueError, ["matched no module", "'fc1'", "'fc2'", "'fc3'"]),
        (r"blocks\..*", ValueError, ["matched no module", "'fc2'"]),
        (".*", TypeError, ["is a", "not a linear layer", "in_features, out_features"]),
        (["emb"], TypeError, ["'emb' is a Embedding", "not a linear layer"]),
        (["gate"], TypeError, ["'gate' is a NoWeight", "not a linear layer"]),
        (["fc2", "act"], TypeError, ["'act' is a GELU"]),
    ],
)
def test_add_lora_with_targets_that_do_not_fit_changes_nothing(targets, error, words):
    model = _targets_model()
    snap = snapshot(model)
    _refuses(error, lambda: add_lora(model, LoRAConfig(target_modules=targets), "new"), *words)
    assert_unchanged(model, snap)


@pytest.mark.parametrize(
    "config, name, error, words",
    [
        ({"target_modules": ["fc2"]}, "default", ValueError, ["already has", "'default'"]),
        ({"target_modules": ["fc2"]}, "", ValueError, ["non-empty string", "''"]),
        ({"target_modules": ["fc2"]}, 3, ValueError, ["non-empty string", "got 3"]),
        ({"target_modules": ["fc1"], "use_dora": True}, "d", ValueError, ["DoRA", "['fc1']"]),
        (None, "new", TypeError, ["must be a LoRAConfig", "dict"]),
    ],
)
def test_add_lora_with_a_bad_name_or_config_changes_nothing(config, name, error, words):
    model = _adapted()
    snap = snapshot(model)
    cfg = {"target_modules": ["fc2"]} if config is None else LoRAConfig(**config)
    _refuses(error, lambda: add_lora(model, cfg, name), *words)
    assert_unchanged(model, snap)


def test_lora_linear_around_a_non_linear_module_says_what_it_wraps():
    _refuses(TypeError, lambda: LoRALinear(nn.Embedding(10, 4)), "Embedding", "in_features")


@pytest.mark.parametrize("kwargs", [{"r": 0}, {"lora_alpha": -2}, {"lora_dropout": 1.0}])
def test_a_refused_lora_linear_leaves_its_base_layer_trainable(kwargs):
    base = nn.Linear(4, 3)
    with pytest.raises(ValueError):
        LoRALinear(base, **kwargs)
    assert all(p.requires_grad for p in base.parameters())


@pytest.mark.parametrize("kind", [LoRALinear, DoRALinear])
@pytest.mark.parametrize(
    "args, kwargs, words",
    [
        (("default", 4, 4), {}, ["already has an adapter", "'default'"]),
        (("a.b", 4, 4), {}, ["without '.'", "'a.b'"]),
        (("new", 0, 4), {}, ["positive integer", "got 0"]),
        (("new", 4, -1.0), {}, ["> 0", "got -1.0"]),
        (("new", 4, 4), {"lora_dropout": 1.0}, ["[0, 1)", "got 1.0"]),
        (("new", 4, 4), {"init_lora_weights": "pissa"}, ["'gaussian'", "'pissa'"]),
    ],
)
def test_a_refused_update_layer_changes_nothing(kind, args, kwargs, words):
    torch.manual_seed(0)
    layer = kind(nn.Linear(8, 6), r=2)
    snap = snapshot(layer)
    _refuses(ValueError, lambda: layer.update_layer(*args, **kwargs), *words)
    assert_unchanged(layer, snap)


# --- set_adapter, merge, unmerge, disable ---------------------------------------------------


def _two_adapter_model():
    model = _adapted()
    add_lora(model, LoRAConfig(r=2, target_modules=["fc1"], init_lora_weights=False), "b")
    return model


@pytest.mark.parametrize("names", ["nope", ["b", "nope"], ["Default"]])
def test_set_adapter_to_an_unknown_name_lists_the_known_ones_and_changes_nothing(names):
    model = _two_adapter_model()
    snap = snapshot(model)
    _refuses(ValueError, lambda: set_adapter(model, names), "unknown adapter", "['b', 'default']")
    assert_unchanged(model, snap)
    _refuses(ValueError, lambda: model.fc1.set_adapter(names), "unknown adapter", "'default'")
    assert_unchanged(model, snap)


@pytest.mark.parametrize(
    "first, second, words",
    [
        (None, None, ["already merged", "['default', 'b']", "unmerge() first"]),
        (["default"], ["b", "default"], ["already merged", "['default']"]),
        ([], ["b", "b"], ["twice", "['b', 'b']", "each once"]),
        ([], ["b", "nope"], ["unknown adapter", "'nope'", "['b', 'default']"]),
    ],
)
def test_merging_again_or_a_bad_list_changes_nothing(first, second, words):
    model = _two_adapter_model()
    layer = model.fc1
    layer.set_adapter(["default", "b"])
    layer.merge(first)
    snap = snapshot(model)
    _refuses(ValueError, lambda: layer.merge(second), *words)
    assert_unchanged(model, snap)


def test_unmerge_when_nothing_is_merged_is_a_no_op():
    model = _two_adapter_model()
    snap = snapshot(model)
    model.fc1.unmerge()
    model.fc1.unmerge()
    assert_unchanged(model, snap)


def test_a_dora_adapter_on_a_merged_layer_is_refused_and_changes_nothing():
    torch.manual_seed(0)
    layer = DoRALinear(nn.Linear(8, 6), r=2, init_lora_weights=False)
    layer.merge()
    snap = snapshot(layer)
    _refuses(RuntimeError, lambda: layer.update_layer("d", 2, 4, use_dora=True), "unmerge() first")
    assert_unchanged(layer, snap)


def test_disable_adapter_restores_the_flags_after_an_error_inside():
    model, x = _adapted(), _x()
    expected = model(x)
    with pytest.raises(ZeroDivisionError), disable_adapter(model):
        _ = 1 / 0
    assert not model.fc1.disable_adapters and torch.equal(model(x), expected)


def test_disable_adapter_on_a_merged_model_refuses_in_forward_then_re_enables():
    model, x = _adapted(), _x()
    model.fc1.merge()
    expected = model(x)
    with disable_adapter(model):
        _refuses(RuntimeError, lambda: model(x), "merged", "unmerge() first")
    assert torch.equal(model(x), expected)
    model.fc1.unmerge()
    with disable_adapter(model):
        assert torch.allclose(model(x), _base()(x), rtol=0, atol=1e-6)


# --- load_adapter ---------------------------------------------------------------------------


def _break(directory, how):
    """Damage the saved adapter in `directory` in one way; returns the path to load from."""
    cfg_path, w_path = directory / CONFIG, directory / WEIGHTS
    cfg, raw = json.loads(cfg_path.read_text()), w_path.read_bytes()
    tensors = load_file(w_path)
    a1, b1 = "base_model.model.fc1.lora_A.weight", "base_model.model.fc1.lora_B.weight"
    if how == "path is a file":
        return cfg_path
    if how == "truncated safetensors":
        w_path.write_bytes(raw[: len(raw) // 2])
    elif how == "safetensors one byte short":
        w_path.write_bytes(raw[:-1])
    elif how == "safetensors header only":
        w_path.write_bytes(raw[:8])
    elif how == "empty safetensors":
        w_path.write_bytes(b"")
    elif how == "json array":
        cfg_path.write_text(json.dumps([cfg]))
    elif how == "model config json":
        cfg_path.write_text(json.dumps({"model_type": "llama", "hidden_size": 16}))
    elif how == "json not utf-8":
        cfg_path.write_bytes(b"\xff\xfe\x00{")
    elif how == "config r=0":
        cfg_path.write_text(json.dumps({**cfg, "r": 0}))
    elif how == "config alpha string":
        cfg_path.write_text(json.dumps({**cfg, "lora_alpha": "6"}))
    elif how == "config option on":
        cfg_path.write_text(json.dumps({**cfg, "rank_pattern": {"fc1": 2}}))
    elif how == "targets match nothing":
        cfg_path.write_text(json.dumps({**cfg, "target_modules": ["q_proj"]}))
    elif how == "A in_features":
        save_file({**tensors, a1: torch.zeros(3, 9)}, w_path)
    elif how == "B out_features":
        save_file({**tensors, b1: torch.zeros(15, 3)}, w_path)
    elif how == "integer tensor":
        save_file({**tensors, a1: torch.zeros(3, 8, dtype=torch.int32)}, w_path)
    return directory


@pytest.mark.parametrize(
    "how, error, words",
    [
        ("path is a file", FileNotFoundError, ["no adapter directory", CONFIG]),
        ("truncated safetensors", ValueError, ["not a readable safetensors", WEIGHTS]),
        ("safetensors one byte short", ValueError, ["not a readable safetensors"]),
        ("safetensors header only", ValueError, ["not a readable safetensors"]),
        ("empty safetensors", ValueError, ["not a readable safetensors"]),
        ("json array", ValueError, ["must hold a JSON object", "list"]),
        ("model config json", ValueError, ["peft_type must be 'LORA'", "None"]),
        ("json not utf-8", ValueError, ["not valid JSON"]),
        ("config r=0", ValueError, [CONFIG, "positive integer", "got 0"]),
        ("config alpha string", ValueError, [CONFIG, "lora_alpha", "'6'"]),
        ("config option on", ValueError, ["rank_pattern", "lora_edu reads"]),
        ("targets match nothing", ValueError, ["'q_proj'", "matched no module", "'fc2'"]),
        ("A in_features", ValueError, ["fc1.lora_A.weight has shape (3, 9)", "need (3, 8)"]),
        ("B out_features", ValueError, ["fc1.lora_B.weight has shape (15, 3)", "need (16, 3)"]),
        ("integer tensor", ValueError, ["unexpected tensors", "fc1.lora_A.weight", "float"]),
    ],
)
def test_a_bad_adapter_leaves_the_model_and_the_files_unchanged(tmp_path, how, error, words):
    save_adapter(_adapted(), tmp_path / "a")
    path = _break(tmp_path / "a", how)
    model = add_lora(_base(), LoRAConfig(r=2, target_modules=["fc2"]))
    snap, files = snapshot(model), _files(tmp_path)
    _refuses(error, lambda: load_adapter(model, path, adapter_name="new"), *words)
    assert_unchanged(model, snap)
    assert _files(tmp_path) == files


def test_a_dora_adapter_onto_a_plain_lora_layer_changes_nothing(tmp_path):
    save_adapter(_adapted(use_dora=True), tmp_path / "a")
    model = add_lora(_base(), LoRAConfig(r=2, target_modules=["fc1"]))  # a plain LoRALinear
    snap, files = snapshot(model), _files(tmp_path)
    _refuses(ValueError, lambda: load_adapter(model, tmp_path / "a", "d"), "DoRA", "['fc1']")
    assert_unchanged(model, snap)
    assert _files(tmp_path) == files


def test_a_dora_adapter_onto_a_non_dora_config_is_refused(tmp_path):
    save_adapter(_adapted(use_dora=True), tmp_path / "a")
    cfg_path = tmp_path / "a" / CONFIG
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "use_dora": False}))
    model = _base()
    snap, files = snapshot(model), _files(tmp_path)
    _refuses(ValueError, lambda: load_adapter(model, tmp_path / "a"), "use_dora is false")
    assert_unchanged(model, snap)
    assert _files(tmp_path) == files


# --- save_adapter ---------------------------------------------------------------------------


def test_save_onto_a_file_says_so_and_leaves_the_file(tmp_path):
    (tmp_path / "a").write_text("not a directory")
    model = _adapted()
    snap = snapshot(model)
    _refuses(NotADirectoryError, lambda: save_adapter(model, tmp_path / "a"), "not a directory")
    assert _files(tmp_path) == {"a": b"not a directory"}
    assert_unchanged(model, snap)


def test_save_of_a_model_without_lora_lists_no_adapters(tmp_path):
    _refuses(ValueError, lambda: save_adapter(_base(), tmp_path / "a"), "'default'", "it has []")
    assert list(tmp_path.iterdir()) == []


# Every call save_adapter makes that touches the disk (or builds the bytes), in order; the
# n-th call of one of them is made to fail. Before the swap, the old adapter must be intact;
# after it, the new one; an exception leaves no temporary directory, except when it stops the
# final removal of the old adapter's directory.
STEPS = [
    ("save", 1),  # safetensors bytes
    ("dumps", 1),  # JSON text
    ("open", 1), ("fsync", 1), ("open", 2), ("fsync", 2),  # the two files
    ("copy2", 1),  # README.md kept
    ("_exchange", 1), ("rename", 1), ("rename", 2),  # the swap (exchange, or two renames)
    ("rmtree", 1),  # the old adapter's directory
]  # fmt: skip
OWNERS = {"save": adapters, "dumps": adapters.json, "open": adapters, "fsync": adapters.os,
          "copy2": adapters.shutil, "_exchange": adapters, "rename": adapters.os,
          "rmtree": adapters.shutil}  # fmt: skip


def _fail_at(monkeypatch, step, nth, fail):
    """Make the `nth` call of `step` call `fail()` instead; returns a list that records the hit."""
    owner, hit, calls = OWNERS[step], [], []
    real = open if step == "open" else getattr(owner, step)

    def wrapper(*args, **kwargs):
        calls.append(args)
        if len(calls) == nth:
            hit.append(step)
            fail()
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, step, wrapper, raising=step != "open")
    return hit


def _can_exchange(tmp_path):
    a, b = tmp_path / "probe" / "a", tmp_path / "probe" / "b"
    a.mkdir(parents=True), b.mkdir()
    (a / "x").write_text("a")
    try:
        return adapters._exchange(a, b) and (b / "x").is_file()
    finally:
        shutil.rmtree(tmp_path / "probe")


def _old_and_new(tmp_path, monkeypatch, exchange):
    """An adapter saved at run/a (the old one, with a README), a model holding a different
    one, the files each gives; the atomic exchange on or off (skip where it is missing)."""
    target = tmp_path / "run" / "a"
    save_adapter(_adapted(seed=0), target)
    (target / "README.md").write_text("card")
    old = _files(target)
    model = _adapted(seed=7, lora_alpha=5)  # its config differs too, not only its tensors
    save_adapter(model, tmp_path / "reference")
    new = {**_files(tmp_path / "reference"), "README.md": b"card"}
    if not exchange:
        monkeypatch.setattr(adapters, "_exchange", lambda a, b: False)
    elif not _can_exchange(tmp_path):
        pytest.skip("this file system cannot swap two directories")
    return target, old, model, new


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
@pytest.mark.parametrize("step, nth", STEPS)
def test_an_interrupted_save_leaves_the_old_adapter_or_the_new_one_whole(
    tmp_path, monkeypatch, step, nth, exchange
):
    target, old, model, new = _old_and_new(tmp_path, monkeypatch, exchange)

    def stop():
        raise KeyboardInterrupt

    hit = _fail_at(monkeypatch, step, nth, stop)
    try:
        save_adapter(model, target)
    except KeyboardInterrupt:
        assert hit
    monkeypatch.undo()
    after = _files(target)
    if not hit:  # this path does not make that call: the save went through
        assert after == new
        return
    swapped = step == "rmtree"
    assert after == (new if swapped else old)
    left = sorted(p.name for p in (tmp_path / "run").iterdir() if p.name != "a")
    assert left == [] or (swapped and len(left) == 1 and left[0].startswith(".a."))
    seed, alpha = (7, 5) if swapped else (0, 6)  # the adapter in place computes as its model
    expected = _adapted(seed, lora_alpha=alpha)(_x())
    assert torch.equal(load_adapter(_base(seed), target)(_x()), expected)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
@pytest.mark.parametrize("step, nth", [s for s in STEPS if s[0] not in ("save", "dumps")])
def test_a_save_killed_at_any_step_never_leaves_a_mixed_adapter(
    tmp_path, monkeypatch, step, nth, exchange
):
    """A hard crash (os._exit: no except, no finally) in a child process at each step.

    With the exchange, the target is always the whole old or the whole new adapter. With two
    renames, a crash between them leaves no target, and the old adapter whole in a hidden
    directory beside it; never a mixture.
    """
    target, old, model, new = _old_and_new(tmp_path, monkeypatch, exchange)
    files = {
        adapters.WEIGHTS_NAME: (tmp_path / "reference" / WEIGHTS).read_bytes(),
        adapters.CONFIG_NAME: (tmp_path / "reference" / CONFIG).read_bytes(),
    }  # built here: the child runs only the file steps (no torch after fork)
    pid = os.fork()
    if pid == 0:  # the child: crash at the step, or exit 0 if it is never reached
        try:
            _fail_at(monkeypatch, step, nth, lambda: os._exit(3))
            adapters._write_directory(target, files)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    crashed = os.waitstatus_to_exitcode(status) == 3
    after = _files(target) if target.exists() else None
    assert after in (old, new) or (not exchange and after is None)
    if not crashed:
        assert after == new
    hidden = [p for p in (tmp_path / "run").iterdir() if p.name != "a"]
    assert all(re.fullmatch(r"\.a\.(tmp|old)-[0-9a-f]{8}", p.name) for p in hidden)
    if after is None:  # between the two renames: the old adapter is whole, beside the target
        assert [_files(p) for p in hidden if ".old-" in p.name] == [old]


def test_lora_edu_never_pickles():
    """Safetensors and JSON only: no pickle, no torch.save, torch.load only with weights_only."""
    sources = sorted(Path(adapters.__file__).parent.rglob("*.py"))
    assert len(sources) > 10
    for path in sources:
        text = path.read_text(encoding="utf-8")
        code = "\n".join(line.split("#")[0] for line in text.splitlines())
        assert not re.search(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b", code, re.M), path
        assert "torch.save(" not in code and "allow_pickle=True" not in code, path
        for call in re.finditer(r"torch\.load\(", code):
            args = code[call.end() : code.find(")", call.end()) + 1]
            assert "weights_only=True" in args, f"{path}: torch.load without weights_only=True"


# --- quantize_4bit, dequantize_4bit, QuantState, Linear4bit ---------------------------------

BLOCKSIZES = "(32, 64, 128, 256, 512, 1024, 2048, 4096)"


def _w(shape=(4, 64), dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)


@pytest.mark.parametrize(
    "w, kwargs, error, words",
    [
        (_w(), {"blocksize": 16}, ValueError, ["blocksize", "got 16", BLOCKSIZES]),
        (_w(), {"blocksize": 0}, ValueError, ["got 0", BLOCKSIZES]),
        (_w(), {"blocksize": -64}, ValueError, ["got -64", BLOCKSIZES]),
        (_w(), {"blocksize": 64.0}, ValueError, ["got 64.0", BLOCKSIZES]),
        (_w(), {"blocksize": "64"}, ValueError, ["got '64'", BLOCKSIZES]),
        (_w(), {"blocksize": True}, ValueError, ["got True", BLOCKSIZES]),
        (_w(), {"blocksize": None}, ValueError, ["got None", BLOCKSIZES]),
        (_w(), {"quant_type": "NF4"}, ValueError, ["quant_type", "'NF4'", "'nf4' or 'fp4'"]),
        (_w(), {"quant_type": None}, ValueError, ["got None", "'nf4' or 'fp4'"]),
        (torch.ones(64, dtype=torch.bool), {}, ValueError, ["torch.bool", "float16, bfloat16"]),
        (torch.ones(64, dtype=torch.uint8), {}, ValueError, ["torch.uint8", "float32"]),
        (torch.ones(64, dtype=torch.complex64), {}, ValueError, ["complex64", "floating-point"]),
        ([0.5] * 64, {}, TypeError, ["torch.Tensor", "list"]),
        (torch.ones(0), {}, ValueError, ["empty", "(0,)"]),
        (torch.ones(3, 0), {}, ValueError, ["empty", "(3, 0)"]),
        (torch.tensor([1.0, -float("inf")] * 32), {}, ValueError, ["NaN or inf", "finite"]),
        (
            _w(dtype=torch.float16).index_fill(1, torch.tensor([5]), float("nan")),
            {},
            ValueError,
            ["NaN or inf", "finite"],
        ),  # fmt: skip
        (
            _w(dtype=torch.bfloat16).index_fill(0, torch.tensor([2]), float("inf")),
            {},
            ValueError,
            ["NaN or inf", "finite"],
        ),  # fmt: skip
    ],
)
def test_quantize_4bit_refuses_bad_input_naming_it_and_what_is_allowed(w, kwargs, error, words):
    before = w.clone() if isinstance(w, torch.Tensor) else list(w)
    _refuses(error, lambda: quantize_4bit(w, **kwargs), *words)
    if isinstance(w, torch.Tensor):  # untouched, bit for bit (NaN included)
        assert torch.equal(w.reshape(-1).view(torch.uint8), before.reshape(-1).view(torch.uint8))
    else:
        assert w == before


def test_bitsandbytes_accepts_exactly_the_blocksizes_lora_edu_accepts():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    accepted = []
    for blocksize in (16, 32, 48, 64, 128, 256, 512, 1024, 2048, 4096, 8192):
        try:
            bnbf.quantize_4bit(_w(), blocksize=blocksize)
            accepted.append(blocksize)
        except ValueError:
            pass
        try:
            quantize_4bit(_w(), blocksize=blocksize)
            assert blocksize in accepted
        except ValueError:
            assert blocksize not in accepted
    assert str(tuple(accepted)) == BLOCKSIZES


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_bitsandbytes_turns_a_nan_or_inf_block_into_nan_silently_so_lora_edu_refuses(bad):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    w = _w((2, 64))
    w[0, 3] = bad  # block 0 only
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    idx = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 15], 1).view(-1).long()
    values = state.code[idx].view(2, 64) * state.absmax[:, None]  # its codes, decoded here
    assert not torch.isfinite(state.absmax[0]) and torch.isfinite(state.absmax[1])
    assert torch.isnan(values[0]).sum() >= 63 and torch.isfinite(values[1]).all()
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_4bit(w, blocksize=64)


def test_bitsandbytes_returns_empty_codes_for_an_empty_tensor_lora_edu_refuses():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    packed, state = bnbf.quantize_4bit(torch.ones(0, 64), blocksize=64)
    assert packed.numel() == 0 and state.absmax.numel() == 0
    with pytest.raises(ValueError, match="empty"):
        quantize_4bit(torch.ones(0, 64))


def _state(shape=(8, 64), **kw):
    return quantize_4bit(_w(shape), **kw)


@pytest.mark.parametrize(
    "codes, state, error, words",
    [
        (_state((8, 64))[0], _state((8, 66))[1], ValueError, ["528 codes need 264", "another"]),
        (_state((8, 64))[0][:-1], _state((8, 64))[1], ValueError, ["255 bytes", "need 256"]),
        (_state()[0].view(torch.int8), _state()[1], ValueError, ["uint8", "torch.int8"]),
        (_state()[0].float(), _state()[1], ValueError, ["uint8", "torch.float32"]),
        (_state()[0], {"shape": (8, 64)}, TypeError, ["QuantState", "dict"]),
        (_state()[0], None, TypeError, ["QuantState", "NoneType"]),
    ],
)
def test_dequantize_with_codes_that_do_not_fit_the_state_is_refused(codes, state, error, words):
    _refuses(error, lambda: dequantize_4bit(codes, state), *words)


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"quant_type": "nf5"}, ["quant_type", "'nf5'", "'nf4' or 'fp4'"]),
        ({"blocksize": 48}, ["blocksize", "got 48", BLOCKSIZES]),
        ({"shape": (8, 65)}, ["absmax values do not fit", "(8, 65)"]),
        ({"absmax": torch.zeros(8, dtype=torch.uint8)}, ["exactly when offset", "torch.uint8"]),
    ],
)
def test_a_quant_state_that_does_not_fit_its_absmax_is_refused(changes, words):
    state = _state()[1]
    fields = {k: getattr(state, k) for k in ("absmax", "shape", "dtype", "blocksize")}
    fields.update(quant_type=state.quant_type, code=state.code)
    _refuses(ValueError, lambda: QuantState(**{**fields, **changes}), *words)


def test_linear4bit_refuses_codes_of_another_tensor_and_a_non_2d_state():
    packed, state = _state((8, 64))
    other = _state((4, 64))[1]
    _refuses(ValueError, lambda: Linear4bit(packed, other), "256 codes need 128", "another")
    flat_packed, flat = quantize_4bit(_w((512,)))
    _refuses(ValueError, lambda: Linear4bit(flat_packed, flat), "2-D (out, in)", "(512,)")
