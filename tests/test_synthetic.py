"""Tests for the synthetic instruction task: templates, splits, gold scorer, simulated labeler."""
import functools
import itertools
import re
import string

import numpy as np
import pytest

from instructjax.data import synthetic
from instructjax.data.synthetic import (INSTRUCTIONS, INSTRUCTION_MARKERS, STYLES, Problem,
                                        SyntheticTask, TaskConfig)
from instructjax.errors import InputError


@pytest.fixture(scope="module")
def task():
  return SyntheticTask(TaskConfig(seed=1))


def reference_answer(problem: Problem) -> str:
  """Each instruction solved the slow, obvious way, independently of the module's solvers."""
  word, digits = problem.word, list(problem.digits)
  name = problem.instruction
  if name == "reverse":
    out = ""
    for char in word:
      out = char + out
    return out
  if name == "upper":
    return "".join(string.ascii_uppercase[string.ascii_lowercase.index(c)] for c in word)
  if name == "repeat":
    return " ".join(word for _ in range(problem.times))
  if name == "sort":
    return " ".join(str(d) for d in range(10) for _ in range(digits.count(d)))
  if name == "max":
    return str([d for d in range(10) if d in digits][-1])
  if name == "min":
    return str([d for d in range(10) if d in digits][0])
  if name == "count":
    return str(sum(1 for _ in digits))
  if name == "first":
    return str(digits[0])
  if name == "last":
    return str(digits[len(digits) - 1])
  raise AssertionError(name)


def slow_edit_distance(a: str, b: str) -> int:
  @functools.cache
  def d(i, j):
    if i == 0 or j == 0:
      return i + j
    return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))
  return d(len(a), len(b))


def shot_problems(prompt: str) -> list[Problem]:
  """The solved examples inside a few-shot style prompt, as problems."""
  problem = synthetic.parse(prompt)
  out = []
  for line in prompt.split("\n")[1:-1]:
    given, _ = line.split(" => ")
    if INSTRUCTIONS[problem.instruction].takes == "word":
      out.append(Problem(problem.instruction, "few-shot", 0, word=given, times=problem.times))
    else:
      out.append(Problem(problem.instruction, "few-shot", 0,
                         digits=tuple(int(d) for d in given.split())))
  return out


# -- Determinism and splits ------------------------------------------------------------------------


def test_streams_are_deterministic_given_seed_and_prefix_stable():
  a, b = SyntheticTask(TaskConfig(seed=5)), SyntheticTask(TaskConfig(seed=5))
  assert a.prompts(50, "eval") == b.prompts(50, "eval")
  assert a.prompts(20, "eval") == b.prompts(50, "eval")[:20]
  assert a.demonstrations(30) == b.demonstrations(30)
  assert a.pretraining_documents(30) == b.pretraining_documents(30)
  assert a.prompts(30, "ppo", style="user") == b.prompts(30, "ppo", style="user")
  other = SyntheticTask(TaskConfig(seed=6))
  assert other.prompts(50, "eval") != a.prompts(50, "eval")
  assert other.pretraining_documents(10) != a.pretraining_documents(10)


def test_splits_are_disjoint_in_instruction_and_input(task):
  keys = {}
  for split in ("train", "rm", "ppo", "eval"):
    prompts = task.prompts(400, split)
    problems = [synthetic.parse(p) for p in prompts]
    assert all(task.split_of(p) == split for p in problems)
    keys[split] = {p.key for p in problems}
    # Solved examples inside few-shot prompts come from the same split too.
    for prompt, problem in zip(prompts, problems):
      if problem.style == "few-shot":
        assert all(task.split_of(s) == split for s in shot_problems(prompt))
  for s1, s2 in itertools.combinations(keys, 2):
    assert not keys[s1] & keys[s2], (s1, s2)
  # Each split asks about every instruction in every style.
  for split in keys:
    seen = {(synthetic.parse(p).instruction, synthetic.parse(p).style)
            for p in task.prompts(400, split)}
    assert seen == set(itertools.product(INSTRUCTIONS, STYLES))


def test_unknown_split_or_style_is_an_input_error(task):
  with pytest.raises(InputError, match="split"):
    task.prompts(3, "validation")
  with pytest.raises(InputError, match="style"):
    task.prompts(3, "eval", style="chat")
  with pytest.raises(InputError):
    task.prompts(-1, "eval")


# -- Templates -------------------------------------------------------------------------------------


def test_every_template_parses_back_to_the_right_answer_and_no_other():
  task = SyntheticTask()
  rng = np.random.default_rng(0)
  for ins in INSTRUCTIONS.values():
    for style, templates in (("plain", ins.plain), ("user", ins.user), ("few-shot", ins.few_shot)):
      for template in range(len(templates)):
        for _ in range(20):
          problem = task._random_problem(rng, ins.name, style, template)
          shots = [task._random_problem(rng, ins.name, style, template, short=True)
                   for _ in range(int(rng.integers(1, 3)))] if style == "few-shot" else []
          shots = [Problem(s.instruction, s.style, s.template, s.word, s.digits, problem.times)
                   for s in shots]
          prompt = synthetic.render(problem, shots)
          matches = [p for p in synthetic._patterns() if p[0].fullmatch(prompt)]
          assert len(matches) == 1, prompt
          assert synthetic.parse(prompt) == problem
          assert task.answer(prompt) == " " + reference_answer(problem)
          for shot in shots:  # The shown examples are solved correctly.
            assert f" => {reference_answer(shot)}\n" in prompt


def test_prompts_end_at_an_obvious_boundary_and_stay_short(task):
  for style in STYLES:
    for prompt in task.prompts(500, "train", style):
      assert prompt.endswith(("\nAnswer:", "\nAssistant:", " =>")), prompt
      assert len(prompt) <= 64, prompt
      answer = task.answer(prompt)
      assert answer.startswith(" ") and "\n" not in answer and len(answer) <= 24


def test_demonstrations_are_prompts_with_their_answers(task):
  demos = task.demonstrations(100, "train")
  assert [d["prompt"] for d in demos] == task.prompts(100, "train")
  for d in demos:
    assert set(d) == {"prompt", "completion"}
    assert d["completion"] == " " + reference_answer(synthetic.parse(d["prompt"]))


def test_chatty_demonstrators_add_a_remark_the_gold_scorer_penalises():
  task = SyntheticTask(TaskConfig(remark_rate=0.6))
  demos = task.demonstrations(400, "train")
  assert [d["prompt"] for d in demos] == task.prompts(400, "train")
  assert demos[:50] == task.demonstrations(50, "train")  # a longer request extends a shorter one
  chatty = 0
  for d in demos:
    answer = task.answer(d["prompt"])
    if d["completion"] == answer:
      assert task.score(d["prompt"], d["completion"]) == 1.0
      continue
    chatty += 1
    head, remark = d["completion"].split("\n")
    assert head == answer and remark in synthetic.REMARKS
    penalty = task.config.trailing_text_penalty * min(1.0, len(remark) / 16)
    assert task.score(d["prompt"], d["completion"]) == pytest.approx(1.0 - penalty)
  assert 0.5 < chatty / len(demos) < 0.7
  with pytest.raises(InputError, match="remark_rate"):
    TaskConfig(remark_rate=1.5)


@pytest.mark.parametrize("text", [
    "hello there", "Reverse: abc", "Reverse: ABC\nAnswer:", "Sort: 1,2\nAnswer:",
    "Repeat ab 0 times.\nAnswer:", "User: please reverse abc\nAnswer:", "",
    "Reverse each word.\nab => ba",
])
def test_text_that_is_not_a_prompt_is_a_value_error(task, text):
  with pytest.raises(ValueError, match="not a prompt|repeat"):
    task.answer(text)
  with pytest.raises(InputError):
    task.score(text, " abc")


def test_few_shot_prompt_prepends_correct_examples_of_the_same_format(task):
  for prompt in task.prompts(60, "eval"):
    problem = synthetic.parse(prompt)
    assert task.few_shot_prompt(prompt, n_shots=0) == prompt
    prompted = task.few_shot_prompt(prompt, n_shots=2)
    assert prompted == task.few_shot_prompt(prompt, n_shots=2)  # Deterministic.
    assert prompted.endswith(prompt.split("\n")[-1]) and len(prompted) > len(prompt)
    assert task.answer(prompted) == task.answer(prompt)
    assert task.score(prompted, task.answer(prompt)) == 1.0
    if problem.style == "few-shot":
      assert len(prompted.split("\n")) == len(prompt.split("\n")) + 2
      shots = shot_problems(prompted)
    else:
      blocks = prompted.split("\n\n")
      assert len(blocks) == 3 and blocks[-1] == prompt
      shots = []
      for block in blocks[:-1]:
        question, _, given = block.rpartition(":")
        shot = synthetic.parse(question + ":")
        assert (shot.instruction, shot.style, shot.template) == (
            problem.instruction, problem.style, problem.template)
        assert given == " " + reference_answer(shot)
        shots.append(shot)
    for shot in shots:
      assert shot.key != problem.key  # Never gives away the answer.
      if problem.style == "few-shot":
        line = f"{shot.word or ' '.join(map(str, shot.digits))} => {reference_answer(shot)}"
        assert line in prompted.split("\n")


# -- Pretraining corpus ----------------------------------------------------------------------------


def test_pretraining_documents_never_pose_or_answer_an_instruction(task):
  docs = task.pretraining_documents(500)
  assert len(set(docs)) > 450
  allowed = set(string.ascii_letters + string.digits + " .")
  for doc in docs:
    assert 20 <= len(doc) <= 120, doc
    assert set(doc) <= allowed, doc
    assert not any(marker in doc for marker in INSTRUCTION_MARKERS), doc
    with pytest.raises(InputError):
      synthetic.parse(doc)
    words = re.findall(r"[A-Za-z]+", doc)
    assert not {"Reverse", "Sort", "Uppercase", "Repeat", "Count"} & set(words)
  # The corpus does use the task's words and digits.
  text = " ".join(docs)
  assert set(task.config.alphabet) <= set(text) and set(string.digits) <= set(text)
  assert task.pretraining_documents(50, "eval") != task.pretraining_documents(50)


# -- Gold score ------------------------------------------------------------------------------------


def test_edit_distance_matches_the_recursive_definition():
  rng = np.random.default_rng(1)
  for _ in range(300):
    a = "".join(rng.choice(list("abc"), size=rng.integers(0, 7)))
    b = "".join(rng.choice(list("abc"), size=rng.integers(0, 7)))
    assert synthetic.edit_distance(a, b) == slow_edit_distance(a, b), (a, b)


def test_score_is_one_for_the_answer_and_low_for_garbage(task):
  rng = np.random.default_rng(2)
  for prompt in task.prompts(300, "eval"):
    answer = task.answer(prompt)
    assert task.score(prompt, answer) == 1.0
    assert task.score(prompt, answer.strip()) == 1.0
    assert task.score(prompt, answer + " \n ") == 1.0  # Trailing whitespace is not text.
    garbage = "".join(rng.choice(list("xyz!?XYZ"), size=len(answer) + 2))
    assert task.score(prompt, garbage) <= 0.1
    assert task.score(prompt, "") == 0.0
    response = task.simulated_response(prompt, rng)
    assert 0.0 <= task.score(prompt, response) <= 1.0


def test_partial_credit_falls_with_each_wrong_character():
  task = SyntheticTask()
  prompt = "Reverse: abcde\nAnswer:"
  scores = [task.score(prompt, r) for r in (" edcba", " edcbx", " edcxx", " edxxx", " xxxxx")]
  assert scores == sorted(scores, reverse=True) and len(set(scores)) == 5
  assert scores[0] == 1.0 and scores[-1] == 0.0
  assert 0.0 < task.score(prompt, " edcb") < 1.0  # A missing character.
  sort = "Sort: 3 1 2\nAnswer:"
  assert 0.0 < task.score(sort, " 1 3 2") < task.score(sort, " 1 2 3")
  # Numbers: a near miss earns some credit, a far one less.
  count = "Count: 1 1 1 1 1\nAnswer:"
  near, far = task.score(count, " 4"), task.score(count, " 1")
  assert 0.0 < far < near < 1.0
  # ... but not for a position's digit: the first of "3 7" is 3, and 4 is no nearer than 9.
  first = "First of 3 7?\nAnswer:"
  assert task.score(first, " 4") == task.score(first, " 9") == 0.0


def test_trailing_text_is_penalised_in_proportion_to_its_length():
  task = SyntheticTask()
  prompt = "User: please sort 3 1 2\nAssistant:"
  clean = task.score(prompt, " 1 2 3")
  short = task.score(prompt, " 1 2 3\nok")
  long = task.score(prompt, " 1 2 3\nUser: please sort 5 4\nAssistant: 4 5")
  assert clean == 1.0 > short > long
  assert long == pytest.approx(1.0 - task.config.trailing_text_penalty)
  # The penalty multiplies partial credit, so a wrong answer with rambling is worse still.
  assert task.score(prompt, " 1 3 2\nmore text here") < task.score(prompt, " 1 3 2")


# -- Simulated labeler -----------------------------------------------------------------------------


def random_pairs(task, n, seed, quality_range=(0.0, 1.0)):
  rng = np.random.default_rng(seed)
  pairs = []
  prompts = task.prompts(n, "rm")
  for prompt in prompts:
    a, b = (task.simulated_response(prompt, rng, float(rng.uniform(*quality_range)))
            for _ in range(2))
    pairs.append((prompt, a, b, task.score(prompt, a) - task.score(prompt, b)))
  return [p for p in pairs if p[3] != 0.0]


def test_labelers_agree_at_the_calibrated_rate_on_random_pairs():
  task = SyntheticTask(TaskConfig(seed=3))
  pairs = random_pairs(task, 3000, seed=11)
  labeler_1, labeler_2 = np.random.default_rng(21), np.random.default_rng(22)
  with_gold, between = [], []
  for prompt, a, b, gap in pairs:
    r1, r2 = task.rank(prompt, [a, b], labeler_1), task.rank(prompt, [a, b], labeler_2)
    first_prefers_a = r1[0] < r1[1]
    with_gold.append(first_prefers_a == (gap > 0))
    between.append(first_prefers_a == (r2[0] < r2[1]))
  target = task.config.labeler_agreement
  assert np.mean(between) == pytest.approx(target, abs=0.03)
  assert task.inter_labeler_agreement() == pytest.approx(target, abs=1e-3)
  # Agreement with the gold order is the RM ceiling; p^2 + (1-p)^2 = target for a fixed p.
  assert np.mean(with_gold) == pytest.approx(task.labeler_agreement_ceiling(), abs=0.03)
  assert task.labeler_agreement_ceiling() > target
  gaps = [abs(g) for *_, g in pairs]
  assert task.labeler_agreement_ceiling(gaps) == pytest.approx(np.mean(with_gold), abs=0.03)


def test_ceiling_for_given_pairs_predicts_agreement_on_close_calls():
  task = SyntheticTask(TaskConfig(seed=4))
  pairs = random_pairs(task, 2500, seed=12, quality_range=(0.7, 1.0))  # Mostly near misses.
  rng = np.random.default_rng(5)
  agree = [(task.rank(p, [a, b], rng)[0] == 0) == (gap > 0) for p, a, b, gap in pairs]
  predicted = task.labeler_agreement_ceiling([abs(g) for *_, g in pairs])
  assert np.mean(agree) == pytest.approx(predicted, abs=0.03)
  assert predicted < task.labeler_agreement_ceiling()  # Close calls are harder.


def test_k_way_rankings_have_the_same_pairwise_agreement():
  task = SyntheticTask(TaskConfig(seed=3))
  rng = np.random.default_rng(7)
  agree = []
  for prompt in task.prompts(800, "rm"):
    responses = [task.simulated_response(prompt, rng) for _ in range(4)]
    scores = [task.score(prompt, r) for r in responses]
    ranks = task.rank(prompt, responses, rng)
    assert sorted(set(ranks)) == list(range(len(set(ranks))))  # Dense, 0 = best.
    for i, j in itertools.combinations(range(4), 2):
      if scores[i] != scores[j]:
        assert ranks[i] != ranks[j]
        agree.append((ranks[i] < ranks[j]) == (scores[i] > scores[j]))
      else:
        assert ranks[i] == ranks[j]  # Equal gold scores tie.
  assert np.mean(agree) == pytest.approx(task.labeler_agreement_ceiling(), abs=0.03)


def test_a_perfect_labeler_follows_the_gold_order():
  task = SyntheticTask(TaskConfig(labeler_agreement=1.0))
  prompt = "Reverse: abcd\nAnswer:"
  responses = [" dcbx", " dcba", " xxxx", " dcba", " dcba\nmore"]
  assert task.rank(prompt, responses, np.random.default_rng(0)) == [2, 0, 3, 0, 1]
  assert task.labeler_agreement_ceiling() == 1.0
  assert task.rank(prompt, [], np.random.default_rng(0)) == []
  with pytest.raises(InputError):
    task.rank(prompt, " dcba", np.random.default_rng(0))


# -- Configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [
    dict(alphabet="ABC"), dict(word_len=(3, 2)), dict(list_len=(0, 3)), dict(repeat_times=(2, 12)),
    dict(instructions=("reverse", "translate")),
    dict(style_weights=(("plain", 1.0), ("chat", 1.0))),
    dict(splits=(("train", 0.5), ("train", 0.5))), dict(splits=(("train", 0.0),)),
    dict(labeler_agreement=0.5), dict(trailing_text_penalty=1.5), dict(few_shot_examples=0),
])
def test_bad_config_is_an_input_error(bad):
  with pytest.raises(InputError, match="TaskConfig"):
    TaskConfig(**bad)


def test_a_subset_of_instructions_and_styles_is_respected():
  task = SyntheticTask(TaskConfig(instructions=("sort", "upper"), style_weights=(("user", 1.0),)))
  problems = [synthetic.parse(p) for p in task.prompts(100, "train")]
  assert {p.instruction for p in problems} == {"sort", "upper"}
  assert {p.style for p in problems} == {"user"}


def test_instructions_cover_every_difficulty():
  assert {i.difficulty for i in INSTRUCTIONS.values()} == {"easy", "medium", "hard"}


def test_what_differs_names_remark_answer_or_remark_text():
  assert synthetic.what_differs(" 3", " 3\ndone.") == "remark"
  assert synthetic.what_differs(" 4\ndone.", " 3") == "remark"
  assert synthetic.what_differs(" 3", " 4") == "answer"
  assert synthetic.what_differs(" 3\ndone.", " 4\nall good.") == "answer"
  assert synthetic.what_differs(" 3\ndone.", " 3\nhope it helps.") == "remark text"
  assert synthetic.what_differs("  3 ", " 3") == "remark text"  # whitespace is not an answer
