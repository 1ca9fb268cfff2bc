"""The `vidtok-train` command (vidtok_jax/cli/train.py) run from a checkout; see `--help`."""

from vidtok_jax.cli import train as command

if __name__ == "__main__":
  command.run()
