"""Process-start settings for the entry points (they cannot be changed once Python runs)."""
import os
import sys

HUGETLB = "glibc.malloc.hugetlb=1"


def reexec_with_hugetlb(module: str, argv: list[str], disabled: bool = False) -> None:
  """Restarts `python -m module argv` with glibc's malloc on transparent huge pages.

  Without it glibc hands XLA's large per-step buffers back to the OS and page-faults them in again
  every step (about 385 MB of faults per SFT step at the reference shape; the step is 27 % faster
  with it, measured by experiments/benchmark.py). glibc reads its tunables at process start, so
  this cannot be done in-process. Off with INSTRUCTJAX_NO_HUGETLB=1.
  """
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  if (disabled or HUGETLB in tunables or not sys.platform.startswith("linux")
      or os.environ.get("INSTRUCTJAX_NO_HUGETLB") == "1"):
    return
  env = dict(os.environ, GLIBC_TUNABLES=":".join(t for t in (tunables, HUGETLB) if t))
  os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)
