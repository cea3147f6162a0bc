"""Fixtures shared by the tests. Every random draw is seeded: the run has one base seed (fresh each run unless
--seed is given, printed in the header and in every failure report) and each test draws from its own generator,
seeded by the base seed and the test's id, so a failure reruns exactly with `--seed BASE` (with or without
pytest-xdist's workers). torch is imported only by the fixtures that build Hugging Face checkpoints."""

from __future__ import annotations

import os
import secrets
import zlib

import numpy as np
import pytest

# The CLI keeps compiled programs in the user's cache by default; the tests (and the commands they start) do not
# write there. test_cli's compilation-cache test names its own directory.
os.environ.setdefault("SVDSPARSE_COMPILE_CACHE", "off")


def pytest_addoption(parser):
    parser.addoption("--seed", type=int, default=None,
                     help="base seed of the tests' random draws (default: a fresh one, printed in the header)")


def pytest_configure(config):
    seed = config.getoption("--seed")
    if hasattr(config, "workerinput"):  # a pytest-xdist worker: the controller's seed
        seed = config.workerinput["base_seed"]
    config.base_seed = secrets.randbelow(1 << 31) if seed is None else seed


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """pytest-xdist, on the controller: every worker draws from the one base seed the header prints."""
    node.workerinput["base_seed"] = node.config.base_seed


def pytest_report_header(config):
    return f"random draws: base seed {config.base_seed} (rerun with --seed {config.base_seed})"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        report.sections.append(("random draws", f"base seed {item.config.base_seed}: rerun with --seed "
                                                f"{item.config.base_seed}"))
    return report


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture
def seed(request) -> int:
    """This test's seed: the run's base seed mixed with the test's id."""
    return (request.config.base_seed * 1_000_003 + zlib.crc32(request.node.nodeid.encode())) % (1 << 31)


@pytest.fixture
def rng(seed) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.fixture(params=("llama_relu", "mistral_gqa", "qwen2_tied", "llama_fatrelu", "llama_drelu"))
def hf_checkpoint(request, tmp_path, seed):
    from checkpoints import make_hf_checkpoint
    return make_hf_checkpoint(tmp_path / request.param, request.param, seed=seed)


@pytest.fixture
def llama_checkpoint(tmp_path, seed):
    from checkpoints import make_hf_checkpoint
    return make_hf_checkpoint(tmp_path / "llama", "llama_relu", seed=seed)
