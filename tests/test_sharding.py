"""Tensor-parallel decode on CPU host devices (`--xla_force_host_platform_device_count`, set in a subprocess
before JAX starts): sharded dense and sparse logits equal the unsharded ones (f32, relative error <= 1e-5) and
greedy tokens are identical on 1, 2 and 4 devices, for MHA, GQA with 2 KV heads (replicated on 4 devices) and
Qwen2's qkv bias, also with the guarded FFN's kernels (interpreted) per shard; sharded loading round-trips
exactly; two processes run one program; meshes that do not divide the model are refused."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from svdsparse_jax.config import named_config
from svdsparse_jax.errors import SvdsparseError
from svdsparse_jax.sharding import axis_rules, check_mesh, make_mesh

HERE = Path(__file__).parent


@pytest.mark.parametrize("family,sizes", [("llama_relu", "124"), ("mistral_gqa", "24"), ("qwen2_tied", "24")])
def test_sharded_logits_and_tokens_equal_unsharded(family, sizes, tmp_path, seed):
    """The one-device mesh once; GQA at 2 devices (KV heads split) and 4 (replicated)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, str(HERE / "multidevice.py"), "decode", family, str(tmp_path), str(seed),
                        *sizes], capture_output=True, text=True, env=env, cwd=HERE.parent, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["devices"] == 4
    for run in out["runs"]:
        assert run["w_gate_shards"] == run["n"] and run["w_gate_shard_rows"] == 128 // run["n"]  # d_ff 128 split
        for mode in ("dense", "sparse", "kernels_dense_3", "kernels_dense_1", "kernels_sparse_3", "kernels_sparse_1",
                     "gate_up_dense_3", "gate_up_dense_1"):
            assert run[f"{mode}_rel_err"] <= 1e-5, run
        assert run["dense_tokens_equal"] and run["sparse_tokens_equal"] and run["kernels_tokens_equal"], run
        # heads split with no resharding: each device's q/k/v rows are its heads', and the only collectives are
        # the all-reduces after o_proj and the FFN of each layer (and one for the vocabulary-split embedding)
        assert run["qkv_blocks_are_heads"], run
        for mode, ops in run["collectives"].items():
            if run["n"] == 1:
                assert ops == {}, (mode, ops)
            else:
                assert set(ops) == {"all-reduce"} and ops["all-reduce"] - 2 * out["layers"] in (0, 1), (mode, ops)


def first_sample(stdout: str) -> list[int]:
    """The first sample's new tokens in `generate --json` output."""
    return json.loads(stdout)["results"][0]["samples"][0]["output_ids"]


def test_sharded_conversion_and_loading_round_trip_exactly(tmp_path, seed):
    """A converted directory (orbax restores each tensor's shards onto their devices) and an HF directory, loaded
    onto 2 and 4 devices: every tensor has its table sharding, the split ones are split, values are exact."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, str(HERE / "multidevice.py"), "convert", "qwen2_tied", str(tmp_path),
                        str(seed), "2", "4"], capture_output=True, text=True, env=env, cwd=HERE.parent, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = json.loads(r.stdout.strip().splitlines()[-1])["runs"]
    assert len(runs) == 4
    for run in runs:
        # per layer q/k/v/o and the q/k/v biases (by heads), gate/up/down (by neurons); the tied embedding (by
        # vocabulary); on 4 devices the 2 KV heads (k, v and their biases) are replicated
        split = 2 * (10 if run["n"] == 2 else 6) + 1
        assert run["shardings"] and run["equal"] and run["split_tensors"] == split, run


def test_meshes_that_do_not_divide_the_model_are_refused():
    cfg = named_config("tiny")  # 4 heads, 2 KV heads, d_ff 256
    check_mesh(cfg, 4)  # KV heads fewer than devices: replicated
    assert axis_rules(cfg, 4)["kv_heads"] is None and axis_rules(cfg, 2)["kv_heads"] == "model"
    with pytest.raises(SvdsparseError, match="4 attention heads do not split evenly over 3 devices"):
        check_mesh(cfg, 3)
    with pytest.raises(SvdsparseError, match="3 KV heads do not split evenly over 2"):
        check_mesh(named_config("tiny", n_kv_heads=3, n_heads=6), 2)
    with pytest.raises(SvdsparseError, match="FFN neurons"):
        check_mesh(named_config("tiny", d_ff=255), 2)
    with pytest.raises(SvdsparseError, match="--devices 2: this JAX backend has 1 cpu device"):
        make_mesh(2)


def test_cli_devices(tmp_path):
    """`generate --devices 2` and `score --devices 2` give the one-device tokens and scores on the bundled model;
    `--devices 3` (4 heads) is refused with a one-line error."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}

    def cli(*argv):
        return subprocess.run([sys.executable, "-c", "import sys; from svdsparse_jax.cli import main; "
                               "sys.exit(main(sys.argv[1:]))", *argv], capture_output=True, text=True, env=env,
                              cwd=HERE.parent, timeout=600)

    outs = []
    for devices in ("1", "2"):
        gen = cli("generate", "--prompt", "def main():\n", "--max-new-tokens", "12", "--dtype", "float32", "--json",
                  "--devices", devices)
        score = cli("score", "--prompt-ids", "5,17,300,42,9,77", "--dtype", "float32", "--json", "--devices", devices)
        assert gen.returncode == 0 and score.returncode == 0, gen.stderr[-2000:] + score.stderr[-2000:]
        outs.append((first_sample(gen.stdout), json.loads(score.stdout)["logprobs"]))
    assert outs[0][0] == outs[1][0]
    assert outs[0][1] == pytest.approx(outs[1][1], rel=1e-5, abs=1e-5)
    bad = cli("generate", "--prompt-ids", "1,2", "--devices", "3")
    lines = [ln for ln in bad.stderr.splitlines() if ln.strip()]
    assert bad.returncode == 2 and "--devices 3: the model's 4 attention heads" in lines[-1]
    assert "Traceback" not in bad.stderr


def test_two_processes_run_one_program(tmp_path):
    """`jax.distributed` on localhost: two processes of 2 CPU devices each run `generate --devices 4` as one
    program (gloo collectives between them) and give the one-process tokens; only process 0 prints."""
    import socket
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    run = [sys.executable, "-c", "import sys; from svdsparse_jax.cli import main; sys.exit(main(sys.argv[1:]))",
           "generate", "--prompt", "class A:\n", "--max-new-tokens", "10", "--dtype", "float32", "--json"]
    procs = [subprocess.Popen(run + ["--devices", "4", "--coordinator", f"localhost:{port}", "--num-processes", "2",
                                     "--process-id", str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env, cwd=HERE.parent) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    alone = subprocess.run(run, capture_output=True, text=True, env=env, cwd=HERE.parent, timeout=600)
    # gloo reports its connections on stdout from its own threads ("[Gloo] Rank 1 is connected to 3 peer ranks.
    # ..."), sometimes split over two lines; the CLI's output is the one JSON line
    json_lines = [[ln for ln in out.splitlines() if ln.startswith("{")] for out, _ in outs]
    assert len(json_lines[0]) == 1 and first_sample(json_lines[0][0]) == first_sample(alone.stdout)
    assert json_lines[1] == []
    other = [ln for out, _ in outs for ln in out.splitlines() if ln.strip() and not ln.startswith("{")]
    assert all("[Gloo]" in ln or "peer ranks" in ln for ln in other), other


def test_incomplete_process_options_are_refused(capsys, monkeypatch):
    from svdsparse_jax.cli import main
    for env in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(env, raising=False)
    assert main(["generate", "--prompt-ids", "1,2", "--coordinator", "localhost:1"]) == 2
    assert "--coordinator localhost:1: also give --num-processes" in capsys.readouterr().err
    assert main(["generate", "--prompt-ids", "1,2", "--coordinator", "localhost:1", "--num-processes", "2",
                 "--process-id", "2"]) == 2
    assert "--process-id 2: expected 0 <= id < --num-processes 2" in capsys.readouterr().err
