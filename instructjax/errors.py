"""Errors a user can act on: each names the file, the record and what is wrong."""


class InputError(ValueError):
  """Bad input data or configuration, reported as `where: what is wrong`.

  `where` is a file and line (`data.jsonl:12`) or a record id; the message never needs a
  traceback from inside jax to be understood.
  """

  def __init__(self, where: str, problem: str):
    self.where = where
    self.problem = problem
    super().__init__(f"{where}: {problem}")
