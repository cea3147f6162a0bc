"""`python -m svdsparse_jax.cli`: the `svdsparse` command."""

import sys

from svdsparse_jax.cli.app import main

sys.exit(main())
