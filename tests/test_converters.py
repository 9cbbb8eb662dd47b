"""Tests for the K-way ranking format (rankings.py) and the dataset converters."""
import collections
import gzip
import itertools
import json

import pytest

from instructjax.data import converters
from instructjax.data import rankings
from instructjax.errors import InputError


def write_jsonl(path, rows, *, compress=False):
  text = "".join(json.dumps(row) + "\n" for row in rows)
  if compress:
    with gzip.open(path, "wt", encoding="utf-8") as f:
      f.write(text)
  else:
    path.write_text(text, encoding="utf-8")
  return path


def run(converter, path, **kwargs):
  stats = rankings.Stats()
  records = list(converter(path, stats, **kwargs))
  return records, stats


GOOD = {"prompt": "p", "responses": ["a", "b", "c"], "ranks": [1, 0, 1]}

# --------------------------------------------------------------------------- pairs


def test_pairs_matches_hand_list():
  assert rankings.pairs([1, 0, 2, 1]) == [(0, 2), (1, 0), (1, 2), (1, 3), (3, 2)]
  assert rankings.pairs([0, 1]) == [(0, 1)]
  assert rankings.pairs([1, 0]) == [(1, 0)]
  assert rankings.pairs([3, 3, 3]) == []


def test_pairs_full_ranking_has_every_pair_once():
  for ranks in itertools.permutations(range(5)):
    got = rankings.pairs(ranks)
    assert len(got) == 10
    assert all(ranks[w] < ranks[l] for w, l in got)
    every_pair = {frozenset(p) for p in itertools.combinations(range(5), 2)}
    assert {frozenset(p) for p in got} == every_pair


# --------------------------------------------------------------------------- validation


def test_validate_accepts_and_copies():
  record = {**GOOD, "responses": ("a", "b", "c"), "source": "x"}
  out = rankings.validate_ranking(record, "r")
  assert out == {**GOOD, "source": "x"}
  assert isinstance(out["responses"], list)


@pytest.mark.parametrize("record, reason, words", [
    (["not", "a", "dict"], "not_an_object", "JSON object"),
    ({"responses": ["a", "b"], "ranks": [0, 1]}, "missing_field", "'prompt'"),
    ({"prompt": "p", "ranks": [0, 1]}, "missing_field", "'responses'"),
    ({"prompt": "p", "responses": ["a", "b"]}, "missing_field", "'ranks'"),
    ({"prompt": 3, "responses": ["a", "b"], "ranks": [0, 1]}, "wrong_type", "'prompt'"),
    ({"prompt": "p", "responses": "ab", "ranks": [0, 1]}, "wrong_type", "'responses'"),
    ({"prompt": "p", "responses": ["a", "b"], "ranks": "01"}, "wrong_type", "'ranks'"),
    ({"prompt": "p", "responses": ["a", 7], "ranks": [0, 1]}, "wrong_type", "responses[1]"),
    ({"prompt": "p", "responses": ["a"], "ranks": [0]}, "too_few_responses", "at least 2"),
    ({"prompt": "p", "responses": [], "ranks": []}, "too_few_responses", "at least 2"),
    ({"prompt": "p", "responses": ["a", "b"], "ranks": [0, 1, 2]}, "length_mismatch", "3 ranks"),
    ({"prompt": "p", "responses": ["a", "b"], "ranks": [0, -1]}, "bad_rank", "ranks[1]"),
    ({"prompt": "p", "responses": ["a", "b"], "ranks": [0, 1.0]}, "bad_rank", "ranks[1]"),
    ({"prompt": "p", "responses": ["a", "b"], "ranks": [True, 0]}, "bad_rank", "ranks[0]"),
    ({"prompt": "p", "responses": ["a", "b"], "ranks": [0, "1"]}, "bad_rank", "ranks[1]"),
    ({"prompt": "p", "responses": ["a", ""], "ranks": [0, 1]}, "empty_response", "responses[1]"),
    ({"prompt": "p", "responses": [" \n\t", "b"], "ranks": [0, 1]}, "empty_response",
     "responses[0]"),
    ({"prompt": "p", "responses": ["a", "b", "c"], "ranks": [2, 2, 2]}, "all_tied",
     "no preference"),
])
def test_validate_rejects(record, reason, words):
  with pytest.raises(InputError) as info:
    rankings.validate_ranking(record, "file.jsonl:7")
  assert info.value.reason == reason
  assert info.value.where == "file.jsonl:7"
  assert words in info.value.problem


def test_validate_max_k():
  assert rankings.validate_ranking(GOOD, "r", max_k=3)
  with pytest.raises(InputError, match="exceeds max_k = 2") as info:
    rankings.validate_ranking(GOOD, "r", max_k=2)
  assert info.value.reason == "too_many_responses"


# --------------------------------------------------------------------------- read / write


def test_write_then_read_round_trip(tmp_path):
  records = [GOOD, {"prompt": "q", "responses": ["x", "ÿ ü"], "ranks": [0, 1]}]
  for name in ("r.jsonl", "r.jsonl.gz"):
    assert rankings.write_rankings(tmp_path / name, records) == 2
    got, stats = rankings.read_rankings(tmp_path / name)
    assert got == records
    assert (stats.read, stats.written, dict(stats.skipped)) == (2, 2, {})
  assert (tmp_path / "r.jsonl.gz").read_bytes()[:2] == b"\x1f\x8b"


def test_write_refuses_bad_record_and_leaves_no_file(tmp_path):
  out = tmp_path / "out.jsonl"
  with pytest.raises(InputError, match="record 1: .*all 2 responses have rank 0"):
    rankings.write_rankings(out, [GOOD, {"prompt": "p", "responses": ["a", "b"], "ranks": [0, 0]}])
  assert list(tmp_path.iterdir()) == []


def test_read_names_file_and_line(tmp_path):
  path = tmp_path / "r.jsonl"
  path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps({**GOOD, "ranks": [0, 0, 0]}) + "\n")
  with pytest.raises(InputError, match=r"r\.jsonl:3: all 3 responses have rank 0"):
    rankings.read_rankings(path)


def test_read_skip_counts_every_bad_record(tmp_path):
  rows = [GOOD, {**GOOD, "ranks": [0, 0, 0]}, {**GOOD, "responses": ["a", "", "c"]}, GOOD,
          {"prompt": "p"}, {**GOOD, "ranks": [0, 0, 0]}]
  path = write_jsonl(tmp_path / "r.jsonl.gz", rows, compress=True)
  records, stats = rankings.read_rankings(path, on_bad="skip")
  assert records == [GOOD, GOOD]
  assert stats.read == 6 and stats.written == 2
  assert stats.skipped == {"all_tied": 2, "empty_response": 1, "missing_field": 1}
  assert sum(stats.skipped.values()) + stats.written == stats.read


def test_read_max_k(tmp_path):
  pair = {**GOOD, "responses": ["a", "b"], "ranks": [0, 1]}
  path = write_jsonl(tmp_path / "r.jsonl", [GOOD, pair])
  with pytest.raises(InputError, match=r"r\.jsonl:1: K = 3 responses exceeds max_k = 2"):
    rankings.read_rankings(path, max_k=2)
  records, stats = rankings.read_rankings(path, max_k=2, on_bad="skip")
  assert len(records) == 1 and stats.skipped == {"too_many_responses": 1}


def test_read_file_level_errors(tmp_path):
  path = tmp_path / "r.jsonl"
  path.write_text(json.dumps(GOOD) + "\n{not json\n")
  with pytest.raises(InputError, match=r"r\.jsonl:2: .*JSON"):
    rankings.read_rankings(path, on_bad="skip")  # Not JSON is never skipped.
  with pytest.raises(InputError, match="no such file"):
    rankings.read_rankings(tmp_path / "missing.jsonl")
  with pytest.raises(InputError, match="on_bad"):
    rankings.read_rankings(path, on_bad="ignore")
  (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9"}\n')
  with pytest.raises(InputError, match=r"latin1\.jsonl:1: .*UTF-8"):
    rankings.read_rankings(tmp_path / "latin1.jsonl")
  (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(b'{"a": 1}\n' * 50)[:30])
  with pytest.raises(InputError, match="cannot read the file"):
    rankings.read_rankings(tmp_path / "cut.jsonl.gz", on_bad="skip")


# --------------------------------------------------------------------------- HH-RLHF

H, A = "\n\nHuman:", "\n\nAssistant:"


def test_hh_rlhf_splits_at_last_shared_assistant_turn(tmp_path):
  prefix = f"{H} Hi there{A} Hello! How can I help?{H} Tell me a joke{A}"
  rows = [
      # Both replies start with the same words: the cut must not be mid-reply.
      {"chosen": prefix + " Why did the chicken cross the road?",
       "rejected": prefix + " Why not, here: knock knock."},
      {"chosen": prefix + " Sure.", "rejected": prefix + " Sure."},          # identical
      {"chosen": f"{H} a{A} b{H} c{A} d", "rejected": f"{H} a{A} x{H} c{A} d"},  # differs early
      {"chosen": prefix + " ", "rejected": prefix + " No."},               # empty chosen
      {"chosen": f"{H} a{A} b", "rejected": f"{H} z{A} b"},                 # no shared turn
  ]
  path = write_jsonl(tmp_path / "hh.jsonl.gz", rows, compress=True)
  records, stats = run(converters.hh_rlhf, path)
  assert records == [{"prompt": prefix,
                      "responses": ["Why did the chicken cross the road?",
                                    "Why not, here: knock knock."],
                      "ranks": [0, 1]}]
  assert (stats.read, stats.written) == (5, 1)
  assert stats.skipped == {"identical": 1, "differ_before_final_turn": 1, "empty_response": 1,
                           "no_shared_assistant_turn": 1}


def test_hh_rlhf_malformed_record(tmp_path):
  path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": f"{H} a{A} b", "rejected": f"{H} a{A} c"},
                                             {"chosen": "x"}])
  with pytest.raises(InputError, match=r"hh\.jsonl:2: missing field 'rejected'"):
    run(converters.hh_rlhf, path)
  records, stats = run(converters.hh_rlhf, path, on_bad="skip")
  assert len(records) == 1 and stats.skipped == {"malformed": 1}


def test_hh_rlhf_real(shared_data):
  path = shared_data / "hh_rlhf_harmless_base" / "test.jsonl.gz"
  records, stats = run(converters.hh_rlhf, path)
  assert stats.read == 2312
  assert stats.written + sum(stats.skipped.values()) == stats.read
  assert stats.written > 2250
  sources = [json.loads(line) for line in gzip.open(path, "rt", encoding="utf-8")]
  by_chosen = {s["chosen"]: s for s in sources}
  for record in records[:300]:
    assert record["prompt"].startswith(H) and record["prompt"].endswith(A)
    # Lossless up to the whitespace around each reply.
    source = next(s for c, s in by_chosen.items()
                  if c.startswith(record["prompt"]) and c[len(record["prompt"]):].strip()
                  == record["responses"][0])
    assert source["rejected"][len(record["prompt"]):].strip() == record["responses"][1]


# --------------------------------------------------------------------------- OpenAssistant


def oa(text, role, rank=None, replies=(), **extra):
  message = {"message_id": text, "text": text, "role": role, "lang": "en", "replies": list(replies),
             **extra}
  if role == "assistant":
    message["rank"] = rank
  return message


def oa_tree():
  return {
      "message_tree_id": "tree-1", "tree_state": "ready_for_export",
      "prompt": oa("Q1", "prompter", replies=[
          oa("A1", "assistant", 1, replies=[
              oa("Q2", "prompter", replies=[
                  oa("B", "assistant", 0), oa("C", "assistant", None), oa("D", "assistant", 1),
                  oa("Z", "assistant", 2, deleted=True)])]),
          oa("E1", "assistant", 0),
          oa("F1", "assistant", None, replies=[  # Unranked, yet its subtree is walked.
              oa("Q3", "prompter", replies=[oa("G", "assistant", 0)])]),
      ])}


def test_open_assistant_walks_the_whole_tree(tmp_path):
  path = write_jsonl(tmp_path / "oa.jsonl.gz", [oa_tree()], compress=True)
  records, stats = run(converters.open_assistant, path)
  assert records == [
      {"prompt": f"{H} Q1{A}", "responses": ["A1", "E1"], "ranks": [1, 0]},
      {"prompt": f"{H} Q1{A} A1{H} Q2{A}", "responses": ["B", "D"], "ranks": [0, 1]},
  ]
  assert (stats.read, stats.written) == (1, 2)
  assert stats.dropped == {"unranked_replies": 2, "deleted_replies": 1}
  assert stats.skipped == {"too_few_responses": 1}  # Q3 has a single ranked reply.


def test_open_assistant_format_errors(tmp_path):
  tree = oa_tree()
  tree["prompt"]["replies"][1]["role"] = "prompter"
  path = write_jsonl(tmp_path / "oa.jsonl", [tree])
  where = r"oa\.jsonl:1 tree tree-1 message Q1: "
  with pytest.raises(InputError, match=where + ".*roles must alternate"):
    run(converters.open_assistant, path)
  tree = oa_tree()
  tree["prompt"]["replies"][1]["rank"] = "first"
  path = write_jsonl(tmp_path / "oa.jsonl", [tree, oa_tree()])
  with pytest.raises(InputError, match=r"ranks\[1\] must be a non-negative integer"):
    run(converters.open_assistant, path)
  records, stats = run(converters.open_assistant, path, on_bad="skip")
  assert len(records) == 2 and stats.skipped["bad_rank"] == 1


def reference_oa_k_counts(path):
  """K of every prompter message with >= 2 ranked replies, by a plain tree walk."""
  counts = collections.Counter()
  stack = [json.loads(line)["prompt"] for line in gzip.open(path, "rt", encoding="utf-8")]
  while stack:
    message = stack.pop()
    replies = message.get("replies") or []
    k = sum(reply.get("rank") is not None for reply in replies)
    if message["role"] == "prompter" and k >= 2:
      counts[k] += 1
    stack.extend(replies)
  return counts


def test_open_assistant_real_k_distribution(shared_data):
  path = shared_data / "open_assistant" / "en_100_tree.jsonl.gz"
  records, stats = run(converters.open_assistant, path)
  k_counts = collections.Counter(len(r["responses"]) for r in records)
  # The distribution documented in shared/data/README.md.
  assert k_counts == {2: 57, 3: 117, 4: 27, 5: 3, 6: 6, 8: 1, 9: 1}
  assert k_counts == reference_oa_k_counts(path)
  assert stats.read == 100 and stats.written == 212
  assert stats.dropped["unranked_replies"] > 0
  assert all(r["prompt"].startswith(H) and r["prompt"].endswith(A) for r in records)
  assert all(sorted(r["ranks"]) == list(range(len(r["ranks"]))) for r in records)


# ------------------------------------------------------------------ summarize-from-feedback


def tldr_row(choice, texts=(" first summary", " second summary")):
  return {"info": {"id": "t3_x", "post": "My post body.\n", "title": "A title",
                   "subreddit": "relationships"},
          "split": "valid1",
          "summaries": [{"text": t, "policy": "ref", "note": None} for t in texts],
          "choice": choice, "worker": "w", "batch": "batch13", "extra": {"confidence": 5}}


def test_summarize_from_feedback(tmp_path):
  rows = [tldr_row(1), tldr_row(0, (" same", " same")), tldr_row(2)]
  path = write_jsonl(tmp_path / "tldr.jsonl", rows)
  with pytest.raises(InputError, match=r"tldr\.jsonl:3: choice 2 is not an index"):
    run(converters.summarize_from_feedback, path)
  records, stats = run(converters.summarize_from_feedback, path, on_bad="skip")
  assert records == [{
      "prompt": "SUBREDDIT: r/relationships\nTITLE: A title\nPOST: My post body.\nTL;DR:",
      "responses": ["first summary", "second summary"], "ranks": [1, 0]}]
  assert rankings.pairs(records[0]["ranks"]) == [(1, 0)]
  assert stats.skipped == {"identical": 1, "malformed": 1}


def test_summarize_from_feedback_real(shared_data):
  path = shared_data / "summarize_from_feedback" / "batch13.jsonl.gz"
  records, stats = run(converters.summarize_from_feedback, path)
  sources = [json.loads(line) for line in gzip.open(path, "rt", encoding="utf-8")]
  assert stats.read == len(sources) == 1097 and stats.written == 1097
  for record, source in zip(records, sources):
    winner, = [i for i, rank in enumerate(record["ranks"]) if rank == 0]
    assert winner == source["choice"]
    assert record["responses"][winner] == source["summaries"][source["choice"]]["text"].strip()
    assert record["prompt"].endswith("TL;DR:") and source["info"]["title"] in record["prompt"]


# --------------------------------------------------------------------------- GSM8K


def gsm8k_row(question, flags):
  row = {"question": question, "ground_truth": "A: 1"}
  for key, flag in zip(converters.GSM8K_SOLUTION_KEYS, flags):
    row[key] = None if flag is None else {"is_correct": flag, "solution": f"{key} says\nA: 1"}
  return row


def test_gsm8k_solutions(tmp_path):
  rows = [gsm8k_row("mixed", [False, True, None, True]),
          gsm8k_row("all right", [True, True, True, True]),
          gsm8k_row("all wrong", [False, False]),
          gsm8k_row("lonely", [True])]
  del rows[0]["175b_verification"]  # An absent key is like a null one.
  records, stats = run(converters.gsm8k_solutions, write_jsonl(tmp_path / "g.jsonl", rows))
  assert records == [{"prompt": "mixed",
                      "responses": ["6b_finetuning says\nA: 1", "6b_verification says\nA: 1"],
                      "ranks": [1, 0]}]
  assert stats.skipped == {"all_correct": 1, "all_incorrect": 1, "too_few_responses": 1}
  bad = gsm8k_row("q", [True, False])
  bad["6b_verification"]["is_correct"] = "yes"
  where = r"g\.jsonl:1 6b_verification: "
  with pytest.raises(InputError, match=where + "field 'is_correct' must be bool"):
    run(converters.gsm8k_solutions, write_jsonl(tmp_path / "g.jsonl", [bad]))


def test_gsm8k_solutions_real(shared_data):
  path = shared_data / "gsm8k" / "example_model_solutions.jsonl.gz"
  records, stats = run(converters.gsm8k_solutions, path)
  assert stats.read == 1319
  assert stats.written + stats.skipped["all_correct"] + stats.skipped["all_incorrect"] == 1319
  for record in records:
    # 4 solutions split 1-3, 2-2 or 3-1 between correct and incorrect.
    assert len(record["responses"]) == 4
    assert len(rankings.pairs(record["ranks"])) in (3, 4)


# --------------------------------------------------------------------------- generic and convert


def test_generic_accepts_both_forms(tmp_path):
  rows = [GOOD, {"prompt": "p", "chosen": "good", "rejected": "bad", "id": 9}]
  records, stats = run(converters.generic, write_jsonl(tmp_path / "g.jsonl", rows))
  assert records == [GOOD, {"prompt": "p", "responses": ["good", "bad"], "ranks": [0, 1], "id": 9}]
  assert stats.written == 2


def test_generic_is_strict(tmp_path):
  rows = [{"prompt": "p", "chosen": "same", "rejected": "same"}, {**GOOD, "ranks": [0, 0, 0]},
          {"prompt": "p", "text": "?"}, GOOD]
  path = write_jsonl(tmp_path / "g.jsonl", rows)
  with pytest.raises(InputError, match=r"g\.jsonl:1: chosen and rejected are identical"):
    run(converters.generic, path)
  records, stats = run(converters.generic, path, on_bad="skip")
  assert records == [GOOD]
  assert stats.skipped == {"identical": 1, "all_tied": 1, "missing_field": 1}


def test_convert_writes_a_rankings_file(tmp_path):
  source = write_jsonl(tmp_path / "oa.jsonl", [oa_tree()])
  stats = converters.convert("open_assistant", source, tmp_path / "out.jsonl.gz")
  records, read_stats = rankings.read_rankings(tmp_path / "out.jsonl.gz")
  assert stats.written == read_stats.read == len(records) == 2
  assert "written 2" in str(stats) and stats.as_dict()["dropped"]["unranked_replies"] == 2
  with pytest.raises(InputError, match="unknown converter 'oasst'"):
    converters.convert("oasst", source, tmp_path / "x.jsonl")
  assert set(converters.CONVERTERS) == {"hh_rlhf", "open_assistant", "summarize_from_feedback",
                                        "gsm8k_solutions", "generic"}


def test_on_bad_checked_before_reading(tmp_path):
  with pytest.raises(InputError, match="on_bad"):
    converters.hh_rlhf(tmp_path / "missing.jsonl", on_bad="drop")
