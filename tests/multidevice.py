"""Run in a subprocess by test_sharding.py, with `--xla_force_host_platform_device_count` set before JAX starts:
for a tiny checkpoint of a family, the logits and greedy tokens of the unsharded model and of the model placed on
meshes of the given sizes, dense and with every layer sparse; the layout of the fused q/k/v matrix on the devices
and the collectives of the compiled forward pass. Prints one JSON object."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import sys
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from checkpoints import make_hf_checkpoint  # the script's own directory is on sys.path
from pallas_kernels.tuning import GemvTile, ProjectionRule
from svdsparse_jax import kv_cache
from svdsparse_jax.convert import load_model
from svdsparse_jax.engine import EngineConfig
from svdsparse_jax.generate import Generator
from svdsparse_jax.model import Transformer
from svdsparse_jax.predictors import LowRankPredictor
from svdsparse_jax.sharding import make_mesh, shard_predictors


@jax.jit
def _logits(model, tokens, preds):
    cache = kv_cache.init_cache(model.cfg, jnp.zeros(tokens.shape[0], jnp.int32), tokens.shape[1], model.dtype)
    states, _ = model(tokens, cache, jnp.int32(0), preds)
    return model.logits(states)


def collectives(model, tokens, preds) -> dict[str, int]:
    """The collectives in the compiled program of one forward pass and its logits, by kind."""
    text = _logits.lower(model, tokens, preds).compile().as_text()
    return dict(Counter(re.findall(r"= \S+ (all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)"
                                   r"(?:-start)?\(", text)))


def qkv_blocks_are_heads(model, weights, cfg, n: int) -> bool:
    """Whether each device's rows of layer 0's fused q/k/v matrix are exactly its own query heads' rows of wq
    and the rows of wk and wv of the KV heads they read (its share, or all where KV heads are replicated)."""
    fused = model.layers[0].attn.wqkv[...]
    q, k, v = (np.asarray(weights[("layers", 0, "attn", name)]) for name in ("wq", "wk", "wv"))
    qr, kr = cfg.q_dim // n, (cfg.kv_dim // n if cfg.n_kv_heads % n == 0 else cfg.kv_dim)
    ok = len(fused.addressable_shards) == n
    for shard in fused.addressable_shards:
        i = (shard.index[0].start or 0) // (qr + 2 * kr)
        j = i if kr < cfg.kv_dim else 0
        want = np.concatenate([q[i * qr:(i + 1) * qr], k[j * kr:(j + 1) * kr], v[j * kr:(j + 1) * kr]])
        ok &= np.array_equal(np.asarray(shard.data), want)
    return bool(ok)


def main(family: str, out_dir: str, seed: int, sizes: list[int]) -> dict:
    ckpt = make_hf_checkpoint(Path(out_dir) / family, family, seed=seed)
    lm = load_model(ckpt.path, jnp.float32)
    cfg = lm.cfg
    rng = np.random.default_rng(seed)
    preds = [LowRankPredictor(jnp.asarray(rng.standard_normal((8, cfg.d_model)) / np.sqrt(cfg.d_model), jnp.float32),
                              jnp.asarray(rng.standard_normal((cfg.d_ff, 8)), jnp.float32),
                              jnp.zeros(cfg.d_ff, jnp.float32)) for _ in range(cfg.n_layers)]
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (3, 12)), jnp.int32)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (3, 9, 6)]
    base = EngineConfig(ffn_policy="sparse")
    model = Transformer(cfg, lm.weights, base)
    want = {mode: np.asarray(_logits(model, tokens, p), np.float64) for mode, p in (("dense", None), ("sparse", preds))}
    want_tokens = {mode: Generator(model, p).generate(prompts, 12).tokens
                   for mode, p in (("dense", None), ("sparse", preds))}
    out = {"devices": len(jax.devices()), "layers": cfg.n_layers, "runs": []}
    for n in sizes:
        mesh = make_mesh(n)
        engine = EngineConfig(ffn_policy="sparse", mesh=mesh)
        sharded = Transformer(cfg, lm.weights, engine)  # placed on the mesh
        placed = shard_predictors(preds, mesh, cfg.d_ff)
        ffn = sharded.layers[0].ffn.w_gate[...]
        run = {"n": n, "w_gate_shards": len(ffn.addressable_shards),
               "w_gate_shard_rows": ffn.addressable_shards[0].data.shape[0]}
        run["qkv_blocks_are_heads"] = qkv_blocks_are_heads(sharded, lm.weights, cfg, n)
        run["collectives"] = {mode: collectives(sharded, tokens[:, :1], p) for mode, p in (("dense", None),
                                                                                          ("sparse", placed))}
        for mode, p in (("dense", None), ("sparse", placed)):
            got = np.asarray(_logits(sharded, tokens, p), np.float64)
            run[f"{mode}_rel_err"] = float(np.linalg.norm(got - want[mode]) / np.linalg.norm(want[mode]))
            gen = Generator(Transformer(cfg, lm.weights, engine), None if p is None else preds)
            run[f"{mode}_tokens_equal"] = gen.generate(prompts, 12).tokens == want_tokens[mode]
        # the kernels (interpreted) per shard, at decode sizes: the GEMV for every split product (gate and up as
        # two), the fused add + norm, and the guarded FFN's kernels (the mma kernels for 3 sequences, the stream
        # kernel for one)
        kernels = EngineConfig(backend="interpret", ffn_policy="sparse", mesh=mesh, gate_up_tile=None,
                               projections=(ProjectionRule(8, 0, "gemv", ("float32",)),))
        step = tokens[:, :1]
        for (mode, p), rows in itertools.product((("dense", None), ("sparse", placed)), (3, 1)):
            want_step = np.asarray(_logits(model, step[:rows], None if p is None else preds), np.float64)
            got = np.asarray(_logits(Transformer(cfg, lm.weights, kernels), step[:rows], p), np.float64)
            run[f"kernels_{mode}_{rows}_rel_err"] = float(np.linalg.norm(got - want_step) / np.linalg.norm(want_step))
        # the dense FFN's gate and up as one kernel per shard (`engine.gate_up`)
        one_pass = dataclasses.replace(kernels, gate_up_tile=GemvTile(rows=2, cap=4096, num_warps=8))
        for rows in (3, 1):
            want_step = np.asarray(_logits(model, step[:rows], None), np.float64)
            got = np.asarray(_logits(Transformer(cfg, lm.weights, one_pass), step[:rows], None), np.float64)
            run[f"gate_up_dense_{rows}_rel_err"] = float(np.linalg.norm(got - want_step) / np.linalg.norm(want_step))
        gen = Generator(Transformer(cfg, lm.weights, kernels), preds)
        run["kernels_tokens_equal"] = gen.generate(prompts, 6).tokens == [t[:6] for t in want_tokens["sparse"]]
        out["runs"].append(run)
    return out


def round_trip(family: str, out_dir: str, seed: int, sizes: list[int]) -> dict:
    """Conversion, then loading the converted and the HF directory onto meshes: per mesh size, whether every
    tensor has its table sharding (`spec_shardings`), no tensor is whole on one device where it is split, and
    every value equals the unsharded load exactly."""
    from svdsparse_jax.convert import convert
    from svdsparse_jax.sharding import spec_shardings
    ckpt = make_hf_checkpoint(Path(out_dir) / family, family, seed=seed)
    converted = convert(ckpt.path, Path(out_dir) / "converted", jnp.float32)
    want = load_model(converted).weights
    out = {"runs": []}
    for n in sizes:
        mesh = make_mesh(n)
        for source in (converted, ckpt.path):
            lm = load_model(source, jnp.float32, mesh=mesh)
            placed = spec_shardings(lm.cfg, mesh)
            out["runs"].append({
                "n": n, "source": "converted" if source == converted else "hf",
                "shardings": all(lm.weights[k].sharding == placed[k] for k in want),
                "split_tensors": sum(len({s.data.shape for s in lm.weights[k].addressable_shards}) == 1
                                     and lm.weights[k].addressable_shards[0].data.shape != lm.weights[k].shape
                                     for k in want),
                "equal": all(np.array_equal(np.asarray(lm.weights[k]), np.asarray(want[k])) for k in want)})
    return out


if __name__ == "__main__":
    mode, family, out_dir, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    sizes = [int(v) for v in sys.argv[5:]]
    print(json.dumps((main if mode == "decode" else round_trip)(family, out_dir, seed, sizes)))
