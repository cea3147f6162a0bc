"""The `svdsparse` command line, one module per command:

  app.py               the parser, the plug-in hook (entry point group `svdsparse.commands`) and `main`
  arguments.py         argument types, the options commands share, the session their flags load
  textio.py            strict JSON output, text files read checked and piece by piece, their tokens
  tables.py            the tables commands print, with what their columns mean
  convert.py, generate.py, score.py, build_predictors.py, eval.py, demo.py   one command each (`serve`:
                       `svdsparse_jax.serving.command`)

Each command module has `add_parser(subparsers)` and `run(args)`.
"""

from svdsparse_jax.cli.app import build_parser, main  # noqa: F401
from svdsparse_jax.cli.build_predictors import demo_build_config  # noqa: F401  (scripts.bench)
from svdsparse_jax.cli.textio import calibration_tokens as _calibration_tokens  # noqa: F401  (scripts.bench.topk)
from svdsparse_jax.cli.textio import print_json  # noqa: F401
