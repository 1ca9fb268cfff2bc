"""`python -m vidtok_jax.data`: the `vidtok-check-data` command (`vidtok_jax.cli.check_data`)."""

import sys

from vidtok_jax.cli.check_data import main

if __name__ == "__main__":
  sys.exit(main())
