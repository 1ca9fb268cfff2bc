"""`python -m vidtok_jax.tokenize`: the `vidtok-tokenize` command (`vidtok_jax.cli.tokenize`)."""

from vidtok_jax.cli.tokenize import run

if __name__ == "__main__":
  run()
