"""The tiny LLaMA: same module names and, with the same weights, the same logits as transformers'."""

import pytest
import torch

from lora_edu.experiments import SequenceTask, evaluate, load_pretrained_llama
from lora_edu.experiments.llama import LlamaConfig, TinyLlama

transformers = pytest.importorskip("transformers")


def _hf_twin(cfg: LlamaConfig):
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
    )
    return transformers.LlamaForCausalLM(hf_cfg).eval()


def test_tiny_llama_matches_transformers_llama_with_the_same_weights():
    torch.manual_seed(0)
    ours = TinyLlama().eval()
    hf = _hf_twin(ours.config)
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    ids = torch.randint(0, ours.config.vocab_size, (3, 25))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_grouped_query_projections_are_not_square():
    model = TinyLlama()
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (64, 64)
    assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (32, 64)
    assert model.get_output_embeddings() is model.lm_head


def test_stored_llama_base_copies_but_cannot_reverse_or_shift():
    model = load_pretrained_llama()
    assert evaluate(model, SequenceTask("copy"), n=512) < 0.01
    assert evaluate(model, SequenceTask("reverse"), n=512) > 1.0
    assert evaluate(model, SequenceTask("shift"), n=512) > 1.0


def test_sequence_tasks_have_the_answer_after_the_separator():
    task = SequenceTask("reverse", n=4)
    seq = task.sample(2, torch.Generator().manual_seed(0))
    assert seq.shape == (2, 9) and (seq[:, 4] == 32).all()
    assert torch.equal(seq[:, 5:], seq[:, :4].flip(-1))
    with pytest.raises(ValueError, match="copy.*reverse.*shift"):
        SequenceTask("sort")
