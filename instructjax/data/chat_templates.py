"""Chat templates: a checkpoint's Jinja `chat_template`, rendered the way transformers renders it.

A chat checkpoint (Llama-3, Qwen, ...) says how a conversation becomes text in a Jinja template
shipped beside its tokenizer. This module reads that template and renders conversations with it
using `jinja2` and the environment transformers' `apply_chat_template(..., tokenize=False)`
builds (transformers 5.x `utils/chat_template_utils._compile_jinja_template`): a sandboxed,
immutable environment with `trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension
(`{% break %}`, `{% continue %}`), the `{% generation %}` block tag (rendered as its body), the
globals `raise_exception`, `strftime_now`, `dict` and `namespace`, and a `tojson` filter that
does not escape HTML or non-ASCII characters and takes `indent`, `separators` and `sort_keys`.
The template sees `messages`, `add_generation_prompt`, `tools` and `documents` (both None) and
the tokenizer's named special tokens (`bos_token`, `eos_token`, ...) as strings.

  template = chat_templates.load_chat_template(checkpoint_dir)       # None: the checkpoint has none
  special = chat_templates.load_special_tokens(checkpoint_dir)       # {"bos_token": ..., ...}
  messages = chat_templates.hh_messages(transcript)                  # [{"role", "content"}, ...]
  prompt, response = chat_templates.split_for_training(template, messages, special)

Every problem is an `InputError` naming the file (or "chat template") and what is wrong; problems
with a conversation are a `ConversationProblem`, whose `reason` is a short key to count skips by.
"""
import codecs
import dataclasses
import datetime
import functools
import json
import os
import pathlib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jinja2
import jinja2.exceptions
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.sandbox
import jinja2.utils

from instructjax.data.converters import ASSISTANT, HUMAN, OA_ROLES, oa_message
from instructjax.errors import InputError

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
# Newer transformers checkpoints keep the template in its own file (and further named templates
# in a folder); these take priority over tokenizer_config.json's `chat_template`, as in
# transformers' `from_pretrained`.
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"
DEFAULT_TEMPLATE_NAME = "default"
# The named special tokens transformers passes to a template (`special_tokens_map`).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                       "cls_token", "mask_token")
# Names a message's reasoning is passed under; transformers fills the first two from any of them.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# What `render` itself passes to the template.
_RESERVED_VARIABLES = frozenset({"messages", "add_generation_prompt", "tools", "documents"})
# OpenAssistant / HH speaker -> chat-template role.
_CHAT_ROLES = {"human": "user", "assistant": "assistant"}

PathLike = str | os.PathLike
Message = dict[str, Any]


class ConversationProblem(InputError):
  """A conversation a template cannot be used on; `reason` is a short key to count skips by:
  "text_before_first_turn", "roles_do_not_alternate", "empty_conversation",
  "last_not_assistant", "not_incremental", "empty_response"."""

  def __init__(self, where: str, problem: str, reason: str):
    super().__init__(where, problem)
    self.reason = reason


# ------------------------------------------------------------------ reading a checkpoint


def _read_text(path: pathlib.Path) -> str:
  try:
    text = path.read_bytes().decode("utf-8")
  except OSError as e:
    raise InputError(str(path), f"cannot read: {e}") from e
  except UnicodeDecodeError as e:
    raise InputError(str(path), f"is not UTF-8: {e}") from e
  return text.removeprefix(codecs.BOM_UTF8.decode("utf-8"))  # A byte-order mark is not text.


def _read_json_object(path: pathlib.Path) -> dict:
  try:
    value = json.loads(_read_text(path))
  except json.JSONDecodeError as e:
    raise InputError(str(path), f"is not valid JSON: {e}") from e
  if not isinstance(value, dict):
    raise InputError(str(path), f"expected a JSON object, got {type(value).__name__}")
  return value


def _require_directory(directory: PathLike) -> pathlib.Path:
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise InputError(str(directory), "is not a directory (expected a checkpoint directory)")
  return directory


def _template_from_config(config: dict, path: pathlib.Path) -> str | None:
  """tokenizer_config.json's `chat_template`: a string, or a list of {name, template}."""
  value = config.get("chat_template")
  if value is None:
    return None
  if isinstance(value, str):
    return value
  if not isinstance(value, list):
    raise InputError(str(path), "field 'chat_template' must be a string or a list of "
                     f"{{'name': ..., 'template': ...}}, got {type(value).__name__}")
  templates = {}
  for i, entry in enumerate(value):
    if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
            and isinstance(entry.get("template"), str)):
      raise InputError(str(path), f"field 'chat_template'[{i}] must be "
                       f"{{'name': str, 'template': str}}, got {entry!r:.200}")
    templates[entry["name"]] = entry["template"]
  if DEFAULT_TEMPLATE_NAME not in templates:
    raise InputError(str(path), f"field 'chat_template' names templates {sorted(templates)} "
                     f"but none is {DEFAULT_TEMPLATE_NAME!r}")
  return templates[DEFAULT_TEMPLATE_NAME]


def load_chat_template(directory: PathLike) -> str | None:
  """The chat template of a checkpoint directory, or None when it has none.

  Looked for as transformers' `from_pretrained` does: `chat_template.jinja` (and named templates
  in `additional_chat_templates/NAME.jinja`), which take priority, else `tokenizer_config.json`'s
  `chat_template`, a string or a list of {"name", "template"}. Where there are several named
  templates, the one named "default" is used. Unreadable files, bad JSON and wrong types raise
  InputError naming the file and the field.
  """
  directory = _require_directory(directory)
  templates = {}
  if (directory / CHAT_TEMPLATE_FILE).is_file():
    templates[DEFAULT_TEMPLATE_NAME] = _read_text(directory / CHAT_TEMPLATE_FILE)
  if (directory / CHAT_TEMPLATE_DIR).is_dir():
    for path in sorted((directory / CHAT_TEMPLATE_DIR).glob("*.jinja")):
      templates[path.name.removesuffix(".jinja")] = _read_text(path)
  if templates:
    if DEFAULT_TEMPLATE_NAME not in templates:
      raise InputError(str(directory), f"has chat templates {sorted(templates)} in "
                       f"{CHAT_TEMPLATE_DIR}/ but no {CHAT_TEMPLATE_FILE} or "
                       f"{CHAT_TEMPLATE_DIR}/{DEFAULT_TEMPLATE_NAME}.jinja")
    return templates[DEFAULT_TEMPLATE_NAME]
  config_path = directory / TOKENIZER_CONFIG_FILE
  if not config_path.is_file():
    return None
  return _template_from_config(_read_json_object(config_path), config_path)


def _token_content(value: Any, name: str, where: str) -> str | None:
  """A special token as tokenizer_config.json stores it: a string, or {"content": str, ...}."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, dict) and isinstance(value.get("content"), str):
    return value["content"]
  raise InputError(where, f"field {name!r} must be a string or {{'content': str, ...}}, "
                   f"got {value!r:.200}")


def load_special_tokens(directory: PathLike) -> dict[str, str]:
  """The named special tokens (`bos_token`, `eos_token`, ... `mask_token`) of a checkpoint
  directory, as strings, for `render`'s `special_tokens`: from `tokenizer_config.json`, with
  names it lacks filled from the older `special_tokens_map.json`. Unset tokens are left out
  (a template reading one gets an empty string, as in transformers)."""
  directory = _require_directory(directory)
  tokens: dict[str, str] = {}
  for name in (TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE):
    path = directory / name
    if not path.is_file():
      continue
    config = _read_json_object(path)
    for key in SPECIAL_TOKEN_NAMES:
      content = _token_content(config.get(key), key, str(path))
      if content is not None:
        tokens.setdefault(key, content)
  return tokens


# ------------------------------------------------------------------ the Jinja environment


class _TemplateRaised(jinja2.exceptions.TemplateError):
  """What the template's own `raise_exception(message)` raises."""


class _GenerationBlock(jinja2.ext.Extension):
  """`{% generation %}...{% endgeneration %}`: transformers marks the assistant's tokens with
  it; the text rendered is the block's body."""
  tags = {"generation"}

  def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

  def _body(self, caller: Any) -> str:
    return caller()


def _raise_exception(message: Any):
  raise _TemplateRaised(str(message))


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | str | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
  # Jinja's own `tojson` escapes <, >, & and ' for HTML; transformers' does not.
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
  return datetime.datetime.now().strftime(format)


class _TemplateDict:
  """`dict(...)` and `dict.fromkeys(...)` without exposing the dict type to the template."""

  def __call__(self, *args, **kwargs):
    return dict(*args, **kwargs)

  def fromkeys(self, *args, **kwargs):
    return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
  """Jinja's `namespace`, refusing underscore-prefixed attribute names."""

  def __init__(*args, **kwargs):  # noqa: B902 - the signature of jinja2.utils.Namespace
    self, args = args[0], args[1:]
    attrs = dict(*args, **kwargs)
    for name in attrs:
      _TemplateNamespace._check_name(name)
    jinja2.utils.Namespace.__init__(self, attrs)

  def __setitem__(self, name, value):
    _TemplateNamespace._check_name(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)

  @staticmethod
  def _check_name(name):
    if isinstance(name, str) and name.startswith("_"):
      raise jinja2.exceptions.SecurityError(
          f"chat templates cannot store underscore-prefixed attributes on a namespace, got {name!r}")


@functools.lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = _strftime_now
  env.globals["dict"] = _TemplateDict()
  env.globals["namespace"] = _TemplateNamespace
  return env.from_string(template)


def _plain(value: Any) -> Any:
  """JSON-like data rebuilt from plain types, as transformers rebuilds what the template sees;
  anything else becomes a placeholder naming its type."""
  if value is None or type(value) in (str, int, float, bool):
    return value
  if isinstance(value, str):
    return str.__str__(value)
  if isinstance(value, int):
    return int.__int__(value)
  if isinstance(value, float):
    return float.__float__(value)
  if isinstance(value, Mapping):
    return {_plain(k): _plain(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_plain(item) for item in value]
  if isinstance(value, tuple):
    return tuple(_plain(item) for item in value)
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
  return f"<{type(value).__name__}>"


def _template_messages(messages: Any, where: str) -> list[Message]:
  """The messages as transformers hands them to the template: keys whose value is None dropped,
  reasoning copied to `reasoning_content` and `thinking`."""
  if not isinstance(messages, Sequence) or isinstance(messages, str | bytes):
    raise InputError(where, f"messages must be a list of dicts, got {type(messages).__name__}")
  if not messages:
    raise ConversationProblem(where, "the conversation has no messages", "empty_conversation")
  out = []
  for i, message in enumerate(messages):
    if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
      raise InputError(where, f"message {i} must be a dict with a string 'role', "
                       f"got {message!r:.200}")
    message = {k: v for k, v in _plain(message).items() if v is not None}
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is not None:
      message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    out.append(message)
  return out


def _special_token_values(special_tokens: Mapping[str, Any] | None, where: str) -> dict[str, str]:
  values = {}
  for name, value in (special_tokens or {}).items():
    if not isinstance(name, str) or name in _RESERVED_VARIABLES:
      raise InputError(where, f"{name!r} cannot be a special token name")
    content = _token_content(value, name, where)
    if content is not None:
      values[name] = content
  return values


def render(template: str, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool,
           special_tokens: Mapping[str, Any] | None = None, where: str = "chat template") -> str:
  """`messages` rendered with `template`, as `apply_chat_template(messages, tokenize=False,
  add_generation_prompt=...)` renders them.

  `special_tokens` maps names (`bos_token`, `eos_token`, ...) to tokens, each a string or a
  tokenizer_config.json-style {"content": ...} dict; see `load_special_tokens`. A template that
  does not parse, calls `raise_exception(message)` or fails while rendering raises InputError
  ("`where`: the chat template ...") with the template's message.
  """
  if not isinstance(template, str):
    raise InputError(where, f"the chat template must be a string, got {type(template).__name__}")
  chat = _template_messages(messages, where)
  variables = _special_token_values(special_tokens, where)
  try:
    compiled = _compile(template)
  except jinja2.exceptions.TemplateSyntaxError as e:
    raise InputError(where, f"the chat template does not parse: line {e.lineno}: {e.message}") from e
  try:
    return compiled.render(messages=chat, tools=None, documents=None,
                           add_generation_prompt=bool(add_generation_prompt), **variables)
  except _TemplateRaised as e:
    raise InputError(where, f"the chat template refused the conversation: {e.message}") from e
  except jinja2.exceptions.TemplateError as e:
    raise InputError(where, f"the chat template failed: {type(e).__name__}: {e.message}") from e
  except Exception as e:  # pylint: disable=broad-except - any error in the template is its own.
    raise InputError(where, f"the chat template failed: {type(e).__name__}: {e}") from e


def _excerpt(text: str, at: int) -> str:
  return repr(text[max(0, at - 20):at + 20])


def split_for_training(template: str, messages: Sequence[Mapping[str, Any]],
                       special_tokens: Mapping[str, Any] | None = None, *,
                       where: str = "chat template") -> tuple[str, str]:
  """(prompt_text, response_text) of a conversation whose last message is the assistant's.

  prompt_text renders every message but the last with the generation prompt (what the model
  sees before it replies); response_text is what rendering the whole conversation adds to it
  (the reply and the template's end-of-turn text, e.g. "<|eot_id|>"). prompt_text +
  response_text is exactly the rendered conversation. A template whose prompt is not a prefix of
  the whole conversation ("the template does not render the conversation incrementally") raises
  a ConversationProblem, as do a conversation that does not end with the assistant's reply, one
  with nothing before it, and a reply that renders as nothing.
  """
  if not isinstance(messages, Sequence) or isinstance(messages, str | bytes) or not messages:
    raise ConversationProblem(where, "the conversation has no messages", "empty_conversation")
  last = messages[-1].get("role") if isinstance(messages[-1], Mapping) else None
  if last != "assistant":
    raise ConversationProblem(where, "the last message must be the assistant's reply (role "
                              f"'assistant'), got role {last!r}", "last_not_assistant")
  if len(messages) < 2:
    raise ConversationProblem(where, "the conversation has only the assistant's reply; a prompt "
                              "needs at least one message before it", "empty_conversation")
  prompt = render(template, messages[:-1], add_generation_prompt=True,
                  special_tokens=special_tokens, where=where)
  full = render(template, messages, add_generation_prompt=False,
                special_tokens=special_tokens, where=where)
  if not full.startswith(prompt):
    at = len(os.path.commonprefix([prompt, full]))
    raise ConversationProblem(
        where, "the template does not render the conversation incrementally: the prompt "
        "(the messages before the reply, with add_generation_prompt=True) is not a prefix of the "
        f"whole conversation; they differ at character {at}: prompt {_excerpt(prompt, at)}, "
        f"conversation {_excerpt(full, at)}", "not_incremental")
  response = full[len(prompt):]
  if not response:
    raise ConversationProblem(where, "the template renders the assistant's reply as nothing",
                              "empty_response")
  return prompt, response


# ------------------------------------------------------------------ conversations from datasets

_HH_TURN = re.compile(f"({re.escape(HUMAN)}|{re.escape(ASSISTANT)})")
_HH_ROLES = {HUMAN: "user", ASSISTANT: "assistant"}


def _check_alternating(messages: list[Message], where: str) -> list[Message]:
  for i in range(1, len(messages)):
    if messages[i]["role"] == messages[i - 1]["role"]:
      raise ConversationProblem(where, f"turns {i} and {i + 1} are both {messages[i]['role']!r}: "
                                "roles must alternate", "roles_do_not_alternate")
  return messages


def hh_messages(transcript: str, *, where: str = "HH transcript") -> list[Message]:
  """An Anthropic HH-RLHF transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") as chat messages,
  [{"role": "user" | "assistant", "content": ...}, ...], the turn markers `converters` uses.

  Turn texts are stripped of surrounding whitespace, as the converters strip them. A final empty
  assistant turn (a prompt ending in "\\n\\nAssistant:", as `converters.split_hh_pair` returns)
  is dropped, leaving the messages ready for add_generation_prompt. Text before the first
  "\\n\\nHuman:" and two turns of one role in a row raise ConversationProblem.
  """
  if not isinstance(transcript, str):
    raise InputError(where, f"a transcript must be a string, got {type(transcript).__name__}")
  if transcript.startswith(HUMAN.lstrip()):  # "Human: ..." without the leading blank line.
    transcript = HUMAN[:-len(HUMAN.lstrip())] + transcript
  pieces = _HH_TURN.split(transcript)
  if pieces[0].strip() or len(pieces) == 1 or pieces[1] != HUMAN:
    raise ConversationProblem(where, f"a transcript must start with {HUMAN!r}, got "
                              f"{transcript[:40]!r}", "text_before_first_turn")
  messages = [{"role": _HH_ROLES[marker], "content": text.strip()}
              for marker, text in zip(pieces[1::2], pieces[2::2])]
  if messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
    messages.pop()
  return _check_alternating(messages, where)


def thread_messages(texts_and_roles: Iterable[Any], *, where: str = "thread") -> list[Message]:
  """An OpenAssistant thread as chat messages: each item a (text, role) pair or an
  OpenAssistant message dict {"text", "role", ...}, role "prompter" (-> "user") or "assistant".

  Texts are stripped, as the converters strip them; roles must alternate (ConversationProblem)
  and be one of the two (InputError, as the open_assistant converter says it).
  """
  messages = []
  for i, item in enumerate(texts_and_roles):
    here = f"{where} message {i}"
    if isinstance(item, Mapping):
      text, role, _ = oa_message(item, here)
    else:
      if not (isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 2
              and isinstance(item[0], str) and isinstance(item[1], str)):
        raise InputError(here, f"expected a (text, role) pair or a message dict, got {item!r:.200}")
      text, role = item
      if role not in OA_ROLES:
        raise InputError(here, f"role must be 'prompter' or 'assistant', got {role!r}")
    messages.append({"role": _CHAT_ROLES[OA_ROLES[role]], "content": text.strip()})
  if not messages:
    raise ConversationProblem(where, "the thread has no messages", "empty_conversation")
  return _check_alternating(messages, where)
