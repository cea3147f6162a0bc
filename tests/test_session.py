"""The one public loader (`session.load`) against the command line and the checkpoint: its model generates
`svdsparse generate`'s tokens, dense and with predictors; its fingerprint, taken from the model's fused arrays,
is the checkpoint's; building predictors refuses an existing output before any work. And progress off a
terminal: plain lines, with the count the work has (`progress.tqdm`, and `svdsparse build-predictors` piped)."""

import io
import json
import os
import pty
import subprocess
import sys
import time

import jax.numpy as jnp
import pytest
from tqdm import tqdm as stock_tqdm

from svdsparse_jax import session
from svdsparse_jax.assets import BUNDLED_MODEL, corpus_split
from svdsparse_jax.checkpoint import load_model
from svdsparse_jax.cli import main
from svdsparse_jax.errors import SvdsparseError
from svdsparse_jax.predictors import BuildConfig
from svdsparse_jax.progress import tqdm
from svdsparse_jax.weights import model_fingerprint


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A float32 session of the bundled model with small whitened predictors, saved."""
    out = tmp_path_factory.mktemp("session") / "pred"
    s = session.load(dtype="float32", kernels="xla", ffn_policy="sparse")
    s = s.build_predictors(corpus_split("calib"), BuildConfig(ranks=32, value=0.7, tokens=4096), out=out,
                           progress=False)
    return s, out


def cli_tokens(capsys, ids: list[int], *flags: str) -> list[int]:
    assert main(["generate", "--prompt-ids", ",".join(map(str, ids)), "--max-new-tokens", "12", "--dtype", "float32",
                 "--kernels", "xla", "--json", *flags]) == 0
    return json.loads(capsys.readouterr().out)["results"][0]["samples"][0]["output_ids"]


def test_loader_generates_the_cli_tokens(built, capsys, rng):
    s, pred = built
    ids = [int(t) for t in rng.integers(3, s.cfg.vocab_size, 9)]
    assert s.generator(dense=True).generate([ids], 12).tokens[0] == cli_tokens(capsys, ids)
    assert s.generator().generate([ids], 12).tokens[0] == cli_tokens(capsys, ids, "--predictors", str(pred),
                                                                     "--ffn-policy", "sparse")
    again = session.load(dtype="float32", kernels="xla", ffn_policy="sparse", predictors=pred)
    assert again.generator().generate([ids], 12).tokens[0] == s.generator().generate([ids], 12).tokens[0]
    assert again.engine.ffn_policy == "sparse" and again.predictors.method == "whitened"


def test_fingerprint_from_the_model_is_the_checkpoints(built):
    s, _ = built
    lm = load_model(BUNDLED_MODEL, jnp.float32)
    assert s.fingerprint == model_fingerprint(lm.cfg, lm.weights)
    bf16 = session.load()  # computed from the fused q/k/v of a bf16 model: the scheme keeps the digest
    assert "fingerprint" not in bf16.__dict__ and bf16.fingerprint == s.fingerprint


def test_an_existing_output_is_refused_before_the_build(built, tmp_path, monkeypatch):
    s, _ = built
    (tmp_path / "taken").mkdir()
    calls = []
    monkeypatch.setattr(session, "build_predictors", lambda *a, **k: calls.append(a))
    with pytest.raises(SvdsparseError, match="taken"):
        s.build_predictors(corpus_split("calib"), BuildConfig(ranks=32, value=0.7, tokens=4096), out=tmp_path / "taken")
    assert calls == []
    with pytest.raises(SvdsparseError, match="no model given|not a directory"):
        session.load(tmp_path / "missing")


def test_progress_off_a_terminal_is_plain_lines():
    log = io.StringIO()
    for _ in tqdm(range(8), desc="layers", disable=None, file=log, mininterval=0.2, delay=0.2, unit="layer"):
        time.sleep(0.1)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and log.getvalue().endswith("\n") and len(lines) >= 2
    counts = [int(line.split("| ")[1].split("/")[0]) for line in lines]
    assert counts == sorted(counts) and lines[-1].count(" 8/8 ") == 1 and counts.count(8) == 1
    quick = io.StringIO()  # work shorter than the interval leaves nothing
    list(tqdm(range(8), disable=None, file=quick))
    assert quick.getvalue() == ""
    # on a terminal it is tqdm's own bar: the same bytes as stock tqdm's
    outs = []
    for cls in (tqdm, stock_tqdm):
        main_fd, other_fd = pty.openpty()
        with os.fdopen(other_fd, "w") as term:
            bar = cls(total=3, desc="t", disable=None, file=term, mininterval=0,
                      bar_format="{desc}: {n_fmt}/{total_fmt}")
            bar.update(1)
            bar.update(2)
            bar.close()
        out = b""
        while True:  # to the end of what was written (the other side is closed)
            try:
                chunk = os.read(main_fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        outs.append(out)
        os.close(main_fd)
    assert outs[0] == outs[1] and b"\r" in outs[0]


def test_build_predictors_piped_to_a_log_prints_progress(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-m", "svdsparse_jax.cli", "build-predictors", "--out", str(tmp_path / "p"),
                          "--tokens", "32768", "--dtype", "float32", "--json"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    layers = json.loads(run.stdout)["layers"]
    progress = [line for line in run.stderr.splitlines() if line.startswith("build whitened:")]
    assert progress and "\r" not in run.stderr
    assert progress[-1].count(f" {len(layers)}/{len(layers)} ") == 1  # the last line: every layer built
