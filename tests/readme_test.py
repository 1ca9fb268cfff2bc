"""The README's code examples run as written."""

import contextlib
import io
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def run_readme_example(heading: str) -> str:
  """Executes the first ```python block after `heading`; returns what it printed."""
  text = README.read_text()
  section = text[text.index(heading):]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(code, str(README), "exec"), {})  # pylint: disable=exec-used
  return out.getvalue().strip()


def test_readme_model_example_runs():
  printed = run_readme_example("## Using the model")
  assert printed.startswith("(1, 5, 8, 8, 6) (1, 5, 8, 8) (1, 17, 64, 64, 3) 0.0"), printed
  aux_loss = float(printed.split()[-1])  # entropy terms: may be negative, never nan/inf/0
  assert aux_loss == aux_loss and abs(aux_loss) not in (0.0, float("inf"))


def test_readme_training_example_runs():
  metrics = eval(run_readme_example("The building blocks can be used directly"))  # pylint: disable=eval-used
  assert set(metrics) == {"total_loss", "nll_loss", "d_weight"}
  assert all(v == v and abs(v) < float("inf") for v in metrics.values())


def test_readme_long_video_example_runs():
  printed = run_readme_example("## Long videos")
  # 41 frames in, 41 out; latents: frame 0, two 16-frame chunks and a front-padded 8-frame tail.
  assert printed == "(1, 41, 32, 32, 3) (1, 11, 4, 4, 4) (1, 41, 32, 32, 3)", printed
