"""Process-start settings for the entry points (they cannot be changed once Python runs)."""
import os
import re
import sys

HUGETLB = "glibc.malloc.hugetlb=1"
CPU_DEVICES_FLAG = "--xla_force_host_platform_device_count"
CPU_DEVICES_ENV = "INSTRUCTJAX_CPU_DEVICES"


def _with_hugetlb(env: dict, disabled: bool) -> dict:
  """glibc's malloc on transparent huge pages.

  Without it glibc hands XLA's large per-step buffers back to the OS and page-faults them in again
  every step (about 385 MB of faults per SFT step at the reference shape; the step is 27 % faster
  with it, measured by experiments/benchmark.py). Off with INSTRUCTJAX_NO_HUGETLB=1.
  """
  tunables = env.get("GLIBC_TUNABLES", "")
  if (disabled or HUGETLB in tunables or not sys.platform.startswith("linux")
      or env.get("INSTRUCTJAX_NO_HUGETLB") == "1"):
    return env
  return dict(env, GLIBC_TUNABLES=":".join(t for t in (tunables, HUGETLB) if t))


def cpu_device_count(xla_flags: str) -> int | None:
  """The CPU device count XLA_FLAGS asks for, or None."""
  found = re.findall(re.escape(CPU_DEVICES_FLAG) + r"=(\d+)", xla_flags)
  return int(found[-1]) if found else None


def _with_cpu_devices(env: dict, count: int | None) -> dict:
  """Splits the CPU into `count` XLA devices (XLA's default is one device using every core).

  A mesh with data = -1 then shards each batch over them: one device per core runs its share of
  the rows on its own, instead of every op splitting across the cores and waiting for all of
  them, which for this project's small matmuls costs more than it gains (benchmark, 2 devices on
  2 cores: decode +27-40 %, the reference SFT and reward steps 15-20 % faster; the tiny configs:
  no change). Only the CPU backend reads the flag, so on a GPU or TPU host it changes nothing.
  """
  if not count or count < 1 or cpu_device_count(env.get("XLA_FLAGS", "")) == count:
    return env
  flags = re.sub(re.escape(CPU_DEVICES_FLAG) + r"=\d+", "", env.get("XLA_FLAGS", "")).split()
  return dict(env, XLA_FLAGS=" ".join(flags + [f"{CPU_DEVICES_FLAG}={count}"]))


def requested_cpu_devices(env=None) -> int | None:
  """INSTRUCTJAX_CPU_DEVICES as a positive int, or None when unset."""
  value = (os.environ if env is None else env).get(CPU_DEVICES_ENV, "").strip()
  if not value:
    return None
  if not value.isdigit() or int(value) < 1:
    raise SystemExit(f"error: {CPU_DEVICES_ENV}={value!r} must be a positive integer")
  return int(value)


def reexec(module: str, argv: list[str], *, hugetlb: bool = True,
           cpu_devices: int | None = None) -> None:
  """Restarts `python -m module argv` if the process-start environment must change: glibc's
  huge-page malloc (read at process start) and the CPU device count (read when jax starts).
  `cpu_devices` None takes INSTRUCTJAX_CPU_DEVICES, if set."""
  if cpu_devices is None:
    cpu_devices = requested_cpu_devices()
  env = _with_cpu_devices(_with_hugetlb(dict(os.environ), disabled=not hugetlb), cpu_devices)
  if env == dict(os.environ):
    return
  os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)
