#!/usr/bin/env bash
# Issue 28's "user's path" row, through the CLI only: a random LLaMA2-7B-shaped HF checkpoint written with
# transformers (FATReLU at the gate's 0.9 quantile, W_gate columns scaled by (j+1)^-0.5, the bundled tokenizer),
# `build-predictors` with its defaults calibrated on 120 files of the Python standard library, then `generate`,
# greedy, 128 new tokens, dense and sparse, at each batch size: batch B sends the first B of 16 code prompts
# (scripts/bench/user_path.py) in one call. The figure is the CLI's tokens_per_s (new tokens over the program's
# run, prefill included, compilation not). Reports: $OUT/user_path.json (every run and the build), user_path.log.
#   bash scripts/bench/user_path.sh [--shape S] [--batches "1 4 8"] [--new-tokens N] [--device cuda|cpu]
#                                   [--work DIR] [--commit C] [--build-args "ARGS"] [--tag NAME] [--cache off|on]
#                                   [--preallocate on|off] [--order "dense sparse"]
# --build-args: more build-predictors flags (e.g. "--rank auto"); with --tag NAME its predictors, runs and report
# are kept apart (pred_NAME, runs_NAME, user_path_NAME.json), beside the defaults' and on the same checkpoint.
# --cache: `generate` without the persistent compilation cache (off, the default here) or with the user's (on).
# With it on, a run whose program an earlier run compiled (sparse with no sparse layer is dense's program) loads it
# from the cache, and that program's one timed call runs 6-8% slower than a freshly compiled one's (docs/
# BENCHMARKS.md, eighth session): off, every run compiles and is timed alike.
# --preallocate: JAX's GPU memory preallocation for build-predictors and generate (on, JAX's default and so the
# user's; off: XLA_PYTHON_CLIENT_PREALLOCATE=false, as every run before the twelfth session). The checkpoint's
# writer runs torch beside JAX, always with it off. Until then a sparse run whose policy picked no sparse layer (the
# very program of the dense run) ran 3-7% slower than dense in 3 of 4 sessions while three dense processes spread
# 2% (docs/BENCHMARKS.md, twelfth session): this flag tells the allocator's part.
# --order: the runs at each batch size, in order; a mode named again runs again in a fresh process ("dense sparse
# sparse dense": an ABBA pair, which tells a process's own spread from sparsity's effect).
# The checkpoint and the predictors stay in --work (default /tmp/user_path) and are reused by a later call on
# the same machine. CPU dry run: --shape tiny --batches "1 2" --new-tokens 8 --device cpu.
set -o pipefail
export PYTHONUNBUFFERED=1
shape=llama2-7b batches="1 4 8" new=128 device=cuda work=/tmp/user_path commit= build_args= tag= cache=off
preallocate=on order="dense sparse"
while [ $# -gt 0 ]; do
    case $1 in
        --shape) shape=$2 ;; --batches) batches=$2 ;; --new-tokens) new=$2 ;; --device) device=$2 ;;
        --work) work=$2 ;; --commit) commit=$2 ;; --build-args) build_args=$2 ;; --tag) tag=$2 ;;
        --cache) cache=$2 ;; --preallocate) preallocate=$2 ;; --order) order=$2 ;;
        *) echo "user_path.sh: unknown flag $1" >&2; exit 2 ;;
    esac
    shift 2
done
case $preallocate in on) ;; off) export XLA_PYTHON_CLIENT_PREALLOCATE=false ;;
    *) echo "user_path.sh: --preallocate must be on or off, not $preallocate" >&2; exit 2 ;; esac
suffix=${tag:+_$tag} pred=$work/pred${tag:+_$tag} runs=$work/runs${tag:+_$tag}
out=${OUT:-$work/out}; mkdir -p "$out" "$runs"
log=$out/user_path$suffix.log
cli() { python -m svdsparse_jax.cli "$@"; }
step() { echo "== $(date +%T) $*" | tee -a "$log"; }
start=$(date +%s)

if [ ! -f "$work/model/config.json" ]; then
    step "checkpoint ($shape)"
    XLA_PYTHON_CLIENT_PREALLOCATE=false python -m scripts.bench.user_path checkpoint --shape "$shape" --out "$work/model" --device "$device" \
        2>&1 | grep -v -i warn | tee -a "$log" || exit 1
fi
if [ ! -f "$pred/manifest.json" ]; then
    step "build-predictors (defaults${build_args:+ and $build_args}, 120 standard-library files)"
    python -m scripts.bench.user_path calib-files --count 120 --out "$work/calib.txt" || exit 1
    rm -rf "$pred"
    # shellcheck disable=SC2046,SC2086
    cli build-predictors "$work/model" --calib-text $(cat "$work/calib.txt") --out "$pred" $build_args --json \
        > "$runs/build.json" 2>> "$log" || { tail -20 "$log"; exit 1; }
fi
python -m scripts.bench.user_path prompts --out "$work/prompts"
prompts=("$work"/prompts/prompt_*.py)
for mode in $order; do
    case $mode in dense|sparse) ;; *) echo "user_path.sh: --order takes dense and sparse, not $mode" >&2; exit 2 ;; esac
done
rm -f "$runs"/gen_b*.json  # this call's runs only
for b in $batches; do
    files=()
    for p in "${prompts[@]:0:$b}"; do files+=(--prompt-file "$p"); done
    declare -A done_runs=()
    for mode in $order; do
        k=$(( ${done_runs[$mode]:-0} + 1 )); done_runs[$mode]=$k
        step "generate batch $b $mode (run $k)"
        extra=(); [ "$mode" = sparse ] && extra=(--predictors "$pred")
        [ "$cache" = off ] && extra+=(--compile-cache off)
        run_file=$runs/gen_b${b}_${mode}_$k.json
        cli generate "$work/model" "${files[@]}" --max-new-tokens "$new" --greedy --json "${extra[@]}" \
            > "$run_file" 2>> "$log" || { tail -20 "$log"; exit 1; }
        python -c "import json,sys; d=json.load(open(sys.argv[1])); print(d['tokens_per_s'], d['sparse_layers'])" \
            "$run_file" | tee -a "$log"
    done
    unset done_runs
done
step "summary"
XLA_PYTHON_CLIENT_PREALLOCATE=false python -m scripts.bench.user_path summary --runs "$runs" --checkpoint-info "$work/checkpoint_info.json" \
    --json-out "$out/user_path$suffix.json" --compile-cache "$cache" --preallocate "$preallocate" ${commit:+--commit "$commit"} 2>&1 | grep -v -i warn | tee -a "$log"
echo "user path: $(( $(date +%s) - start )) s wall" | tee -a "$log"
