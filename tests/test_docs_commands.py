"""Every command the README and docs/ show works as written: each fenced or inline `python -m
experiments.run` or `experiments.sweep` command names a config file that exists, a variant the
file accepts, and only `--config.` fields the config has (no training: the config is built and
the overrides parsed). A user copying a command never meets a typo the docs made.

Every relative link in them resolves: to a file or folder of the repository, and for a `#anchor`
into a Markdown file, to one of its headings as GitHub spells the anchor. And every field of the
stage configs is named somewhere in the docs, so each flag a run takes is described."""
import importlib.util
import pathlib
import re
import shlex
import urllib.parse

import pytest
from ml_collections import config_dict

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


# Links: `[text](target)` and `![alt](target)` in prose (not in code), and `[ref]: target`.
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$", re.M)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def prose(text: str) -> str:
  """The text less fenced blocks and inline code, where brackets are not links."""
  return CODE_SPAN.sub("", FENCE.sub("", text))


def github_anchor(heading: str) -> str:
  """The anchor GitHub gives a heading: its text (links reduced to their text, code to its
  content), lower-cased, everything but letters, digits, `_`, `-` and spaces dropped, spaces
  made hyphens (github-slugger)."""
  text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
  text = re.sub(r"<[^>]+>", "", text).replace("`", "")
  return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: pathlib.Path) -> set[str]:
  """Every heading anchor of a Markdown file; a repeated heading gets -1, -2, ... as on GitHub."""
  seen: dict[str, int] = {}
  found = set()
  for match in HEADING.finditer(FENCE.sub("", path.read_text(encoding="utf-8"))):
    slug = github_anchor(match.group(2).strip())
    count = seen.get(slug, 0)
    seen[slug] = count + 1
    found.add(slug if count == 0 else f"{slug}-{count}")
  return found


def links(path: pathlib.Path) -> list[str]:
  text = prose(path.read_text(encoding="utf-8"))
  return LINK.findall(text) + REF_DEFINITION.findall(text)


def broken(path: pathlib.Path, target: str) -> str | None:
  """Why a link target of `path` does not resolve, or None when it does (or is not relative)."""
  if SCHEME.match(target) or target.startswith("//"):
    return None  # http(s)://, mailto: ...: not a file of this repository
  file, _, anchor = target.partition("#")
  dest = (path.parent / urllib.parse.unquote(file)).resolve() if file else path
  if not dest.exists():
    return f"{target}: no such file or folder"
  if ROOT != dest and ROOT not in dest.parents:
    return f"{target}: outside the repository"
  if anchor and dest.is_file() and dest.suffix == ".md":
    if urllib.parse.unquote(anchor) not in anchors(dest):
      return f"{target}: {dest.relative_to(ROOT)} has no heading with anchor #{anchor}"
  return None


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path):
  problems = [why for target in links(path) if (why := broken(path, target))]
  assert not problems, f"{path.relative_to(ROOT)}: " + "; ".join(problems)


def test_the_link_checker_reads_links_and_anchors_as_github_does(tmp_path, monkeypatch):
  monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
  page = tmp_path / "page.md"
  page.write_text("# Stage 3: PPO-ptx\n## Joining a prompt: `config.format`\n## Notes\n## Notes\n"
                  "```\n# not a heading\n[in code](nowhere.md)\n```\n"
                  "See [a](#stage-3-ppo-ptx), [b](page.md#joining-a-prompt-configformat), "
                  "[c](#notes-1), `[d](nowhere.md)`, [e](https://example.com/x.md), "
                  "[f](missing.md), [g](#not-here).\n", encoding="utf-8")
  assert anchors(page) == {"stage-3-ppo-ptx", "joining-a-prompt-configformat", "notes", "notes-1"}
  found = links(page)
  assert found == ["#stage-3-ppo-ptx", "page.md#joining-a-prompt-configformat", "#notes-1",
                   "https://example.com/x.md", "missing.md", "#not-here"]
  assert [t for t in found if broken(page, t)] == ["missing.md", "#not-here"]


# Every flag described: each field of each stage config is named in README.md or docs/, as
# `field.path` or `--config.field.path=...` (the pipeline's sections are these same configs).
STAGE_CONFIGS = ("experiments/configs/pretrain.py:tiny", "experiments/configs/sft.py:tiny",
                 "experiments/configs/reward.py:tiny", "experiments/configs/ppo.py:tiny",
                 "experiments/configs/evaluate.py", "experiments/configs/sample.py",
                 "experiments/configs/instructgpt.py")


def fields(config: config_dict.ConfigDict, prefix: str = ""):
  for name in config.keys():
    value = config[name]
    if isinstance(value, config_dict.ConfigDict):
      if not (config.get("stage") == "pipeline" and "stage" in value):  # a stage's own config
        yield from fields(value, f"{prefix}{name}.")
    else:
      yield f"{prefix}{name}"


def named_in_docs() -> set[str]:
  names = set()
  for path in DOCS:
    text = path.read_text(encoding="utf-8")
    for span in re.findall(r"`([^`\n]+)`", text) + re.findall(r"--config\.([\w.]+)", text):
      for word in span.split():
        word = word.removeprefix("--config.").split("=", 1)[0].strip(",;:()")
        names.add(word)
  return names


def test_every_config_field_is_named_in_the_docs():
  named = named_in_docs()
  missing = sorted({f"{spec.split('/')[-1]}: {field}" for spec in STAGE_CONFIGS
                    for field in fields(config_of(spec)) if field not in named})
  assert not missing, "fields no page names (as `field.path`): " + ", ".join(missing)
