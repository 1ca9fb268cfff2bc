"""The commands the README and the docs pages show use flags their commands define.

Static and fast: each command's flags are read from its source (absl `flags.DEFINE_*` and
argparse `add_argument` calls, found with `ast`), `--config.a.b=...` overrides are checked
against the training config's fields, and `make X` against the Makefile's targets. Nothing is
run and no model is built, so a renamed or removed flag fails here in seconds.
"""

import ast
import functools
import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PKG = REPO / "vidtok_jax"
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# How a command is spelled in the docs -> the source files defining its flags.
ABSL_COMMANDS = {
    "train.py": ["cli/train.py"],
    "vidtok-train": ["cli/train.py"],
    "eval.py": ["cli/eval.py", "cli/flags.py"],
    "vidtok-eval": ["cli/eval.py", "cli/flags.py"],
    "reconstruct.py": ["cli/reconstruct.py", "cli/flags.py"],
    "vidtok-reconstruct": ["cli/reconstruct.py", "cli/flags.py"],
    "vidtok_jax.tokenize": ["cli/tokenize.py", "cli/flags.py"],
    "vidtok-tokenize": ["cli/tokenize.py", "cli/flags.py"],
}
ARGPARSE_COMMANDS = {
    "vidtok_jax.cli.convert": ["cli/convert.py"],
    "vidtok-convert": ["cli/convert.py"],
    "vidtok_jax.data": ["cli/check_data.py"],
    "vidtok-check-data": ["cli/check_data.py"],
    "vidtok_jax.bench": ["planning/__main__.py"],  # the planner's old path, for one release
    "vidtok_jax.planning": ["planning/__main__.py"],
    "vidtok_jax.cli.demo": ["cli/demo.py"],
    "vidtok_jax.planning.traffic": ["planning/traffic.py"],
}
# `python -m vidtok_jax.data.tfds_builder` is TFDS's own `build` command: its flags are TFDS's.
TFDS_BUILD_FLAGS = {"manual_dir", "data_dir", "help", "helpfull"}
# absl's own flags, defined for every absl program.
ABSL_BUILTIN = {"help", "helpfull", "helpshort", "helpxml", "flagfile", "verbosity", "v",
                "logtostderr", "alsologtostderr", "log_dir", "undefok", "only_check_args"}

COMMAND = re.compile(
    r"(?:python\S*\s+(?:-m\s+(?P<module>vidtok_jax(?:\.\w+)*)|(?P<script>[\w/.-]+\.py))"
    r"|(?P<console>vidtok-[\w-]+)|\bmake\s+(?P<target>[\w-]+))")
FLAG = re.compile(r"(?<![\w-])--([A-Za-z_][\w.-]*)")


def _calls(paths):
  for rel in paths:
    tree = ast.parse((PKG / rel).read_text())  # an absolute `rel` replaces PKG
    for node in ast.walk(tree):
      if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        yield node


@functools.lru_cache(maxsize=None)
def absl_flags(paths: tuple) -> frozenset:
  names = set(ABSL_BUILTIN)
  for call in _calls(paths):
    if call.func.attr.startswith("DEFINE") and call.args and isinstance(call.args[0],
                                                                         ast.Constant):
      name = call.args[0].value
      names.add(name)
      if call.func.attr in ("DEFINE_bool", "DEFINE_boolean"):
        names.add("no" + name)
  return frozenset(names)


@functools.lru_cache(maxsize=None)
def argparse_flags(paths: tuple) -> frozenset:
  names = {"help"}
  # The model flags the planner and benchmarks/bench.py share are defined in one function.
  if any("add_model_flags(" in (PKG / rel).read_text() for rel in paths):
    paths = (*paths, "planning/configs.py")
  for call in _calls(paths):
    if call.func.attr != "add_argument":
      continue
    options = [a.value for a in call.args if isinstance(a, ast.Constant)
               and isinstance(a.value, str) and a.value.startswith("--")]
    optional = any(k.arg == "action" and "BooleanOptional" in ast.unparse(k.value)
                   for k in call.keywords)
    for o in options:
      names.add(o[2:])
      if optional:
        names.add("no-" + o[2:])
  return frozenset(names)


@functools.lru_cache(maxsize=None)
def config_fields() -> dict:
  """The training config as nested dicts (every command's `--config.X` overrides)."""
  from vidtok_jax.train.configs import get_config

  return get_config("kl_causal_488_4chn").to_dict()


def has_field(path: str) -> bool:
  node = config_fields()
  for part in path.split("."):
    if not isinstance(node, dict) or part not in node:
      return False
    node = node[part]
  return True


@functools.lru_cache(maxsize=None)
def make_targets() -> frozenset:
  text = (REPO / "Makefile").read_text()
  return frozenset(re.findall(r"^([\w-]+)\s*:(?!=)", text, flags=re.M))


def commands(text: str):
  """(command line, where) of every command in the page's code blocks and inline code."""
  blocks = re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S)
  inline = re.findall(r"(?<!`)`([^`\n]+)`(?!`)", re.sub(r"```.*?```", "", text, flags=re.S))
  for chunk in blocks + inline:
    chunk = chunk.replace("\\\n", " ")
    for line in chunk.splitlines():
      line = re.sub(r"\s#.*$", "", line)
      for part in re.split(r"&&|;|\||\"", line):
        if COMMAND.search(part):
          yield part.strip()


def problems_of(line: str) -> list:
  m = COMMAND.search(line)
  rest = line[m.end():]
  flags = FLAG.findall(rest)
  if m["target"]:
    return [] if m["target"] in make_targets() else [f"make target {m['target']!r} does not exist"]
  name = m["module"] or m["console"] or m["script"]
  name = name.split("/")[-1] if m["script"] in ("train.py", "eval.py", "reconstruct.py") else name
  if name == "vidtok_jax.data.tfds_builder":
    known, kind = TFDS_BUILD_FLAGS, "argparse"
  elif name in ABSL_COMMANDS:
    known, kind = absl_flags(tuple(ABSL_COMMANDS[name])), "absl"
  elif name in ARGPARSE_COMMANDS:
    known, kind = argparse_flags(tuple(ARGPARSE_COMMANDS[name])), "argparse"
  elif m["script"] and (REPO / m["script"]).is_file() and m["script"].startswith(("tools/",
                                                                                    "benchmarks/")):
    known, kind = argparse_flags((str(REPO / m["script"]),)), "argparse"
  else:
    return [f"unknown command {name!r}"]
  out = []
  for flag in flags:
    if flag.startswith("config."):
      if not has_field(flag[len("config."):].split("=")[0]):
        out.append(f"--{flag}: no such config field")
      continue
    if flag.split("=")[0] not in known:
      out.append(f"--{flag}: not a flag of {name}")
  return out


def test_every_documented_command_uses_defined_flags():
  found, bad = 0, []
  for page in PAGES:
    for line in commands(page.read_text()):
      found += 1
      bad += [f"{page.relative_to(REPO)}: `{line}`: {p}" for p in problems_of(line)]
  assert found > 40, f"only {found} commands found: the parser no longer sees the pages' code"
  assert not bad, "\n".join(bad)


@pytest.mark.parametrize("line, problem", [
    ("python eval.py --config=configs/vidtok.py:x --no_such_flag=1", "--no_such_flag"),
    ("vidtok-tokenize --out=t --config.model.no_such_field=3", "no such config field"),
    ("python -m vidtok_jax.cli.convert to-flax a.ckpt --outdir p", "--outdir"),
    ("make no-such-target", "does not exist"),
])
def test_a_wrong_flag_is_caught(line, problem):
  assert any(problem in p for p in problems_of(line))


def test_known_flags_pass():
  for line in ("python eval.py --config=configs/vidtok.py:x --pretrained=x --nofvd --size=64",
               "python -m vidtok_jax.planning --topology cpu --no-lpips --shape 1,17,64,64",
               "python train.py --config.train.mesh.space=4 --distributed", "make docs"):
    assert problems_of(line) == [], line


# The architecture page against the tree: every package and top-level module of vidtok_jax/ is
# named (as `vidtok_jax/NAME/` or `vidtok_jax/NAME.py`), and every file or folder the page names
# exists, relative to the repository, to vidtok_jax/, or to the package whose paragraph names it.
ARCHITECTURE = REPO / "docs" / "architecture.md"
PATH_SPAN = re.compile(r"`([\w./-]+(?:\.py|/))`")


def architecture_problems(text: str) -> list:
  named, problems = set(), []
  for paragraph in re.split(r"\n\s*\n", text):
    package = re.match(r"\*\*`vidtok_jax/(\w+)/`\*\*", paragraph)
    bases = [REPO, PKG] + ([PKG / package[1]] if package else [])
    for span in PATH_SPAN.findall(paragraph):
      named.add(span)
      if not any((base / span).exists() for base in bases):
        problems.append(f"`{span}` is named on the page but does not exist")
  tree = {f"vidtok_jax/{p.name}/" for p in PKG.iterdir() if (p / "__init__.py").is_file()}
  tree |= {f"vidtok_jax/{p.name}" for p in PKG.glob("*.py")}
  problems += [f"{unit} is not named on the page" for unit in sorted(tree - named)]
  if len(named) < 60:
    problems.append(f"only {len(named)} paths found: the page's format changed?")
  return problems


def test_architecture_page_matches_the_tree():
  assert not architecture_problems(ARCHITECTURE.read_text()), "\n".join(
      architecture_problems(ARCHITECTURE.read_text()))


def test_architecture_drift_is_caught():
  text = ARCHITECTURE.read_text()
  dropped = re.sub(r"\*\*`vidtok_jax/metrics/`\*\*.*?\n\n", "", text, flags=re.S)
  assert "vidtok_jax/metrics/ is not named on the page" in architecture_problems(dropped)
  extra = text + "\n\n**`vidtok_jax/models/`** — `stages.py`.\n"
  assert "`stages.py` is named on the page but does not exist" in architecture_problems(extra)


def test_no_user_visible_text_cites_unshipped_documents():
  """Docstrings, help strings and messages (every string in the package) say what they mean
  instead of citing a design document that is not shipped ("SPEC 9.1", "STYLE 4", "quirk 15")."""
  citation = re.compile(r"\b(?:SPEC|STYLE)\b\s*§?\s*\d|\bquirks? \d")  # its quirk list too
  found = []
  for path in sorted(PKG.rglob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Constant) and isinstance(node.value, str):
        found += [f"{path.relative_to(REPO)}:{node.lineno}: {m.group(0)!r}"
                  for m in citation.finditer(node.value)]
  assert not found, "\n".join(found)
