"""The `vidtok-reconstruct` command (vidtok_jax/commands/reconstruct.py) run from a checkout; see `--help`."""

from vidtok_jax.commands import reconstruct as command

if __name__ == "__main__":
  command.run()
