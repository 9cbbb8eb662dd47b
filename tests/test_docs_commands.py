"""Every command the README shows works as written: each fenced `python -m experiments.run` or
`experiments.sweep` command names a config file that exists, a variant the file accepts, and
only `--config.` fields the config has (no training: the config is built and the overrides
parsed). A user copying a command never meets a typo the docs made."""
import importlib.util
import pathlib
import re
import shlex

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
FENCE = re.compile(r"```[a-z]*\n(.*?)```", re.S)
INLINE = re.compile(r"(?<!`)`(python -m experiments\.(?:run|sweep) [^`]*)`(?!`)")
ENTRIES = ("experiments.run", "experiments.sweep")


def commands(path: pathlib.Path) -> list[list[str]]:
  """The config-taking commands of the file's fenced blocks and inline code, as argument lists
  (a trailing `...` stands for the user's own flags)."""
  text = path.read_text(encoding="utf-8")
  found = [[w for w in shlex.split(span) if w != "..."]
           for span in INLINE.findall(FENCE.sub("", text))]
  for block in FENCE.findall(text):
    for line in block.replace("\\\n", " ").splitlines():
      for part in line.split("&&"):
        if any(part.strip().startswith(f"python -m {entry} ") for entry in ENTRIES):
          found.append(shlex.split(part.strip(), comments=True))
  return found


def all_commands():
  """Every documented command with a config, less usage patterns (`<name>` placeholders)."""
  return [(path.relative_to(ROOT), words) for path in DOCS for words in commands(path)
          if any(w == "--config" or w.startswith("--config=") for w in words)
          and not any("<" in w for w in words)]


def config_of(spec: str):
  """The config `--config FILE[:ARG]` builds, the way ml_collections' config_flags does."""
  file, _, arg = spec.partition(":")
  module_path = ROOT / file
  assert module_path.is_file(), f"{file} does not exist"
  spec_ = importlib.util.spec_from_file_location(f"docs_config_{module_path.stem}", module_path)
  module = importlib.util.module_from_spec(spec_)
  spec_.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def check_field(config, dotted: str) -> None:
  target = config
  for name in dotted.split("."):
    assert name in target, f"no field {dotted!r} (stops at {name!r})"
    target = target[name]


@pytest.mark.parametrize("where, words", all_commands(),
                         ids=lambda x: str(x) if isinstance(x, pathlib.Path) else None)
def test_a_documented_command_names_a_real_config_and_real_fields(where, words):
  args = words[3:]
  spec = next((args[i + 1] for i, a in enumerate(args) if a == "--config"), None)
  if spec is None:
    spec = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), None)
  assert spec, f"{where}: {' '.join(words)} names no --config"
  config = config_of(spec)
  for arg in args:
    if arg.startswith("--config.") and "=" in arg:
      check_field(config, arg[len("--config."):].split("=", 1)[0])


def test_the_readme_shows_commands_to_check():
  assert len(all_commands()) >= 10
