"""Conversion: round trip, sharded checkpoints, and bad inputs that must fail cleanly with no output left."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from checkpoints import make_hf_checkpoint
from svdsparse_jax.checkpoint import load_model
from svdsparse_jax.convert import convert
from svdsparse_jax.converted import read_converted
from svdsparse_jax.hf_checkpoint import read_hf_weights
from svdsparse_jax.config import read_hf_config
from svdsparse_jax.errors import SvdsparseError
from svdsparse_jax.weights import FUSED, module_shapes


def weights_equal(a: dict, b: dict) -> bool:
    """True when both hold the same paths with identical dtypes and values."""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


def _no_output(out):
    return not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial")]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_round_trip_identical(tmp_path, dtype, seed):
    ckpt = make_hf_checkpoint(tmp_path / "hf", "qwen2_tied", seed=seed)
    cfg = read_hf_config(ckpt.path)
    direct = read_hf_weights(ckpt.path, cfg, dtype)
    out = convert(ckpt.path, tmp_path / "out", dtype)
    cfg2, loaded = read_converted(out)
    assert cfg2 == cfg and weights_equal(direct, loaded)
    assert {p.name for p in out.iterdir()} >= {"svdsparse.json", "config.json", "params"}
    # the down projection is stored transposed, every other tensor as in the checkpoint
    sd = ckpt.torch_model.state_dict()
    np.testing.assert_array_equal(np.asarray(loaded[("layers", 1, "ffn", "w_down_t")], np.float32),
                                  np.asarray(jnp.asarray(sd["model.layers.1.mlp.down_proj.weight"].numpy().T, dtype),
                                             np.float32))
    lm = load_model(out, jnp.float32)  # a converted dir loads, cast on request
    assert all(w.dtype == jnp.float32 for w in lm.weights.values())


def test_sharded_checkpoint_and_missing_shard(tmp_path, seed):
    ckpt = make_hf_checkpoint(tmp_path / "hf", "llama_relu", seed=seed)
    ckpt.torch_model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    shards = sorted((tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 1
    cfg = read_hf_config(ckpt.path)
    assert weights_equal(read_hf_weights(tmp_path / "sharded", cfg, jnp.float32),
                         read_hf_weights(ckpt.path, cfg, jnp.float32))
    shards[1].unlink()
    with pytest.raises(SvdsparseError, match=f"missing: .*{shards[1].name}"):
        convert(tmp_path / "sharded", tmp_path / "out")
    assert _no_output(tmp_path / "out")


def test_misshapen_missing_and_extra_tensors_named_in_one_error(tmp_path, seed):
    ckpt = make_hf_checkpoint(tmp_path / "hf", "llama_relu", seed=seed)
    path = ckpt.path / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"][:, :-1].copy()
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    tensors["model.layers.0.mlp.extra.weight"] = np.zeros(3, np.float32)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(SvdsparseError) as err:
        convert(ckpt.path, tmp_path / "out")
    msg = str(err.value)
    assert "model.layers.0.mlp.up_proj.weight: (128, 63) (expected (128, 64))" in msg
    assert "model.layers.1.self_attn.k_proj.weight" in msg and "model.layers.0.mlp.extra.weight" in msg
    assert _no_output(tmp_path / "out")


def test_silu_refused_unless_dense_only(tmp_path, seed):
    ckpt = make_hf_checkpoint(tmp_path / "hf", "llama_relu", seed=seed)
    cfg_path = ckpt.path / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "hidden_act": "silu"}))
    with pytest.raises(SvdsparseError, match=r"silu.*\['relu', 'fatrelu', 'drelu'\].*dense_only"):
        convert(ckpt.path, tmp_path / "out")
    assert _no_output(tmp_path / "out")
    assert convert(ckpt.path, tmp_path / "dense", dense_only=True).is_dir()


def test_bin_checkpoint_with_flag(tmp_path, seed):
    import shutil
    import torch
    ckpt = make_hf_checkpoint(tmp_path / "hf", "llama_relu", seed=seed)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(ckpt.path / "config.json", bin_dir / "config.json")
    torch.save(ckpt.torch_model.state_dict(), bin_dir / "pytorch_model.bin")
    with pytest.raises(SvdsparseError, match="allow_pickle"):
        convert(bin_dir, tmp_path / "out")
    assert _no_output(tmp_path / "out")
    cfg = read_hf_config(ckpt.path)
    assert weights_equal(read_hf_weights(bin_dir, cfg, jnp.float32, allow_pickle=True),
                         read_hf_weights(ckpt.path, cfg, jnp.float32))


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch, seed):
    ckpt = make_hf_checkpoint(tmp_path / "hf", "llama_relu", seed=seed)

    def boom(*a, **k):
        raise KeyboardInterrupt

    import shutil
    monkeypatch.setattr(shutil, "copy2", boom)  # the config's copy fails after the params were written
    with pytest.raises(KeyboardInterrupt):
        convert(ckpt.path, tmp_path / "out")
    assert _no_output(tmp_path / "out")


def test_existing_output_refused(tmp_path, seed):
    ckpt = make_hf_checkpoint(tmp_path / "hf", "llama_relu", seed=seed)
    (tmp_path / "out").mkdir()
    with pytest.raises(SvdsparseError, match="already exists"):
        convert(ckpt.path, tmp_path / "out")


def test_spec_paths_are_the_model_state(tmp_path, seed):
    """The weight table and the NNX module tree describe the same arrays, with the same shapes (q/k/v held as
    one concatenated matrix, as weights.FUSED says), and the fused matrix is the specs' tensors in order."""
    from flax import nnx
    from svdsparse_jax.model import Transformer
    ckpt = make_hf_checkpoint(tmp_path / "hf", "qwen2_tied", seed=seed)
    lm = load_model(ckpt.path, jnp.float32)
    state = nnx.state(Transformer(lm.cfg, lm.weights), nnx.Param)
    leaves = {tuple(k.key if hasattr(k, "key") else k.idx for k in path): v.shape
              for path, v in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0]}
    assert leaves == module_shapes(lm.cfg)
    model = Transformer(lm.cfg, lm.weights)
    for name, parts in FUSED.items():
        fused = getattr(model.layers[1].attn, name)[...]
        np.testing.assert_array_equal(fused, np.concatenate([lm.weights[("layers", 1, "attn", p)] for p in parts]))
