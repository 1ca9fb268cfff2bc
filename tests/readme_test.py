"""The README's quick start and the docs pages' code examples run as written.

Each example is executed statement by statement; where a statement's comment states a shape
(`recon = ...  # (1, 17, 64, 64, 3)`), the value it assigned must have that shape, so a comment
that no longer tells the truth fails here too.
"""

import ast
import pathlib
import re

import jax
import numpy as np

import vidtok_jax
from conftest import random_params

REPO = pathlib.Path(__file__).resolve().parents[1]
SHAPE = re.compile(r"#[^(]*\((\d+(?:, \d+)+)\)")


def python_blocks(page: str, heading: str) -> list:
  """The ```python blocks of `page` between the line `heading` and the next heading of its level
  or above (lines inside code fences are not headings)."""
  level, blocks, inside, fence = len(heading.split()[0]), [], False, None
  for line in (REPO / page).read_text().splitlines():
    if fence is not None:  # in a code block
      if line.startswith("```"):
        blocks += [fence] if inside and fence is not False else []
        fence = None
      elif fence is not False:
        fence += line + "\n"
    elif line.startswith("```"):
      fence = "" if line.strip() == "```python" else False
    elif line == heading:
      inside = True
    elif inside and re.match(rf"#{{1,{level}}} ", line):
      break
  assert blocks, f"{page}: no python block under the heading {heading!r}"
  return blocks


def run_blocks(page: str, heading: str) -> tuple:
  """Executes the blocks in one namespace; returns it and the number of shape comments checked."""
  ns, checked = {"__name__": "__readme__"}, 0
  for code in python_blocks(page, heading):
    lines = code.splitlines()
    for stmt in ast.parse(code).body:
      exec(compile(ast.Module([stmt], []), page, "exec"), ns)  # pylint: disable=exec-used
      shape = SHAPE.search(lines[stmt.end_lineno - 1])
      if shape and isinstance(stmt, ast.Assign):
        target = stmt.targets[0]
        name = (target.elts[0] if isinstance(target, ast.Tuple) else target).id
        if hasattr(ns[name], "shape"):
          want = tuple(int(d) for d in shape.group(1).split(", "))
          assert tuple(ns[name].shape) == want, (
              f"{page}: `{lines[stmt.end_lineno - 1].strip()}`: {name} is {ns[name].shape}")
          checked += 1
  return ns, checked


def test_readme_quick_start_runs(monkeypatch):
  """The quick start as written, with the hub download replaced by a narrow copy of the named
  variant (random weights): the calls, shapes and frame counts are the released model's."""
  asked = []

  def narrow_from_pretrained(name, **kwargs):
    asked.append(vidtok_jax.weights.hub.variant_name(name))  # a ValueError for a bad name
    cfg = vidtok_jax.load_config(asked[-1], ch=16, num_res_blocks=1, **kwargs)
    return vidtok_jax.VidTok(cfg), random_params(vidtok_jax.abstract_params(cfg))

  monkeypatch.setattr(vidtok_jax, "from_pretrained", narrow_from_pretrained)
  ns, checked = run_blocks("README.md", "## Quick start")
  assert asked == ["vidtok_fsq_causal_488_262144"]
  assert checked >= 4, f"only {checked} shape comments checked"
  # v1.0 causal models stream exactly: the first 17 frames come back as from the one-call path
  # (the streamer's output is clamped to the pixel range).
  recon = np.clip(np.asarray(ns["recon"]), -1.0, 1.0)
  diff = np.abs(np.asarray(ns["long_recon"][:, :17]) - recon).max()
  assert diff < 1e-4, diff


def test_using_the_model_example_runs():
  ns, checked = run_blocks("docs/using_the_model.md", "# Using the model")
  assert checked >= 2
  # Decoding the codes and decoding the token ids give the same video.
  assert float(np.abs(np.asarray(ns["y"]) - np.asarray(ns["y_tok"])).max()) == 0.0
  aux_loss = float(ns["aux"]["aux_loss"])  # entropy terms: may be negative, never nan/inf/0
  assert np.isfinite(aux_loss) and aux_loss != 0.0


def test_training_building_blocks_example_runs():
  ns, _ = run_blocks("docs/training.md", "## The objective")
  metrics = jax.device_get(ns["metrics"])
  assert {"total_loss", "nll_loss", "d_weight"} <= set(metrics), sorted(metrics)
  assert all(np.isfinite(v).all() for v in metrics.values())


def test_long_video_example_runs():
  ns, checked = run_blocks("docs/long_videos.md", "# Long videos")
  assert checked >= 1
  # 41 frames in, 41 out; latents: frame 0, two 16-frame chunks and a front-padded 8-frame tail.
  assert (ns["recon"].shape, ns["z"].shape, ns["frames"].shape) == (
      (1, 41, 32, 32, 3), (1, 11, 4, 4, 4), (1, 41, 32, 32, 3))
