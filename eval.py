"""The `vidtok-eval` command (vidtok_jax/cli/eval.py) run from a checkout; see `--help`."""

from vidtok_jax.cli import eval as command

if __name__ == "__main__":
  command.run()
