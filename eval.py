"""The `vidtok-eval` command (vidtok_jax/commands/eval.py) run from a checkout; see `--help`."""

from vidtok_jax.commands import eval as command

if __name__ == "__main__":
  command.run()
