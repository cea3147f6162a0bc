"""Fault injection: bad numbers, damaged files, killed processes, races and bad flags, each refused with one
line that names the file, tensor, field or flag, and nothing left half-written. On tiny checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from checkpoints import make_hf_checkpoint
from svdsparse_jax import cli
from svdsparse_jax.config import from_hf_config
from svdsparse_jax.errors import SvdsparseError
from svdsparse_jax.fsutil import PARTIAL, atomic_directory
from svdsparse_jax.generate import seed_key

HERE = Path(__file__).parent


def run_cli(capsys, *argv) -> tuple[int, str]:
    """(exit code, the last line of stderr) of the CLI run in this process."""
    try:
        code = cli.main(list(argv))
    except SystemExit as e:  # argparse refusals
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("hf") / "llama", "llama_relu", seed=3).path


def _with_tensor(src: Path, dst: Path, name: str, edit) -> Path:
    """A copy of the checkpoint at dst with tensor `name` replaced by edit(tensor)."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(str(src / "model.safetensors"))
    tensors[name] = edit(tensors[name])
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


W_O = "model.layers.1.self_attn.o_proj.weight"


@pytest.mark.parametrize("case", ["nan", "inf", "int8", "overflow"])
def test_conversion_refuses_non_finite_and_non_float_weights(hf, tmp_path, capsys, case):
    def edit(t):
        t = t.copy()
        if case == "nan":
            t[0, :3] = np.nan
        elif case == "inf":
            t[1, 1] = -np.inf
        elif case == "int8":
            return t.astype(np.int8)
        else:
            t[2, 2] = 1e6  # past float16's 65504
        return t

    bad = _with_tensor(hf, tmp_path / "bad", W_O, edit)
    argv = ["convert", str(bad), str(tmp_path / "out")] + (["--dtype", "float16"] if case == "overflow" else [])
    code, line = run_cli(capsys, *argv)
    want = {"nan": "3 of 4096 values are NaN or infinite", "inf": "1 of 4096 values are NaN or infinite",
            "int8": "is int8; only floating-point weights", "overflow": "1 values overflow float16"}[case]
    assert code == 2 and f"model.safetensors: tensor {W_O}" in line and want in line, line
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(f".out{PARTIAL}*"))


@pytest.mark.parametrize("field,value,want", [
    ("rms_norm_eps", -1e-6, "rms_eps must be positive"),
    ("rope_theta", float("nan"), "rope_theta=nan"),
    ("rope_scaling", {"rope_type": "linear", "factor": 0.0}, "rope_scale must be positive"),
    ("hidden_size", None, "hidden_size=None"),
    ("eos_token_id", 1.5, "eos_token_id 1.5"),
    ("num_hidden_layers", "2", "num_hidden_layers='2'"),
])
def test_bad_config_fields_are_refused_naming_the_file_and_field(hf, field, value, want):
    cfg = json.loads((hf / "config.json").read_text())
    cfg.pop("rope_parameters", None)  # transformers 5's key, which takes precedence over the 4.x ones set here
    cfg[field] = value
    with pytest.raises(SvdsparseError) as e:
        from_hf_config(cfg, where="x/config.json")
    assert str(e.value).startswith("x/config.json: ") and want in str(e.value), e.value
    with pytest.raises(SvdsparseError, match="x/config.json: expected a JSON object, got list"):
        from_hf_config([cfg], where="x/config.json")


def test_damaged_checkpoint_files_are_named(hf, tmp_path, capsys):
    for name, data in (("empty", b""), ("random", np.random.default_rng(0).bytes(4000)),
                       ("truncated", (hf / "model.safetensors").read_bytes()[:5000])):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text((hf / "config.json").read_text())
        (d / "model.safetensors").write_bytes(data)
        code, line = run_cli(capsys, "convert", str(d), str(tmp_path / f"out_{name}"))
        assert code == 2 and f"{d / 'model.safetensors'}: cannot read" in line, (name, line)
    d = tmp_path / "tok"
    d.mkdir()
    for f in hf.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    (d / "tokenizer.json").write_text("{not json")
    code, line = run_cli(capsys, "score", str(d), "--prompt-ids", "1,2,3", "--kernels", "xla")
    assert code == 2 and f"{d}: cannot load the tokenizer" in line, line


def test_nothing_outside_the_checkpoint_directory_is_read(hf, tmp_path, capsys):
    """A safetensors index naming a shard by '..', by an absolute path, through a link out of the directory, or
    a pickle shard under a safetensors index; a config or a copied file (the generation config) that links out:
    each refused in one line naming the index or file, before anything is written, so another model's tensors
    are never loaded."""
    other = make_hf_checkpoint(tmp_path / "other", "llama_relu", seed=4).path
    names = list(load_file(str(hf / "model.safetensors")))

    def checkpoint(name: str, shard: str) -> Path:
        d = tmp_path / name
        d.mkdir(exist_ok=True)
        (d / "config.json").write_text((hf / "config.json").read_text())
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: shard for n in names}}))
        return d

    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "model.safetensors").symlink_to(other / "model.safetensors")
    cases = {"dotdot": "../other/model.safetensors", "absolute": str(other / "model.safetensors"),
             "linked": "model.safetensors", "pickle": "pytorch_model.bin"}
    for name, shard in cases.items():
        d = checkpoint(name, shard)
        if name == "pickle":
            torch.save({n: torch.zeros(1) for n in names}, d / shard)
        want = "shards must be .safetensors" if name == "pickle" else "refused"
        code, line = run_cli(capsys, "convert", str(d), str(tmp_path / f"out_{name}"))
        assert code == 2 and str(d / "model.safetensors.index.json") in line and want in line, (name, line)
        assert not (tmp_path / f"out_{name}").exists()
    for linked in ("config.json", "generation_config.json"):
        d = tmp_path / f"link_{linked}"
        d.mkdir()
        for f in hf.iterdir():
            if f.name != linked:
                (d / f.name).write_bytes(f.read_bytes())
        secret = tmp_path / f"secret_{linked}"
        secret.write_bytes((hf / linked).read_bytes())
        secret.chmod(0o600)
        (d / linked).symlink_to(secret)
        code, line = run_cli(capsys, "convert", str(d), str(tmp_path / f"out_{linked}"))
        assert code == 2 and f"{d / linked} leads outside {d}" in line, (linked, line)
        assert not (tmp_path / f"out_{linked}").exists()


def test_text_that_is_not_utf8_is_named(hf, tmp_path, capsys):
    f = tmp_path / "latin1.txt"
    f.write_bytes("café déjà vu".encode("latin-1"))
    code, line = run_cli(capsys, "score", str(hf), "--text-file", str(f))
    assert code == 2 and f"{f}: not UTF-8 text" in line, line


def test_prompts_that_are_not_utf8_are_named(hf, capsys):
    bad = b"caf\xe9".decode("utf-8", "surrogateescape")  # how Python hands over such a command-line argument
    code, line = run_cli(capsys, "generate", str(hf), "--prompt", "fine", "--prompt", bad)
    assert code == 2 and "--prompt 2: not valid UTF-8 (byte 3)" in line, line


@pytest.mark.parametrize("argv,flag", [
    (["build-predictors", "--out", "X", "--s", "nan"], "--s"),
    (["build-predictors", "--out", "X", "--s", "2"], "--s"),
    (["build-predictors", "--out", "X", "--s", "0"], "--s"),
    (["build-predictors", "--out", "X", "--tokens", "0"], "--tokens"),
    (["build-predictors", "--out", "X", "--target-loss", "0"], "--target-loss"),
    (["generate", "--prompt", "a", "--temperature", "nan"], "--temperature"),
    (["generate", "--prompt", "a", "--top-k", "-5"], "--top-k"),
    (["generate", "--prompt", "a", "--top-p", "0"], "--top-p"),
    (["generate", "--prompt", "a", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["generate", "--prompt", "a", "--seed", str(2 ** 64)], "--seed"),
    (["generate", "--prompt", "a", "--seed", "-1"], "--seed"),
    (["score", "--prompt-ids", "1,2", "--window", "0"], "--window"),
])
def test_bad_numbers_on_the_command_line_are_refused(capsys, argv, flag):
    code, line = run_cli(capsys, *argv)
    assert code == 2 and f"argument {flag}" in line, line


def test_flags_that_would_be_ignored_or_misplaced_are_named(capsys):
    """Sampling flags that greedy decoding would ignore, greedy samples asked for more than once, streaming of
    several samples, a whitespace-only prompt, and an unknown flag, which gets the command's usage rather than
    the top level's; --version prints the package's."""
    for argv, want in ((["--greedy", "--top-p", "0.9"], "--greedy excludes --temperature, --top-k and --top-p"),
                       (["--temperature", "0", "--top-k", "5"], "--temperature 0 is greedy decoding"),
                       (["--num-samples", "2"], "--num-samples 2: greedy samples are all the same"),
                       (["--temperature", "1", "--num-samples", "2", "--stream"], "--stream prints one sample"),
                       (["--stop", ""], "stop strings must not be empty")):
        code, line = run_cli(capsys, "generate", "--prompt", "a", *argv)
        assert code == 2 and want in line, line
    code, line = run_cli(capsys, "generate", "--prompt", " \n\t")
    assert code == 2 and "--prompt 1: empty or only whitespace" in line, line
    code, line = run_cli(capsys, "generate", "--prompt", "a", "--repetition-penalty", "0")
    assert code == 2 and "argument --repetition-penalty" in line, line
    with pytest.raises(SystemExit) as e:
        cli.main(["score", "--prompt-ids", "1,2", "--bogus"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "usage: svdsparse score" in err and "unrecognized arguments: --bogus" in err, err
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    from svdsparse_jax import __version__
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"svdsparse {__version__}" != "svdsparse "


def test_json_output_never_holds_nan(capsys):
    cli.print_json({"nll": float("nan"), "logprobs": [0.5, float("-inf")], "ok": 1.0})
    out = capsys.readouterr()
    assert json.loads(out.out) == {"nll": None, "logprobs": [0.5, None], "ok": 1.0}
    assert "2 non-finite values written as null (nll, logprobs[1])" in out.err


def test_seeds_span_64_bits():
    keys = [tuple(np.asarray(jax.random.key_data(seed_key(s)))) for s in (1, 2 ** 32 + 1, 2 ** 33 + 1, 2 ** 64 - 1)]
    assert len(set(keys)) == 4
    assert keys[0] == tuple(np.asarray(jax.random.key_data(jax.random.key(1))))  # 32-bit seeds as before
    with pytest.raises(SvdsparseError, match="seed"):
        seed_key(2 ** 64)


def test_existing_outputs_are_refused_before_any_work(hf, tmp_path, capsys):
    (tmp_path / "exists").mkdir()
    broken = tmp_path / "broken"  # reading it would fail: the refusal must come first
    broken.mkdir()
    (broken / "config.json").write_text((hf / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"junk")
    code, line = run_cli(capsys, "convert", str(broken), str(tmp_path / "exists"))
    assert code == 2 and "(OUT_DIR): already exists" in line, line
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    code, line = run_cli(capsys, "build-predictors", str(broken), "--out", str(tmp_path / "dangling"))
    assert code == 2 and "(--out): already exists" in line, line
    (tmp_path / "plot.png").write_text("x")
    code, line = run_cli(capsys, "eval", str(broken), "--predictors", "P", "--plots", str(tmp_path / "plot.png"))
    assert code == 2 and "(--plots): exists and is not a directory" in line, line


def test_a_full_disk_is_refused_before_the_weights_are_read(hf, tmp_path, capsys, monkeypatch):
    import shutil
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=50_000))  # the f32 weights need 0.39 MB
    code, line = run_cli(capsys, "convert", str(hf), str(tmp_path / "out"), "--dtype", "float32")
    assert code == 2 and "(OUT_DIR): needs about 0.39 MB, but its filesystem has 0.05 MB free" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_race_for_one_output_leaves_one_complete_result(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SvdsparseError, match="written by another run meanwhile"):
        with atomic_directory(out) as mine:
            (mine / "a").write_text("mine")
            with atomic_directory(out) as theirs:
                (theirs / "a").write_text("theirs")
    assert (out / "a").read_text() == "theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


CHILD = textwrap.dedent("""
    import signal, sys, time
    from pathlib import Path
    from svdsparse_jax.fsutil import atomic_directory, exit_on_signal
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # as the CLI's main does
        signal.signal(sig, lambda signum, frame: exit_on_signal(signum, "child"))
    with atomic_directory(Path(sys.argv[1])) as tmp:
        (tmp / "half").write_bytes(b"x" * 1000)
        print("writing", flush=True)
        time.sleep(60)
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGKILL])
def test_a_killed_writer_leaves_nothing_that_outlives_it(tmp_path, sig):
    """SIGTERM, SIGHUP and SIGINT remove the partial output and exit at once (code 128 + the signal); after
    SIGKILL, which no handler sees, the next write into the same parent removes it."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "out")], stdout=subprocess.PIPE,
                            text=True, cwd=HERE.parent)
    assert proc.stdout.readline().strip() == "writing"
    partials = list(tmp_path.glob(f".out{PARTIAL}*"))
    assert len(partials) == 1 and (partials[0] / "half").is_file()
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == (128 + sig if sig != signal.SIGKILL else -sig)
    assert not (tmp_path / "out").exists()
    if sig != signal.SIGKILL:
        assert not partials[0].exists()
        return
    assert partials[0].exists()
    with atomic_directory(tmp_path / "other") as tmp:
        (tmp / "done").write_text("ok")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]


def test_a_signal_just_after_the_partial_directory_is_made_still_removes_it(tmp_path, monkeypatch):
    """The handler (`exit_on_signal`) run at the first moment the partial directory exists, before anything else
    in `atomic_directory`: it finds the directory and removes it."""
    from svdsparse_jax import fsutil
    real_mkdir = os.mkdir

    def mkdir_then_signal(path, *args, **kwargs):
        real_mkdir(path, *args, **kwargs)
        if PARTIAL in os.fspath(path):
            fsutil.exit_on_signal(signal.SIGTERM, "test")

    def no_exit(code):
        raise SystemExit(code)
    monkeypatch.setattr(os, "mkdir", mkdir_then_signal)
    monkeypatch.setattr(os, "_exit", no_exit)
    with pytest.raises(SystemExit, match=str(128 + signal.SIGTERM)):
        with atomic_directory(tmp_path / "out"):
            pytest.fail("the block ran after the signal")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_conversion_killed_while_writing_then_a_clean_rerun(tmp_path, sig):
    """`svdsparse convert` killed while its output is being written (its partial directory exists): SIGTERM
    leaves nothing; after SIGKILL a rerun into the same place succeeds and leaves only its output."""
    src = make_hf_checkpoint(tmp_path / "hf", "llama_relu", seed=5, hidden_size=256, intermediate_size=1024,
                             num_hidden_layers=6, num_attention_heads=4).path  # ~40 MB of float32 to write
    work = tmp_path / "work"
    work.mkdir()
    cmd = [sys.executable, "-m", "svdsparse_jax.cli", "convert", str(src), str(work / "out"), "--dtype", "float32"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    for _ in range(5):  # the write lasts about a second: poll for it, retry if the kill came too late
        proc = subprocess.Popen(cmd, cwd=HERE.parent, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and not list(work.glob(f".out{PARTIAL}*")):
            pass
        proc.send_signal(sig)
        code = proc.wait(timeout=120)
        if not (work / "out").exists():
            assert code == (143 if sig == signal.SIGTERM else -9)
            break
        import shutil
        shutil.rmtree(work / "out")
    else:
        pytest.fail("the conversion finished before every kill")
    left = sorted(p.name for p in work.iterdir())
    if sig == signal.SIGTERM:
        assert left == [], left
    else:  # SIGKILL: the partial stays until the next run into the same directory
        assert len(left) == 1 and PARTIAL in left[0], left
    rerun = subprocess.run(cmd, cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert sorted(p.name for p in work.iterdir()) == ["out"]


def test_damaged_predictors_are_refused(hf, tmp_path, capsys):
    """NaN / Inf or integer factors in a predictor file, a manifest without its fingerprint or with too few
    layers: each refused, naming the file and the tensor or field."""
    from svdsparse_jax.checkpoint import load_model
    from svdsparse_jax.model import Transformer
    from svdsparse_jax.predictors import BuildConfig, build_predictors, load_predictors, save_predictors
    from svdsparse_jax.predictors.store import file_sha256

    lm = load_model(hf, np.float32)
    pset = build_predictors(Transformer(lm.cfg, lm.weights), np.random.default_rng(0).integers(0, 128, 1024),
                            BuildConfig(method="whitened", ranks=8, rule="s", value=0.5, tokens=1024, window=64),
                            progress=False)
    good = save_predictors(tmp_path / "good", pset, lm.cfg, lm.fingerprint)
    load_predictors(good, lm.cfg, lm.fingerprint)

    def damaged(name, edit_tensors=None, edit_manifest=None):
        d = tmp_path / name
        d.mkdir()
        tensors = load_file(str(good / "predictors.safetensors"))
        manifest = json.loads((good / "manifest.json").read_text())
        if edit_tensors:
            edit_tensors(tensors)
        if edit_manifest:
            edit_manifest(manifest)
        save_file(tensors, str(d / "predictors.safetensors"))
        if "tensors_sha256" in manifest:  # a manifest written for these tensors: the tensor checks must still hold
            manifest["tensors_sha256"] = file_sha256(d / "predictors.safetensors")
        (d / "manifest.json").write_text(json.dumps(manifest))
        return d

    cases = {
        "nan": (lambda t: t["layers.1.b"].__setitem__((0, 0), np.nan), None, "layers.1.b: 1 of"),
        "inf": (lambda t: t["layers.0.a"].__setitem__((3, 1), np.inf), None, "layers.0.a: 1 of"),
        "nan_bias": (lambda t: t["layers.0.bias"].__setitem__(3, np.nan), None,
                     "layers.0.bias: 1 of 128 values are NaN"),
        "int32": (lambda t: t.__setitem__("layers.0.a", t["layers.0.a"].astype(np.int32)), None,
                  "layers.0.a is int32, expected floating point"),
        "no_fingerprint": (None, lambda m: m.pop("fingerprint"), "missing fields ['fingerprint']"),
        "no_layers": (None, lambda m: m.pop("layers"), "missing fields ['layers']"),
        "short_layers": (None, lambda m: m["layers"].pop(), "layers must list 2 entries"),
    }
    for name, (et, em, want) in cases.items():
        with pytest.raises(SvdsparseError) as e:
            load_predictors(damaged(name, et, em), lm.cfg, lm.fingerprint)
        assert str(tmp_path / name) in str(e.value) and want in str(e.value), (name, e.value)


@pytest.mark.parametrize("case", ["empty", "truncated", "random", "payload", "int8", "complex", "fc1_bias"])
def test_damaged_svdp_files_name_the_file(tmp_path, case):
    from torch_npu_bridge.svdp_format import read_svdp

    d, dff, r = 16, 32, 4
    good = {"fc1.weight": torch.randn(r, d), "fc2.weight": torch.randn(dff, r), "fc2.bias": torch.randn(dff)}
    root = tmp_path / "svdp"
    root.mkdir()
    torch.save(good, root / "model_0.pt")
    path = root / "model_1.pt"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        torch.save(good, path)
        path.write_bytes(path.read_bytes()[:200])
    elif case == "random":
        path.write_bytes(np.random.default_rng(0).bytes(3000))
    elif case == "payload":  # a pickle that would run a command: weights_only refuses it
        class Evil:
            def __reduce__(self):
                return (os.system, (f"touch {tmp_path / 'pwned'}",))
        torch.save({"x": Evil()}, path)
    else:
        bad = dict(good)
        if case == "int8":
            bad["fc2.weight"] = torch.ones(dff, r, dtype=torch.int8)
        elif case == "complex":
            bad["fc1.weight"] = torch.randn(r, d, dtype=torch.complex64)
        else:
            bad["fc1.bias"] = torch.randn(r)
        torch.save(bad, path)
    with pytest.raises(SvdsparseError) as e:
        read_svdp(root, 2, d, dff, allow_pickle=True)
    assert str(e.value).startswith(str(path)), e.value
    assert not (tmp_path / "pwned").exists()
