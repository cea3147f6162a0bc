"""Hostile inputs, class by class (issue 29): files that lead out of the directory the user named, outputs that
would overwrite or delete what is not ours, unbounded reads and allocations, data that does not belong together,
bad arguments to the Python API and to lm-eval, and refusals that come only after the work. Each is refused in
one line naming the file, field or flag, before anything large is read, allocated or written."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from checkpoints import make_hf_checkpoint
from test_faults import run_cli
from svdsparse_jax.assets import BUNDLED_MODEL
from svdsparse_jax.errors import SvdsparseError
from svdsparse_jax.fsutil import OWNER_MARK, PARTIAL, atomic_directory

ROOT = Path(__file__).parent.parent
HUGE = 10 ** 15


def copy_dir(src: Path, dst: Path, **replace: bytes) -> Path:
    """A copy of a model directory with some files' bytes replaced."""
    shutil.copytree(src, dst)
    for name, data in replace.items():
        (dst / name).write_bytes(data)
    return dst


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A tiny LLaMA checkpoint with a tokenizer."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("hf") / "llama", "llama_relu", seed=5, tokenizer=True).path


@pytest.fixture(scope="module")
def lm(hf):
    from svdsparse_jax.checkpoint import load_model
    return load_model(hf, np.float32)


@pytest.fixture(scope="module")
def predictors(lm, tmp_path_factory):
    """Two predictor directories of the tiny model, built from different calibration tokens."""
    from svdsparse_jax.model import Transformer
    from svdsparse_jax.predictors import BuildConfig, build_predictors, save_predictors

    root = tmp_path_factory.mktemp("predictors")
    out = []
    for seed in (0, 1):
        tokens = np.random.default_rng(seed).integers(0, lm.cfg.vocab_size, 1024)
        pset = build_predictors(Transformer(lm.cfg, lm.weights), tokens,
                                BuildConfig(ranks=8, rule="s", value=0.5, tokens=1024, window=64), progress=False)
        out.append(save_predictors(root / f"set{seed}", pset, lm.cfg, lm.fingerprint))
    return out


# ------------------------------------------------------------------------------------ 1. reading outside

def test_tokenizer_and_predictor_files_that_lead_outside_are_refused(hf, lm, predictors, tmp_path, capsys):
    from svdsparse_jax.predictors import load_predictors

    secret = tmp_path / "secret.json"
    secret.write_bytes((hf / "tokenizer.json").read_bytes())
    d = copy_dir(hf, tmp_path / "model")
    (d / "tokenizer.json").unlink()
    (d / "tokenizer.json").symlink_to(secret)
    code, line = run_cli(capsys, "generate", str(d), "--prompt", "def f", "--max-new-tokens", "1")
    assert code == 2 and f"{d / 'tokenizer.json'} leads outside {d}" in line, line
    for name in ("manifest.json", "predictors.safetensors"):
        p = copy_dir(predictors[0], tmp_path / f"pred_{name}")
        (p / name).unlink()
        (p / name).symlink_to(predictors[1] / name)
        with pytest.raises(SvdsparseError, match=f"{p / name} leads outside {p}"):
            load_predictors(p, lm.cfg, lm.fingerprint)


def test_an_unindexed_weight_file_that_links_outside_is_refused(hf, tmp_path, capsys):
    """Without an index the weights are model.safetensors, the one *.safetensors file or pytorch_model.bin: each,
    a link to another model's file, is refused like an index's shard, by generate and convert alike."""
    other = make_hf_checkpoint(tmp_path / "other", "llama_relu", seed=6, tokenizer=True).path
    torch.save({k: torch.from_numpy(v.copy()) for k, v in load_file(str(other / "model.safetensors")).items()},
               other / "pytorch_model.bin")
    for name, target, flags in (("model.safetensors", "model.safetensors", []),
                                ("weights.safetensors", "model.safetensors", []),
                                ("pytorch_model.bin", "pytorch_model.bin", ["--allow-pickle"])):
        d = tmp_path / name.replace(".", "_")
        d.mkdir()
        (d / "config.json").write_bytes((hf / "config.json").read_bytes())
        (d / name).symlink_to(other / target)
        for argv in (["generate", str(d), "--prompt-ids", "1,2", "--max-new-tokens", "1"],
                     ["convert", str(d), str(tmp_path / f"out_{d.name}")]):
            code, line = run_cli(capsys, *argv, *flags)
            assert code == 2 and f"{d / name} leads outside {d}" in line, (name, argv[0], line)
        assert not (tmp_path / f"out_{d.name}").exists()


def test_copied_files_keep_their_narrow_modes(hf, tmp_path, capsys):
    """A tokenizer file only its owner may read is copied into a conversion as such, never made 0644."""
    d = copy_dir(hf, tmp_path / "model")
    (d / "tokenizer_config.json").chmod(0o600)
    code, _ = run_cli(capsys, "convert", str(d), str(tmp_path / "out"))
    assert code == 0
    assert (tmp_path / "out" / "tokenizer_config.json").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "out" / "tokenizer.json").stat().st_mode & 0o077 == (d / "tokenizer.json").stat().st_mode & 0o077


# ------------------------------------------------------------------------- 2. overwriting and deleting

def test_plots_never_replace_files(tmp_path, capsys):
    """An existing PNG of the plot names is refused before the model is even loaded, and left as it was."""
    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / "recall.png").write_bytes(b"mine")
    code, line = run_cli(capsys, "eval", "--predictors", str(tmp_path / "none"), "--plots", str(plots))
    assert code == 2 and f"{plots / 'recall.png'} (--plots): already exists" in line, line
    assert (plots / "recall.png").read_bytes() == b"mine"


def test_plot_names_too_long_for_the_filesystem_are_refused_first(tmp_path, capsys):
    plots = tmp_path / ("p" * 300) / "plots"
    code, line = run_cli(capsys, "eval", "--predictors", str(tmp_path / "none"), "--plots", str(plots))
    assert code == 2 and "(--plots): a name of 300 bytes; at most" in line, line
    assert not any(tmp_path.iterdir())  # nothing created


def test_memory_checks_count_the_address_space_limit_and_the_cgroup(tmp_path):
    """Under `ulimit -v` the free memory is what the limit leaves the process, not the host's; a cgroup's limit
    (v2 or v1 files) counts its use."""
    from svdsparse_jax.limits import cgroup_free

    code = ("import resource; from svdsparse_jax.limits import available_memory, _proc_fields; from pathlib import "
            "Path; a = available_memory(); size = _proc_fields(Path('/proc/self/status'))['VmSize']; "
            "resource.setrlimit(resource.RLIMIT_AS, (size + a // 2, resource.RLIM_INFINITY)); "
            "print(a, available_memory())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    host, limited = map(int, out.stdout.split())
    assert 0 <= limited <= host // 2 + (1 << 20), out  # (the process may have grown a little since)
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text("4294967296\n")
    (v2 / "memory.current").write_text("1073741824\n")
    assert cgroup_free(v2) == 3 << 30
    (v2 / "memory.max").write_text("max\n")
    assert cgroup_free(v2) is None
    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(str(2 << 30))
    (v1 / "memory.usage_in_bytes").write_text(str(3 << 30))
    assert cgroup_free(tmp_path / "v1") == 0
    (v1 / "memory.limit_in_bytes").write_text(str(1 << 62))  # v1's "no limit"
    assert cgroup_free(tmp_path / "v1") is None
    assert cgroup_free(tmp_path / "none") is None


def test_cleanup_removes_only_our_own_dead_partials(tmp_path):
    """A directory named like a partial output of a dead process of this host is removed only when it holds the
    mark `atomic_directory` writes: another program's (or user's) directory of that name stays."""
    dead = 2 ** 22 + 12345  # above the default pid_max: no process has it
    host = socket.gethostname()
    theirs = tmp_path / f".data{PARTIAL}{host}-{dead}-abcd1234"
    ours = tmp_path / f".model{PARTIAL}{host}-{dead}-efgh5678"
    empty = tmp_path / f".other{PARTIAL}{host}-{dead}-ijkl9012"  # killed before its mark was written
    for d in (theirs, ours, empty):
        d.mkdir()
    for d in (theirs, ours):
        (d / "payload").write_text("x")
    (ours / OWNER_MARK).write_text(f"{host} {dead}\n")
    with atomic_directory(tmp_path / "new") as tmp:
        (tmp / "file").write_text("y")
    assert theirs.is_dir() and (theirs / "payload").is_file()
    assert not ours.exists() and not empty.exists()
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["file"]  # the mark does not stay


# ------------------------------------------------------------------------------------ 3. unbounded inputs

def test_devices_and_endless_streams_are_refused(tmp_path, capsys):
    code, line = run_cli(capsys, "score", "--text-file", "/dev/zero")
    assert code == 2 and "/dev/zero (--text-file): not a regular file" in line, line
    code, line = run_cli(capsys, "build-predictors", "--calib-text", "/dev/zero", "--out", str(tmp_path / "p"))
    assert code == 2 and "/dev/zero (--calib-text): not a regular file" in line, line
    code, line = run_cli(capsys, "generate", "--prompt-file", "/dev/zero")
    assert code == 2 and "/dev/zero (--prompt-file): more than 16.8 MB" in line, line
    run = subprocess.run([sys.executable, "-m", "svdsparse_jax.cli", "generate", "--prompt-file", "-"],
                         input=b"y\n" * (9 << 20), capture_output=True, timeout=120, cwd=ROOT)
    err = run.stderr.decode().strip().splitlines()
    assert run.returncode == 2 and err[-1].endswith("--prompt-file - (standard input): more than 16.8 MB; a prompt "
                                                    "must fit the model's context"), err[-3:]


def test_a_text_without_line_ends_is_read_in_bounded_pieces(tmp_path):
    """Pieces of a text with no line break end before a space between words, so they tokenize as the whole text;
    one with neither is cut at twice the piece size. No piece is longer than that."""
    import inspect
    import textwrap

    from svdsparse_jax.checkpoint import load_tokenizer
    from svdsparse_jax.evaluate import text_pieces

    text = " ".join(inspect.getsource(textwrap).split())  # words and single spaces
    path = tmp_path / "one_line.txt"
    path.write_text(text)
    pieces = list(text_pieces(path, chars=1000))
    assert len(pieces) > 5 and "".join(pieces) == text and max(map(len, pieces)) <= 2000
    assert all(p[0] == " " for p in pieces[1:])
    tok = load_tokenizer(BUNDLED_MODEL)
    whole = tok(text)["input_ids"]
    assert sum((tok(p, add_special_tokens=i == 0)["input_ids"] for i, p in enumerate(pieces)), []) == whole
    (tmp_path / "blob.txt").write_text("x" * 5500)
    assert [len(p) for p in text_pieces(tmp_path / "blob.txt", chars=1000)] == [2000, 2000, 1500]


def test_sizes_in_a_config_are_checked_against_memory_first(hf, tmp_path, capsys):
    """A million layers, a context of 10^12 tokens and nesting deeper than the JSON reader goes: each refused in
    one line naming the file or flag, before a weight is read or an array allocated."""
    cfg = json.loads((hf / "config.json").read_text())
    d = copy_dir(hf, tmp_path / "layers", **{"config.json": json.dumps(cfg | {"num_hidden_layers": 10 ** 6})
                                             .encode()})
    code, line = run_cli(capsys, "generate", str(d), "--prompt-ids", "1,2", "--max-new-tokens", "1")
    assert code == 2 and f"{d / 'config.json'}: " in line and "weights in bfloat16: needs about" in line, line
    d = copy_dir(hf, tmp_path / "context", **{"config.json": json.dumps(cfg | {"max_position_embeddings": 10 ** 12})
                                              .encode()})
    code, line = run_cli(capsys, "score", str(d), "--prompt-ids", "1,2,3")
    assert code == 2 and "window (--window; default: the model's context) 1000000000000: needs about" in line \
        and "fits" in line, line
    d = copy_dir(hf, tmp_path / "nested", **{"config.json": b"[" * 100_000 + b"]" * 100_000})
    code, line = run_cli(capsys, "generate", str(d), "--prompt-ids", "1,2")
    assert code == 2 and f"{d / 'config.json'}: a model config is nested too deeply" in line, line


def test_counts_are_checked_against_memory_naming_the_largest_that_fits(hf, tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text("def f(x):\n    return x\n" * 100)
    for argv, flag in ((["build-predictors", str(hf), "--calib-text", str(text), "--out", str(tmp_path / "p"),
                         "--tokens", str(HUGE)], "--tokens"),
                       (["generate", str(hf), "--prompt-ids", "1,2", "--temperature", "1", "--num-samples",
                         str(10 ** 9)], "--num-samples")):
        code, line = run_cli(capsys, *argv)
        assert code == 2 and f"{flag} {argv[-1]}: needs about" in line and "fits" in line, line
        most = int(line.split("at most ")[1].split()[0].replace(",", ""))
        assert 0 < most < int(argv[-1])


def test_a_generation_longer_than_the_context_names_max_new_tokens(hf, capsys):
    """--max-new-tokens 10^15 is refused for the context it exceeds, not as a --num-samples that does not fit."""
    code, line = run_cli(capsys, "generate", str(hf), "--prompt-ids", "1,2", "--max-new-tokens", str(HUGE))
    assert code == 2 and f"with max_new_tokens={HUGE} that exceeds the model's context" in line, line


def test_eval_refuses_a_window_count_beyond_memory(hf, predictors, tmp_path, capsys):
    text = tmp_path / "heldout.txt"
    text.write_text("def g(y):\n    return y\n" * 100)
    code, line = run_cli(capsys, "eval", str(hf), "--dtype", "float32", "--predictors", str(predictors[0]),
                         "--text-file", str(text), "--max-windows", str(HUGE))
    assert code == 2 and f"--max-windows {HUGE}: needs about" in line and "fits" in line, line


# ----------------------------------------------------------------------------------- 4. wrong data

def test_predictor_tensors_and_fields_must_belong_to_their_manifest(lm, predictors, tmp_path):
    from safetensors.numpy import load_file, save_file

    from svdsparse_jax.predictors import load_predictors

    swapped = copy_dir(predictors[0], tmp_path / "swapped",
                       **{"predictors.safetensors": (predictors[1] / "predictors.safetensors").read_bytes()})
    with pytest.raises(SvdsparseError, match="is not the tensor file this manifest was written with"):
        load_predictors(swapped, lm.cfg, lm.fingerprint)

    def edited(name, edit):
        d = copy_dir(predictors[0], tmp_path / name)
        m = json.loads((d / "manifest.json").read_text())
        edit(m, d)
        (d / "manifest.json").write_text(json.dumps(m))
        return d

    def stray(m, d):
        tensors = load_file(str(d / "predictors.safetensors"))
        tensors["layers.9.a"] = tensors["layers.0.a"]
        save_file(tensors, str(d / "predictors.safetensors"))
        from svdsparse_jax.predictors.store import file_sha256
        m["tensors_sha256"] = file_sha256(d / "predictors.safetensors")

    cases = {"nan_union": (lambda m, d: m["union_rows"]["candidates"][0].__setitem__(0, float("nan")),
                           "union_rows fractions must lie in [0, 1]"),
             "negative_union": (lambda m, d: m["union_rows"]["active"][1].__setitem__(1, -0.5),
                                "union_rows fractions must lie in [0, 1]"),
             "bad_rank": (lambda m, d: m["layers"][1].__setitem__("rank", -3), "layer 1: lowrank entry"),
             "bad_hash": (lambda m, d: m.__setitem__("tensors_sha256", 5), "tensors_sha256 5"),
             "bad_threshold": (lambda m, d: m.__setitem__("threshold", "hot"), "threshold 'hot': expected a finite"),
             "nan_threshold": (lambda m, d: m.__setitem__("threshold", float("nan")), "threshold nan"),
             "bad_activation": (lambda m, d: m.__setitem__("activation", "gelu"), "activation 'gelu'"),
             "bad_dtype": (lambda m, d: m.__setitem__("dtype", "int8"), "dtype 'int8'"),
             "stray": (stray, "tensors no layer of the manifest uses: ['layers.9.a']")}
    for name, (edit, want) in cases.items():
        with pytest.raises(SvdsparseError) as e:
            load_predictors(edited(name, edit), lm.cfg, lm.fingerprint)
        assert str(tmp_path / name) in str(e.value) and want in str(e.value), (name, e.value)


def test_import_svdp_refuses_factors_that_overflow_the_dtype(hf, lm, tmp_path, capsys):
    svdp = tmp_path / "svdp"
    svdp.mkdir()
    for i in range(lm.cfg.n_layers):
        torch.save({"fc1.weight": torch.full((8, lm.cfg.d_model), 1e6), "fc2.weight": torch.ones(lm.cfg.d_ff, 8),
                    "fc2.bias": torch.zeros(lm.cfg.d_ff)}, svdp / f"model_{i}.pt")
    code, line = run_cli(capsys, "import-svdp", str(hf), "--allow-pickle", "--dtype", "float16", "--svdp", str(svdp),
                         "--out", str(tmp_path / "out"))
    assert code == 2 and f"{svdp} (as --dtype float16): tensor layers.0.a: " in line and "infinite" in line, line
    assert not (tmp_path / "out").exists()


def test_results_that_cannot_be_written_are_an_error(tmp_path):
    """With stdout closed the command refuses to start; with stdout on a full device it fails, naming why."""
    base = [sys.executable, "-m", "svdsparse_jax.cli", "score", "--prompt-ids", "1,2,3", "--dtype", "float32"]
    closed = subprocess.run(" ".join(base) + " >&-", shell=True, capture_output=True, text=True, timeout=120,
                            cwd=ROOT)
    assert closed.returncode == 2 and "standard output is closed" in closed.stderr, closed.stderr
    with open("/dev/full", "w") as full:
        run = subprocess.run(base, stdout=full, stderr=subprocess.PIPE, text=True, timeout=300, cwd=ROOT)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and lines[-1].endswith("cannot write the results to standard output (No space left "
                                                      "on device)"), lines[-3:]
    assert "Exception ignored" not in run.stderr


def test_a_stream_that_cannot_be_written_is_one_line():
    """--stream writes from the decode loop's host callback: a full device there ends the program and is the
    same one line, not an XLA runtime error carrying the callback's traceback."""
    with open("/dev/full", "w") as full:
        run = subprocess.run([sys.executable, "-m", "svdsparse_jax.cli", "generate", "--prompt", "def f(x):",
                              "--max-new-tokens", "8", "--stream", "--dtype", "float32"], stdout=full,
                             stderr=subprocess.PIPE, text=True, timeout=300, cwd=ROOT)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and lines[-1] == ("svdsparse generate: error: cannot write the results to standard "
                                                 "output (No space left on device)"), lines[-3:]
    assert "Traceback" not in run.stderr and "io_callback" not in run.stderr, run.stderr[-2000:]


# ----------------------------------------------------------------------------------- 5. the Python API

def test_the_python_api_checks_its_arguments(lm, tmp_path):
    from svdsparse_jax.checkpoint import load_model
    from svdsparse_jax.evaluate import score_tokens
    from svdsparse_jax.generate import Generator, Sampler
    from svdsparse_jax.model import Transformer
    from svdsparse_jax.predictors import BuildConfig, build_predictors

    model = Transformer(lm.cfg, lm.weights)
    gen = Generator(model)
    for kwargs, want in (({"max_new_tokens": 2.5}, "max_new_tokens=2.5: expected an integer >= 1"),
                         ({"sampler": Sampler(temperature="hot")}, "Sampler temperature='hot'"),
                         ({"sampler": Sampler(temperature=1.0, top_p=2)}, "Sampler top_p=2"),
                         ({"sampler": Sampler(repetition_penalty=0)}, "Sampler repetition_penalty=0"),
                         ({"eos_ids": [10 ** 12]}, f"eos_ids=[1000000000000]: expected token ids in [0, "
                                                   f"{lm.cfg.vocab_size})"),
                         ({"seed": -1}, "seed -1"),
                         ({"prompts": [[1, "x"]]}, "prompt 1: expected a list of integer token ids")):
        args = {"prompts": [[1, 2, 3]], "max_new_tokens": 2} | kwargs
        with pytest.raises(SvdsparseError, match=None) as e:
            gen.generate(args.pop("prompts"), args.pop("max_new_tokens"), **args)
        assert want in str(e.value), (kwargs, e.value)
    with pytest.raises(SvdsparseError, match="window=0: expected an integer >= 2"):
        score_tokens(model, [1, 2, 3], window=0)
    for field, value in (("ridge", float("nan")), ("window", 0), ("tokens", 2.5), ("ranks", 0), ("value", 1.5)):
        with pytest.raises(SvdsparseError, match=f"BuildConfig {field}="):
            BuildConfig(rule="recall", **{field: value})
    with pytest.raises(SvdsparseError, match=rf"calibration tokens \[{lm.cfg.vocab_size}"):
        build_predictors(model, np.full(1024, lm.cfg.vocab_size), BuildConfig(ranks=8, tokens=1024, window=64),
                         progress=False)
    with pytest.raises(SvdsparseError, match="dtype 'int8' is not supported"):
        load_model(BUNDLED_MODEL, "int8")
    with pytest.raises(SvdsparseError, match="is not supported"):
        load_model(BUNDLED_MODEL, jnp.int8)


# ----------------------------------------------------------------------------------------- 6. lm-eval

def test_lm_eval_refuses_bad_model_args_in_one_line(tmp_path):
    from scripts.bench.lm_eval_tasks import MC_TASK, write_tasks
    from svdsparse_jax.assets import corpus_split
    from svdsparse_jax.checkpoint import load_tokenizer
    from svdsparse_jax.lm_eval_model import SvdsparseLM

    for args, want in (("batch_size=0", "batch_size=0: expected an integer >= 1"),
                       ("dtype=int8", "dtype 'int8' is not supported"),
                       (f"batch_size={10 ** 8}", "--model_args batch_size 100000000: needs about"),
                       (f"pretrained={tmp_path / 'none'}", "not a directory")):
        with pytest.raises(SvdsparseError, match=None) as e:
            SvdsparseLM.create_from_arg_string(args + ",dtype=float32" * ("dtype" not in args))
        assert want in str(e.value), (args, e.value)
    write_tasks(tmp_path, load_tokenizer(BUNDLED_MODEL), corpus_split("heldout"), n=2, seed=0)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_DATASETS_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", "import sys; from svdsparse_jax.lm_eval_model import main; "
                          "sys.exit(main())", "run", "--model", "svdsparse", "--model_args",
                          f"pretrained={tmp_path / 'none'}", "--tasks", MC_TASK, "--include_path", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert run.stderr.strip().splitlines()[-1].startswith("svdsparse-lm-eval: error: "), run.stderr[-2000:]


# ------------------------------------------------------------------------------------- 7. late refusals

def test_outputs_are_checked_before_the_work(hf, predictors, tmp_path, capsys, monkeypatch):
    """A name too long once the temporary name's additions are counted, and too little free space for the
    predictors or the SVDP files: refused before the build or the export, leaving nothing behind."""
    text = tmp_path / "calib.txt"
    text.write_text("def f(x):\n    return x\n" * 200)
    long_out = tmp_path / ("p" * 240)
    code, line = run_cli(capsys, "build-predictors", str(hf), "--calib-text", str(text), "--out", str(long_out))
    assert code == 2 and "(--out): the name has 240 bytes; at most" in line, line
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    import svdsparse_jax.predictors.build as build
    monkeypatch.setattr(build, "layer_statistics", lambda *a: pytest.fail("the build ran"))
    code, line = run_cli(capsys, "build-predictors", str(hf), "--calib-text", str(text), "--out",
                         str(tmp_path / "p"), "--rank", "8")
    assert code == 2 and "(--out): needs about" in line and "free" in line, line
    code, line = run_cli(capsys, "export-svdp", str(hf), "--dtype", "float32", "--predictors", str(predictors[0]),
                         "--out", str(tmp_path / "svdp"))
    assert code == 2 and "(--out): needs about" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt"]


@pytest.mark.parametrize("shape", ["tiny", "llama2-7b", "qwen2-7b"])
@pytest.mark.parametrize("tied", [False, True])
def test_the_closed_form_weight_count_is_the_specs(shape, tied):
    import math

    from svdsparse_jax.config import named_config
    from svdsparse_jax.weights import weight_count, weight_specs

    cfg = named_config(shape, tie_embeddings=tied, o_bias=shape == "tiny")
    specs = weight_specs(cfg)
    assert weight_count(cfg) == (len(specs), sum(math.prod(s.shape) for s in specs))
