"""`svdsparse convert HF_DIR OUT_DIR`: a Hugging Face checkpoint -> this project's converted directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from svdsparse_jax.cli.arguments import config_overrides, model_options
from svdsparse_jax.errors import SvdsparseError
from svdsparse_jax.fsutil import check_new_output


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert a Hugging Face checkpoint to this project's format")
    p.add_argument("hf_dir", help="Hugging Face model directory (config.json, safetensors, tokenizer)")
    p.add_argument("out_dir", help="directory to write (must not exist)")
    model_options(p, optional_model=False)


def run(args: argparse.Namespace) -> None:
    from svdsparse_jax.convert import convert
    from svdsparse_jax.dtypes import parse_dtype

    if not Path(args.hf_dir).is_dir():
        raise SvdsparseError(f"{args.hf_dir}: not a directory")
    check_new_output(args.out_dir, "OUT_DIR")  # before any weight is read
    out = convert(args.hf_dir, args.out_dir, parse_dtype(args.dtype), allow_pickle=args.allow_pickle,
                  **config_overrides(args))
    print(f"converted {args.hf_dir} -> {out}")
