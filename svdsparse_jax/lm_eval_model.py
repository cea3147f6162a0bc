"""The lm-evaluation-harness model `svdsparse`: lm-eval's tasks on this engine, dense or with predictors.

    svdsparse-lm-eval --model svdsparse --model_args pretrained=DIR,predictors=DIR,batch_size=8 --tasks ...

`svdsparse-lm-eval` is lm-eval's own command (`lm_eval.__main__.cli_evaluate`, every flag the same) with this
model registered first: lm-eval 0.4 finds models only among the modules it imports itself, so the stock
`lm_eval` command cannot see a model of another package. From Python, importing this module registers it
(`lm_eval.simple_evaluate(model="svdsparse", model_args=...)`), or pass `SvdsparseLM(...)` as the model.

model_args: pretrained (a converted or Hugging Face directory; default: the bundled model), predictors (a
predictor directory; without it the model runs dense), dtype (bfloat16), kernels (auto, pallas, interpret,
xla; default: SVDSPARSE_KERNELS, else auto), ffn_policy (sparse: every layer guarded, the default, so that
accuracy shows the predictors' effect; measured; dense), batch_size (lm-eval's --batch_size, else 8; on the
command line model_args' batch_size is passed to lm-eval as --batch_size, so its report says the size that
runs), max_gen_toks (256), act_threshold (a FATReLU model's threshold, as `--act-threshold`; default the
checkpoint's). The model loads through `session.load`.

How each request runs:
- loglikelihood: context and continuation in one teacher-forced pass (every token through the guarded FFN
  when there are predictors, as `svdsparse eval` runs them), batched, left-padded; contexts longer than the
  model's context lose their first tokens.
- loglikelihood_rolling: lm-eval's rolling windows of max_length = the model's context - 1 inputs, each
  predicting as many tokens after one token of context, so a text's total equals `svdsparse score`'s (windows
  of the model's context overlapping by one token) on the same tokens.
- generate_until: the project's generate program (prefill dense, decode with the predictors on the layers the
  policy picks), batched over requests with the same generation arguments, greedy or sampled, stopping at EOS
  or at the `until` strings (cut before them).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax.numpy as jnp
import lm_eval.models  # noqa: F401  lm-eval's own models first: a registry holding only ours would hide them
import numpy as np
from flax import nnx
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from svdsparse_jax import session
from svdsparse_jax.errors import SvdsparseError
from svdsparse_jax.evaluate import forward_stats, evaluation_bytes_per_token
from svdsparse_jax.limits import check_count
from svdsparse_jax.generate import Sampler, Watcher, bucket
from svdsparse_jax.progress import tqdm

NAME = "svdsparse"


@register_model(NAME)
class SvdsparseLM(TemplateLM):
    """An lm-eval model over the project's jitted programs (see the module's docstring for the arguments)."""

    def __init__(self, pretrained: str | None = None, predictors: str | None = None, dtype: str = "bfloat16",
                 kernels: str | None = None, ffn_policy: str = "sparse", batch_size: int | str = 8,
                 max_gen_toks: int | str = 256, act_threshold: float | str | None = None, device: str | None = None,
                 max_batch_size: Any = None, **unknown: Any):
        super().__init__()
        from svdsparse_jax.policy import POLICIES

        if unknown:  # lm-eval passes its own options too; anything else is a typo
            raise SvdsparseError(f"--model_args: unknown argument(s) {sorted(unknown)} for model {NAME!r}")
        self.batch_size = _batch_size(batch_size)
        self.max_gen_toks = _positive(max_gen_toks, "max_gen_toks")
        if ffn_policy not in POLICIES:
            raise SvdsparseError(f"--model_args ffn_policy={ffn_policy}: expected one of {', '.join(POLICIES)}")
        if act_threshold is not None:
            act_threshold = _finite_float(act_threshold, "act_threshold")
        lm = session.load(pretrained, dtype=dtype, kernels=kernels, ffn_policy=ffn_policy, predictors=predictors,
                          act_threshold=act_threshold)
        if lm.tokenizer is None:
            raise SvdsparseError(f"{lm.path}: the model has no tokenizer files, which lm-eval's text tasks need")
        self.cfg, self.tokenizer = lm.cfg, lm.tokenizer
        # a batch of rows of up to the model's context, each with f32 log-probabilities over the vocabulary
        check_count("--model_args batch_size", self.batch_size, self.cfg.max_seq_len * (
            evaluation_bytes_per_token(self.cfg) + 8 * self.cfg.vocab_size))
        self.pset, self.model = lm.predictors, lm.model
        self.guarded = self.pset.layers if self.pset is not None and ffn_policy != "dense" else None
        self.generator = lm.generator()
        if self.pset is not None:  # the CLI defaults to the measured policy: say which one runs here
            import sys
            print(f"svdsparse lm-eval model: ffn_policy={ffn_policy} (scoring runs every layer guarded unless "
                  "ffn_policy=dense; generation: "
                  f"{sum(self.generator.sparse_layers(self.batch_size))} of {self.cfg.n_layers} layers sparse at "
                  f"batch {self.batch_size})", file=sys.stderr)
        self._graph = nnx.split(self.model)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "SvdsparseLM":
        """lm-eval's constructor hook: --model_args win over lm-eval's own options (its --batch_size default)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **arg_dict})

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "SvdsparseLM":
        from lm_eval.utils import simple_parse_args_string
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # ---- what TemplateLM asks for

    @property
    def eot_token_id(self) -> int:
        return int(self.cfg.eos_ids[0])

    @property
    def max_length(self) -> int:
        """Input tokens of one scoring pass: the context less the one token being predicted last."""
        return self.cfg.max_seq_len - 1

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"]

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """requests: ((context, continuation), context_ids, continuation_ids) -> (sum of the continuation's
        log-probabilities, whether every continuation token is the greedy one)."""
        sequences = [(list(ctx) + list(cont))[-self.cfg.max_seq_len:] for _, ctx, cont in requests]
        lengths = [len(cont) for _, _, cont in requests]
        if any(n == 0 for n in lengths):
            raise SvdsparseError("lm-eval asked for the likelihood of an empty continuation")
        scores = self.score_sequences(sequences, lengths, disable_tqdm)
        return [(float(lp.sum()), bool(greedy.all())) for lp, greedy in scores]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        out = []
        for (string,) in tqdm([r.args for r in requests], disable=_quiet(disable_tqdm), desc="rolling loglikelihood"):
            windows = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            scores = self.score_sequences([ctx + cont for ctx, cont in windows], [len(c) for _, c in windows], True)
            out.append(float(sum(lp.sum() for lp, _ in scores)))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):  # one batch shape and sampler per set of generation arguments
            groups.setdefault(repr(sorted(r.args[1].items())), []).append(i)
        bar = tqdm(total=len(requests), disable=_quiet(disable_tqdm), desc="generate_until")
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = _positive(kwargs.pop("max_gen_toks", self.max_gen_toks), "max_gen_toks")
            max_new = min(max_new, self.cfg.max_seq_len - 1)
            sampler, seed = _sampler(kwargs)
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                prompts = [(self.tok_encode(requests[i].args[0]) or [self.prefix_token_id])
                           [-(self.cfg.max_seq_len - max_new):] for i in batch]
                watcher = Watcher(self.tok_decode, len(prompts), until)
                self.generator.generate(prompts, max_new, sampler, seed, watcher=watcher)
                for b, i in enumerate(batch):
                    results[i] = watcher.text(b)
                bar.update(len(batch))
        bar.close()
        return results

    # ---- the scoring pass

    def score_sequences(self, sequences: list[list[int]], lengths: list[int], disable_tqdm: bool = False
                        ) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each token sequence (at most the model's context), the log-probabilities [n] f64 of its last
        `lengths[i]` tokens given those before them, and whether each was the greedy token [n] bool: one
        teacher-forced pass per batch of `batch_size`, longest first, left-padded to a bucketed length."""
        graphdef, state = self._graph
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        out: list[Any] = [None] * len(sequences)
        for start in tqdm(range(0, len(order), self.batch_size), disable=_quiet(disable_tqdm), desc="loglikelihood"):
            chunk = order[start:start + self.batch_size]
            longest = len(sequences[chunk[0]])
            length = min(bucket(longest), self.cfg.max_seq_len)
            tokens = np.zeros((self.batch_size, length), np.int32)
            pad = np.full(self.batch_size, length, np.int32)  # rows past the chunk: all padding
            for row, i in enumerate(chunk):
                seq = sequences[i]
                bad = [t for t in seq if not 0 <= t < self.cfg.vocab_size]
                if bad:
                    raise SvdsparseError(f"token ids {bad[:5]} outside the vocabulary [0, {self.cfg.vocab_size})")
                tokens[row, length - len(seq):] = seq
                pad[row] = length - len(seq)
            lp, top, _, _ = forward_stats(graphdef, state, self.guarded, jnp.asarray(tokens), jnp.asarray(pad))
            lp, top = np.asarray(lp, np.float64), np.asarray(top)
            for row, i in enumerate(chunk):  # lp[:, j] scores token j + 1
                n = lengths[i]
                out[i] = (lp[row, length - 1 - n:], top[row, length - 1 - n:] == tokens[row, length - n:])
        return out


def _quiet(disable_tqdm: bool) -> bool | None:
    """tqdm's `disable` for lm-eval's flag: off when lm-eval says so, else a bar on a terminal and plain progress
    lines in a log (`progress.tqdm`)."""
    return True if disable_tqdm else None


def _batch_size(value: Any) -> int:
    """The batch size a model_args batch_size runs: the integer, or 8 for lm-eval's "auto" / "auto:N" (the
    harness's automatic search is Hugging Face's only)."""
    return _positive(8 if str(value).startswith("auto") else value, "batch_size")


def _report_true_batch_size(args: Any) -> None:
    """lm-eval's command prints and records its own --batch_size (default 1), never the model's: for this model
    with model_args batch_size=N, it is given N (what the model runs) too; the two disagreeing are refused."""
    if getattr(args, "command", None) != "run" or getattr(args, "model", None) != NAME:
        return
    from lm_eval.utils import simple_parse_args_string
    model_args = getattr(args, "model_args", None)
    model_args = simple_parse_args_string(model_args) if isinstance(model_args, str) else model_args or {}
    if model_args.get("batch_size") is None:
        return
    runs = _batch_size(model_args["batch_size"])
    flag = getattr(args, "batch_size", None)
    if flag is not None and str(flag) != str(runs):
        raise SvdsparseError(f"--batch_size {flag} and --model_args batch_size={model_args['batch_size']} disagree "
                             f"(the model runs the latter); give one of them")
    args.batch_size = str(runs)


def _finite_float(value: Any, name: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = math.nan
    if not math.isfinite(x):
        raise SvdsparseError(f"--model_args {name}={value}: expected a finite number")
    return x


def _positive(value: Any, name: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise SvdsparseError(f"--model_args {name}={value}: expected an integer >= 1")
    return n


def _sampler(kwargs: dict) -> tuple[Sampler, int]:
    """lm-eval's generation arguments (do_sample, temperature, top_k, top_p, seed) -> Sampler and seed; greedy
    unless do_sample or a temperature > 0 asks otherwise."""
    kwargs = dict(kwargs)
    do_sample = bool(kwargs.pop("do_sample", False))
    temperature = float(kwargs.pop("temperature", 1.0 if do_sample else 0.0))
    sampler = Sampler(temperature=temperature if do_sample or temperature > 0 else 0.0,
                      top_k=int(kwargs.pop("top_k", 0) or 0), top_p=float(kwargs.pop("top_p", 1.0) or 1.0))
    seed = int(kwargs.pop("seed", 0) or 0)
    if kwargs:
        raise SvdsparseError(f"generation arguments {sorted(kwargs)} are not supported by model {NAME!r}")
    return sampler, seed


def main() -> int:
    """`svdsparse-lm-eval`: lm-eval's command line with the `svdsparse` model registered. A bad model argument
    or file ends in one line and exit status 2, any other failure in one line and status 1, as the `svdsparse`
    commands do (SVDSPARSE_DEBUG=1 shows the traceback)."""
    import os
    import sys

    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    from svdsparse_jax import compile_cache

    debug = os.environ.get("SVDSPARSE_DEBUG") == "1"  # read once, at the edge
    try:
        compile_cache.enable()  # SVDSPARSE_COMPILE_CACHE, else the user's cache directory
        setup_logging()  # what lm_eval.__main__.cli_evaluate does, with the batch size made true between
        cli = HarnessCLI()
        args = cli.parse_args()
        _report_true_batch_size(args)
        cli.execute(args)
    except SvdsparseError as e:
        if debug:
            raise
        print(f"svdsparse-lm-eval: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if debug:
            raise
        print(f"svdsparse-lm-eval: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0
