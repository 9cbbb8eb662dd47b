"""A synthetic instruction-following task: the default data for every training stage.

InstructGPT's pipeline needs four kinds of data: a pretraining corpus, labeler demonstrations,
prompts for the reward model and PPO, and human rankings of model outputs. This module makes all
four from one small, fully-specified world, so the project runs end to end on a laptop CPU with
tiny byte-level models (1 character = 1 token) and no files:

* Instructions over short random words ("abc") and digit lists ("3 1 2"): reverse, uppercase,
  repeat N times, sort, max, min, count, first, last. They are graded from easy (copy one item)
  to hard (sort, repeat) so that SFT is good but not perfect and PPO has room to improve it.
* Each instruction is phrased in several templates and in the paper's three prompt styles:
  "plain" (`Reverse: abc\nAnswer:`), "few-shot" (solved examples, then `abc =>`) and "user"
  (`User: please reverse abc\nAssistant:`). A prompt always ends with `Answer:`, `Assistant:`
  or `=>`; the labeler's completion is one space and the answer (" cba"), then EOS.
* The pretraining corpus uses the same letters, words and digit lists in descriptive sentences
  but never contains an instruction or its answer format, so a base model does poorly zero-shot,
  better few-shot, and SFT has something to teach.
* A gold scorer gives partial credit in [0, 1] (normalised edit distance to the answer, numeric
  closeness for numbers, a penalty for text after the answer line), so a reward model has signal
  beyond right/wrong.
* Demonstrators may be chatty: with `remark_rate` a demonstration adds a short remark on a new
  line after the answer ("hope it helps."), which the gold scorer penalises like any trailing
  text. Demonstrations and rankings then disagree, as InstructGPT's did: SFT copies the habit,
  the reward model learns the rankers' dislike of it, and RLHF can remove it.
* A simulated labeler ranks K responses by gold score plus Gaussian noise, the noise calibrated so
  that two independent labelers agree on `labeler_agreement` (paper: 72.6 %) of response pairs.

Everything is parsed back from prompt text alone (`answer`, `score`), deterministic given
`TaskConfig.seed`, and prompt splits are disjoint in their (instruction, input) pairs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import string
import zlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from instructjax.errors import InputError

STYLES = ("plain", "few-shot", "user")

# Where the prompt ends and the labeler's answer begins, for each style.
_PLAIN_END = "\nAnswer:"
_USER_START, _USER_END = "User: ", "\nAssistant:"
_FEWSHOT_ARROW = " =>"
# Shots prepended by `few_shot_prompt` are separated by a blank line; a single prompt has none.
_SHOT_SEPARATOR = "\n\n"
_MAX_REPEAT = 9

# What a chatty demonstrator adds after the answer, on its own line (5-14 characters, so each
# costs 16-44 % of the score under the default trailing-text penalty).
REMARKS = ("done.", "hope it helps.", "that is all.", "easy one.", "all good.", "see above.")

# Strings that mark an instruction; the pretraining corpus must never contain them.
INSTRUCTION_MARKERS = ("Answer:", "Assistant:", "User:", "=>")


@dataclasses.dataclass(frozen=True)
class Instruction:
  """One kind of instruction: how to phrase it, how to solve it and how hard it is.

  Templates use `{w}` for a word, `{l}` for a digit list and `{n}` for a repeat count. `plain` and
  `user` phrase one request; `few_shot` are headers followed by `input => output` lines.
  """
  name: str
  difficulty: str  # "easy", "medium" or "hard", for per-difficulty reporting.
  takes: str  # "word" or "digits".
  solve: Callable[[Problem], str]
  plain: tuple[str, ...]
  user: tuple[str, ...]
  few_shot: tuple[str, ...]
  # Answers are magnitudes (a count, a max): a near number earns partial credit. Not for
  # first/last, where the answer is a position's digit and a neighbouring value is just wrong.
  numeric: bool = False


@dataclasses.dataclass(frozen=True)
class Problem:
  """A prompt's content: which instruction, phrased how, applied to what."""
  instruction: str
  style: str
  template: int
  word: str = ""
  digits: tuple[int, ...] = ()
  times: int = 0

  @property
  def key(self) -> str:
    """The (instruction, input) identity that decides a problem's split; phrasing is excluded."""
    return f"{self.instruction}|{self.word}|{','.join(map(str, self.digits))}|{self.times}"


def _digits_text(digits: Sequence[int]) -> str:
  return " ".join(str(d) for d in digits)


INSTRUCTIONS: dict[str, Instruction] = {i.name: i for i in (
    Instruction(
        "first", "easy", "digits", lambda p: str(p.digits[0]),
        plain=("First of {l}?", "First item: {l}", "Which comes first in {l}?"),
        user=("what is the first of {l}?", "please give the first item of {l}"),
        few_shot=("Give the first digit.",)),
    Instruction(
        "last", "easy", "digits", lambda p: str(p.digits[-1]),
        plain=("Last of {l}?", "Last item: {l}", "Which comes last in {l}?"),
        user=("what is the last of {l}?", "please give the last item of {l}"),
        few_shot=("Give the last digit.",)),
    Instruction(
        "upper", "easy", "word", lambda p: p.word.upper(),
        plain=("Uppercase: {w}", "Write {w} in capitals.", "Make {w} uppercase."),
        user=("please uppercase {w}", "can you write {w} in capitals?"),
        few_shot=("Uppercase each word.",)),
    Instruction(
        "count", "medium", "digits", lambda p: str(len(p.digits)),
        plain=("Count: {l}", "How many digits in {l}?", "Count the digits in {l}."),
        user=("please count {l}", "how many digits are in {l}?"),
        few_shot=("Count the digits.",), numeric=True),
    Instruction(
        "max", "medium", "digits", lambda p: str(max(p.digits)),
        plain=("Max: {l}", "Largest of {l}?", "Which is biggest: {l}?"),
        user=("please find the max of {l}", "what is the largest of {l}?"),
        few_shot=("Find the largest digit.",), numeric=True),
    Instruction(
        "min", "medium", "digits", lambda p: str(min(p.digits)),
        plain=("Min: {l}", "Smallest of {l}?", "Which is smallest: {l}?"),
        user=("please find the min of {l}", "what is the smallest of {l}?"),
        few_shot=("Find the smallest digit.",), numeric=True),
    Instruction(
        "reverse", "medium", "word", lambda p: p.word[::-1],
        plain=("Reverse: {w}", "Reverse the word {w}.", "Write {w} backwards."),
        user=("please reverse {w}", "can you spell {w} backwards?"),
        few_shot=("Reverse each word.",)),
    Instruction(
        "sort", "hard", "digits", lambda p: _digits_text(sorted(p.digits)),
        plain=("Sort: {l}", "Sort {l} from low to high.", "Put {l} in order."),
        user=("please sort {l}", "can you put {l} in order?"),
        few_shot=("Sort the digits.",)),
    Instruction(
        "repeat", "hard", "word", lambda p: " ".join([p.word] * p.times),
        plain=("Repeat {w} {n} times.", "Write {w} {n} times.", "Say {w} {n} times."),
        user=("please say {w} {n} times", "can you repeat {w} {n} times?"),
        few_shot=("Repeat each word {n} times.",)),
)}

# Sentences of the pretraining corpus: same words and digits, never an instruction.
_DOC_SENTENCES = (
    "{W} is a name.",
    "{w} and {v} are words.",
    "we wrote {w} on the wall.",
    "the numbers were {l}.",
    "there were {d} birds near {W}.",
    "{W} met {V} by the sea.",
    "{w} {v} {u}.",
    "she counted {run}.",
    "{W} has {d} cats.",
    "the code is {l}.",
    "a {w} is not a {v}.",
    "they sang {w} {w} {w}.",
    "{W} {V} and {U}.",
)


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """Sizes of everything; the defaults suit a tiny byte-level model on a CPU.

  Attributes:
    seed: Seeds every stream and the split partition.
    alphabet: Letters words are made of; a small alphabet helps a tiny model.
    word_len: Inclusive range of word lengths.
    list_len: Inclusive range of digit-list lengths.
    repeat_times: Inclusive range of N in "repeat N times".
    instructions: Names of the instructions to use (keys of `INSTRUCTIONS`).
    style_weights: Relative frequency of each prompt style when no style is asked for.
    splits: Split names and the fraction of (instruction, input) pairs that belong to each.
    max_prompt_chars: Length budget for a prompt; few-shot style adds shots while they fit.
    few_shot_examples: Most solved examples in a few-shot style prompt.
    doc_chars: Inclusive range of pretraining document lengths.
    labeler_agreement: Target rate at which two simulated labelers order a response pair the
      same way (the paper's inter-labeler agreement is 72.6 %).
    trailing_text_penalty: Score fraction lost to text after the answer line, at most.
    trailing_text_chars: Amount of trailing text that costs the full penalty.
    remark_rate: Fraction of demonstrations with one of `REMARKS` on a new line after the
      answer: a habit of the demonstrators that the gold scorer (and so every ranking labeler)
      penalises, so SFT learns it and comparisons carry a preference the demonstrations lack.
    calibration_pairs: Reference response pairs used to calibrate the labeler noise.
  """
  seed: int = 0
  alphabet: str = "abcdefgh"
  word_len: tuple[int, int] = (2, 5)
  list_len: tuple[int, int] = (2, 5)
  repeat_times: tuple[int, int] = (2, 3)
  instructions: tuple[str, ...] = tuple(INSTRUCTIONS)
  style_weights: tuple[tuple[str, float], ...] = (("plain", 0.4), ("few-shot", 0.2), ("user", 0.4))
  splits: tuple[tuple[str, float], ...] = (("train", 0.4), ("rm", 0.2), ("ppo", 0.2), ("eval", 0.2))
  max_prompt_chars: int = 64
  few_shot_examples: int = 2
  doc_chars: tuple[int, int] = (40, 120)
  labeler_agreement: float = 0.73
  trailing_text_penalty: float = 0.5
  trailing_text_chars: int = 16
  remark_rate: float = 0.0
  calibration_pairs: int = 2000

  def __post_init__(self):
    where = "TaskConfig"
    if not self.alphabet or not set(self.alphabet) <= set(string.ascii_lowercase):
      raise InputError(f"{where}.alphabet",
                       f"must be lowercase ascii letters, got {self.alphabet!r}")
    for name, low in (("word_len", 1), ("list_len", 1), ("repeat_times", 1), ("doc_chars", 1)):
      lo, hi = getattr(self, name)
      if not low <= lo <= hi:
        raise InputError(f"{where}.{name}", f"needs {low} <= min <= max, got {(lo, hi)}")
    if self.repeat_times[1] > _MAX_REPEAT:
      raise InputError(f"{where}.repeat_times", f"at most {_MAX_REPEAT}, got {self.repeat_times}")
    unknown = set(self.instructions) - set(INSTRUCTIONS)
    if not self.instructions or unknown:
      raise InputError(f"{where}.instructions",
                       f"unknown {sorted(unknown)}; choose from {sorted(INSTRUCTIONS)}")
    for name, known in (("style_weights", STYLES), ("splits", None)):
      pairs = getattr(self, name)
      names = [n for n, _ in pairs]
      if not pairs or len(set(names)) != len(names) or any(w <= 0 for _, w in pairs):
        raise InputError(f"{where}.{name}", f"needs distinct names with positive weights: {pairs}")
      if known and set(names) - set(known):
        raise InputError(f"{where}.{name}", f"styles must be among {STYLES}, got {names}")
    if self.few_shot_examples < 1 or self.calibration_pairs < 1:
      raise InputError(where, "few_shot_examples and calibration_pairs must be >= 1")
    if not 0.5 < self.labeler_agreement <= 1.0:
      raise InputError(f"{where}.labeler_agreement",
                       f"must be in (0.5, 1]; 0.5 is coin flipping, got {self.labeler_agreement}")
    if not 0.0 <= self.remark_rate <= 1.0:
      raise InputError(f"{where}.remark_rate", f"must be in [0, 1], got {self.remark_rate}")
    if not 0.0 <= self.trailing_text_penalty <= 1.0 or self.trailing_text_chars < 1:
      raise InputError(f"{where}.trailing_text_penalty",
                       "penalty must be in [0, 1] and trailing_text_chars >= 1")


# ------------------------------------------------------------------------------------------------
# Templates <-> text.


def _template_regex(template: str) -> str:
  """A template's text as a regex with named groups w (word), l (digit list), n (count)."""
  groups = {"w": r"(?P<w>[a-z]+)", "l": r"(?P<l>\d(?: \d)*)", "n": r"(?P<n>\d)"}
  parts = []
  for literal, field, _, _ in string.Formatter().parse(template):
    parts.append(re.escape(literal))
    if field is not None:
      parts.append(groups[field])
  return "".join(parts)


def _input_text(instruction: Instruction, problem: Problem) -> str:
  return problem.word if instruction.takes == "word" else _digits_text(problem.digits)


def _fill(template: str, problem: Problem) -> str:
  return template.format(w=problem.word, l=_digits_text(problem.digits), n=problem.times)


@functools.cache
def _patterns() -> tuple[tuple[re.Pattern, str, str, int], ...]:
  """One full-match regex per (instruction, style, template)."""
  patterns = []
  for ins in INSTRUCTIONS.values():
    for i, t in enumerate(ins.plain):
      patterns.append((_template_regex(t) + re.escape(_PLAIN_END), ins.name, "plain", i))
    for i, t in enumerate(ins.user):
      regex = re.escape(_USER_START) + _template_regex(t) + re.escape(_USER_END)
      patterns.append((regex, ins.name, "user", i))
    query = _template_regex("{w}" if ins.takes == "word" else "{l}")
    for i, t in enumerate(ins.few_shot):
      # Solved lines are not checked: the answer depends only on the header and the query.
      regex = _template_regex(t) + r"\n(?:[^\n]* => [^\n]*\n)*" + query + re.escape(_FEWSHOT_ARROW)
      patterns.append((regex, ins.name, "few-shot", i))
  return tuple((re.compile(r, re.ASCII), n, s, i) for r, n, s, i in patterns)


def render(problem: Problem, shots: Sequence[Problem] = ()) -> str:
  """The prompt text of `problem`; few-shot style shows `shots` solved first."""
  ins = INSTRUCTIONS[problem.instruction]
  if problem.style == "plain":
    return _fill(ins.plain[problem.template], problem) + _PLAIN_END
  if problem.style == "user":
    return _USER_START + _fill(ins.user[problem.template], problem) + _USER_END
  lines = [_fill(ins.few_shot[problem.template], problem)]
  lines += [f"{_input_text(ins, s)} => {solve(s)}" for s in shots]
  lines.append(_input_text(ins, problem) + _FEWSHOT_ARROW)
  return "\n".join(lines)


def parse(prompt: str) -> Problem:
  """Recovers the problem a prompt of this task asks; raises InputError for any other text.

  Shots that `SyntheticTask.few_shot_prompt` prepended (blocks before the last blank line) are
  ignored: the last block is the question.
  """
  if not isinstance(prompt, str):
    raise InputError("prompt", f"must be a string, got {type(prompt).__name__}")
  block = prompt.rsplit(_SHOT_SEPARATOR, 1)[-1]
  found = []
  for pattern, name, style, template in _patterns():
    match = pattern.fullmatch(block)
    if match:
      found.append(_problem_from_match(match, name, style, template))
  if not found:
    raise InputError("prompt", f"not a prompt of the synthetic task: {block[-60:]!r}")
  return found[0]


def _problem_from_match(match: re.Match, name: str, style: str, template: int) -> Problem:
  groups = match.groupdict()
  times = int(groups["n"]) if groups.get("n") else 0
  if name == "repeat" and times < 1:
    raise InputError("prompt", "'repeat' needs a count of 1 to 9")
  digits = tuple(int(d) for d in groups["l"].split()) if groups.get("l") else ()
  return Problem(name, style, template, word=groups.get("w") or "", digits=digits, times=times)


def solve(problem: Problem) -> str:
  """The answer text (no leading space)."""
  return INSTRUCTIONS[problem.instruction].solve(problem)


# ------------------------------------------------------------------------------------------------
# Gold scoring.


def edit_distance(a: str, b: str) -> int:
  """Levenshtein distance: insertions, deletions and substitutions each cost 1."""
  if len(a) < len(b):
    a, b = b, a
  previous = list(range(len(b) + 1))
  for i, ca in enumerate(a, 1):
    current = [i]
    for j, cb in enumerate(b, 1):
      current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
    previous = current
  return previous[-1]


def _similarity(got: str, want: str, numeric: bool) -> float:
  """Partial credit in [0, 1] for an answer line; 1 only for an exact match."""
  longest = max(len(got), len(want))
  similarity = 1.0 - edit_distance(got, want) / longest if longest else 1.0
  if numeric and got.isdigit() and got != want:
    # One-digit answers have no partial credit by edit distance; being close still counts.
    closeness = max(0.0, 1.0 - abs(int(got) - int(want)) / 5.0)
    similarity = max(similarity, 0.5 * closeness)
  return similarity


def _split_response(response: str) -> tuple[str, str]:
  """(answer line, trailing text), ignoring whitespace around both."""
  head, _, tail = response.lstrip().partition("\n")
  return head.rstrip(), tail.strip()


def what_differs(response_a: str, response_b: str) -> str:
  """What sets two responses apart, for breaking a reward model's accuracy down:
  "remark" when only one has text after its answer line, else "answer" when the answer lines
  differ, else "remark text" (same answer, both or neither with trailing text)."""
  (head_a, tail_a), (head_b, tail_b) = _split_response(response_a), _split_response(response_b)
  if bool(tail_a) != bool(tail_b):
    return "remark"
  return "answer" if head_a != head_b else "remark text"


# ------------------------------------------------------------------------------------------------
# Labeler noise.


def _normal_cdf(x: float) -> float:
  return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _agreement_with_gold(gaps: np.ndarray, noise_std: float) -> np.ndarray:
  """P(a labeler orders a pair like the gold score) for gold-score gaps > 0.

  Each response gets independent N(0, noise_std^2) noise, so the noisy gap is N(gap, 2 std^2).
  """
  if noise_std == 0.0:
    return np.ones_like(gaps)
  return np.array([_normal_cdf(g / (noise_std * math.sqrt(2.0))) for g in gaps])


def _agreement_between_labelers(gaps: np.ndarray, noise_std: float) -> np.ndarray:
  p = _agreement_with_gold(gaps, noise_std)
  return p * p + (1.0 - p) * (1.0 - p)


def _solve_noise_std(gaps: np.ndarray, target: float) -> float:
  """The noise std at which two labelers agree on `target` of the pairs with these gaps.

  Agreement falls monotonically from 1 (std 0) to 0.5 (std -> inf), so bisection on log std.
  """
  if target >= 1.0:
    return 0.0
  lo, hi = 1e-6, 1e3
  for _ in range(100):
    mid = math.sqrt(lo * hi)
    if _agreement_between_labelers(gaps, mid).mean() > target:
      lo = mid
    else:
      hi = mid
  return math.sqrt(lo * hi)


def _stable_hash(*parts) -> int:
  return zlib.crc32("|".join(map(str, parts)).encode())


# ------------------------------------------------------------------------------------------------
# The task.


class SyntheticTask:
  """Pretraining text, demonstrations, prompts, a gold scorer and a simulated labeler.

  Every stream is deterministic given `config.seed`, the split and the purpose, and a longer
  request starts with the shorter one (`prompts(10, s)[:5] == prompts(5, s)`).
  """

  def __init__(self, config: TaskConfig = TaskConfig()):
    self.config = config
    self._split_names = [name for name, _ in config.splits]
    total = sum(w for _, w in config.splits)
    self._split_edges = np.cumsum([w / total for _, w in config.splits])

  # -- randomness and splits ---------------------------------------------------------------------

  def _rng(self, purpose: str, split: str) -> np.random.Generator:
    return np.random.default_rng([self.config.seed, _stable_hash(split), _stable_hash(purpose)])

  def _check_split(self, split: str):
    if split not in self._split_names:
      raise InputError("split", f"unknown split {split!r}; expected one of {self._split_names}")

  def split_of(self, problem: Problem) -> str:
    """The split a problem's (instruction, input) pair belongs to, whatever its phrasing."""
    u = _stable_hash(self.config.seed, problem.key) / 2**32
    index = int(np.searchsorted(self._split_edges, u, side="right"))
    index = min(index, len(self._split_names) - 1)  # Guards float round-off at the top edge.
    return self._split_names[index]

  # -- problems ----------------------------------------------------------------------------------

  def _random_problem(self, rng: np.random.Generator, instruction: str, style: str,
                      template: int, short: bool = False, times: int | None = None) -> Problem:
    """Draws an input; `short` keeps lengths in the lower half, for in-context shots, and a
    given `times` fixes the repeat count (shots share their prompt's header)."""
    cfg = self.config
    ins = INSTRUCTIONS[instruction]

    def length(bounds):
      lo, hi = bounds
      return int(rng.integers(lo, (lo + hi) // 2 + 1 if short else hi + 1))

    word, digits = "", ()
    if ins.takes == "word":
      word = "".join(rng.choice(list(cfg.alphabet), size=length(cfg.word_len)))
    else:
      digits = tuple(int(d) for d in rng.integers(0, 10, size=length(cfg.list_len)))
    if instruction != "repeat":
      times = 0
    elif times is None:
      times = int(rng.integers(cfg.repeat_times[0], cfg.repeat_times[1] + 1))
    return Problem(instruction, style, template, word=word, digits=digits, times=times)

  def _problem_in_split(self, rng: np.random.Generator, split: str | None, **kwargs) -> Problem:
    """Rejection-samples an input whose (instruction, input) pair lies in `split`."""
    for _ in range(10_000):
      problem = self._random_problem(rng, **kwargs)
      if split is None or self.split_of(problem) == split:
        return problem
    raise InputError("TaskConfig", f"too few distinct inputs for {kwargs['instruction']!r} to "
                     f"fill split {split!r}; widen word_len/list_len or the alphabet")

  def _few_shot_examples(self, rng: np.random.Generator, problem: Problem,
                         split: str | None) -> list[Problem]:
    """In-context shots for a few-shot style prompt: up to `few_shot_examples` that fit
    `max_prompt_chars`, and at least one (the shortest drawn) even if none fits.

    Shots come from the same split, so a training prompt never shows, solved, the input of an
    evaluation prompt.
    """
    budget = self.config.max_prompt_chars
    shots, shortest = [], None
    for _ in range(4 * self.config.few_shot_examples):
      if len(shots) == self.config.few_shot_examples:
        break
      shot = self._problem_in_split(rng, split, instruction=problem.instruction, style="few-shot",
                                    template=problem.template, short=True, times=problem.times)
      if shot.key == problem.key:
        continue
      if len(render(problem, shots + [shot])) <= budget:
        shots.append(shot)
      elif shortest is None or len(render(problem, [shot])) < len(render(problem, [shortest])):
        shortest = shot
    if not shots and shortest is None:
      raise InputError("TaskConfig", "too few distinct inputs for a few-shot "
                       f"{problem.instruction!r} prompt; widen word_len/list_len or the alphabet")
    return shots or [shortest]

  def _prompt_stream(self, split: str | None, style: str | None, purpose: str) -> Iterator[str]:
    """An endless deterministic stream of prompts."""
    cfg = self.config
    rng = self._rng(f"{purpose}/{style}", str(split))
    styles = [s for s, _ in cfg.style_weights]
    weights = np.array([w for _, w in cfg.style_weights])
    while True:
      instruction = cfg.instructions[int(rng.integers(len(cfg.instructions)))]
      this_style = style or styles[int(rng.choice(len(styles), p=weights / weights.sum()))]
      ins = INSTRUCTIONS[instruction]
      templates = {"plain": ins.plain, "user": ins.user, "few-shot": ins.few_shot}[this_style]
      problem = self._problem_in_split(rng, split, instruction=instruction, style=this_style,
                                       template=int(rng.integers(len(templates))))
      shots = self._few_shot_examples(rng, problem, split) if this_style == "few-shot" else []
      yield render(problem, shots)

  def _take(self, n: int, stream: Iterator[str]) -> list[str]:
    if not isinstance(n, (int, np.integer)) or n < 0:
      raise InputError("n", f"must be a non-negative integer, got {n!r}")
    return [next(stream) for _ in range(n)]

  # -- public data -------------------------------------------------------------------------------

  def prompts(self, n: int, split: str, style: str | None = None) -> list[str]:
    """`n` prompts from `split`, in one `style` or mixed by `config.style_weights`."""
    self._check_split(split)
    if style is not None and style not in STYLES:
      raise InputError("style", f"unknown style {style!r}; expected one of {STYLES} or None")
    return self._take(n, self._prompt_stream(split, style, "prompts"))

  def demonstrations(self, n: int, split: str = "train") -> list[dict]:
    """What the labelers write: `{"prompt", "completion"}`, completion = `answer(prompt)`, then
    with probability `remark_rate` a newline and one of `REMARKS`."""
    rng = self._rng("demonstration-remarks", split)
    out = []
    for prompt in self.prompts(n, split):
      completion = self.answer(prompt)
      if rng.uniform() < self.config.remark_rate:
        completion += "\n" + REMARKS[int(rng.integers(len(REMARKS)))]
      out.append({"prompt": prompt, "completion": completion})
    return out

  def pretraining_documents(self, n: int, split: str = "train") -> list[str]:
    """Descriptive text over the task's letters, words and digits that never poses or answers an
    instruction (it contains none of `INSTRUCTION_MARKERS`)."""
    self._check_split(split)
    rng = self._rng("pretraining", split)
    return self._take(n, iter(lambda: self._document(rng), None))

  def _document(self, rng: np.random.Generator) -> str:
    cfg = self.config
    target = int(rng.integers(cfg.doc_chars[0], cfg.doc_chars[1] + 1))
    sentences, length = [], -1
    for _ in range(50):
      sentence = self._sentence(rng)
      if length + 1 + len(sentence) > cfg.doc_chars[1]:
        continue
      sentences.append(sentence)
      length += 1 + len(sentence)
      if length >= target:
        break
    return " ".join(s[0].upper() + s[1:] for s in sentences)

  def _sentence(self, rng: np.random.Generator) -> str:
    cfg = self.config

    def word():
      size = int(rng.integers(cfg.word_len[0], cfg.word_len[1] + 1))
      return "".join(rng.choice(list(cfg.alphabet), size=size))

    def digit_list():
      size = int(rng.integers(cfg.list_len[0], cfg.list_len[1] + 1))
      return _digits_text(rng.integers(0, 10, size=size))

    start = int(rng.integers(0, 7))
    run_len = int(rng.integers(cfg.list_len[0], cfg.list_len[1] + 1))
    run = _digits_text(range(start, start + run_len))
    w, v, u = word(), word(), word()
    template = _DOC_SENTENCES[int(rng.integers(len(_DOC_SENTENCES)))]
    return template.format(w=w, v=v, u=u, W=w.capitalize(), V=v.capitalize(), U=u.capitalize(),
                           l=digit_list(), d=int(rng.integers(2, 10)), run=run)

  def few_shot_prompt(self, prompt: str, n_shots: int = 2) -> str:
    """The "GPT-prompted" baseline: `prompt` with `n_shots` solved examples of the same
    instruction and phrasing first. Plain and user prompts get whole solved prompts before them,
    separated by a blank line; few-shot style prompts get more `input => output` lines.
    `answer` and `score` accept the result as well as the original prompt."""
    if n_shots < 0:
      raise InputError("n_shots", f"must be >= 0, got {n_shots}")
    problem = parse(prompt)
    rng = np.random.default_rng([self.config.seed, _stable_hash("few-shot-prompt", prompt)])
    shots = []
    for _ in range(100 * n_shots):
      if len(shots) == n_shots:
        break
      # Few-shot style shares one header, so one repeat count; whole prompts may vary it.
      times = problem.times if problem.style == "few-shot" else None
      shot = self._random_problem(rng, problem.instruction, problem.style, problem.template,
                                  short=True, times=times)
      if shot.key != problem.key:  # A shot must not give the answer away.
        shots.append(shot)
    if len(shots) < n_shots:
      raise InputError("TaskConfig", f"too few distinct inputs for {n_shots} shots of "
                       f"{problem.instruction!r}; widen word_len/list_len or the alphabet")
    if problem.style == "few-shot":
      header, rest = prompt.rsplit(_SHOT_SEPARATOR, 1)[-1].split("\n", 1)
      ins = INSTRUCTIONS[problem.instruction]
      lines = [f"{_input_text(ins, s)} => {solve(s)}" for s in shots]
      return "\n".join([header] + lines + [rest])
    solved = [render(s) + " " + solve(s) for s in shots]
    return _SHOT_SEPARATOR.join(solved + [prompt])

  # -- gold ----------------------------------------------------------------------------------------

  def parse(self, prompt: str) -> Problem:
    """The problem a prompt poses (instruction, style, template, input); see module `parse`."""
    return parse(prompt)

  def answer(self, prompt: str) -> str:
    """The correct completion, recovered from the prompt text alone: a space, then the answer
    (" cba"), exactly what a labeler's demonstration contains."""
    return " " + solve(parse(prompt))

  def score(self, prompt: str, response: str) -> float:
    """Gold score in [0, 1]: partial credit for the answer line times a trailing-text discount.

    The answer line (the response up to its first newline, surrounding whitespace ignored) earns
    1 - edit_distance / max_length against the answer; for numeric answers a near number earns up
    to 0.5. Any non-blank text after that line costs up to `trailing_text_penalty`, in
    proportion to its length up to `trailing_text_chars`.
    """
    if not isinstance(response, str):
      raise InputError("response", f"must be a string, got {type(response).__name__}")
    problem = parse(prompt)
    head, tail = _split_response(response)
    similarity = _similarity(head, solve(problem), INSTRUCTIONS[problem.instruction].numeric)
    cfg = self.config
    discount = cfg.trailing_text_penalty * min(1.0, len(tail) / cfg.trailing_text_chars)
    return float(similarity * (1.0 - discount))

  # -- simulated labelers --------------------------------------------------------------------------

  def simulated_response(self, prompt: str, rng: np.random.Generator,
                         quality: float | None = None) -> str:
    """A policy-like response of graded quality, for calibration and tests.

    `quality` in [0, 1] (uniform at random if None): each answer character is corrupted with
    probability 1 - quality, and with probability (1 - quality) / 2 some rambling follows.
    """
    quality = float(rng.uniform()) if quality is None else quality
    target = list(solve(parse(prompt)))
    noise_chars = self.config.alphabet + string.digits + " " + self.config.alphabet.upper()
    out = []
    for char in target + [""]:
      if rng.uniform() < 1.0 - quality:
        edit = int(rng.integers(3))
        if edit == 0:  # Substitute.
          char = noise_chars[int(rng.integers(len(noise_chars)))] if char else ""
        elif edit == 1:  # Insert.
          char = noise_chars[int(rng.integers(len(noise_chars)))] + char
        else:  # Delete.
          char = ""
      out.append(char)
    text = "".join(out).strip() or noise_chars[int(rng.integers(len(noise_chars)))]
    if rng.uniform() < (1.0 - quality) / 2:
      text += "\n" + self._sentence(rng)
    return " " + text

  @functools.cached_property
  def _noise_std(self) -> float:
    return _solve_noise_std(self._calibration_gaps, self.config.labeler_agreement)

  @property
  def labeler_noise_std(self) -> float:
    """Std of the Gaussian noise a simulated labeler adds to each gold score."""
    return self._noise_std

  def rank(self, prompt: str, responses: Sequence[str], rng: np.random.Generator) -> list[int]:
    """One simulated labeler's ranking: rank 0 = best, dense ranks.

    Each distinct gold score gets independent Gaussian noise (`labeler_noise_std`) and responses
    are ordered by the noisy score; responses with equal gold scores tie (same rank).
    """
    if isinstance(responses, str) or not all(isinstance(r, str) for r in responses):
      raise InputError("responses", "must be a list of strings")
    if not responses:
      return []
    scores = np.array([self.score(prompt, r) for r in responses])
    distinct, which = np.unique(scores, return_inverse=True)
    noisy = distinct + rng.normal(0.0, self._noise_std, size=len(distinct))
    rank_of_distinct = np.empty(len(distinct), dtype=int)
    rank_of_distinct[np.argsort(-noisy, kind="stable")] = np.arange(len(distinct))
    return [int(r) for r in rank_of_distinct[which.reshape(-1)]]

  def labeler_agreement_ceiling(self, score_gaps: Sequence[float] | None = None) -> float:
    """Expected rate at which a simulated labeler orders a pair like the gold score.

    This is the best accuracy any reward model can reach on held-out labeler comparisons, to
    report next to RM accuracy. With `score_gaps` (|gold(a) - gold(b)| of the evaluated pairs,
    ties excluded) it is exact for those pairs; without, it is the rate on the calibration
    reference pairs.
    """
    return float(_agreement_with_gold(self._reference_or(score_gaps), self._noise_std).mean())

  def inter_labeler_agreement(self, score_gaps: Sequence[float] | None = None) -> float:
    """Expected rate at which two independent simulated labelers order a pair the same way;
    `config.labeler_agreement` on the calibration reference pairs."""
    gaps = self._reference_or(score_gaps)
    return float(_agreement_between_labelers(gaps, self._noise_std).mean())

  def _reference_or(self, score_gaps: Sequence[float] | None) -> np.ndarray:
    if score_gaps is None:
      return self._calibration_gaps
    gaps = np.abs(np.asarray(score_gaps, dtype=float)).reshape(-1)
    gaps = gaps[gaps > 0]
    if gaps.size == 0:
      raise InputError("score_gaps", "needs at least one pair with different gold scores")
    return gaps

  @functools.cached_property
  def _calibration_gaps(self) -> np.ndarray:
    """Gold-score gaps of the reference pairs the labeler noise is calibrated on.

    Agreement depends on how far apart the scores of compared responses are, so calibration
    needs a reference distribution; it is two `simulated_response`s of independent uniform
    quality to the same random prompt (ties excluded). `labeler_agreement_ceiling(gaps)` gives
    the rate for any other set of pairs.
    """
    rng = np.random.default_rng([self.config.seed, _stable_hash("labeler-calibration")])
    stream = self._prompt_stream(None, None, "labeler-calibration")
    gaps = []
    while len(gaps) < self.config.calibration_pairs:
      prompt = next(stream)
      a, b = (self.score(prompt, self.simulated_response(prompt, rng)) for _ in range(2))
      if a != b:
        gaps.append(abs(a - b))
    return np.array(gaps)
