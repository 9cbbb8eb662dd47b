"""experiments.prepare_data: public and own data -> SFT / RM / PPO / eval files split by prompt.

Fixtures are a few records in each public format, written here; one test also runs every dataset
on the real files in ../shared/data when they are present.
"""
import gzip
import json
import random
import subprocess
import sys
import time

import pytest

from experiments import prepare_data
from instructjax.data import converters, rankings, records

H, A = "\n\nHuman:", "\n\nAssistant:"
ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def write_jsonl(path, rows, *, compress=None):
  text = "".join(json.dumps(row) + "\n" for row in rows)
  if compress if compress is not None else str(path).endswith(".gz"):
    with gzip.open(path, "wt", encoding="utf-8") as f:
      f.write(text)
  else:
    path.write_text(text, encoding="utf-8")
  return path


# ------------------------------------------------------------------------------------ fixtures


def hh_rows(n=40):
  rows = []
  for i in range(n):
    prefix = f"{H} Hi, question {i}?{A} Hello.{H} Tell me about thing {i}.{A}"
    rows.append({"chosen": f"{prefix} Thing {i} is nice.", "rejected": f"{prefix} No."})
  # The same conversation compared twice (one prompt, two rankings and demonstrations).
  rows.append({"chosen": f"{H} Hi, question 0?{A} Hello.{H} Tell me about thing 0.{A} Fine.",
               "rejected": f"{H} Hi, question 0?{A} Hello.{H} Tell me about thing 0.{A} Go away."})
  rows.append({"chosen": f"{H} same{A} same", "rejected": f"{H} same{A} same"})  # identical
  rows.append({"chosen": f"{H} empty{A} ", "rejected": f"{H} empty{A} something"})
  return rows


def oa_message(message_id, text, role, rank=None, replies=(), parent_id=None):
  """One OpenAssistant message, with the fields of ../shared/data/open_assistant."""
  message = {"message_id": message_id, "parent_id": parent_id, "text": text, "role": role,
             "lang": "en", "review_count": 3, "review_result": True, "deleted": False,
             "synthetic": False, "model_name": None, "replies": list(replies)}
  if parent_id is None:
    del message["parent_id"]
  if role == "assistant":
    message["rank"] = rank
  return message


def oa_tree(i):
  root, a0, a1, a2, q2 = f"q{i}", f"a{i}-0", f"a{i}-1", f"a{i}-2", f"q{i}-2"
  return {"message_tree_id": root, "tree_state": "ready_for_export", "prompt": oa_message(
      root, f"How do I do task {i}?", "prompter", replies=[
          oa_message(a0, f"Do it this way ({i}).", "assistant", 1, parent_id=root, replies=[
              oa_message(q2, f"And then {i}?", "prompter", parent_id=a0, replies=[
                  # A single ranked reply: no ranking, but a demonstration.
                  oa_message(f"b{i}", f"Then finish {i}.", "assistant", 0, parent_id=q2)])]),
          oa_message(a1, f"  The best way to do {i}.  ", "assistant", 0, parent_id=root),
          oa_message(a2, f"Unranked {i}.", "assistant", None, parent_id=root)])}


def tldr_row(i, choice, texts):
  return {"info": {"id": f"t3_{i}", "post": f"My post number {i}.\n", "title": f"Title {i}",
                   "subreddit": "relationships"},
          "split": "valid1",
          "summaries": [{"text": t, "policy": "ref", "note": None} for t in texts],
          "choice": choice, "worker": "w", "batch": "batch13", "extra": {"confidence": 5}}


def tldr_rows(n=30):
  rows = [tldr_row(i, i % 2, (f" summary a {i}", f" summary b {i}")) for i in range(n)]
  rows.append(tldr_row(0, 0, (" summary a 0", " summary c 0")))  # the same post again
  rows.append(tldr_row(1, 1, (" summary a 1", " summary b 1")))  # an exact duplicate
  return rows


def gsm8k_train_rows(n=30):
  return [{"question": f"Tom has {i} apples and buys 2 more. How many now?",
           "answer": f"Tom has {i} + 2 = <<{i}+2={i + 2}>>{i + 2} apples.\n#### {i + 2}"}
          for i in range(n)]


def gsm8k_solution_rows(n=20):
  rows = []
  for i in range(n):
    row = {"question": f"Ann reads {i} pages a day. How many in 3 days?",
           "ground_truth": f"{3 * i}\nA: {3 * i}"}
    for j, key in enumerate(converters.GSM8K_SOLUTION_KEYS):
      correct = (i + j) % 3 != 0 if i % 5 else True  # every 5th question: all correct
      row[key] = {"is_correct": correct, "solution": f"{key} works it out\nA: {3 * i}"}
    rows.append(row)
  return rows


def generic_rows():
  rows = [{"prompt": f"Pair prompt {i}:", "chosen": f"good {i}", "rejected": f"bad {i}"}
          for i in range(12)]
  rows += [{"prompt": f"Ranked prompt {i}:", "responses": ["x", "y", "z"], "ranks": [2, 0, 1]}
           for i in range(12)]
  rows += [{"prompt": f"Demo prompt {i}:", "completion": f" answer {i}"} for i in range(12)]
  rows += [{"prompt": f"Only a prompt {i}:"} for i in range(12)]
  return rows


def dataset_inputs(tmp_path, name):
  """(dataset, [input paths]) with fixtures for `name`."""
  if name == "hh_rlhf":
    return [write_jsonl(tmp_path / "hh.jsonl.gz", hh_rows())]
  if name == "open_assistant":
    return [write_jsonl(tmp_path / "oa.jsonl.gz", [oa_tree(i) for i in range(15)])]
  if name == "summarize_from_feedback":
    return [write_jsonl(tmp_path / "tldr.jsonl", tldr_rows())]
  if name == "gsm8k":
    return [write_jsonl(tmp_path / "train.jsonl.gz", gsm8k_train_rows()),
            write_jsonl(tmp_path / "example_model_solutions.jsonl.gz", gsm8k_solution_rows())]
  return [write_jsonl(tmp_path / "mine.jsonl", generic_rows())]


def run(name, inputs, out, *extra):
  code = prepare_data.main([name, "--in", ",".join(map(str, inputs)), "--out", str(out), *extra])
  assert code == 0
  return json.loads((out / "summary.json").read_text())


def read_outputs(out):
  return {name: [json.loads(line) for line in (out / name).read_text().splitlines()]
          for name in prepare_data.FILES}


def check_disjoint(files):
  """Every prompt text sits in one set only, and within SFT / RM in train or eval only."""
  split_of, file_of = {}, {}
  for name, (kind, split) in prepare_data.FILES.items():
    for record in files[name]:
      assert split_of.setdefault(record["prompt"], split) == split, record["prompt"]
      if kind != "prompts" and split in ("sft", "rm"):
        assert file_of.setdefault(record["prompt"], name) == name
  return split_of


# ------------------------------------------------------------------------------------ tests

DATASETS = ("hh_rlhf", "open_assistant", "summarize_from_feedback", "gsm8k", "generic")


@pytest.mark.parametrize("name", DATASETS)
def test_splits_are_disjoint_by_prompt_and_counts_match(tmp_path, name, capsys):
  out = tmp_path / "out"
  summary = run(name, dataset_inputs(tmp_path, name), out, "--holdout", "0.2")
  printed = capsys.readouterr().out
  files = read_outputs(out)
  split_of = check_disjoint(files)
  # The stages' own readers accept every file.
  for name_, (kind, _) in prepare_data.FILES.items():
    path = out / name_
    if kind == "demonstrations":
      assert len(list(records.read_demonstrations(path))) == len(files[name_])
    elif kind == "rankings":
      assert rankings.read_rankings(path)[1].written == len(files[name_])
    elif files[name_]:
      assert len(records.read_prompts(path)) == len(files[name_])
  # summary.json's counts are the files'.
  assert summary["files"] == {name_: len(rows) for name_, rows in files.items()}
  assert files["sft/train.jsonl"] and files["rm/train.jsonl"] and files["ppo/prompts.jsonl"]
  assert files["eval/prompts.jsonl"]
  n, unused = summary["records"], summary["unused"]
  assert n["demonstrations"] == (len(files["sft/train.jsonl"]) + len(files["sft/eval.jsonl"])
                                 + sum(unused["demonstrations"].values()))
  assert n["rankings"] == (len(files["rm/train.jsonl"]) + len(files["rm/eval.jsonl"])
                           + len(files["eval/rankings.jsonl"]) + sum(unused["rankings"].values()))
  assert n["prompts"] == sum(summary["prompts_per_split"].values()) >= len(split_of)
  for split in ("ppo", "eval"):
    assert summary["prompts_per_split"][split] == len(files[f"{split}/prompts.jsonl"])
  for kind in ("demonstrations", "rankings"):
    written = sum(item[kind]["written"] for item in summary["inputs"] if kind in item)
    assert written == n[kind] + summary["duplicates"][kind]
  # The converters' own counts are reused: read = written + skipped (one output per record).
  for item in summary["inputs"]:
    assert item["read"] == len(list(records.iter_jsonl(item["path"])))
  # format.json and the printed flags.
  separator = json.loads((out / "format.json").read_text())["separator"]
  assert separator == prepare_data.SEPARATORS[name] == summary["separator"]
  assert f"--config.data.train_files={out}/sft/train.jsonl" in printed
  assert f"--config.data.train_files={out}/rm/train.jsonl" in printed
  assert f"--config.data.files={out}/ppo/prompts.jsonl" in printed
  assert printed.count("--config.format.separator=") == 4
  assert f"--config.data.max_k={summary['rm_max_k']}" in printed


def test_records_follow_the_converters_conventions(tmp_path):
  """With every prompt in SFT, all demonstrations are written: check what they are."""
  def demos(name, inputs):
    out = tmp_path / name
    summary = run(name, inputs, out, "--fractions", "sft=1", "--holdout", "0")
    assert summary["unused"]["demonstrations"] == {}
    # Prompt-only generic records and GSM8K solution questions (a ranking only): no set with a
    # share takes them; counted, not written.
    assert summary["unused"]["prompts"] == {"generic": {"sft": 12}, "gsm8k": {"sft": 16}}.get(
        name, {})
    return {(d["prompt"], d["completion"]) for d in read_outputs(out)["sft/train.jsonl"]}

  hh = demos("hh_rlhf", dataset_inputs(tmp_path, "hh_rlhf"))
  prefix = f"{H} Hi, question 3?{A} Hello.{H} Tell me about thing 3.{A}"
  assert (prefix, "Thing 3 is nice.") in hh
  assert (f"{H} same{A}", "same") in hh  # identical pair: no ranking, still a demonstration
  assert all(p.endswith(A) and c == c.strip() for p, c in hh)
  assert len(hh) == 40 + 1 + 1  # the empty chosen reply gives none
  oa = demos("open_assistant", dataset_inputs(tmp_path, "open_assistant"))
  assert (f"{H} How do I do task 4?{A}", "The best way to do 4.") in oa
  assert (f"{H} How do I do task 4?{A} Do it this way (4).{H} And then 4?{A}",
          "Then finish 4.") in oa
  assert len(oa) == 30
  tldr = demos("summarize_from_feedback", dataset_inputs(tmp_path, "summarize_from_feedback"))
  post0 = "SUBREDDIT: r/relationships\nTITLE: Title 0\nPOST: My post number 0.\nTL;DR:"
  assert {c for p, c in tldr if p == post0} == {"summary a 0"}
  assert (post0.replace("0", "1"), "summary b 1") in tldr
  gsm = demos("gsm8k", dataset_inputs(tmp_path, "gsm8k"))
  assert ("Tom has 5 apples and buys 2 more. How many now?",
          "Tom has 5 + 2 = <<5+2=7>>7 apples.\n#### 7") in gsm
  assert len(gsm) == 30  # train answers only; model solutions give no demonstrations
  mine = demos("generic", dataset_inputs(tmp_path, "generic"))
  assert ("Demo prompt 2:", " answer 2") in mine  # own demonstrations are kept as written
  assert ("Pair prompt 2:", "good 2") in mine and ("Ranked prompt 2:", "y") in mine


def test_deterministic_and_independent_of_order(tmp_path):
  rows = hh_rows()
  first = run("hh_rlhf", [write_jsonl(tmp_path / "hh.jsonl", rows)], tmp_path / "a")
  again = run("hh_rlhf", [tmp_path / "hh.jsonl"], tmp_path / "b")
  random.Random(0).shuffle(rows)
  (tmp_path / "shuffled").mkdir()
  half = len(rows) // 2
  parts = [write_jsonl(tmp_path / "shuffled" / "x.jsonl", rows[:half]),
           write_jsonl(tmp_path / "shuffled" / "y.jsonl.gz", rows[half:])]
  shuffled = run("hh_rlhf", parts[::-1], tmp_path / "c")
  for name in [*prepare_data.FILES, "format.json"]:
    reference = (tmp_path / "a" / name).read_bytes()
    assert (tmp_path / "b" / name).read_bytes() == reference, name
    assert (tmp_path / "c" / name).read_bytes() == reference, name
  assert (tmp_path / "b" / "summary.json").read_bytes() == (
      tmp_path / "a" / "summary.json").read_bytes()
  for key in ("files", "records", "prompts_per_split", "unused", "duplicates"):
    assert shuffled[key] == first[key] == again[key]
  # Another seed puts prompts elsewhere.
  run("hh_rlhf", [tmp_path / "hh.jsonl"], tmp_path / "d", "--seed", "1")
  assert read_outputs(tmp_path / "d")["ppo/prompts.jsonl"] != read_outputs(
      tmp_path / "a")["ppo/prompts.jsonl"]


def test_fractions_and_eligibility(tmp_path):
  inputs = dataset_inputs(tmp_path, "gsm8k")
  summary = run("gsm8k", inputs, tmp_path / "out", "--fractions", "sft=0.5,rm=0.5")
  assert [item["source"] for item in summary["inputs"]] == ["gsm8k_answers", "gsm8k_solutions"]
  files = read_outputs(tmp_path / "out")
  # A train question (a demonstration only) never lands in the RM set, nor a model-solutions
  # question (a ranking only) in SFT: nothing is unused, and PPO / eval get nothing.
  assert summary["unused"] == {"demonstrations": {}, "rankings": {}, "prompts": {},
                               "empty_prompts": 0}
  assert len(files["sft/train.jsonl"]) + len(files["sft/eval.jsonl"]) == 30
  assert len(files["rm/train.jsonl"]) + len(files["rm/eval.jsonl"]) == 16  # 4 all correct
  assert summary["prompts_per_split"]["ppo"] == summary["prompts_per_split"]["eval"] == 0
  assert all(d["completion"].split("\n")[-1].startswith("#### ") for d in files["sft/train.jsonl"])
  assert "$'\\n'" in "".join(prepare_data.stage_flags(str(tmp_path / "out"), summary)[0])


@pytest.mark.parametrize("rows, where, words", [
    (None, ":2", "malformed JSON"),
    ([{"chosen": f"{H} a{A} b"}], ":1", "missing field 'rejected'"),
    ([], "", "no records"),
    ([{"chosen": f"{H} no reply", "rejected": f"{H} none"}], "", "every record was left out"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, rows, where, words):
  path = tmp_path / "hh.jsonl"
  if rows is None:
    path.write_text(json.dumps(hh_rows()[0]) + "\n{not json\n")
  else:
    write_jsonl(path, rows)
  code = prepare_data.main(["hh_rlhf", "--in", str(path), "--out", str(tmp_path / "out")])
  err = capsys.readouterr().err
  assert code == 2
  assert err.count("\n") == 1 and err.startswith(f"error: {path}{where}") and words in err


@pytest.mark.parametrize("args, words", [
    (["--fractions", "sft=0.5,rm=0.2"], "sum to 0.7"),
    (["--fractions", "train=1"], "expected SPLIT=FRACTION"),
    (["--holdout", "1.5"], "--holdout"),
    (["--max_records", "0"], "max_records"),
])
def test_bad_options_are_one_line_exit_2(tmp_path, capsys, args, words):
  path = write_jsonl(tmp_path / "hh.jsonl", hh_rows())
  assert prepare_data.main(["hh_rlhf", "--in", str(path), "--out", str(tmp_path / "o"),
                            *args]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and words in err


def test_gsm8k_file_kind_is_detected_or_refused(tmp_path, capsys):
  path = write_jsonl(tmp_path / "other.jsonl", [{"question": "q", "solution": "s"}])
  assert prepare_data.main(["gsm8k", "--in", str(path), "--out", str(tmp_path / "o")]) == 2
  assert f"{path}:1: not a GSM8K file" in capsys.readouterr().err


def test_command_line_exit_codes(tmp_path):
  """The real entry points: no traceback, one line on stderr, exit 2."""
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps(hh_rows()[0]) + "\n{not json\n")
  good = write_jsonl(tmp_path / "hh.jsonl", hh_rows())
  commands = [
      ([sys.executable, "-m", "experiments.prepare_data", "hh_rlhf", "--in", str(bad), "--out",
        str(tmp_path / "o")], 2),
      ([sys.executable, "-m", "instructjax.data.converters", "hh_rlhf", str(bad),
        str(tmp_path / "r.jsonl")], 2),
      ([sys.executable, "-m", "instructjax.data.converters", "hh_rlhf", str(good),
        str(tmp_path / "r.jsonl")], 0),
  ]
  for command, code in commands:
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == code, result.stderr
    if code:
      assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
      assert f"{bad}:2: malformed JSON" in result.stderr
  # The converters' module converts (it used to exit 0 and write nothing).
  written, stats = rankings.read_rankings(tmp_path / "r.jsonl")
  assert len(written) == 41 and "written 41" in result.stdout


def test_boundary_cases_are_counted(tmp_path):
  pytest.importorskip("instructjax.data.formatting")
  summary = run("hh_rlhf", dataset_inputs(tmp_path, "hh_rlhf"), tmp_path / "out",
                "--tokenizer_kind", "byte")
  counts = summary["boundary"]["files"]
  assert counts["sft/train.jsonl"] == {"pairs": summary["files"]["sft/train.jsonl"],
                                       "boundary_cases": 0}
  assert counts["rm/train.jsonl"]["pairs"] == 2 * summary["files"]["rm/train.jsonl"]


def test_real_datasets(shared_data, tmp_path):
  """Each public dataset, its first records, end to end: non-empty, disjoint sets."""
  inputs = {
      "hh_rlhf": ["hh_rlhf_harmless_base/test.jsonl.gz"],
      "open_assistant": ["open_assistant/en_100_tree.jsonl.gz"],
      "summarize_from_feedback": ["summarize_from_feedback/batch13.jsonl.gz",
                                  "summarize_from_feedback/batch18.jsonl.gz"],
      "gsm8k": ["gsm8k/train.jsonl.gz", "gsm8k/example_model_solutions.jsonl.gz"],
  }
  start = time.perf_counter()
  for name, paths in inputs.items():
    out = tmp_path / name
    summary = run(name, [shared_data / p for p in paths], out, "--max_records", "1000")
    files = read_outputs(out)
    check_disjoint(files)
    for name_ in ("sft/train.jsonl", "rm/train.jsonl", "ppo/prompts.jsonl", "eval/prompts.jsonl"):
      assert files[name_], (name, name_)
    assert summary["files"] == {name_: len(rows) for name_, rows in files.items()}
    if name == "hh_rlhf":
      assert all(r["prompt"].endswith(A) and not r["prompt"].endswith(" ")
                 for r in files["ppo/prompts.jsonl"])
    if name == "summarize_from_feedback":
      assert all(r["prompt"].endswith("TL;DR:") for r in files["sft/train.jsonl"])
  assert time.perf_counter() - start < 20


# ------------------------------------------------------------------------------------ chat templates

# ChatML as Qwen2-Instruct writes it, without the default system message.
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def chatml(*turns, generation_prompt=True):
  """The ChatML text of (role, content) turns."""
  text = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns)
  return text + ("<|im_start|>assistant\n" if generation_prompt else "")


def write_checkpoint(directory, template=CHATML):
  """A checkpoint directory with only what --chat_template reads: tokenizer_config.json."""
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "tokenizer_config.json").write_text(json.dumps({
      "chat_template": template, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
      "added_tokens_decoder": {
          "0": {"content": "<|endoftext|>", "special": True},
          "1": {"content": "<|im_start|>", "special": True},
          "2": {"content": "<|im_end|>", "special": True}}}), encoding="utf-8")
  return directory


def bad_conversations():
  """HH pairs the converters take but a chat template cannot: two user turns in a row, and
  text before the first turn."""
  return [{"chosen": f"{H} a{H} b{A} c", "rejected": f"{H} a{H} b{A} d"},
          {"chosen": f"Intro{H} x{A} good", "rejected": f"Intro{H} x{A} bad"}]


def check_template_run(out, summary, printed, template=CHATML):
  files = read_outputs(out)
  check_disjoint(files)
  assert json.loads((out / "format.json").read_text()) == {"separator": ""}
  assert summary["separator"] == ""
  c = summary["chat_template"]
  assert c["file"] == "tokenizer_config.json"
  assert c["sha256"] == __import__("hashlib").sha256(template.encode()).hexdigest()
  assert "--config.format.separator=''" in printed and "separator=' '" not in printed
  # What the converters wrote = what was rendered (and written once) + what was left out.
  for kind in ("demonstrations", "rankings"):
    written = sum(item[kind]["written"] for item in summary["inputs"] if kind in item)
    assert written == (summary["records"][kind] + summary["duplicates"][kind]
                       + sum(c["skipped"][kind].values()))
    assert c["rendered"][kind] == summary["records"][kind]
  for name, (kind, _) in prepare_data.FILES.items():
    for record in files[name]:
      assert record["prompt"].startswith("<|im_start|>user\n"), record
      assert record["prompt"].endswith("<|im_end|>\n<|im_start|>assistant\n"), record
      for response in record.get("responses", [record.get("completion", "<|im_end|>\n")]):
        assert response.endswith("<|im_end|>\n") and "<|im_start|>" not in response
  return files


def test_chat_template_renders_hh_dialogues_and_counts_what_it_cannot(tmp_path, capsys):
  ckpt = write_checkpoint(tmp_path / "ckpt")
  path = write_jsonl(tmp_path / "hh.jsonl", hh_rows() + bad_conversations())
  summary = run("hh_rlhf", [path], tmp_path / "out", "--chat_template", str(ckpt),
                "--fractions", "sft=0.5,rm=0.5", "--holdout", "0")
  printed = capsys.readouterr().out
  files = check_template_run(tmp_path / "out", summary, printed)
  c = summary["chat_template"]
  refused = {"roles_do_not_alternate": 1, "text_before_first_turn": 1}
  assert c["skipped"] == {"demonstrations": refused, "rankings": refused, "prompts": {}}
  assert set(c["examples"]) == set(refused) and "roles must alternate" in printed
  assert c["layout"] == "dialogue" and c["special_tokens_in_text"]["<|im_start|>"] > 0
  # Every conversation the converters read, but the two, is rendered and written.
  assert c["rendered"] == {"demonstrations": 42, "rankings": 41, "prompts": 0}
  assert set(summary["unused"]["demonstrations"]) == {"rm"}  # RM-set prompts' demonstrations
  prompt = chatml(("user", "Hi, question 3?"), ("assistant", "Hello."),
                  ("user", "Tell me about thing 3."))
  demos = {(d["prompt"], d["completion"]) for d in files["sft/train.jsonl"]}
  rankings_ = {r["prompt"]: r for r in files["rm/train.jsonl"]}
  assert ((prompt, "Thing 3 is nice.<|im_end|>\n") in demos or
          rankings_[prompt]["responses"] == ["Thing 3 is nice.<|im_end|>\n", "No.<|im_end|>\n"])
  # The split is by the rendered prompt: the stages read these files as they are.
  for name, (kind, _) in prepare_data.FILES.items():
    if kind == "demonstrations":
      assert len(list(records.read_demonstrations(tmp_path / "out" / name))) == len(files[name])
    elif kind == "rankings" and files[name]:
      assert rankings.read_rankings(tmp_path / "out" / name)[1].written == len(files[name])


def test_chat_template_renders_open_assistant_threads(tmp_path, capsys):
  ckpt = write_checkpoint(tmp_path / "ckpt")
  inputs = dataset_inputs(tmp_path, "open_assistant")
  summary = run("open_assistant", inputs, tmp_path / "out", "--chat_template", str(ckpt),
                "--fractions", "sft=1", "--holdout", "0")
  files = check_template_run(tmp_path / "out", summary, capsys.readouterr().out)
  demos = {(d["prompt"], d["completion"]) for d in files["sft/train.jsonl"]}
  assert (chatml(("user", "How do I do task 4?")), "The best way to do 4.<|im_end|>\n") in demos
  assert (chatml(("user", "How do I do task 4?"), ("assistant", "Do it this way (4)."),
                 ("user", "And then 4?")), "Then finish 4.<|im_end|>\n") in demos
  assert len(demos) == 30 and summary["chat_template"]["skipped"]["demonstrations"] == {}


@pytest.mark.parametrize("name", ["summarize_from_feedback", "gsm8k", "generic"])
def test_chat_template_single_turn_prompts(tmp_path, capsys, name):
  """TL;DR posts and GSM8K questions are one user turn; a generic prompt is a dialogue when it
  is in the HH layout, one user turn otherwise."""
  ckpt = write_checkpoint(tmp_path / "ckpt")
  inputs = dataset_inputs(tmp_path, name)
  if name == "generic":
    inputs.append(write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": f"{H} Hi {i}.{A} Hello.{H} Bye?{A}", "chosen": f" Bye {i}.", "rejected": "No."}
        for i in range(6)]))
  summary = run(name, inputs, tmp_path / "out", "--chat_template", str(ckpt),
                "--fractions", "sft=1", "--holdout", "0")
  files = check_template_run(tmp_path / "out", summary, capsys.readouterr().out)
  assert summary["chat_template"]["layout"] == prepare_data.CHAT_LAYOUTS[name]
  demos = {(d["prompt"], d["completion"]) for d in files["sft/train.jsonl"]}
  if name == "summarize_from_feedback":
    post = "SUBREDDIT: r/relationships\nTITLE: Title 1\nPOST: My post number 1.\nTL;DR:"
    assert (chatml(("user", post)), "summary b 1<|im_end|>\n") in demos
  elif name == "gsm8k":
    assert (chatml(("user", "Tom has 5 apples and buys 2 more. How many now?")),
            "Tom has 5 + 2 = <<5+2=7>>7 apples.\n#### 7<|im_end|>\n") in demos
  else:
    assert (chatml(("user", "Demo prompt 2:")), "answer 2<|im_end|>\n") in demos
    assert (chatml(("user", "Hi 3."), ("assistant", "Hello."), ("user", "Bye?")),
            "Bye 3.<|im_end|>\n") in demos
    # Prompt-only records are rendered with the generation prompt too (unused: SFT only here).
    assert summary["chat_template"]["rendered"]["prompts"] == 12


def test_chat_template_refusals_are_counted_and_a_template_that_refuses_all_is_an_error(
    tmp_path, capsys):
  refusing = ("{% for m in messages %}{% if 'thing 7' in m['content'] %}"
              "{{ raise_exception('no thing 7 here') }}{% endif %}{% endfor %}" + CHATML)
  ckpt = write_checkpoint(tmp_path / "ckpt", refusing)
  path = write_jsonl(tmp_path / "hh.jsonl", hh_rows())
  summary = run("hh_rlhf", [path], tmp_path / "out", "--chat_template", str(ckpt))
  c = summary["chat_template"]
  assert c["skipped"]["demonstrations"] == {"template_refused": 1}
  assert c["skipped"]["rankings"] == {"template_refused": 1}
  assert "no thing 7 here" in c["examples"]["template_refused"]
  assert "template_refused 1" in capsys.readouterr().out

  def fails(ckpt_dir, *extra):
    code = prepare_data.main(["hh_rlhf", "--in", str(path), "--out", str(tmp_path / "o"),
                              "--chat_template", str(ckpt_dir), *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    return err

  everything = write_checkpoint(tmp_path / "all", "{{ raise_exception('never') }}")
  assert "cannot render a one-turn conversation" in fails(everything)
  only_first = write_checkpoint(tmp_path / "first", (
      "{% if messages|length > 1 %}{{ raise_exception('one turn only') }}{% endif %}" + CHATML))
  assert "used on no conversation (template_refused" in fails(only_first)
  (tmp_path / "none").mkdir()
  (tmp_path / "none" / "tokenizer_config.json").write_text("{}")
  assert "has no chat template" in fails(tmp_path / "none")
  assert "is not a directory" in fails(tmp_path / "missing")
  assert "leave --separator out" in fails(ckpt, "--separator", " ")
  assert "does not parse" in fails(write_checkpoint(tmp_path / "broken", "{% for %}"))


def test_chat_template_special_tokens_a_tokenizer_reads_as_text_are_reported(tmp_path, capsys):
  ckpt = write_checkpoint(tmp_path / "ckpt")
  path = write_jsonl(tmp_path / "hh.jsonl", hh_rows())
  summary = run("hh_rlhf", [path], tmp_path / "out", "--chat_template", str(ckpt),
                "--tokenizer_kind", "byte")
  c = summary["chat_template"]
  assert c["special_tokens_as_text"] == {"<|im_end|>": 10, "<|im_start|>": 12}
  out = capsys.readouterr().out
  assert "WARNING" in out
  # The stages read the template's tokens as tokens (a tokenizer that has them).
  assert "--config.tokenizer.special_tokens_in_text=True" in out
  assert all(f["boundary_cases"] == 0 for f in summary["boundary"]["files"].values())
