"""Two small lm-eval tasks on the bundled model's held-out code, written as local files (lm-eval's `json`
dataset path: no network): a four-way multiple choice (which text ends this line?) and a generation task (the
next line, greedy, until the line end, exact match). Run as a script, it scores the bundled model on both
through lm-eval, dense and with predictors, and writes a report:

    python -m scripts.bench.lm_eval_tasks --items 200 --out docs/bench/lm_eval_bundled.json
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

MC_TASK = "svdsparse_code_mc"
GEN_TASK = "svdsparse_code_gen"


def code_lines(tokenizer, tokens: np.ndarray) -> list[str]:
    """Non-trivial lines of held-out code (20 to 80 characters, not comments) with a space near the middle."""
    text = tokenizer.decode(tokens.tolist(), skip_special_tokens=True)
    return [ln for ln in text.split("\n") if 20 <= len(ln.strip()) <= 80 and not ln.strip().startswith("#")
            and _cut(ln) > 4]


def _cut(line: str) -> int:
    """Where a line splits into question and answer: the last space before its middle (so the answer starts a
    word, and context and answer tokenize apart)."""
    return line.rfind(" ", 0, len(line) // 2 + 1)


def write_tasks(root: Path, tokenizer, tokens: np.ndarray, n: int, seed: int) -> Path:
    """Writes both tasks' data (n items each) and YAML under root; returns root (lm-eval's include_path)."""
    rng = np.random.default_rng(seed)
    text = tokenizer.decode(tokens.tolist(), skip_special_tokens=True).split("\n")
    lines = code_lines(tokenizer, tokens)
    picks = rng.choice(len(lines), size=n, replace=False)
    mc = []
    for i in picks:
        line = lines[i]
        others = [j for j in rng.choice(len(lines), size=4, replace=False) if lines[j][_cut(lines[j]):] !=
                  line[_cut(line):]][:3]
        choices = [line[_cut(line):]] + [lines[j][_cut(lines[j]):] for j in others]
        order = rng.permutation(len(choices))
        mc.append({"context": line[:_cut(line)], "choices": [choices[k] for k in order],
                   "gold": int(np.argmax(order == 0))})
    gen = []
    starts = rng.choice(len(text) - 4, size=n, replace=False)
    for s in starts:
        gen.append({"context": "\n".join(text[s:s + 3]) + "\n", "target": text[s + 3]})
    for name, rows in (("mc", mc), ("gen", gen)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / f"{MC_TASK}.yaml").write_text(f"""task: {MC_TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    (root / f"{GEN_TASK}.yaml").write_text(f"""task: {GEN_TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / 'gen.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 24
  do_sample: false
metric_list:
  - metric: exact_match
""")
    return root


def main() -> None:
    import jax.numpy as jnp
    import lm_eval
    from lm_eval.tasks import TaskManager

    from svdsparse_jax.assets import BUNDLED_MODEL, corpus_split
    from svdsparse_jax.cli import demo_build_config
    from svdsparse_jax.convert import load_model
    from svdsparse_jax.lm_eval_model import SvdsparseLM
    from svdsparse_jax.model import Transformer
    from svdsparse_jax.predictors import build_predictors, save_predictors

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=200, help="items per task")
    ap.add_argument("--seed", type=int, default=0, help="which held-out lines become items")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", help="JSON report")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="svdsparse-lm-eval-"))
    lm = load_model(BUNDLED_MODEL, jnp.dtype(args.dtype))
    bc = demo_build_config(lm.cfg)  # the defaults: whitened SVD, rank d/4, recall 0.99, 65,536 tokens
    pset = build_predictors(Transformer(lm.cfg, lm.weights), corpus_split("calib"), bc)
    save_predictors(root / "predictors", pset, lm.cfg, lm.fingerprint)
    write_tasks(root, lm.tokenizer, corpus_split("heldout"), args.items, args.seed)
    manager = TaskManager(include_path=str(root))
    report = {"items": args.items, "seed": args.seed, "dtype": args.dtype, "predictors": pset.config, "runs": {}}
    for name, preds in (("dense", None), ("whitened", str(root / "predictors"))):
        t0 = time.perf_counter()
        model = SvdsparseLM(predictors=preds, dtype=args.dtype, batch_size=8, kernels="xla")
        out = lm_eval.simple_evaluate(model=model, tasks=[MC_TASK, GEN_TASK], task_manager=manager,
                                      random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
        report["runs"][name] = {task: {k: v for k, v in out["results"][task].items() if "," in k}
                                for task in (MC_TASK, GEN_TASK)} | {"seconds": round(time.perf_counter() - t0, 1)}
    for task, metric in ((MC_TASK, "acc,none"), (MC_TASK, "acc_norm,none"), (GEN_TASK, "exact_match,none")):
        d, s = report["runs"]["dense"][task][metric], report["runs"]["whitened"][task][metric]
        stderr = report["runs"]["dense"][task][metric.replace(",", "_stderr,")]
        print(f"{task} {metric.split(',')[0]}: dense {d:.4f}, whitened {s:.4f} ({s - d:+.4f}; stderr {stderr:.4f})")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
