"""One decode benchmark run alternately on two checkouts: a change against the commit before it, on one device in
one session (base, head, base, head, ...), so drift of the device shows as spread rather than as a difference.

  python -m scripts.bench.ab --base REV [--base-dir DIR] --base-cmd "CMD {json}" --head-cmd "CMD {json}"
                             [--rounds 2] [--json-out F]

The base checkout is `git archive REV` unpacked into --base-dir (skipped when the directory exists, e.g. carried
to a machine without git); each command runs in its checkout's root and writes its decode report to `{json}`.
The two commands may differ (a benchmark's options can change with the code); they should measure the same
thing. Rows are matched by (shape, gate decay, batch, sparse), and the report gives each side's median decode
tok/s, every round's value, and head / base.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from scripts.bench import harness


def checkout(rev: str, where: Path) -> Path:
    """`git archive rev` unpacked into `where` (the bundled assets left out), unless `where` already exists."""
    if not where.exists():
        where.mkdir(parents=True)
        files = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev], cwd=harness.ROOT, check=True,
                               capture_output=True, text=True).stdout.split()
        keep = [f for f in files if "/assets/" not in f and not f.startswith("docs/")]
        archive = subprocess.run(["git", "archive", rev, *keep], cwd=harness.ROOT, check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(where)], input=archive.stdout, check=True)
    return where


def run(command: str, cwd: Path, out: Path) -> list[dict]:
    """Runs one benchmark command in `cwd`; its report's rows."""
    argv = [sys.executable if a == "python" else a for a in shlex.split(command.format(json=out))]
    print(f"$ (cd {cwd}; {' '.join(argv)})", flush=True)
    subprocess.run(argv, cwd=cwd, check=True)
    return json.loads(out.read_text())["runs"]


def key(row: dict) -> tuple:
    return row["shape"], row["gate_decay"], row["batch"], "sparse" if row["sparse"] else "dense"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the base revision (recorded; archived when --base-dir is absent)")
    ap.add_argument("--base-dir", help="where the base checkout is or goes (default: a temporary directory)")
    ap.add_argument("--base-cmd", required=True)
    ap.add_argument("--head-cmd", required=True)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--keep", help="a directory for every run's own report (base_0.json, head_0.json, ...)")
    harness.add_report_args(ap)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="svdsparse-ab-") as tmp:
        return compare(args, Path(tmp))


def compare(args: argparse.Namespace, tmp: Path) -> int:
    reports = Path(args.keep) if args.keep else tmp
    reports.mkdir(parents=True, exist_ok=True)
    base_dir = checkout(args.base, Path(args.base_dir) if args.base_dir else tmp / "base")
    values: dict[tuple, dict[str, list[float]]] = {}
    for r in range(args.rounds):
        for side, cmd, cwd in (("base", args.base_cmd, base_dir), ("head", args.head_cmd, harness.ROOT)):
            for row in run(cmd, cwd, (reports / f"{side}_{r}.json").absolute()):
                values.setdefault(key(row), {"base": [], "head": []})[side].append(row["decode_tokens_per_s"])
    rows = []
    for k, v in values.items():
        base, head = statistics.median(v["base"]), statistics.median(v["head"])
        rows.append({"shape": k[0], "gate_decay": k[1], "batch": k[2], "mode": k[3], "base_tokens_per_s": base,
                     "head_tokens_per_s": head, "head_over_base": round(head / base, 4), "base_runs": v["base"],
                     "head_runs": v["head"]})
    rep = harness.report(args, base=args.base, base_cmd=args.base_cmd, head_cmd=args.head_cmd, runs=rows)
    harness.save(rep, args.json_out)
    print(f"\n{rep['device']}: base {args.base} against head {rep['commit']}, {args.rounds} rounds, decode tok/s")
    print(harness.table(rows, {"shape": "shape", "decay": "gate_decay", "batch": "batch", "mode": "mode",
                               "base": "base_tokens_per_s", "head": "head_tokens_per_s", "head/base": "head_over_base",
                               "runs (base; head)": lambda r: f"{r['base_runs']}; {r['head_runs']}"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
