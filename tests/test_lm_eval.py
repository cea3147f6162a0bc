"""The lm-evaluation-harness model `svdsparse`: its log-likelihoods equal `svdsparse score` on the same tokens
(context + continuation, and rolling over a text longer than the context); dense and all-active predictors give
the same results through lm-eval's own evaluator on two local tasks; real predictors change them a little."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

from scripts.bench.lm_eval_tasks import GEN_TASK, MC_TASK, write_tasks
from svdsparse_jax.assets import BUNDLED_MODEL, corpus_split
from svdsparse_jax.cli import main
from svdsparse_jax.convert import load_model
from svdsparse_jax.errors import SvdsparseError
from svdsparse_jax.lm_eval_model import SvdsparseLM
from svdsparse_jax.model import Transformer
from svdsparse_jax.predictors import BuildConfig, PredictorSet, build_predictors, save_predictors


def requests(kind: str, args: list[tuple]) -> list:
    from lm_eval.api.instance import Instance
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@pytest.fixture(scope="module")
def predictor_dirs(tmp_path_factory):
    """Whitened predictors of the bundled model (f32), and the same with every neuron always a candidate."""
    lm = load_model(BUNDLED_MODEL, jnp.float32)
    pset = build_predictors(Transformer(lm.cfg, lm.weights), corpus_split("calib"),
                            BuildConfig(ranks=64, value=0.7, tokens=4096), progress=False)
    root = tmp_path_factory.mktemp("lm_eval")
    save_predictors(root / "real", pset, lm.cfg, lm.fingerprint)
    everything = [dataclasses.replace(p, bias=jnp.full_like(p.bias, jnp.inf)) for p in pset.layers]
    save_predictors(root / "all", PredictorSet("whitened", everything, pset.config, [], {}, pset.union), lm.cfg,
                    lm.fingerprint)
    return root


@pytest.fixture(scope="module")
def dense():
    return SvdsparseLM(dtype="float32", batch_size=4, kernels="xla")


@pytest.fixture(scope="module")
def relu():
    """The bundled model with its FATReLU threshold at 0 (plain ReLU): the two scoring paths run the same sums in
    different shapes (padded batches, one sequence), and at a threshold t > 0 a gate that rounds across t in one
    of them jumps by t * up: one such neuron moved a continuation's log-likelihood by 2e-3 (base seed 1171124537).
    At 0 the activation is continuous, so the paths agree to float32 rounding (about 1e-5 a token)."""
    return SvdsparseLM(dtype="float32", batch_size=4, kernels="xla", act_threshold="0")


def score_cli(capsys, ids: list[int], *flags: str) -> list[float]:
    assert main(["score", "--prompt-ids", ",".join(map(str, ids)), "--dtype", "float32", "--kernels", "xla",
                 "--json", *flags]) == 0
    return json.loads(capsys.readouterr().out)["logprobs"]


def test_loglikelihoods_equal_svdsparse_score(relu, capsys, rng):
    dense = relu
    assert dense.cfg.activation == "fatrelu" and dense.cfg.act_threshold == 0
    score = lambda ids: score_cli(capsys, ids, "--act-threshold", "0")  # noqa: E731
    tok = dense.tokenizer
    heldout = corpus_split("heldout")
    start = int(rng.integers(0, len(heldout) - 2000))
    text = tok.decode(heldout[start:start + 1200].tolist(), skip_special_tokens=True)
    pairs = []
    cuts = [i for i in range(10, 400) if text[i] in " \n"]  # where a word starts: both sides tokenize apart
    for _ in range(5):  # (context, continuation) cut at random word starts
        a, b = sorted(rng.choice(cuts, 2, replace=False))
        pairs.append((text[:a], text[a:b]))
    got = dense.loglikelihood(requests("loglikelihood", pairs))
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        ctx_ids, cont_ids = dense._encode_pair(ctx, cont)
        want = score(ctx_ids + cont_ids)[-len(cont_ids):]
        assert ll == pytest.approx(sum(want), abs=1e-4, rel=1e-5)
        assert isinstance(greedy, bool)
    # rolling over a text of about 1,200 tokens: three windows of the 512-token context
    (rolled,) = dense.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]))
    ids = [dense.prefix_token_id] + dense.tok_encode(text)
    assert len(ids) > 2 * dense.cfg.max_seq_len
    assert rolled == pytest.approx(sum(score(ids)), abs=1e-3, rel=1e-6)
    # the greedy flag: a continuation made of the model's own greedy tokens is greedy (their ids: the text
    # generate_until returns need not encode back to the same tokens where it meets the context)
    ctx_ids = dense.tok_encode(text[:200])
    gen = dense.generate_until(requests("generate_until", [(text[:200], {"until": [], "max_gen_toks": 8})]))[0]
    greedy_ids = list(dense.generator.generate([ctx_ids], 8, eos_ids=()).tokens[0])
    assert dense.tok_decode(greedy_ids) == gen
    assert dense._loglikelihood_tokens([(("", ""), ctx_ids, greedy_ids)])[0][1] is True


def test_dense_and_all_active_predictors_agree_and_real_ones_change_little(dense, predictor_dirs, tmp_path, seed):
    import lm_eval
    from lm_eval.tasks import TaskManager

    write_tasks(tmp_path, dense.tokenizer, corpus_split("heldout"), n=24, seed=seed)
    manager = TaskManager(include_path=str(tmp_path))

    def run(model):
        out = lm_eval.simple_evaluate(model=model, tasks=[MC_TASK, GEN_TASK], task_manager=manager,
                                      log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                      fewshot_random_seed=0)
        samples = {t: [s["resps"] for s in out["samples"][t]] for t in (MC_TASK, GEN_TASK)}
        samples["args"] = [s["arguments"] for s in out["samples"][MC_TASK]]
        return out["results"], samples

    dense_results, dense_samples = run(dense)
    everything = SvdsparseLM(predictors=str(predictor_dirs / "all"), dtype="float32", batch_size=4, kernels="xla")
    all_results, all_samples = run(everything)
    assert all_results == dense_results
    assert all_samples[GEN_TASK] == dense_samples[GEN_TASK]
    lls = lambda s: np.array([[float(r[0][0]) for r in item] for item in s[MC_TASK]])  # noqa: E731
    np.testing.assert_allclose(lls(all_samples), lls(dense_samples), atol=1e-4, rtol=0)
    assert len(dense_samples[MC_TASK]) == len(dense_samples[GEN_TASK]) == 24
    real = SvdsparseLM(predictors=str(predictor_dirs / "real"), dtype="float32", batch_size=4, kernels="xla")
    real_results, real_samples = run(real)
    diff = np.abs(lls(real_samples) - lls(dense_samples))
    n_tokens = np.array([[len(dense._encode_pair(*a)[1]) for a in item] for item in dense_samples["args"]])
    # the predictors act, and cost little likelihood per token: over 30 seeds this set's mean change was
    # 0.031-0.062 nats a token (the per-choice median, 0.28-0.61, grows with the choice's length)
    assert 0 < diff.max() and diff.sum() / n_tokens.sum() < 0.1
    assert abs(real_results[MC_TASK]["acc,none"] - dense_results[MC_TASK]["acc,none"]) <= 0.25


def test_bad_model_args_are_named():
    with pytest.raises(SvdsparseError, match="unknown argument"):
        SvdsparseLM(bogus=1)
    with pytest.raises(SvdsparseError, match="batch_size=0"):
        SvdsparseLM(batch_size=0)
    with pytest.raises(SvdsparseError, match="ffn_policy=half"):
        SvdsparseLM(ffn_policy="half")
    with pytest.raises(SvdsparseError, match="act_threshold=inf"):
        SvdsparseLM(act_threshold="inf")


def test_the_command_line_runs_the_model(dense, tmp_path, seed):
    """`svdsparse-lm-eval run --model svdsparse --model_args ...` (lm-eval's own command line, the model
    registered first) on the local tasks, offline; model_args win over lm-eval's --batch_size default, and
    lm-eval's report says the batch size they give."""
    import os
    import subprocess
    import sys

    write_tasks(tmp_path, dense.tokenizer, corpus_split("heldout"), n=4, seed=seed)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_DATASETS_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", "from svdsparse_jax.lm_eval_model import main; main()", "run",
                          "--model", "svdsparse", "--model_args", "dtype=float32", "batch_size=3", "--tasks", MC_TASK,
                          "--include_path", str(tmp_path), "--output_path", str(tmp_path / "out")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert MC_TASK in run.stdout and "acc_norm" in run.stdout
    runs = SvdsparseLM.create_from_arg_string("dtype=float32,batch_size=3", {"batch_size": 1}).batch_size
    assert runs == 3
    # lm-eval's report (its header line and the results file) says the batch size the model ran
    header = next(line for line in run.stdout.splitlines() if line.startswith("svdsparse ("))
    assert header.endswith(f"batch_size: {runs}"), header
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert int(results["config"]["batch_size"]) == runs
    clash = subprocess.run([sys.executable, "-c", "import sys; from svdsparse_jax.lm_eval_model import main; "
                            "sys.exit(main())", "run", "--model", "svdsparse", "--model_args", "batch_size=3",
                            "--batch_size", "2", "--tasks", MC_TASK, "--include_path", str(tmp_path)],
                           capture_output=True, text=True, env=env, timeout=600)
    assert clash.returncode == 2 and "--batch_size 2 and --model_args batch_size=3 disagree" in clash.stderr
