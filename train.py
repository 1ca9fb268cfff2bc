"""The `vidtok-train` command (vidtok_jax/commands/train.py) run from a checkout; see `--help`."""

from vidtok_jax.commands import train as command

if __name__ == "__main__":
  command.run()
