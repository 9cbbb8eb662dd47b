"""Training metrics: a JSONL + TensorBoard writer, a progress line, and a NaN guard.

Everything here runs on the host and needs neither TensorFlow nor the `tensorboard` package:
the TensorBoard events file is written by hand (TFRecord framing with masked CRC32C around a
hand-encoded `Event` protobuf), so `tensorboard --logdir <workdir>/tensorboard` reads it.

Only process 0 writes or prints by default; every process must still call `check_finite`
so that all of them stop together.

`metrics.jsonl` holds one strict-JSON object per `MetricWriter.write` call:
`{"step": 120, "stage": "sft", "loss": 2.31, ...}`. Metric values are floats; NaN and
infinities, which strict JSON cannot hold, are written as the strings "nan", "inf" and "-inf",
and `read_metrics` turns them back into floats.
"""

from __future__ import annotations

import json
import math
import operator
import os
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TextIO

import jax
import numpy as np

from instructjax.errors import InputError

METRICS_FILENAME = "metrics.jsonl"
TENSORBOARD_DIRNAME = "tensorboard"
_RESERVED_KEYS = ("step", "stage")
# Strict JSON has no NaN/Infinity literals; these strings stand in for them.
_JSON_TO_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _is_main_process() -> bool:
  return jax.process_index() == 0


# ---------------------------------------------------------------------------------------------
# Value conversion.


def _to_float(name: str, value: Any) -> float:
  """A scalar metric as a Python float, or an InputError naming the metric."""
  if isinstance(value, (str, bytes)) or np.ndim(value) != 0:
    raise InputError(f"metric {name!r}",
                     f"must be a scalar number, got {type(value).__name__} "
                     f"with shape {np.shape(value)}")
  try:
    return float(value)
  except (TypeError, ValueError) as e:
    raise InputError(f"metric {name!r}", f"is not a number: {e}") from None


def _to_step(step: Any) -> int:
  try:
    step = int(operator.index(step))
  except TypeError:
    raise InputError("step", f"must be an integer, got {type(step).__name__}") from None
  if step < 0:
    raise InputError("step", f"must be >= 0, got {step}")
  return step


def _json_value(value: float) -> float | str:
  if math.isfinite(value):
    return value
  return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


# ---------------------------------------------------------------------------------------------
# TensorBoard events file: TFRecord framing around hand-encoded `Event` protos.


def _make_crc32c_table() -> tuple[int, ...]:
  poly = 0x82F63B78  # Castagnoli polynomial, bit-reversed.
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ poly if crc & 1 else crc >> 1
    table.append(crc)
  return tuple(table)


_CRC32C_TABLE = _make_crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli) of `data`; pure Python, fast enough for a few events per step."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """The rotated-and-offset CRC that TFRecord stores (so CRCs of CRCs stay well-mixed)."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord_frame(data: bytes) -> bytes:
  """One TFRecord: uint64 length, masked CRC of the length, data, masked CRC of the data."""
  length = struct.pack("<Q", len(data))
  return (length + struct.pack("<I", masked_crc32c(length)) + data +
          struct.pack("<I", masked_crc32c(data)))


def _varint(value: int) -> bytes:
  value &= (1 << 64) - 1  # Negative int64s are encoded as their 64-bit two's complement.
  out = bytearray()
  while True:
    low = value & 0x7F
    value >>= 7
    if value:
      out.append(low | 0x80)
    else:
      out.append(low)
      return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
  return _varint((field << 3) | wire_type)


def _length_delimited(field: int, payload: bytes) -> bytes:
  return _key(field, 2) + _varint(len(payload)) + payload


def _float32_bytes(value: float) -> bytes:
  try:
    return struct.pack("<f", value)
  except OverflowError:  # Beyond float32 range: TensorBoard can still show +-inf.
    return struct.pack("<f", math.copysign(math.inf, value))


def encode_scalar_summary(scalars: Mapping[str, float]) -> bytes:
  """`Summary{value: [Value{tag=1, simple_value=2}, ...]}` as protobuf bytes."""
  out = b""
  for tag, value in scalars.items():
    entry = _length_delimited(1, tag.encode("utf-8")) + _key(2, 5) + _float32_bytes(value)
    out += _length_delimited(1, entry)
  return out


def encode_event(wall_time: float,
                 step: int,
                 *,
                 file_version: str | None = None,
                 summary: bytes | None = None) -> bytes:
  """`Event{wall_time=1 double, step=2 int64, file_version=3 string, summary=5}` bytes."""
  out = _key(1, 1) + struct.pack("<d", wall_time) + _key(2, 0) + _varint(step)
  if file_version is not None:
    out += _length_delimited(3, file_version.encode("utf-8"))
  if summary is not None:
    out += _length_delimited(5, summary)
  return out


class EventFileWriter:
  """Writes scalar summaries to a new `events.out.tfevents.<time>.<host>` file in `logdir`."""

  def __init__(self, logdir: str, clock: Callable[[], float] = time.time):
    self._clock = clock
    os.makedirs(logdir, exist_ok=True)
    now = clock()
    base = os.path.join(logdir, f"events.out.tfevents.{int(now):010d}.{socket.gethostname()}")
    self.path = base
    # A second writer in the same second (e.g. a quick restart) must not clobber the first.
    suffix = 0
    while True:
      try:
        self._file = open(self.path, "xb")
        break
      except FileExistsError:
        suffix += 1
        self.path = f"{base}.{suffix}"
    self._file.write(tfrecord_frame(encode_event(now, 0, file_version="brain.Event:2")))
    self._file.flush()

  def add_scalars(self, step: int, scalars: Mapping[str, float],
                  wall_time: float | None = None) -> None:
    if not scalars:
      return
    wall_time = self._clock() if wall_time is None else wall_time
    event = encode_event(wall_time, step, summary=encode_scalar_summary(scalars))
    self._file.write(tfrecord_frame(event))

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    if not self._file.closed:
      self._file.close()


# ---------------------------------------------------------------------------------------------
# The metric writer.


class MetricWriter:
  """Appends metrics to `<workdir>/metrics.jsonl` and to TensorBoard under `<workdir>/tensorboard`.

  Only process 0 writes by default (`enabled=None`); elsewhere every call is a no-op and no
  file or directory is created. Each `write` is flushed, so a killed run keeps its lines.
  A resumed run appends: steps after the last checkpoint then appear twice, in order.
  Metric values must be host scalars or fully replicated jax scalars.
  """

  def __init__(self, workdir: str, stage: str, enabled: bool | None = None):
    self.workdir = workdir
    self.stage = stage
    self.enabled = _is_main_process() if enabled is None else enabled
    self.metrics_path = os.path.join(workdir, METRICS_FILENAME)
    self._jsonl: TextIO | None = None
    self._events: EventFileWriter | None = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    # A run killed mid-line left a partial line; start ours on a fresh one so only that one
    # line is unreadable (read_metrics names it) instead of the first line we write.
    needs_newline = not _ends_with_newline(self.metrics_path)
    self._jsonl = open(self.metrics_path, "a", encoding="utf-8")
    if needs_newline:
      self._jsonl.write("\n")
    self._events = EventFileWriter(os.path.join(workdir, TENSORBOARD_DIRNAME))

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Records `metrics` (name -> scalar) at `step`; TensorBoard tags are `<stage>/<name>`."""
    if not self.enabled:
      return
    if self._jsonl is None or self._jsonl.closed:
      raise RuntimeError(f"MetricWriter({self.metrics_path}) is closed")
    step = _to_step(step)
    values = {}
    for name, value in metrics.items():
      if not isinstance(name, str) or not name:
        raise InputError(f"metric {name!r}", "names must be non-empty strings")
      if name in _RESERVED_KEYS:
        raise InputError(f"metric {name!r}", f"names {_RESERVED_KEYS} are reserved")
      values[name] = _to_float(name, value)
    record = {"step": step, "stage": self.stage}
    record.update({name: _json_value(v) for name, v in values.items()})
    self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
    self._jsonl.flush()
    self._events.add_scalars(step, {f"{self.stage}/{n}": v for n, v in values.items()})
    self._events.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._events is not None:
      self._events.close()

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _ends_with_newline(path: str) -> bool:
  """True for a missing or empty file too: nothing to terminate."""
  if not os.path.exists(path) or os.path.getsize(path) == 0:
    return True
  with open(path, "rb") as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1) == b"\n"


def read_metrics(path: str | os.PathLike) -> list[dict]:
  """The records of a metrics.jsonl file, in order, with "nan"/"inf"/"-inf" back as floats."""
  records = []
  with open(path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise InputError(f"{path}:{line_number}",
                         f"not valid JSON ({e.msg}); a run killed mid-write leaves such a "
                         "line, delete it to read the rest") from None
      if not isinstance(record, dict) or "step" not in record:
        raise InputError(f"{path}:{line_number}", "expected a JSON object with a 'step' key")
      for key, value in record.items():
        if key != "stage" and isinstance(value, str) and value in _JSON_TO_NON_FINITE:
          record[key] = _JSON_TO_NON_FINITE[value]
      records.append(record)
  return records


# ---------------------------------------------------------------------------------------------
# Progress line.


def format_duration(seconds: float) -> str:
  """`1h02m03s`, `1m08s` or `8s`."""
  seconds = max(0, int(round(seconds)))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f"{hours}h{minutes:02d}m{secs:02d}s"
  if minutes:
    return f"{minutes}m{secs:02d}s"
  return f"{secs}s"


class Progress:
  """Prints `[sft] step 120/400 (30%) loss 2.31 | 4.1 steps/s | ETA 1m08s` now and then.

  The rate counts only steps taken by this process since its first `update` (which excludes
  start-up and compilation, and makes a resumed run's ETA right); `start_step`, the step a
  resumed run starts from, is only shown on the first line. The first update, the last step
  and any update at least `every_seconds` after the previous line are printed; only on
  process 0 by default.
  """

  def __init__(self,
               stage: str,
               total_steps: int,
               start_step: int = 0,
               every_seconds: float = 30.0,
               *,
               clock: Callable[[], float] = time.monotonic,
               enabled: bool | None = None,
               stream: TextIO | None = None):
    if total_steps <= 0:
      raise InputError(f"Progress({stage!r})", f"total_steps must be > 0, got {total_steps}")
    self.stage = stage
    self.total_steps = total_steps
    self.start_step = start_step
    self.every_seconds = every_seconds
    self.enabled = _is_main_process() if enabled is None else enabled
    self._clock = clock
    self._stream = stream
    self._first: tuple[int, float] | None = None  # (step, time) of the first update.
    self._last_print_time: float | None = None

  def steps_per_second(self, step: int, now: float) -> float | None:
    """Rate since the first update, or None before any time has passed."""
    if self._first is None:
      return None
    first_step, first_time = self._first
    if now <= first_time or step <= first_step:
      return None
    return (step - first_step) / (now - first_time)

  def format_line(self, step: int, now: float, shown_metrics: Mapping[str, Any]) -> str:
    percent = int(100 * step / self.total_steps)
    head = f"[{self.stage}] step {step}/{self.total_steps} ({percent}%)"
    for name, value in shown_metrics.items():
      head += f" {name} {float(value):.4g}"
    parts = [head]
    if self._last_print_time is None and self.start_step > 0:
      parts.append(f"resumed from step {self.start_step}")
    rate = self.steps_per_second(step, now)
    if rate is not None:
      parts.append(f"{rate:.1f} steps/s" if rate >= 1 else f"{1 / rate:.2f} s/step")
      parts.append(f"ETA {format_duration(max(0, self.total_steps - step) / rate)}")
    return " | ".join(parts)

  def update(self, step: int, **shown_metrics: Any) -> bool:
    """Prints a line if one is due; returns whether it did."""
    now = self._clock()
    if self._first is None:
      self._first = (step, now)
    due = (self._last_print_time is None or step >= self.total_steps or
           now - self._last_print_time >= self.every_seconds)
    if not (due and self.enabled):
      return False
    line = self.format_line(step, now, shown_metrics)
    self._last_print_time = now
    stream = self._stream or sys.stdout  # Looked up late so redirections apply.
    print(line, file=stream, flush=True)
    return True


# ---------------------------------------------------------------------------------------------
# NaN guard and memory stats.


class NonFiniteLossError(RuntimeError):
  """A watched metric became NaN or infinite; training stops without saving."""

  def __init__(self, step: int, name: str, value: float):
    self.step = step
    self.name = name
    self.value = value
    super().__init__(
        f"step {step}: metric {name!r} is {value} (not finite). Training stopped before saving, "
        "so the last good checkpoint in the workdir is kept; resume from it with a lower "
        "learning rate, or look at the data batches near this step.")


def check_finite(step: int, metrics: Mapping[str, Any], keys: Iterable[str] = ("loss",)) -> None:
  """Raises NonFiniteLossError if any of `keys` in `metrics` is NaN or infinite.

  Call it on every process (values are replicated) so that all processes stop together.
  """
  for key in keys:
    if key not in metrics:
      raise InputError(f"step {step}",
                       f"metric {key!r} to check is missing; have {sorted(metrics)}")
    value = _to_float(key, metrics[key])
    if not math.isfinite(value):
      raise NonFiniteLossError(int(step), key, value)


def device_memory_stats() -> dict[str, Any]:
  """Best-effort memory use of the local devices, for benchmarks.

  Returns `{"platform", "num_devices", "peak_bytes_in_use", "bytes_in_use", "bytes_limit"}`;
  the byte counts are the maximum over local devices, or None where the backend does not
  report them (CPU usually does not).
  """
  devices = jax.local_devices()
  stats = []
  for device in devices:
    try:
      stats.append(device.memory_stats() or {})
    except Exception:  # Backends without the API raise various errors; this is best-effort.
      stats.append({})

  def largest(key: str) -> int | None:
    values = [s[key] for s in stats if s.get(key) is not None]
    return int(max(values)) if values else None

  return {
      "platform": devices[0].platform if devices else None,
      "num_devices": len(devices),
      "peak_bytes_in_use": largest("peak_bytes_in_use"),
      "bytes_in_use": largest("bytes_in_use"),
      "bytes_limit": largest("bytes_limit"),
  }
