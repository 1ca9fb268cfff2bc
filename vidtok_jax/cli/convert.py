"""Convert official VidTok checkpoints to Flax params (orbax) and back.

  python -m vidtok_jax.cli.convert to-flax vidtok_kl_causal_488_4chn.ckpt \
      --config vidtok_kl_causal_488_4chn [--config.model.ch=8 ...] [--out DIR] [--force]
  python -m vidtok_jax.cli.convert to-torch SOURCE --config vidtok_kl_causal_488_4chn \
      --out x.safetensors [--use_ema] [--config.model.ch=8 ...] [--force]

`--config` is an official variant name for `vidtok_jax.load_config`; each model field override,
`--config.model.FIELD=VALUE` (as in train.py / eval.py / reconstruct.py) or `--set FIELD=VALUE`,
becomes a keyword override (values parsed as Python literals, else kept as strings).
Neither command replaces an existing output unless `--force` is given; `to-torch` writes under a
temporary name and renames it when complete.
`to-torch` reads any weights source `vidtok_jax.weights.load.load_params` reads: a `vidtok-train`
workdir (its latest good checkpoint; `--use_ema` for the EMA weights), a checkpoints or step
folder, a params tree saved by `to-flax`, an official `.ckpt` / `.safetensors`, or `hf:NAME`.
"""

import argparse
import ast
import os
import sys

import numpy as np

from vidtok_jax.cli import model_overrides_as_set
from vidtok_jax.files import OutputExistsError, atomic_path, refuse_existing
from vidtok_jax.weights.io import load_state_dict, save_safetensors
from vidtok_jax.weights.keys import params_from_state_dict, state_dict_from_params

IGNORED_PREFIXES = ("loss.", "model_ema.")


def _overrides(pairs):
  out = {}
  for pair in pairs:
    field, sep, text = pair.partition("=")
    if not sep or not field:
      raise SystemExit(f"--set expects field=value, got {pair!r}")
    try:
      out[field.strip()] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      out[field.strip()] = text  # bare strings, e.g. --set norm_type=groupnorm
  return out


def _template(args):
  """Flax params tree of jax.ShapeDtypeStruct for the chosen variant."""
  from vidtok_jax import abstract_params, load_config  # lazy: jax/flax only when needed

  return abstract_params(load_config(args.config, **_overrides(args.set)))


def _raise_with_hints(error, args, state_dict, template):
  """Re-raises a shape mismatch as the config field to change, when the shapes tell."""
  from vidtok_jax import load_config
  from vidtok_jax.config import ModelSpec
  from vidtok_jax.weights.infer import config_hints, torch_shapes

  have, want = torch_shapes(state_dict), torch_shapes(template)
  other = {k for k in set(have) ^ set(want) if not k.startswith(IGNORED_PREFIXES)}
  hints = [] if any(not k.startswith(("encoder.", "decoder.")) for k in other) else config_hints(
      have, ModelSpec.from_config(load_config(args.config, **_overrides(args.set))), want)
  if hints:
    raise ValueError(f"{args.ckpt} does not match {args.config}: " + "; ".join(hints)) from error
  raise error


def _count(tree):
  return sum(int(np.size(v)) if not isinstance(v, dict) else _count(v) for v in tree.values())


def to_flax(args):
  import orbax.checkpoint as ocp

  out = os.path.abspath(args.out or os.path.splitext(args.ckpt)[0] + "_flax")
  if os.path.exists(out) and not args.force:  # fail before the (slow) load, not after
    raise OutputExistsError(f"output folder {out} exists; pass --force to overwrite it")
  state_dict = load_state_dict(args.ckpt)
  template = _template(args)
  try:
    params = params_from_state_dict(state_dict, template, ignore_prefixes=IGNORED_PREFIXES)
  except ValueError as e:
    _raise_with_hints(e, args, state_dict, template)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(out, params, force=args.force)
  ckptr.wait_until_finished()
  ignored = {p: sum(str(k).startswith(p) for k in state_dict) for p in IGNORED_PREFIXES}
  print(f"converted {len(state_dict) - sum(ignored.values())} keys "
        f"({_count(params):,} parameters) from {args.ckpt} -> {out}")
  print(f"ignored {sum(ignored.values())} keys ("
        + ", ".join(f"{p}*: {n}" for p, n in ignored.items()) + ")")


def to_torch(args):
  from vidtok_jax import load_config
  from vidtok_jax.weights.load import load_params

  # Before the (slow) load: never replace a file (e.g. a downloaded official checkpoint).
  refuse_existing([args.out], args.force)
  # Any weights source (a train workdir too), shape-checked against the config.
  params = load_params(args.source, load_config(args.config, **_overrides(args.set)),
                       use_ema=args.use_ema)
  state_dict = state_dict_from_params(params)
  with atomic_path(args.out, args.force) as tmp:  # an interrupted write leaves no half file
    save_safetensors(state_dict, tmp)
  print(f"wrote {len(state_dict)} keys ({_count(state_dict):,} parameters) from {args.source} "
        f"-> {args.out}")


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m vidtok_jax.cli.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  a = sub.add_parser("to-flax", help="PyTorch .ckpt/.safetensors -> orbax Flax params")
  a.add_argument("ckpt", help=".ckpt, .pt, .pth or .safetensors state_dict")
  a.add_argument("--out", help="output folder (default: <ckpt without suffix>_flax)")
  a.add_argument("--force", action="store_true", help="overwrite an existing output folder")
  a.set_defaults(func=to_flax)
  b = sub.add_parser("to-torch", help="Flax params (any weights source) -> PyTorch-layout "
                     ".safetensors")
  b.add_argument("source", help="a vidtok-train workdir (its latest good checkpoint), a "
                 "checkpoints or step folder, a folder written by to-flax, an official "
                 ".ckpt/.safetensors, or hf:NAME")
  b.add_argument("--use_ema", action="store_true", help="export the EMA weights of a train "
                 "checkpoint")
  b.add_argument("--out", required=True, help="output .safetensors file")
  b.add_argument("--force", action="store_true", help="overwrite an existing output file")
  b.set_defaults(func=to_torch)
  for p in (a, b):
    p.add_argument("--config", required=True, help="official variant name, e.g. "
                   "vidtok_kl_causal_488_4chn")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="config override, repeatable (e.g. --set ch=8)")
  args = parser.parse_args(model_overrides_as_set(sys.argv[1:] if argv is None else argv))
  try:
    args.func(args)
  except (ValueError, FileNotFoundError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
