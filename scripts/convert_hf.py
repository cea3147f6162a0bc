#!/usr/bin/env python
"""Converts a Hugging Face checkpoint directory to this project's format (same as `svdsparse convert`).

  python scripts/convert_hf.py HF_DIR OUT_DIR [--dtype bfloat16|float16|float32] [--activation drelu] ...
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from svdsparse_jax.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
