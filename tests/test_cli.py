"""The CLI contracts: generate/score/convert outputs, and one-line errors without tracebacks."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from checkpoints import make_hf_checkpoint
from svdsparse_jax.cli import main

CLI_DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def documented_keys(command: str) -> dict[str, str]:
    """docs/cli.md's table for `command --json`: key path -> type."""
    section = CLI_DOC.read_text().split(f"## {command} --json\n", 1)[1].split("\n## ", 1)[0]
    return {m[0]: m[1] for m in re.findall(r"^\| `([^`]+)` \| ([^|]+?) \|", section, re.M)}


def json_paths(obj, maps: set[str], prefix: str = "") -> set[str]:
    """Every key path of a JSON value (`a[].b` for key b of list a's elements), not descending into `maps`."""
    out = set()
    if isinstance(obj, dict) and prefix not in maps:
        for k, v in obj.items():
            path = f"{prefix}.{k}" if prefix else k
            out |= {path} | json_paths(v, maps, path)
    elif isinstance(obj, list):
        for v in obj:
            out |= json_paths(v, maps, prefix + "[]")
    return out


def assert_documented(command: str, obj: dict) -> None:
    """The JSON a command printed has exactly the keys docs/cli.md lists (optional ones may be absent)."""
    doc = documented_keys(command)
    got = json_paths(obj, {k for k, t in doc.items() if t.startswith("map")})
    required = {k for k, t in doc.items() if not t.endswith("optional")
                and not any(k.startswith(o + ".") or k.startswith(o + "[]") for o, u in doc.items()
                            if u.endswith("optional"))}
    assert got <= set(doc), f"undocumented keys of {command} --json: {sorted(got - set(doc))}"
    assert required <= got, f"documented keys of {command} --json not printed: {sorted(required - got)}"



@pytest.fixture
def tiny_with_tokenizer(tmp_path, seed):
    return make_hf_checkpoint(tmp_path / "tiny", "llama_relu", seed=seed, tokenizer=True).path


def test_convert_then_generate_json_matches_transformers(tmp_path, capsys, seed):
    ckpt = make_hf_checkpoint(tmp_path / "hf", "mistral_gqa", seed=seed)
    assert main(["convert", str(ckpt.path), str(tmp_path / "conv"), "--dtype", "float32"]) == 0
    capsys.readouterr()
    prompt = [3, 17, 40, 99, 5]
    assert main(["generate", str(tmp_path / "conv"), "--prompt-ids", ",".join(map(str, prompt)),
                 "--max-new-tokens", "32", "--greedy", "--dtype", "float32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert_documented("generate", out)
    with torch.no_grad():
        ref = ckpt.torch_model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)
    (result,) = out["results"]
    assert result["prompt_ids"] == prompt and result["prompt"] is None
    (sample,) = result["samples"]
    assert sample["output_ids"] == ref[0, len(prompt):].tolist() and sample["finish_reason"] == "length"
    assert sample["text"] is None and out["tokens_per_s"] > 0 and out["sampler"]["temperature"] == 0
    assert out["seed"] is None  # greedy decoding draws nothing


def test_generate_and_score_text(tiny_with_tokenizer, tmp_path, capsys):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_with_tokenizer)
    assert main(["generate", str(tiny_with_tokenizer), "--prompt", "import os", "--max-new-tokens", "8",
                 "--temperature", "0.8", "--top-k", "40", "--top-p", "0.9", "--seed", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert_documented("generate", out)
    sample = out["results"][0]["samples"][0]
    assert out["results"][0]["prompt_ids"] == tok("import os")["input_ids"]
    # 8 tokens, or fewer ending at EOS (the random model's sampled tokens may draw it: base seed 1944418684)
    ids, reason = sample["output_ids"], sample["finish_reason"]
    assert (len(ids), reason) == (8, "length") or (len(ids) < 8 and reason == "eos" and ids[-1] == tok.eos_token_id)
    assert sample["text"] == tok.decode(sample["output_ids"], skip_special_tokens=True) and out["seed"] == 3
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return os.path.join(x, 'y')\n")
    assert main(["score", str(tiny_with_tokenizer), "--text-file", str(text), "--dtype", "float32", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert_documented("score", s)
    n = len(tok(text.read_text())["input_ids"])
    assert s["tokens"] == n and len(s["logprobs"]) == s["predicted"] == n - 1 and s["window"] == 512
    assert np.isclose(s["ppl"], np.exp(s["nll"])) and np.isclose(s["nll"], -np.mean(s["logprobs"]))


@pytest.mark.parametrize("argv, message", [
    (["generate", "/no/such/dir", "--prompt-ids", "1,2"], "/no/such/dir: not a directory"),
    (["score", "MODEL", "--text-file", "/no/such/file"], "/no/such/file (--text-file): cannot read"),
    (["generate", "MODEL", "--prompt-ids", "1,2", "--max-new-tokens", "1000"], "exceeds the model's context"),
    (["generate", "MODEL", "--prompt", "hi"], "has no tokenizer files"),
    (["convert", "MODEL", "MODEL"], "already exists"),
])
def test_errors_are_one_line(tmp_path, argv, message, seed):
    ckpt = make_hf_checkpoint(tmp_path / "hf", "llama_relu", seed=seed)
    argv = [str(ckpt.path) if a == "MODEL" else a for a in argv]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-m", "svdsparse_jax.cli", *argv], capture_output=True, text=True, env=env)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines and message in lines[-1] and "Traceback" not in r.stderr, r.stderr


def test_build_predictors_eval_and_sparse_generate_on_the_bundled_model(tmp_path, capsys, seed):
    out = tmp_path / "preds"
    assert main(["build-predictors", "--out", str(out), "--rank", "64", "--s", "0.6", "--tokens", "2048",
                 "--dtype", "float32", "--json"]) == 0
    built = json.loads(capsys.readouterr().out)
    assert_documented("build-predictors", built)
    assert built["config"]["method"] == "whitened" and len(built["layers"]) == 8
    assert main(["eval", "--predictors", str(out), "--max-windows", "4", "--dtype", "float32", "--json",
                 "--plots", str(tmp_path / "plots"), "--batch-sizes", "1,2", "--ffn-policy", "sparse"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert_documented("eval", rep)
    one, two = rep["batches"]
    # one sequence reads its own rows; two read their union, and each still keeps only its own candidates, so
    # with every layer sparse the accuracy is the same at every batch size
    assert one["gate_rows_union"] == pytest.approx(rep["summary"]["gate_rows_read"], rel=1e-6)
    assert two["gate_rows_union"] > one["gate_rows_union"] and two["up_down_rows_union"] > one["up_down_rows_union"]
    assert main(["eval", "--predictors", str(out), "--max-windows", "2", "--batch-sizes", "1,4"]) == 2
    assert "--batch-sizes 4: expected 1 <= B <= 2" in capsys.readouterr().err
    for b in (one, two):
        assert b["sparse_layers"] == 8 and b["ppl"] == pytest.approx(rep["summary"]["ppl_sparse"], rel=1e-9)
        assert b["top1_agreement"] == pytest.approx(rep["summary"]["top1_agreement"])
    for key in ("true_sparsity", "predicted_sparsity", "recall", "precision", "auroc", "ppl_dense", "ppl_sparse",
                "top1_agreement", "rows_read_fraction"):
        assert 0 <= rep["summary"][key] < float("inf"), key
    assert len(rep["layers"]) == 8 and sorted(p.name for p in (tmp_path / "plots").glob("*.png")) == [
        "auroc.png", "batches.png", "predicted_sparsity.png", "recall.png"]
    assert rep["summary"]["recall"] > 0.9 and rep["summary"]["auroc"] > 0.9
    generated = []
    for kernels in ("xla", "interpret"):  # the engine picked at the edge: the kernels, interpreted, decode alike
        assert main(["generate", "--predictors", str(out), "--prompt", "import os\n", "--max-new-tokens", "8",
                     "--dtype", "float32", "--json", "--kernels", kernels, "--ffn-policy", "sparse"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["sparse_layers"] == 8
        generated.append(result["results"][0]["samples"][0]["output_ids"])
    assert generated[0] == generated[1] and len(generated[0]) <= 8
    # predictors of another model are refused
    other = make_hf_checkpoint(tmp_path / "hf", "llama_relu", seed=seed)
    code = main(["generate", str(other.path), "--predictors", str(out), "--prompt-ids", "1,2"])
    assert code == 2 and "predictors for" in capsys.readouterr().err


def test_demo_runs(capsys, monkeypatch):
    """Every stage of the demo, at a quarter of its calibration tokens and windows (its full run is timed in the
    README)."""
    import dataclasses

    from svdsparse_jax.cli import build_predictors, demo
    full = build_predictors.demo_build_config
    monkeypatch.setattr(build_predictors, "demo_build_config",
                        lambda cfg: dataclasses.replace(full(cfg), tokens=16384))
    monkeypatch.setattr(demo, "EVAL_WINDOWS", 16)
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "top-1 agreement" in out and "sparse:" in out


def _generate(capsys, *argv) -> dict:
    assert main(["generate", *argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert_documented("generate", out)
    return out


def test_generate_json_has_one_shape_and_sampling_flags_imply_sampling(tiny_with_tokenizer, capsys):
    model = str(tiny_with_tokenizer)
    one = _generate(capsys, model, "--prompt", "import os", "--max-new-tokens", "6", "--top-p", "0.9")
    many = _generate(capsys, model, "--prompt", "import os", "--prompt", "def f(x):", "--max-new-tokens", "6",
                     "--top-p", "0.9", "--num-samples", "3", "--seed", str(one["seed"]))
    assert json_paths(one, {"sampler"}) == json_paths(many, {"sampler"})  # the same keys for 1 and 2 x 3 samples
    assert one["sampler"] == many["sampler"] == {"temperature": 1.0, "top_k": 0, "top_p": 0.9,
                                                 "repetition_penalty": 1.0}
    assert [len(r["samples"]) for r in many["results"]] == [3, 3]
    assert [r["prompt"] for r in many["results"]] == ["import os", "def f(x):"]
    outputs = [s["output_ids"] for s in many["results"][0]["samples"]]
    assert len({tuple(o) for o in outputs}) > 1  # samples of one prompt differ
    again = _generate(capsys, model, "--prompt", "import os", "--prompt", "def f(x):", "--max-new-tokens", "6",
                      "--top-p", "0.9", "--num-samples", "3", "--seed", str(one["seed"]))
    assert again["results"] == many["results"]  # a printed seed repeats the run
    seeds = {_generate(capsys, model, "--prompt", "import os", "--max-new-tokens", "2", "--temperature", "1")["seed"]
             for _ in range(3)}
    assert len(seeds) == 3  # without --seed, a fresh one each run


def test_stop_strings_streaming_and_prompt_files(tiny_with_tokenizer, tmp_path, capsys, monkeypatch):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_with_tokenizer)
    model = str(tiny_with_tokenizer)
    args = ["--max-new-tokens", "24", "--dtype", "float32"]

    def first_stop(text: str) -> str | None:  # a two-character piece of real text that first occurs past the start
        return next((text[i:i + 2] for i in range(3, len(text) - 2) if text[i:i + 2].strip() and "\ufffd" not in
                     text[i:i + 2] and text.find(text[i:i + 2]) == i), None)

    # a random tiny model's greedy text can be one repeated byte; the first prompt whose text has a piece to stop at
    for prompt in ("import os", "def f(x):", "class A:", "for i in", "x = 1", "return"):
        full = _generate(capsys, model, "--prompt", prompt, *args)["results"][0]["samples"][0]
        text, ids, stop = full["text"], full["output_ids"], first_stop(full["text"])
        if stop is not None:
            break
    assert stop is not None, "no prompt gave text with a piece to stop at"
    cut = _generate(capsys, model, "--prompt", prompt, "--stop", stop, "--stop", "never seen", *args)
    sample = cut["results"][0]["samples"][0]
    assert sample["text"] == text[:text.find(stop)] and sample["finish_reason"] == "stop"
    n = len(sample["output_ids"])  # through the token that completed the stop string, and no further
    assert sample["output_ids"] == ids[:n] and stop in tok.decode(ids[:n]) and stop not in tok.decode(ids[:n - 1])
    # streamed: the same text on stdout, as it is produced
    assert main(["generate", model, "--prompt", prompt, "--stream", "--stop", stop, *args]) == 0
    assert capsys.readouterr().out == sample["text"] + "\n"
    assert main(["generate", model, "--prompt", prompt, "--stream", *args]) == 0
    assert capsys.readouterr().out == text + "\n"
    # the same prompt from a file and from standard input
    (tmp_path / "p.txt").write_text(prompt)
    from_file = _generate(capsys, model, "--prompt-file", str(tmp_path / "p.txt"), *args)
    monkeypatch.setattr("sys.stdin", type("Stdin", (), {"buffer": __import__("io").BytesIO(prompt.encode())})())
    from_stdin = _generate(capsys, model, "--prompt-file", "-", *args)
    assert from_file["results"][0]["samples"][0] == from_stdin["results"][0]["samples"][0] == full


def test_every_flag_has_help():
    import argparse

    from svdsparse_jax.cli import build_parser
    sub = next(a for a in build_parser({})._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {a.option_strings or a.dest}" for name, p in sub.choices.items() for a in p._actions
               if not a.help]
    assert not missing and {"export-svdp", "import-svdp", "generate", "demo"} <= set(sub.choices)
    assert "(default: 64)" in " ".join(sub.choices["generate"].format_help().split())


def test_build_predictors_rank_auto(tmp_path, capsys):
    """`--rank auto` keeps one of d/16, d/8, d/4 per layer, says which in its table and the manifest, and is
    refused with a sparsity target, naming the flags."""
    from svdsparse_jax.assets import BUNDLED_MODEL
    from svdsparse_jax.config import from_hf_config

    cfg = from_hf_config(json.loads((BUNDLED_MODEL / "config.json").read_text()))
    assert main(["build-predictors", "--out", str(tmp_path / "p"), "--tokens", "1024", "--rank", "auto"]) == 0
    table = capsys.readouterr().out
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    search = [cfg.d_model // 16, cfg.d_model // 8, cfg.d_model // 4]
    assert manifest["config"]["rank_search"] == search and len(manifest["config"]["ranks"]) == cfg.n_layers
    assert set(manifest["config"]["ranks"]) <= set(search)
    rows = [ln.split() for ln in table.splitlines() if ln.split() and ln.split()[0].isdigit()]
    assert [int([t for t in r if t != "*"][-1]) for r in rows] == manifest["config"]["ranks"]
    assert "fewest bytes" in table
    assert main(["build-predictors", "--out", str(tmp_path / "q"), "--rank", "auto", "--s", "0.6"]) == 2
    assert "--rank auto: needs --method whitened or plain and a recall or loss target" in capsys.readouterr().err


def test_outputs_have_normal_modes(tmp_path, capsys):
    umask = os.umask(0o022)
    try:
        assert main(["build-predictors", "--out", str(tmp_path / "p"), "--tokens", "1024", "--rank", "8"]) == 0
    finally:
        os.umask(umask)
    capsys.readouterr()
    assert (tmp_path / "p").stat().st_mode & 0o777 == 0o755
    assert all(f.stat().st_mode & 0o777 == 0o644 for f in (tmp_path / "p").iterdir())


def test_a_second_run_loads_its_programs_from_the_compilation_cache(tmp_path):
    """The same command twice with --compile-cache DIR: the second compiles nothing (JAX's debug log shows no
    cache miss and the decode program's hit), and `--compile-cache off` writes no cache."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_LOGGING_LEVEL": "DEBUG"}
    argv = [sys.executable, "-m", "svdsparse_jax.cli", "generate", "--prompt-ids", "1,2,3", "--max-new-tokens", "4",
            "--dtype", "float32", "--compile-cache"]
    runs = [subprocess.run(argv + [str(tmp_path / "cache")], capture_output=True, text=True, env=env, timeout=300)
            for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[-1].stderr[-2000:]
    assert "CACHE MISS" in runs[0].stderr and len(list((tmp_path / "cache").iterdir())) > 1
    assert "CACHE MISS" not in runs[1].stderr and "cache hit for 'jit__generate_program'" in runs[1].stderr
    off = subprocess.run(argv + ["off"], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert off.returncode == 0 and "Initialized persistent compilation cache" in runs[0].stderr
    assert "Initialized persistent compilation cache" not in off.stderr
