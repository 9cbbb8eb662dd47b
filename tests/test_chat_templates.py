"""Tests for chat templates (chat_templates.py): reading a checkpoint's template, rendering it as
transformers' `apply_chat_template(..., tokenize=False)` does, splitting a conversation into
prompt and response, and conversations from HH-RLHF transcripts and OpenAssistant threads.

Every rendering is checked against expected strings stored here, so the tests check something
where transformers is not installed; where it is, the same renderings are also compared with
what transformers gives for the same checkpoint directory (a tiny tokenizer written here).
"""
import datetime
import gzip
import json

import pytest

from instructjax.data import chat_templates
from instructjax.data import converters
from instructjax.data.chat_templates import ConversationProblem
from instructjax.errors import InputError

# ------------------------------------------------------------------ templates and conversations

# Qwen2-Instruct's tokenizer_config.json `chat_template` (ChatML), verbatim.
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

# Meta-Llama-3-8B-Instruct's tokenizer_config.json `chat_template`, verbatim.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}")

TEMPLATES = {"qwen2": QWEN2_TEMPLATE, "llama3": LLAMA3_TEMPLATE}

# Special tokens as the checkpoints' tokenizer_config.json give them (Qwen2 has no bos; the
# Llama-3 eos is written as an AddedToken dict, as older configs store it).
SPECIAL_TOKENS = {
    "qwen2": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None},
    "llama3": {"bos_token": "<|begin_of_text|>",
               "eos_token": {"__type": "AddedToken", "content": "<|eot_id|>", "lstrip": False,
                             "normalized": False, "rstrip": False, "single_word": False}},
}

TWO_TURNS = [{"role": "user", "content": "What is 2 + 2?"},
             {"role": "assistant", "content": "It is 4 (café, 你好)."}]
# The last turn's surrounding whitespace shows the templates differ: Llama-3 trims, Qwen keeps.
THREE_TURNS = TWO_TURNS + [{"role": "user", "content": "  And 3 + 3?\n"}]
CONVERSATIONS = {"two_turns": TWO_TURNS, "three_turns": THREE_TURNS}

_QWEN_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
_QWEN_TWO = (_QWEN_SYSTEM + "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
             "<|im_start|>assistant\nIt is 4 (café, 你好).<|im_end|>\n")
_LLAMA_TWO = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2 + 2?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nIt is 4 (café, 你好).<|eot_id|>")

# (template, conversation, add_generation_prompt) -> the text transformers renders.
EXPECTED = {
    ("qwen2", "two_turns", False): _QWEN_TWO,
    ("qwen2", "two_turns", True): _QWEN_TWO + "<|im_start|>assistant\n",
    ("qwen2", "three_turns", False): _QWEN_TWO + "<|im_start|>user\n  And 3 + 3?\n<|im_end|>\n",
    ("qwen2", "three_turns", True):
        _QWEN_TWO + "<|im_start|>user\n  And 3 + 3?\n<|im_end|>\n<|im_start|>assistant\n",
    ("llama3", "two_turns", False): _LLAMA_TWO,
    ("llama3", "two_turns", True):
        _LLAMA_TWO + "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ("llama3", "three_turns", False):
        _LLAMA_TWO + "<|start_header_id|>user<|end_header_id|>\n\nAnd 3 + 3?<|eot_id|>",
    ("llama3", "three_turns", True):
        _LLAMA_TWO + "<|start_header_id|>user<|end_header_id|>\n\nAnd 3 + 3?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
}
CASES = sorted(EXPECTED)

# A WordLevel tokenizer.json: transformers needs one to load the directory; rendering with
# tokenize=False never uses it.
TOKENIZER_JSON = {
    "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
    "normalizer": None, "pre_tokenizer": None, "post_processor": None, "decoder": None,
    "model": {"type": "WordLevel", "unk_token": "<unk>",
              "vocab": {"<unk>": 0, "<|begin_of_text|>": 1, "<|eot_id|>": 2, "<|im_end|>": 3,
                        "<|endoftext|>": 4}},
}

LAYOUTS = ("config_string", "config_list", "jinja_file", "template_dir")


def write_checkpoint(directory, template, special_tokens, layout):
  """A checkpoint directory whose chat template is stored in one of the layouts transformers
  reads: tokenizer_config.json's `chat_template` as a string or as a list of {name, template},
  a `chat_template.jinja` file (which wins over a stale template in the config), or named files
  in `additional_chat_templates/`."""
  directory.mkdir(parents=True, exist_ok=True)
  config = {k: v for k, v in special_tokens.items() if v is not None}
  if layout == "config_string":
    config["chat_template"] = template
  elif layout == "config_list":
    config["chat_template"] = [{"name": "tool_use", "template": "{{ 'tools' }}"},
                               {"name": "default", "template": template}]
  elif layout == "jinja_file":
    config["chat_template"] = "{{ 'a stale template the .jinja file replaces' }}"
    (directory / "chat_template.jinja").write_text(template, encoding="utf-8")
  elif layout == "template_dir":
    (directory / "additional_chat_templates").mkdir()
    (directory / "additional_chat_templates" / "default.jinja").write_text(template, "utf-8")
    (directory / "additional_chat_templates" / "tool_use.jinja").write_text("{{ 'tools' }}")
  else:
    raise AssertionError(layout)
  (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
  (directory / "tokenizer.json").write_text(json.dumps(TOKENIZER_JSON), encoding="utf-8")
  return directory


def ours(directory, messages, add_generation_prompt):
  return chat_templates.render(chat_templates.load_chat_template(directory), messages,
                               add_generation_prompt=add_generation_prompt,
                               special_tokens=chat_templates.load_special_tokens(directory))


# ------------------------------------------------------------------ rendering


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_render_gives_the_stored_text(case):
  name, conversation, add_generation_prompt = case
  text = chat_templates.render(TEMPLATES[name], CONVERSATIONS[conversation],
                               add_generation_prompt=add_generation_prompt,
                               special_tokens=SPECIAL_TOKENS[name])
  assert text == EXPECTED[case]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_checkpoint_directory_renders_the_stored_text(tmp_path, name, layout):
  directory = write_checkpoint(tmp_path / "ckpt", TEMPLATES[name], SPECIAL_TOKENS[name], layout)
  assert chat_templates.load_chat_template(directory) == TEMPLATES[name]
  for (template, conversation, add_generation_prompt), expected in EXPECTED.items():
    if template == name:
      assert ours(directory, CONVERSATIONS[conversation], add_generation_prompt) == expected


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_render_matches_transformers_apply_chat_template(tmp_path, name, layout):
  transformers = pytest.importorskip("transformers")
  directory = write_checkpoint(tmp_path / "ckpt", TEMPLATES[name], SPECIAL_TOKENS[name], layout)
  tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(str(directory))
  assert tokenizer.get_chat_template() == chat_templates.load_chat_template(directory)
  for conversation in CONVERSATIONS.values():
    for add_generation_prompt in (False, True):
      theirs = tokenizer.apply_chat_template(conversation, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
      assert ours(directory, conversation, add_generation_prompt) == theirs


# tojson (no HTML or non-ASCII escaping, indent), loop controls, namespace, dict(), the
# {% generation %} tag, trim_blocks / lstrip_blocks, None-valued keys dropped, an unset token.
FEATURES_TEMPLATE = """\
{% set ns = namespace(n=0) %}
{% for m in messages %}
  {% if m.role == 'system' %}{% continue %}{% endif %}
  {% if loop.index > 4 %}{% break %}{% endif %}
  {% set ns.n = ns.n + 1 %}
{{ m | tojson }}
{% generation %}[{{ m.content | tojson(indent=2) }}]{% endgeneration %}
{% if 'name' in m %}named {{ m.name }}{% endif %}
{% endfor %}
{{ ns.n }}{{ dict(a=1) | tojson }}|{{ unk_token }}|{{ eos_token }}"""
FEATURES_MESSAGES = [
    {"role": "system", "content": "skipped"},
    {"role": "user", "content": "<b>café & 你好</b>", "name": None},
    {"role": "assistant", "content": ["a", "b"]},
    {"role": "user", "content": "x", "name": "bob"},
    {"role": "assistant", "content": "after the break"},
]
FEATURES_EXPECTED = (
    # trim_blocks drops the newline after a block tag ({% endgeneration %}, {% endif %}).
    '{"role": "user", "content": "<b>café & 你好</b>"}\n'
    '["<b>café & 你好</b>"]'
    '{"role": "assistant", "content": ["a", "b"]}\n'
    '[[\n  "a",\n  "b"\n]]'
    '{"role": "user", "content": "x", "name": "bob"}\n'
    '["x"]'
    'named bob'
    '3{"a": 1}||</s>')


def test_environment_features_give_the_stored_text():
  text = chat_templates.render(FEATURES_TEMPLATE, FEATURES_MESSAGES, add_generation_prompt=False,
                               special_tokens={"eos_token": "</s>"})
  assert text == FEATURES_EXPECTED


def test_environment_features_match_transformers(tmp_path):
  transformers = pytest.importorskip("transformers")
  directory = write_checkpoint(tmp_path, FEATURES_TEMPLATE, {"eos_token": "</s>"}, "jinja_file")
  tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(str(directory))
  assert tokenizer.apply_chat_template(FEATURES_MESSAGES, tokenize=False) == FEATURES_EXPECTED


def test_strftime_now_and_undefined_tokens():
  text = chat_templates.render("{{ bos_token }}{{ strftime_now('%Y') }}", TWO_TURNS,
                               add_generation_prompt=False)
  assert text in {str(datetime.date.today().year), str(datetime.date.today().year + 1)}


def test_raise_exception_is_an_input_error_with_the_templates_message():
  # Mistral-style role check.
  template = ("{% for message in messages %}{% if (message['role'] == 'user') != "
              "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
              "user/assistant/user/assistant/...') }}{% endif %}{{ message['content'] }}"
              "{% endfor %}")
  assert chat_templates.render(template, TWO_TURNS, add_generation_prompt=False) == (
      "What is 2 + 2?It is 4 (café, 你好).")
  with pytest.raises(InputError, match=r"^chat template: the chat template refused the "
                     r"conversation: Conversation roles must alternate user/assistant/user/"
                     r"assistant/\.\.\.$"):
    chat_templates.render(template, TWO_TURNS[::-1], add_generation_prompt=False)
  with pytest.raises(InputError, match=r"^ckpt/tokenizer_config\.json: .*must alternate"):
    chat_templates.split_for_training(template, [TWO_TURNS[1], TWO_TURNS[1]],
                                      where="ckpt/tokenizer_config.json")


def test_broken_and_unsafe_templates_are_input_errors():
  with pytest.raises(InputError, match=r"does not parse: line 2: .*'endfor'"):
    chat_templates.render("{% for m in messages %}\n{{ m }}", TWO_TURNS,
                          add_generation_prompt=False)
  with pytest.raises(InputError, match=r"failed: UndefinedError: .*no attribute 'nope'"):
    chat_templates.render("{{ messages[0].nope.deeper }}", TWO_TURNS, add_generation_prompt=False)
  # The sandbox is immutable: a template cannot change the caller's messages.
  messages = [dict(m) for m in TWO_TURNS]
  with pytest.raises(InputError, match=r"failed: SecurityError"):
    chat_templates.render("{{ messages.append(1) }}", messages, add_generation_prompt=False)
  assert messages == TWO_TURNS
  with pytest.raises(InputError, match=r"message 1 must be a dict with a string 'role'"):
    chat_templates.render(QWEN2_TEMPLATE, [TWO_TURNS[0], "hi"], add_generation_prompt=False)
  with pytest.raises(InputError, match=r"field 'eos_token' must be a string or"):
    chat_templates.render(QWEN2_TEMPLATE, TWO_TURNS, add_generation_prompt=False,
                          special_tokens={"eos_token": 7})
  with pytest.raises(InputError, match=r"'messages' cannot be a special token name"):
    chat_templates.render(QWEN2_TEMPLATE, TWO_TURNS, add_generation_prompt=False,
                          special_tokens={"messages": "x"})


# ------------------------------------------------------------------ split_for_training

SYSTEM_DIALOGUE = [{"role": "system", "content": "Be brief."}] + THREE_TURNS + [
    {"role": "assistant", "content": "6."}]


def test_split_for_training_llama3():
  special = SPECIAL_TOKENS["llama3"]
  prompt, response = chat_templates.split_for_training(LLAMA3_TEMPLATE, TWO_TURNS, special)
  assert prompt == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2 + 2?"
                    "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
  assert response == "It is 4 (café, 你好).<|eot_id|>"
  prompt, response = chat_templates.split_for_training(LLAMA3_TEMPLATE, SYSTEM_DIALOGUE, special)
  assert prompt == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief."
                    "<|eot_id|>" + _LLAMA_TWO.removeprefix("<|begin_of_text|>")
                    + "<|start_header_id|>user<|end_header_id|>\n\nAnd 3 + 3?<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
  assert response == "6.<|eot_id|>"


def test_split_for_training_qwen2():
  special = SPECIAL_TOKENS["qwen2"]
  prompt, response = chat_templates.split_for_training(QWEN2_TEMPLATE, TWO_TURNS, special)
  assert prompt == (_QWEN_SYSTEM + "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
                    "<|im_start|>assistant\n")
  assert response == "It is 4 (café, 你好).<|im_end|>\n"
  prompt, response = chat_templates.split_for_training(QWEN2_TEMPLATE, SYSTEM_DIALOGUE, special)
  assert prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                    + _QWEN_TWO.removeprefix(_QWEN_SYSTEM)
                    + "<|im_start|>user\n  And 3 + 3?\n<|im_end|>\n<|im_start|>assistant\n")
  assert response == "6.<|im_end|>\n"


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_split_joins_to_the_whole_conversation(name):
  for messages in (TWO_TURNS, SYSTEM_DIALOGUE):
    prompt, response = chat_templates.split_for_training(TEMPLATES[name], messages,
                                                         SPECIAL_TOKENS[name])
    assert prompt + response == chat_templates.render(
        TEMPLATES[name], messages, add_generation_prompt=False,
        special_tokens=SPECIAL_TOKENS[name])


def test_split_for_training_refusals():
  def reason(messages, template=LLAMA3_TEMPLATE):
    with pytest.raises(ConversationProblem) as e:
      chat_templates.split_for_training(template, messages, SPECIAL_TOKENS["llama3"])
    return e.value.reason, str(e.value)

  assert reason(THREE_TURNS) == (
      "last_not_assistant", "chat template: the last message must be the assistant's reply "
      "(role 'assistant'), got role 'user'")
  assert reason(TWO_TURNS[1:])[0] == "empty_conversation"
  assert reason([])[0] == "empty_conversation"
  # A template that counts the messages up front cannot be rendered turn by turn.
  counting = "{{ messages | length }}:{% for m in messages %}{{ m.content }};{% endfor %}"
  why, message = reason(TWO_TURNS, counting)
  assert why == "not_incremental"
  assert "does not render the conversation incrementally" in message
  assert "differ at character 0" in message
  # One that leaves the assistant's reply out renders it as nothing.
  users_only = "{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}{% endfor %}"
  assert reason(TWO_TURNS, users_only)[0] == "empty_response"


# ------------------------------------------------------------------ load_chat_template


def test_load_chat_template_absent(tmp_path):
  assert chat_templates.load_chat_template(tmp_path) is None  # No files at all.
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
  assert chat_templates.load_chat_template(tmp_path) is None
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": None}))
  assert chat_templates.load_chat_template(tmp_path) is None


def test_load_chat_template_accepts_a_byte_order_mark(tmp_path):
  (tmp_path / "chat_template.jinja").write_bytes(b"\xef\xbb\xbf" + QWEN2_TEMPLATE.encode())
  assert chat_templates.load_chat_template(tmp_path) == QWEN2_TEMPLATE


def test_load_chat_template_errors(tmp_path):
  config = tmp_path / "tokenizer_config.json"

  def error(value):
    config.write_text(value if isinstance(value, str) else json.dumps(value), encoding="utf-8")
    with pytest.raises(InputError) as e:
      chat_templates.load_chat_template(tmp_path)
    return str(e.value)

  where = str(config)
  assert error("{ not json").startswith(f"{where}: is not valid JSON")
  assert error([1, 2]) == f"{where}: expected a JSON object, got list"
  assert error({"chat_template": 3}) == (
      f"{where}: field 'chat_template' must be a string or a list of "
      "{'name': ..., 'template': ...}, got int")
  assert error({"chat_template": [{"name": "default", "template": "x"}, {"name": "y"}]}) == (
      f"{where}: field 'chat_template'[1] must be {{'name': str, 'template': str}}, "
      "got {'name': 'y'}")
  assert error({"chat_template": [{"name": "tool_use", "template": "x"}]}) == (
      f"{where}: field 'chat_template' names templates ['tool_use'] but none is 'default'")
  config.write_bytes(b'{"chat_template": "\xff"}')
  with pytest.raises(InputError, match=r"tokenizer_config\.json: is not UTF-8"):
    chat_templates.load_chat_template(tmp_path)
  config.unlink()
  (tmp_path / "additional_chat_templates").mkdir()
  (tmp_path / "additional_chat_templates" / "tool_use.jinja").write_text("x")
  with pytest.raises(InputError, match=r"has chat templates \['tool_use'\] in "
                     r"additional_chat_templates/ but no chat_template\.jinja"):
    chat_templates.load_chat_template(tmp_path)
  with pytest.raises(InputError, match=r"is not a directory"):
    chat_templates.load_chat_template(tmp_path / "missing")


def test_load_special_tokens(tmp_path):
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({
      "bos_token": "<s>", "eos_token": {"__type": "AddedToken", "content": "</s>"},
      "pad_token": None, "model_max_length": 2048, "chat_template": "x"}))
  (tmp_path / "special_tokens_map.json").write_text(json.dumps(
      {"bos_token": "<ignored>", "unk_token": {"content": "<unk>"}}))
  assert chat_templates.load_special_tokens(tmp_path) == {
      "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": ["</s>"]}))
  with pytest.raises(InputError, match=r"tokenizer_config\.json: field 'eos_token' must be a "
                     r"string or \{'content': str, \.\.\.\}, got \['</s>'\]"):
    chat_templates.load_special_tokens(tmp_path)


# ------------------------------------------------------------------ conversations from datasets

HH_CHOSEN = ("\n\nHuman: How do I boil an egg?\n\nAssistant: Put it in boiling water.\n\n"
             "Human: For how long?\n\nAssistant: About nine minutes for a hard yolk.")
HH_REJECTED = ("\n\nHuman: How do I boil an egg?\n\nAssistant: Put it in boiling water.\n\n"
               "Human: For how long?\n\nAssistant: An hour.")
HH_MESSAGES = [
    {"role": "user", "content": "How do I boil an egg?"},
    {"role": "assistant", "content": "Put it in boiling water."},
    {"role": "user", "content": "For how long?"},
    {"role": "assistant", "content": "About nine minutes for a hard yolk."},
]


def test_hh_messages():
  assert chat_templates.hh_messages(HH_CHOSEN) == HH_MESSAGES
  # The prompt the converter cuts ends with an empty assistant turn, which is dropped.
  prompt, chosen, rejected = converters.split_hh_pair(HH_CHOSEN, HH_REJECTED)
  assert chat_templates.hh_messages(prompt) == HH_MESSAGES[:3]
  assert chat_templates.hh_messages(prompt) + [{"role": "assistant", "content": chosen}] == (
      HH_MESSAGES)
  assert chat_templates.hh_messages(HH_REJECTED)[-1] == {"role": "assistant",
                                                         "content": rejected}
  # Without the leading blank line.
  assert chat_templates.hh_messages(HH_CHOSEN.lstrip()) == HH_MESSAGES
  # Rendered for training: the response is the last reply plus the end of turn.
  _, response = chat_templates.split_for_training(
      LLAMA3_TEMPLATE, chat_templates.hh_messages(HH_CHOSEN), SPECIAL_TOKENS["llama3"])
  assert response == "About nine minutes for a hard yolk.<|eot_id|>"


def test_hh_messages_refusals():
  with pytest.raises(ConversationProblem, match=r"must start with '\\n\\nHuman:'") as e:
    chat_templates.hh_messages("Preamble.\n\nHuman: hi\n\nAssistant: hello")
  assert e.value.reason == "text_before_first_turn"
  with pytest.raises(ConversationProblem, match=r"^row 3: turns 2 and 3 are both 'assistant': "
                     "roles must alternate$"):
    chat_templates.hh_messages("\n\nHuman: a\n\nAssistant: b\n\nAssistant: c", where="row 3")
  with pytest.raises(ConversationProblem, match=r"turns 1 and 2 are both 'user'") as e:
    chat_templates.hh_messages("\n\nHuman: a\n\nHuman: b\n\nAssistant: c")
  assert e.value.reason == "roles_do_not_alternate"
  with pytest.raises(InputError, match="a transcript must be a string, got NoneType"):
    chat_templates.hh_messages(None)


def test_thread_messages_agrees_with_the_hh_layout():
  thread = [("  How do I boil an egg? ", "prompter"), ("Put it in boiling water.", "assistant"),
            ("For how long?", "prompter"), ("About nine minutes for a hard yolk.", "assistant")]
  assert chat_templates.thread_messages(thread) == HH_MESSAGES
  as_dicts = [{"text": text, "role": role, "message_id": str(i)}
              for i, (text, role) in enumerate(thread)]
  assert chat_templates.thread_messages(as_dicts) == HH_MESSAGES
  # The converters' HH-layout prompt for the same turns gives the same messages.
  turns = [("human" if role == "prompter" else "assistant", text) for text, role in thread[:3]]
  assert chat_templates.hh_messages(converters.format_dialogue(turns)) == HH_MESSAGES[:3]


def test_thread_messages_refusals():
  with pytest.raises(InputError, match=r"^thread message 1: role must be 'prompter' or "
                     r"'assistant', got 'user'$"):
    chat_templates.thread_messages([("a", "prompter"), ("b", "user")])
  with pytest.raises(InputError, match=r"^thread message 0: missing field 'text'"):
    chat_templates.thread_messages([{"role": "prompter"}])
  with pytest.raises(InputError, match=r"expected a \(text, role\) pair"):
    chat_templates.thread_messages(["just text"])
  with pytest.raises(ConversationProblem, match=r"both 'assistant'"):
    chat_templates.thread_messages([("a", "prompter"), ("b", "assistant"), ("c", "assistant")])
  with pytest.raises(ConversationProblem, match=r"no messages"):
    chat_templates.thread_messages([])


def test_shared_hh_transcripts_render_with_both_templates(shared_data):
  """The public HH-RLHF test split, when present: every transcript renders and splits, except
  the counted ones whose roles do not alternate or whose final reply is empty."""
  path = shared_data / "hh_rlhf_harmless_base" / "test.jsonl.gz"
  if not path.is_file():
    pytest.skip(f"{path} is absent")
  reasons = {}
  with gzip.open(path, "rt", encoding="utf-8") as f:
    transcripts = [record[key] for line in f if line.strip()
                   for record in [json.loads(line)] for key in ("chosen", "rejected")]
  for transcript in transcripts:
    try:
      messages = chat_templates.hh_messages(transcript)
      for name, template in TEMPLATES.items():
        prompt, response = chat_templates.split_for_training(template, messages,
                                                             SPECIAL_TOKENS[name])
        assert response.startswith(messages[-1]["content"].strip())
    except ConversationProblem as e:
      reasons[e.reason] = reasons.get(e.reason, 0) + 1
  assert set(reasons) <= {"roles_do_not_alternate", "last_not_assistant"}
  assert sum(reasons.values()) < len(transcripts) // 100
