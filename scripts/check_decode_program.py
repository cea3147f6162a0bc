"""The decode program's jaxpr for the GPU path, traced on any backend: whether a refactor changed what runs.

Traces the whole generate program (prefill, then the `lax.while_loop` of decode steps: `generate._generate_program`)
under the engine the H200 runs (backend 'pallas', platform 'gpu', the measured projection and sparse-FFN tables;
the decode benchmark's `EngineConfig.resolve("auto")` on a GPU) with `jax.make_jaxpr`, for batch 1 and 4, dense
and sparse (an SVD predictor on every layer), on model shapes given by name ("bundled": the bundled model's
config; or a `config.NAMED_SHAPES` name, cut to 2 layers) with abstract weights (no arrays are made: `nnx.eval_shape`).
`pallas_call` is a primitive, so no GPU is needed.

The jaxpr text is normalised before hashing: the kernels' source locations (`name_and_src_info`: file and line of
the kernel function) are cut to the function's name, so moving a kernel within its file does not count as a
change; name stacks (`jax.named_scope`) and source info are not printed by default.

  python scripts/check_decode_program.py --out DIR            # writes DIR/<case>.jaxpr and DIR/hashes.json
  python scripts/check_decode_program.py --out DIR2 --compare DIR   # exit 1 and a unified diff if any differ
"""

from __future__ import annotations

import argparse
import difflib
import functools
import hashlib
import json
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from svdsparse_jax import assets, generate  # noqa: E402
from svdsparse_jax.config import named_config, read_hf_config  # noqa: E402
from svdsparse_jax.engine import EngineConfig  # noqa: E402
from svdsparse_jax.model import Transformer  # noqa: E402
from svdsparse_jax.predictors.base import LowRankPredictor  # noqa: E402
from svdsparse_jax.weights import init_weights  # noqa: E402

GPU = EngineConfig(backend="pallas", platform="gpu")  # EngineConfig.resolve("auto") on a GPU, every other default
RANK = 64
PROMPT, NEW = 16, 16
_SRC = re.compile(r"( for kernel function \S+)? at [^\s,\]]+:\d+")


def model_config(shape: str):
    if shape == "bundled":
        return read_hf_config(assets.BUNDLED_MODEL)
    return named_config(shape, max_seq_len=512, n_layers=2)  # the shapes pick the tiles; 2 layers suffice


def program_text(shape: str, batch: int, sparse: bool, dtype=jnp.bfloat16) -> str:
    """The normalised jaxpr of one generate program (greedy, unwatched, no penalty)."""
    cfg = model_config(shape)
    model = nnx.eval_shape(lambda: Transformer(cfg, init_weights(cfg, jax.random.key(0), dtype), GPU))
    graphdef, state = nnx.split(model)
    preds = None
    if sparse:
        sd = jax.ShapeDtypeStruct
        preds = [LowRankPredictor(sd((RANK, cfg.d_model), dtype), sd((cfg.d_ff, RANK), dtype), sd((cfg.d_ff,), dtype))
                 for _ in range(cfg.n_layers)]
    program = functools.partial(generate._generate_program, new_bucket=NEW, greedy=True, penalized=False, watch=None)
    args = (graphdef, state, preds, jax.ShapeDtypeStruct((batch, PROMPT), jnp.int32),
            jax.ShapeDtypeStruct((batch,), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32),
            jax.tree.map(lambda v: jax.ShapeDtypeStruct((), jnp.float32 if isinstance(v, float) else jnp.int32),
                         generate.Sampler()),
            jax.eval_shape(lambda: jax.random.key(0)), jax.ShapeDtypeStruct((1,), jnp.int32))
    closed = jax.make_jaxpr(program, static_argnums=(0,))(*args)
    kernels = "\n".join(f"kernel {i}:\n{k}" for i, k in enumerate(kernel_bodies(closed.jaxpr)))
    return _SRC.sub("", f"{closed}\n{kernels}")


def kernel_bodies(jaxpr) -> list[str]:
    """The body of every pallas_call in the program, in order (the program's text names them only by a label)."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            out.append(str(eqn.params["jaxpr"]))
        for sub in jax.core.subjaxprs(eqn.params) if hasattr(jax.core, "subjaxprs") else _subjaxprs(eqn.params):
            out += kernel_bodies(sub)
    return out


def _subjaxprs(params: dict):
    for v in params.values():
        for item in v if isinstance(v, (tuple, list)) else (v,):
            if isinstance(item, jax.extend.core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jax.extend.core.Jaxpr):
                yield item


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for <case>.jaxpr and hashes.json")
    ap.add_argument("--compare", help="a directory an earlier run wrote: exit 1 if any program differs")
    ap.add_argument("--shapes", nargs="+", default=["bundled", "llama2-7b"])
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    hashes = {}
    for shape in args.shapes:
        for batch in (1, 4):
            for sparse in (False, True):
                case = f"{shape}_b{batch}_{'sparse' if sparse else 'dense'}"
                text = program_text(shape, batch, sparse)
                (out / f"{case}.jaxpr").write_text(text)
                hashes[case] = hashlib.sha256(text.encode()).hexdigest()
                print(f"{case:28s} {hashes[case]}  ({len(text.splitlines())} lines)", flush=True)
    (out / "hashes.json").write_text(json.dumps(hashes, indent=1) + "\n")
    if not args.compare:
        return 0
    before = json.loads((Path(args.compare) / "hashes.json").read_text())
    changed = [c for c in hashes if before.get(c) != hashes[c]]
    for case in changed:
        old = (Path(args.compare) / f"{case}.jaxpr").read_text().splitlines()
        new = (out / f"{case}.jaxpr").read_text().splitlines()
        diff = list(difflib.unified_diff(old, new, case, case, lineterm=""))
        sys.stdout.writelines(line + "\n" for line in diff[:200])
    print(f"{len(hashes) - len(changed)} of {len(hashes)} programs unchanged" + (f"; changed: {changed}" if changed
                                                                                else ""))
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
