"""The command line's tables: build-predictors' per-layer targets, eval's per-layer, whole-model and batch-size
tables, and the demo's dense / sparse comparison, each with what its columns mean (at most 100 columns)."""

from __future__ import annotations

import textwrap


TARGET_WORDS = {"s": "s x the layer's true sparsity (s - 0.1 on layers 0 and 1)",
                "sparsity": "that fraction of neuron/token pairs switched off",
                "recall": "keep that fraction of the active pairs",
                "loss": "drop at most that share of the layer's importance, sum (|h| ||W_down[:, i]||)^2"}


def build_table(info: list[dict], config: dict) -> str:
    """build-predictors' per-layer table on the calibration half, with what each column and the target mean."""
    lines = [f"Per layer, on the calibration half ({config['calibration_tokens'] // 2:,} tokens):",
             f"{'layer':>5}  {'true sparsity':>13}  {'target':>16}  {'predicted sparsity':>18}  {'recall':>7}"]
    ranked = bool(info) and all("rank" in r for r in info)  # a rank search: the rank each layer kept
    if ranked:
        lines[1] += f"  {'rank':>5}"
    short = False
    for r in info:
        t = r["target"]
        missed = not r["target_met"] and t["kind"] != "loss" and config.get("method") != "oracle"
        short |= missed
        lines.append(f"{r['layer']:>5}  {r['true_sparsity']:>13.4f}  {t['kind'] + ' ' + format(t['value'], '.4f'):>16}"
                     f"  {r['calib_predicted_sparsity']:>18.4f}  {r['calib_recall']:>7.4f}"
                     + (f"  {r['rank']:>5}" if ranked else "") + ("  *" if missed else ""))
    lines += [METRIC_WORDS[0] + "; " + METRIC_WORDS[1] + "; recall: the fraction of the nonzero pairs kept",
              f"target: the calibration sets each neuron's threshold until the layer reaches it; "
              f"{config['rule']} {config['value']} means {TARGET_WORDS.get(config['rule'], config['rule'])}."]
    if ranked:
        lines.append(f"rank: of {', '.join(map(str, config['rank_search']))}, the one whose predictor reads the "
                     "fewest bytes per decoded token (its factors, the candidate rows of W_gate, the active rows of "
                     "W_up and W_down) at the same target.")
    if short:
        lines.append("* stopped short of its target: going further would switch off more than 1% of the layer's "
                     "neurons for every token (the calibration's guard against dropping whole neurons).")
    return "\n".join(lines[:2 + len(info)] + [wrap(w) for w in lines[2 + len(info):]])


def batch_table(batches: list[dict]) -> str:
    """One line per decode batch size: the union of the batch's rows, the layers the policy runs sparse, its
    accuracy."""
    lines = [f"{'batch':>5} {'W_gate rows':>11} {'W_up/down rows':>14} {'sparse layers':>13} {'rows read':>9} "
             f"{'ppl':>9} {'top-1 agreement':>15}"]
    lines += [f"{b['batch']:>5} {b['gate_rows_union']:>11.4f} {b['up_down_rows_union']:>14.4f} "
              f"{b['sparse_layers']:>6}/{len(b['layers']):<6} {b['rows_read_fraction']:>9.4f} {b['ppl']:>9.4f} "
              f"{b['top1_agreement']:>15.4f}" for b in batches]
    return "\n".join(lines + [wrap("W_gate rows, W_up/down rows: the fraction the union of a batch's candidates "
                                     "reads (all layers sparse); sparse layers: those the policy runs sparse at that "
                                     "batch size; rows read, ppl, top-1 agreement: with that policy")])


LAYER_COLUMNS = (("true_sparsity", "true sparsity"), ("predicted_sparsity", "predicted sparsity"),
                 ("recall", "recall"), ("precision", "precision"), ("auroc", "AUROC"), ("ffn_rel_error", "FFN error"))
METRIC_WORDS = (
    "true sparsity: the fraction of neuron/token pairs whose activation is zero",
    "predicted sparsity: the fraction the predictor switches off (rows decode does not read)",
    "recall: the fraction of the nonzero pairs the predictor keeps; precision: the fraction of kept pairs that "
    "are nonzero",
    "AUROC: how well the predictor's scores rank nonzero above zero pairs (1 is perfect, 0.5 is chance)",
    "FFN error: the FFN output's relative error when only the kept neurons are computed",
    "top-1 agreement: the fraction of positions where the sparse model's likeliest next token is the dense one's",
    "rows read: the fraction of FFN weight rows decode reads (W_gate: candidates; W_up / W_down: the active ones)",
    "predictor cost: the predictor's bytes per token, as a fraction of the FFN's")


def layer_table(layers: list[dict], summary: dict) -> str:
    """eval's per-layer table, at most 80 columns."""
    from svdsparse_jax.evaluate import windowing
    lines = [f"Per layer ({windowing(summary)}):",
             f"{'layer':>5}  " + "  ".join(f"{name:>{max(len(name), 7)}}" for _, name in LAYER_COLUMNS)]
    lines += [f"{r['layer']:>5}  " + "  ".join(f"{r[k]:>{max(len(name), 7)}.4f}" for k, name in LAYER_COLUMNS)
              for r in layers]
    return "\n".join(lines)


def summary_table(name: str, s: dict) -> str:
    """eval's whole-model comparison, dense and sparse side by side, with what each metric means."""
    from svdsparse_jax.evaluate import windowing
    rows = [("perplexity", f"{s['ppl_dense']:.4f}", f"{s['ppl_sparse']:.4f} ({100 * s['ppl_increase']:+.2f}%)"),
            ("top-1 agreement with dense", "1", f"{s['top1_agreement']:.4f}"),
            ("recall / AUROC", "", f"{s['recall']:.4f} / {s['auroc']:.4f}"),
            ("FFN rows read", "1", f"{s['rows_read_fraction']:.4f} (effective sparsity "
                                   f"{s['effective_sparsity']:.4f})"),
            ("predictor cost", "0", f"{s['predictor_cost']:.4f} of the FFN")]
    lines = [f"Whole model, {name} predictors ({windowing(s)}):", f"{'':28}{'dense':>10}  sparse"]
    lines += [f"{label:28}{a:>10}  {b}" for label, a, b in rows]
    return "\n".join(lines + [""] + [wrap(w) for w in METRIC_WORDS])


def wrap(text: str) -> str:
    """A legend line, wrapped at 100 columns."""
    return textwrap.fill(text, 100, subsequent_indent="  ")


def demo_table(s: dict, dense_tps: float, sparse_tps: float, device: str, n_new: int) -> str:
    """The demo's dense / sparse comparison: eval's summary `s`, decode speeds, with what each row means."""
    rows = [("perplexity", f"{s['ppl_dense']:.4f}", f"{s['ppl_sparse']:.4f}",
             "how surprised the model is by the held-out text (lower is better)"),
            ("top-1 agreement", "1", f"{s['top1_agreement']:.4f}",
             "positions where the likeliest next token is the dense model's"),
            ("FFN neurons zero", f"{s['true_sparsity']:.4f}", f"{s['true_sparsity']:.4f}",
             "neuron/token pairs whose activation is zero (the model's sparsity)"),
            ("FFN neurons skipped", "0", f"{s['predicted_sparsity']:.4f}",
             "neuron/token pairs the predictor switches off"),
            ("recall", "1", f"{s['recall']:.4f}", "of the nonzero neurons, the fraction the predictor keeps"),
            ("AUROC", "", f"{s['auroc']:.4f}", "how well its scores rank nonzero above zero (1 is perfect)"),
            ("W_gate rows read", "1", f"{s['gate_rows_read']:.4f}", "the predictor's candidates"),
            ("W_up, W_down rows read", "1", f"{s['up_down_rows_read']:.4f}", "the candidates that are active"),
            ("FFN bytes read", "1", f"{s['rows_read_fraction']:.4f}",
             f"of the dense FFN's, plus the predictor's {s['predictor_cost']:.4f}"),
            (f"decode tokens/s ({device})", f"{dense_tps:.0f}", f"{sparse_tps:.0f}",
             f"{n_new} greedy tokens, batch 1" + ("; on a CPU the gathers outweigh the rows saved" if device == "CPU"
                                                  else ""))]
    print(f"{'':24}{'dense':>8}{'sparse':>9}  what it means")
    for name, a, b, words in rows:
        print(f"{name:24}{a:>8}{b:>9}  {words}")
    lines = [f"{'':24}{'dense':>8}{'sparse':>9}  what it means"]
    lines += [f"{name:24}{a:>8}{b:>9}  {words}" for name, a, b, words in rows]
    return "\n".join(lines)
