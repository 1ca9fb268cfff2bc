"""The `vidtok-reconstruct` command (vidtok_jax/cli/reconstruct.py) run from a checkout; see `--help`."""

from vidtok_jax.cli import reconstruct as command

if __name__ == "__main__":
  command.run()
