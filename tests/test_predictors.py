"""Baselines, the guarded FFN, calibration statistics, the build pipeline and predictor storage."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from svdsparse_jax import kv_cache
from svdsparse_jax.calibration import layer_statistics
from svdsparse_jax.config import named_config
from svdsparse_jax.errors import SvdsparseError
from svdsparse_jax.model import Transformer
from svdsparse_jax.predictors import (BuildConfig, LowRankPredictor, OraclePredictor, build_predictors,
                                      load_predictors, save_predictors)
from svdsparse_jax.predictors.base import SignBitPredictor, pack_signs
from svdsparse_jax.predictors.baselines import mlp_predictor, signbit_predictor
from svdsparse_jax.predictors.thresholds import GRID, Target
from svdsparse_jax.weights import init_weights, model_fingerprint

CFG = named_config("tiny", activation="fatrelu", act_threshold=0.02, max_seq_len=128, vocab_size=64)


def _init(seed: int) -> dict:
    return init_weights(CFG, jax.random.key(seed), jnp.float32, std=0.2)


def _model(seed: int):
    return Transformer(CFG, _init(seed))


def test_fingerprint_covers_every_weight(seed, rng):
    """Changing one value of any weight (not only the embedding and W_gate the old fingerprint sampled) changes
    the fingerprint; the same model in bf16, f16 or f32 keeps it (values rounded to bf16)."""
    weights = {k: v.astype(jnp.bfloat16).astype(jnp.float32) for k, v in _init(seed).items()}
    fp = model_fingerprint(CFG, weights)
    assert fp.startswith("w3-")
    for dtype in (jnp.bfloat16, jnp.float16):
        assert model_fingerprint(CFG, {k: v.astype(dtype) for k, v in weights.items()}) == fp
    # f32 weights and their bf16 conversion, values just below 2^-14 that bf16 rounds up to it included
    f32 = {k: v * (1 + 2.0 ** -12) for k, v in _init(seed).items()}
    path = next(iter(f32))
    f32[path] = f32[path].at[0, 0].set(2.0 ** -14 * (1 - 2.0 ** -10))
    assert jnp.abs(f32[path][0, 0].astype(jnp.bfloat16)) == 2.0 ** -14  # rounds up to f16's normal range
    assert model_fingerprint(CFG, f32) == model_fingerprint(CFG, {k: v.astype(jnp.bfloat16) for k, v in f32.items()})
    for path in weights:
        w = np.asarray(weights[path]).copy()
        i = tuple(int(rng.integers(0, n)) for n in w.shape)
        w[i] = w[i] + 0.5 * (abs(w[i]) + 1.0)  # a change bf16 rounding keeps
        assert model_fingerprint(CFG, {**weights, path: jnp.asarray(w)}) != fp, path


@pytest.mark.parametrize("rows", [3, 40])  # the popcount path (decode) and the +-1 matmul path (batches)
def test_sign_bits_count_negative_products(rows, rng):
    w, x = rng.normal(size=(50, 70)), rng.normal(size=(rows, 70))
    x[:, :3] = 0.0  # zero counts as positive on both sides
    p = SignBitPredictor(pack_signs(jnp.asarray(w)), jnp.int32(1), jnp.int32(1), 70)
    n_neg, n_pos = p.counts(jnp.asarray(x))
    ref = ((w[None] < 0) != (x[:, None] < 0)).sum(-1)
    np.testing.assert_array_equal(np.asarray(n_neg), ref)
    np.testing.assert_array_equal(np.asarray(n_pos), 70 - ref)


def test_sign_bit_alpha_meets_its_targets(rng):
    w, x = rng.normal(size=(50, 70)), rng.normal(size=(40, 70))
    ref = ((w[None] < 0) != (x[:, None] < 0)).sum(-1)
    fitted = signbit_predictor(jnp.asarray(w), jnp.asarray(x), jnp.ones((40, 50), bool), Target("sparsity", 0.6))
    # the rule in exact integers: inactive iff N_neg * den > num * N_pos
    inactive = ref * int(fitted.alpha_den) > int(fitted.alpha_num) * (70 - ref)
    np.testing.assert_array_equal(~np.asarray(fitted.predict(jnp.asarray(x))), inactive)
    assert 0.6 <= inactive.mean() < 0.7  # at least the target, without skipping a tie group
    active = rng.random((40, 50)) < 0.3
    fitted = signbit_predictor(jnp.asarray(w), jnp.asarray(x), jnp.asarray(active), Target("recall", 0.9))
    kept = np.asarray(fitted.predict(jnp.asarray(x)))[active].mean()
    assert 0.9 <= kept < 0.97


def test_mlp_learns_the_labels(rng):
    x = rng.normal(size=(2048, 16)).astype(np.float32)
    w = rng.normal(size=(32, 4)) @ rng.normal(size=(4, 16)) / 2  # labels a rank-8 ReLU MLP can represent
    labels = x @ w.T > 1.0
    p = mlp_predictor(jnp.asarray(x), jnp.asarray(labels), 8, steps=1000, dtype=jnp.float32)
    accuracy = np.mean(np.asarray(p.scores(jnp.asarray(x)) > 0) == labels)
    assert accuracy > 0.9


def test_guarded_ffn_equals_dense_when_all_active_and_zero_when_none(seed, rng):
    """Through the block as decode runs it: a predictor that keeps every neuron (or the oracle) gives the dense
    layer exactly; one that keeps none leaves only the attention's residual."""
    model = _model(seed)
    block = model.layers[0]
    x = jnp.asarray(rng.normal(size=(1, 5, CFG.d_model)), model.dtype)
    cache = jnp.zeros((1, CFG.n_kv_heads, 5, CFG.head_dim), model.dtype)
    pad, start = jnp.zeros(1, jnp.int32), jnp.int32(0)
    args = (cache, cache, start, kv_cache.positions(pad, start, 5), kv_cache.attention_bias(CFG, pad, start, 5, 5))
    dense = np.asarray(block(x, *args)[0])
    r = 4
    everything = LowRankPredictor(jnp.zeros((r, CFG.d_model)), jnp.zeros((CFG.d_ff, r)), jnp.ones(CFG.d_ff))
    nothing = dataclasses.replace(everything, bias=-jnp.ones(CFG.d_ff))
    np.testing.assert_array_equal(np.asarray(block(x, *args, everything)[0]), dense)
    residual, _, _, trace = block(x, *args, nothing)
    np.testing.assert_array_equal(np.asarray(trace.candidates.as_mask()), False)
    np.testing.assert_array_equal(np.asarray(residual + block.ffn(trace.inputs)), dense)
    oracle = OraclePredictor(CFG.act_threshold)
    np.testing.assert_array_equal(np.asarray(block(x, *args, oracle)[0]), dense)


def test_layer_statistics_match_a_full_forward(seed, rng):
    model = _model(seed)
    windows = rng.integers(0, CFG.vocab_size, (4, 32))
    cache = kv_cache.init_cache(CFG, jnp.zeros(2, jnp.int32), 32, jnp.float32)
    _, _, stats = model.forward_with_stats(jnp.asarray(windows[2:], jnp.int32), cache, jnp.int32(0))
    for st in layer_statistics(model, windows):
        np.testing.assert_allclose(np.asarray(st.h2), np.asarray(stats[st.layer].hidden).reshape(-1, CFG.d_ff),
                                   rtol=1e-4, atol=1e-5)
        assert rel_err(st.x2, np.asarray(stats[st.layer].inputs).reshape(-1, CFG.d_model)) <= 1e-5
        x1 = np.asarray(st.x1, np.float64)
        np.testing.assert_allclose(np.asarray(st.gram), x1.T @ x1, rtol=1e-4, atol=1e-4)
        norms = np.linalg.norm(np.asarray(model.layers[st.layer].ffn.w_down_t[...]), axis=1)
        np.testing.assert_allclose(np.asarray(st.down_norms), norms, rtol=1e-5)


@pytest.mark.parametrize("method", ["whitened", "plain", "signbit", "mlp", "oracle"])
def test_build_reaches_the_targets_on_the_calibration_half(method, seed, rng):
    """Without the guard every method reaches its target; with the default 1% guard a layer stops short only
    where the guard fired (more than 1% of its neurons switched off on every calibration token)."""
    model = _model(seed)
    tokens = rng.integers(0, CFG.vocab_size, 4096)
    for guard in (1.0, BuildConfig.guard):
        bc = BuildConfig(method=method, ranks=16, rule="sparsity", value=0.3, tokens=4096, window=128,
                         mlp_steps=300, seed=seed, guard=guard)
        ps = build_predictors(model, tokens, bc, progress=False)
        assert len(ps.layers) == CFG.n_layers
        for info in ps.info:
            if method == "oracle":
                assert info["calib_recall"] == 1.0 and info["neurons_off"] == 0
                continue
            guard_fired = method != "signbit" and info["neurons_off"] > guard * CFG.d_ff  # signbit has no guard
            assert info["target_met"] or guard_fired, (guard, info)
            if info["target_met"] and method == "signbit":  # integer counts: the target is met up to one tie group
                assert 0.3 <= info["calib_predicted_sparsity"] < 0.4
            elif info["target_met"]:  # short by less than one grid step of one neuron (n / GRID tokens): equal
                # scores at a cut stay on together (identical inputs, a token id opening several windows, tie
                # exactly: seed 657663186 had 3-way ties at the cuts of 3 neurons, 2 of 524288 pairs short)
                n = bc.tokens // 2
                assert info["calib_predicted_sparsity"] > 0.3 - (n // GRID) / (n * CFG.d_ff)
            else:
                assert info["calib_predicted_sparsity"] < 0.3


def test_rank_search_keeps_the_rank_that_reads_the_fewest_bytes(tmp_path, seed, rng):
    """Each layer of a rank-searched build is the fixed-rank build at the rank whose decode reads the fewest bytes,
    counted here from the fixed builds' tensors and batch-1 row fractions; the set stores and loads with its
    per-layer ranks."""
    model = _model(seed)
    tokens = rng.integers(0, CFG.vocab_size, 4096)
    search = (4, 8, 16)
    common = dict(method="whitened", rule="recall", value=0.95, tokens=4096, window=128, seed=seed)
    fixed = {r: build_predictors(model, tokens, BuildConfig(ranks=r, **common), progress=False) for r in search}
    ps = build_predictors(model, tokens, BuildConfig(rank_search=search, **common), progress=False)
    itemsize = model.dtype.itemsize
    for i, (pred, info) in enumerate(zip(ps.layers, ps.info)):
        want = {}
        for r, f in fixed.items():
            tensors = (f.layers[i].a, f.layers[i].b, f.layers[i].bias)
            rows = f.union.candidates[0][i] + 2 * f.union.active[0][i]  # batch 1: W_gate, then W_up and W_down
            want[r] = sum(t.size for t in tensors) * itemsize + rows * CFG.d_ff * CFG.d_model * itemsize
        got = {int(r): b for r, b in info["decode_bytes"].items()}
        assert got.keys() == want.keys()
        for r in search:
            assert abs(got[r] - want[r]) <= 1e-3 * want[r], (i, r, got, want)
        assert info["rank"] == pred.rank == min(search, key=lambda r: (got[r], r))
        chosen = fixed[pred.rank].layers[i]
        np.testing.assert_allclose(np.asarray(pred.a), np.asarray(chosen.a), rtol=1e-4, atol=1e-5)
        assert info["calib_recall"] >= 0.95 - 1e-3
    assert ps.config["ranks"] == [p.rank for p in ps.layers] and ps.config["rank_search"] == list(search)
    fp = model_fingerprint(CFG, _init(seed))
    save_predictors(tmp_path / "searched", ps, CFG, fp)
    loaded = load_predictors(tmp_path / "searched", CFG, fp)
    assert [p.rank for p in loaded.layers] == [p.rank for p in ps.layers]
    for bad in (dict(rule="sparsity", value=0.3), dict(rule="s", value=0.6), dict(method="mlp")):
        with pytest.raises(SvdsparseError, match="rank_search: needs method whitened or plain and rule recall"):
            BuildConfig(rank_search=search, **(common | bad))
    with pytest.raises(SvdsparseError, match="rank_search=.*ascending"):
        BuildConfig(rank_search=(8, 4), **common)


def test_store_round_trip_and_refusals(tmp_path, seed, rng):
    model = _model(seed)
    fp = model_fingerprint(CFG, _init(seed))
    for method in ("whitened", "mlp", "signbit", "oracle"):
        bc = BuildConfig(method=method, ranks=8, rule="s", value=0.6, tokens=4096, window=128, mlp_steps=20,
                         seed=seed)
        ps = build_predictors(model, rng.integers(0, CFG.vocab_size, 4096), bc, progress=False)
        save_predictors(tmp_path / method, ps, CFG, fp)
        loaded = load_predictors(tmp_path / method, CFG, fp)
        assert loaded.method == method and loaded.config == json_round(ps.config)
        for a, b in zip(ps.layers, loaded.layers):
            la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
            assert type(a) is type(b) and len(la) == len(lb)
            assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))
    with pytest.raises(SvdsparseError, match="another checkpoint, or its weights or config differ"):
        load_predictors(tmp_path / "whitened", CFG, model_fingerprint(CFG, _init(seed + 1)))
    overridden = dataclasses.replace(CFG, activation="fatrelu", act_threshold=0.25)
    with pytest.raises(SvdsparseError, match="check --activation / --act-threshold"):
        load_predictors(tmp_path / "whitened", overridden, model_fingerprint(overridden, _init(seed)))
    manifest = tmp_path / "whitened" / "manifest.json"  # a set from before the fingerprint hashed every weight
    old = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**old, "fingerprint": "0123456789abcdef0123456789abcdef"}))
    with pytest.raises(SvdsparseError, match="older model fingerprint.*rebuild"):
        load_predictors(tmp_path / "whitened", CFG, fp)
    manifest.write_text(json.dumps(old))
    with pytest.raises(SvdsparseError, match=r"\(layers, d_model, d_ff\)"):
        load_predictors(tmp_path / "whitened", dataclasses.replace(CFG, n_layers=3), None)
    with pytest.raises(SvdsparseError, match="already exists"):
        save_predictors(tmp_path / "whitened", ps, CFG, fp)
    from safetensors.numpy import load_file, save_file
    path = tmp_path / "whitened" / "predictors.safetensors"
    tensors = load_file(path)
    del tensors["layers.1.b"]
    save_file(tensors, path)
    with pytest.raises(SvdsparseError, match="is not the tensor file this manifest was written with"):
        load_predictors(tmp_path / "whitened", CFG, fp)
    from svdsparse_jax.predictors.store import file_sha256
    manifest.write_text(json.dumps({**old, "tensors_sha256": file_sha256(path)}))  # a manifest made to match
    with pytest.raises(SvdsparseError, match="layers.1.b is missing"):
        load_predictors(tmp_path / "whitened", CFG, fp)


def _weights(model):
    from flax import nnx
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {tuple(k.key for k in path): v for path, v in jax.tree_util.tree_flatten_with_path(state)[0]}


def json_round(d):
    import json
    return json.loads(json.dumps(d))


def test_predictor_format_imports_nothing_heavy():
    """Reading predictor directories (what the torch executor imports) loads no model, calibration, engine or
    kernels: the format's modules are leaves."""
    import subprocess
    import sys

    code = ("import sys, torch_npu_bridge.factors, svdsparse_jax.predictors.store; "
            "print(' '.join(m for m in ('svdsparse_jax.model', 'svdsparse_jax.calibration', 'svdsparse_jax.engine', "
            "'svdsparse_jax.predictors.build', 'pallas_kernels.gemv', 'pallas_kernels.compaction', 'flax') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
