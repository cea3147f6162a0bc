"""Reading HF config.json files: 4.x and 5.x keys, the families, and refusals."""

import pytest

from svdsparse_jax.config import ModelConfig, from_hf_config, named_config
from svdsparse_jax.errors import SvdsparseError

BASE = dict(model_type="llama", vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, hidden_act="relu")


def test_transformers_4_and_5_rope_keys_agree():
    v4 = from_hf_config({**BASE, "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}})
    v5 = from_hf_config({**BASE, "rope_parameters": {"rope_theta": 5e5, "rope_type": "linear", "factor": 2.0}})
    assert v4 == v5 and v4.rope_theta == 5e5 and v4.rope_scale == 2.0


def test_families():
    q = from_hf_config({**BASE, "model_type": "qwen2", "num_key_value_heads": 2, "tie_word_embeddings": True})
    assert q.qkv_bias and not q.o_bias and q.tie_embeddings and q.n_kv_heads == 2 and q.head_dim == 16
    m = from_hf_config({**BASE, "model_type": "mistral", "sliding_window": 32, "max_position_embeddings": 128})
    assert m.sliding_window == 32
    p = from_hf_config({**BASE, "model_type": "sparsellama", "hidden_act": "fatrelu", "hidden_act_param": 0.01,
                        "eos_token_id": [2, 3]})
    assert p.activation == "fatrelu" and p.act_threshold == 0.01 and p.eos_ids == (2, 3)
    d = from_hf_config(BASE, activation="drelu")
    assert d.activation == "drelu"


def test_refusals():
    with pytest.raises(SvdsparseError, match="supports.*relu.*dense_only"):
        from_hf_config({**BASE, "hidden_act": "silu"})
    assert from_hf_config({**BASE, "hidden_act": "silu"}, dense_only=True).activation == "silu"
    with pytest.raises(SvdsparseError, match="gelu_new.*not supported"):
        from_hf_config({**BASE, "hidden_act": "gelu_new"}, dense_only=True)
    with pytest.raises(SvdsparseError, match="model_type 'gpt2'"):
        from_hf_config({**BASE, "model_type": "gpt2"})
    with pytest.raises(SvdsparseError, match="rope_type 'yarn'"):
        from_hf_config({**BASE, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}})
    with pytest.raises(SvdsparseError, match="missing keys \\['intermediate_size'\\]"):
        from_hf_config({k: v for k, v in BASE.items() if k != "intermediate_size"})


def test_config_is_hashable_and_round_trips():
    cfg = named_config("llama2-7b")
    assert hash(cfg) == hash(ModelConfig.from_dict(cfg.to_dict()))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
