"""Tests for instructjax.metrics: JSONL and TensorBoard round trips, NaN guard, progress line."""

import glob
import io
import json
import math
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructjax import metrics as metrics_lib
from instructjax.errors import InputError

# ---------------------------------------------------------------------------------------------
# An independent reader for events files: bit-by-bit CRC32C, TFRecord parsing, protobuf.


def reference_crc32c(data: bytes) -> int:
  """Bitwise CRC-32C straight from the definition (no table)."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
  return crc ^ 0xFFFFFFFF


def reference_masked_crc(data: bytes) -> int:
  crc = reference_crc32c(data)
  rotated = ((crc >> 15) | (crc << 17)) & 0xFFFFFFFF
  return (rotated + 0xA282EAD8) & 0xFFFFFFFF


def read_tfrecords(path) -> list[bytes]:
  with open(path, "rb") as f:
    blob = f.read()
  records, pos = [], 0
  while pos < len(blob):
    length_bytes = blob[pos:pos + 8]
    (length,) = struct.unpack("<Q", length_bytes)
    (length_crc,) = struct.unpack("<I", blob[pos + 8:pos + 12])
    assert length_crc == reference_masked_crc(length_bytes), "length CRC mismatch"
    data = blob[pos + 12:pos + 12 + length]
    assert len(data) == length, "truncated record"
    (data_crc,) = struct.unpack("<I", blob[pos + 12 + length:pos + 16 + length])
    assert data_crc == reference_masked_crc(data), "data CRC mismatch"
    records.append(data)
    pos += 16 + length
  return records


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
  value, shift = 0, 0
  while True:
    byte = buf[pos]
    pos += 1
    value |= (byte & 0x7F) << shift
    shift += 7
    if not byte & 0x80:
      return value, pos


def parse_proto(buf: bytes) -> dict[int, list]:
  """Field number -> list of raw values (int, 8-byte, 4-byte or length-delimited bytes)."""
  fields, pos = {}, 0
  while pos < len(buf):
    key, pos = read_varint(buf, pos)
    field, wire_type = key >> 3, key & 7
    if wire_type == 0:
      value, pos = read_varint(buf, pos)
    elif wire_type == 1:
      value, pos = buf[pos:pos + 8], pos + 8
    elif wire_type == 5:
      value, pos = buf[pos:pos + 4], pos + 4
    elif wire_type == 2:
      length, pos = read_varint(buf, pos)
      value, pos = buf[pos:pos + length], pos + length
    else:
      raise AssertionError(f"unexpected wire type {wire_type}")
    fields.setdefault(field, []).append(value)
  assert pos == len(buf)
  return fields


def decode_event(data: bytes) -> dict:
  fields = parse_proto(data)
  event = {
      "wall_time": struct.unpack("<d", fields[1][0])[0],
      "step": fields.get(2, [0])[0],
  }
  if 3 in fields:
    event["file_version"] = fields[3][0].decode()
  if 5 in fields:
    scalars = {}
    for value in parse_proto(fields[5][0])[1]:
      value_fields = parse_proto(value)
      scalars[value_fields[1][0].decode()] = struct.unpack("<f", value_fields[2][0])[0]
    event["scalars"] = scalars
  return event


def read_events(path) -> list[dict]:
  return [decode_event(record) for record in read_tfrecords(path)]


def event_files(workdir) -> list[str]:
  return sorted(glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*")))


# ---------------------------------------------------------------------------------------------
# Encoding primitives.


def test_crc32c_matches_known_vector_and_bitwise_reference():
  assert metrics_lib.crc32c(b"123456789") == 0xE3069283  # The standard CRC-32C check value.
  rng = np.random.default_rng(0)
  for size in (0, 1, 7, 100):
    data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    assert metrics_lib.crc32c(data) == reference_crc32c(data)
    assert metrics_lib.masked_crc32c(data) == reference_masked_crc(data)


@pytest.mark.parametrize("step", [0, 1, 127, 128, 300, 2**40, -1])
def test_event_step_varint_round_trips(step):
  event = decode_event(metrics_lib.encode_event(12.5, step))
  assert event["wall_time"] == 12.5
  expected = step if step >= 0 else step + 2**64  # int64 two's complement on the wire.
  assert event["step"] == expected


def test_scalar_beyond_float32_range_becomes_inf():
  summary = metrics_lib.encode_scalar_summary({"big": 1e300, "small": -1e300})
  event = decode_event(metrics_lib.encode_event(0.0, 1, summary=summary))
  assert event["scalars"] == {"big": math.inf, "small": -math.inf}


# ---------------------------------------------------------------------------------------------
# MetricWriter.


def test_jsonl_and_tensorboard_round_trip(tmp_path):
  workdir = str(tmp_path / "run")
  with metrics_lib.MetricWriter(workdir, "sft", enabled=True) as writer:
    writer.write(0, {"loss": 2.5, "lr": np.float32(1e-4)})
    writer.write(np.int64(10), {"loss": jnp.asarray(1.25), "tokens": 4096})
    # Flushed on each write: readable while the writer is still open.
    assert [r["step"] for r in metrics_lib.read_metrics(writer.metrics_path)] == [0, 10]
    writer.write(20, {"loss": float("nan"), "grad_norm": float("inf"), "neg": -math.inf})

  path = tmp_path / "run" / "metrics.jsonl"
  lines = path.read_text().splitlines()
  assert len(lines) == 3

  def reject_constant(name):
    raise AssertionError(f"non-standard JSON constant {name}")

  raw = [json.loads(line, parse_constant=reject_constant) for line in lines]
  assert raw[2] == {"step": 20, "stage": "sft", "loss": "nan", "grad_norm": "inf", "neg": "-inf"}

  records = metrics_lib.read_metrics(path)
  assert records[0] == {"step": 0, "stage": "sft", "loss": 2.5, "lr": float(np.float32(1e-4))}
  assert records[1] == {"step": 10, "stage": "sft", "loss": 1.25, "tokens": 4096.0}
  assert all(type(v) is float for k, v in records[1].items() if k not in ("step", "stage"))
  assert math.isnan(records[2]["loss"])
  assert records[2]["grad_norm"] == math.inf and records[2]["neg"] == -math.inf

  (events_path,) = event_files(workdir)
  assert os.path.basename(events_path).startswith("events.out.tfevents.")
  events = read_events(events_path)
  assert events[0]["file_version"] == "brain.Event:2"
  assert "scalars" not in events[0]
  assert [e["step"] for e in events[1:]] == [0, 10, 20]
  assert events[1]["scalars"] == {"sft/loss": 2.5, "sft/lr": np.float32(1e-4)}
  assert events[2]["scalars"] == {"sft/loss": 1.25, "sft/tokens": 4096.0}
  assert math.isnan(events[3]["scalars"]["sft/loss"])
  assert events[3]["scalars"]["sft/grad_norm"] == math.inf
  assert all(e["wall_time"] > 1e9 for e in events)  # Unix seconds.


def test_second_writer_appends_and_opens_a_new_events_file(tmp_path):
  workdir = str(tmp_path)
  with metrics_lib.MetricWriter(workdir, "sft", enabled=True) as writer:
    writer.write(1, {"loss": 1.0})
  with metrics_lib.MetricWriter(workdir, "rm", enabled=True) as writer:
    writer.write(2, {"loss": 0.5})
  records = metrics_lib.read_metrics(tmp_path / "metrics.jsonl")
  assert [(r["stage"], r["step"]) for r in records] == [("sft", 1), ("rm", 2)]
  files = event_files(workdir)
  assert len(files) == 2
  tags = [set(e["scalars"]) for f in files for e in read_events(f) if "scalars" in e]
  assert sorted(map(sorted, tags)) == [["rm/loss"], ["sft/loss"]]


def test_partial_line_from_killed_run_is_isolated_and_reported(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "stage": "sft", "loss": 1.0}\n{"step": 2, "sta')
  with metrics_lib.MetricWriter(str(tmp_path), "sft", enabled=True) as writer:
    writer.write(2, {"loss": 0.9})
  lines = path.read_text().splitlines()
  assert lines[1] == '{"step": 2, "sta'
  assert json.loads(lines[2])["loss"] == 0.9
  with pytest.raises(InputError, match=r"metrics.jsonl:2: not valid JSON"):
    metrics_lib.read_metrics(path)


def test_non_main_writer_writes_nothing(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  workdir = tmp_path / "run"
  with metrics_lib.MetricWriter(str(workdir), "sft") as writer:
    assert not writer.enabled
    writer.write(1, {"loss": 1.0})
    writer.write(2, {"loss": "not even checked"})
  assert not workdir.exists()

  monkeypatch.setattr(jax, "process_index", lambda: 0)
  with metrics_lib.MetricWriter(str(workdir), "sft") as writer:
    assert writer.enabled
    writer.write(1, {"loss": 1.0})
  assert len(metrics_lib.read_metrics(workdir / "metrics.jsonl")) == 1


@pytest.mark.parametrize("step, metrics, match", [
    (1, {"loss": np.ones(3)}, "must be a scalar"),
    (1, {"loss": "1.5"}, "must be a scalar"),
    (1, {"loss": None}, "not a number"),
    (1, {"step": 1.0}, "reserved"),
    (1, {"": 1.0}, "non-empty"),
    (-1, {"loss": 1.0}, "must be >= 0"),
    (1.5, {"loss": 1.0}, "must be an integer"),
])
def test_bad_metrics_raise_input_error(tmp_path, step, metrics, match):
  with metrics_lib.MetricWriter(str(tmp_path), "sft", enabled=True) as writer:
    with pytest.raises(InputError, match=match):
      writer.write(step, metrics)
  assert not (tmp_path / "metrics.jsonl").read_text()


def test_write_after_close_raises(tmp_path):
  writer = metrics_lib.MetricWriter(str(tmp_path), "sft", enabled=True)
  writer.close()
  writer.close()  # Idempotent.
  with pytest.raises(RuntimeError, match="closed"):
    writer.write(1, {"loss": 1.0})


def test_read_metrics_rejects_non_record(tmp_path):
  path = tmp_path / "m.jsonl"
  path.write_text('{"step": 1, "loss": 2}\n\n[1, 2]\n')
  with pytest.raises(InputError, match=r"m.jsonl:3: expected a JSON object"):
    metrics_lib.read_metrics(path)


def test_tensorboard_loader_reads_our_file(tmp_path):
  loader_lib = pytest.importorskip("tensorboard.backend.event_processing.event_file_loader")
  tensor_util = pytest.importorskip("tensorboard.util.tensor_util")
  with metrics_lib.MetricWriter(str(tmp_path), "ppo", enabled=True) as writer:
    writer.write(3, {"reward": 0.75, "kl": 0.125})
    writer.write(4, {"reward": 1.5})
  (path,) = event_files(str(tmp_path))
  seen = []
  for event in loader_lib.EventFileLoader(path).Load():
    for value in event.summary.value:
      # The loader migrates simple_value into a scalar tensor.
      number = (value.simple_value if value.WhichOneof("value") == "simple_value" else
                float(tensor_util.make_ndarray(value.tensor)))
      seen.append((event.step, value.tag, number))
  assert seen == [(3, "ppo/reward", 0.75), (3, "ppo/kl", 0.125), (4, "ppo/reward", 1.5)]


# ---------------------------------------------------------------------------------------------
# NaN guard.


@pytest.mark.parametrize("value", [1.0, 0.0, -2.5, 3.4e38, 1e-45, np.float32(3.4e38),
                                   np.float64(-1e300), jnp.asarray(1.0), jnp.asarray(-1e-30),
                                   np.array(7.0), 5])
def test_check_finite_passes_finite_values(value):
  """Every finite scalar passes (huge, tiny and negative ones too), and only the checked keys
  are looked at: a NaN elsewhere in the metrics is not the loss."""
  metrics = {"loss": value, "other": math.nan, "grad_norm": math.inf}
  assert metrics_lib.check_finite(3, metrics) is None
  assert metrics_lib.check_finite(3, metrics, keys=("loss",)) is None
  # The same metrics are refused as soon as a non-finite key is asked for: the pass above was
  # about which keys are checked, not a check that never raises.
  with pytest.raises(metrics_lib.NonFiniteLossError, match="'other'"):
    metrics_lib.check_finite(3, metrics, keys=("loss", "other"))


@pytest.mark.parametrize("value", [math.nan, math.inf, jnp.asarray(jnp.nan), np.float32("-inf")])
def test_check_finite_raises_with_clear_message(value):
  with pytest.raises(metrics_lib.NonFiniteLossError) as info:
    metrics_lib.check_finite(7, {"loss": value})
  message = str(info.value)
  assert "step 7" in message and "'loss'" in message
  assert "last good checkpoint" in message
  assert info.value.step == 7 and info.value.name == "loss"


def test_check_finite_checks_requested_keys():
  with pytest.raises(metrics_lib.NonFiniteLossError, match="'kl'"):
    metrics_lib.check_finite(1, {"loss": 1.0, "kl": math.inf}, keys=("loss", "kl"))
  with pytest.raises(InputError, match="'kl' to check is missing"):
    metrics_lib.check_finite(1, {"loss": 1.0}, keys=("kl",))


# ---------------------------------------------------------------------------------------------
# Progress.


class FakeClock:

  def __init__(self):
    self.now = 1000.0

  def __call__(self):
    return self.now


def make_progress(**kwargs):
  clock, stream = FakeClock(), io.StringIO()
  defaults = dict(stage="sft", total_steps=400, every_seconds=10.0, clock=clock, enabled=True,
                  stream=stream)
  defaults.update(kwargs)
  return metrics_lib.Progress(**defaults), clock, stream


def test_progress_eta_uses_only_this_process_steps():
  # A resumed run: steps 0..99 happened in an earlier process and must not inflate the rate.
  progress, clock, stream = make_progress(start_step=100)
  clock.now += 60  # Start-up and compilation are not counted either.
  assert progress.update(110, loss=2.5)
  assert stream.getvalue() == "[sft] step 110/400 (27%) loss 2.5 | resumed from step 100\n"
  clock.now += 10
  assert progress.update(130, loss=2.3114)
  # 20 steps in 10 s = 2 steps/s; 270 steps left -> 135 s.
  assert stream.getvalue().splitlines()[-1] == (
      "[sft] step 130/400 (32%) loss 2.311 | 2.0 steps/s | ETA 2m15s")


def test_progress_prints_only_when_due():
  progress, clock, stream = make_progress(total_steps=100)
  assert progress.update(1)
  clock.now += 4
  assert not progress.update(2)
  clock.now += 5.9
  assert not progress.update(3)
  clock.now += 0.1  # 10 s after the last line.
  assert progress.update(4)
  clock.now += 1
  assert not progress.update(5)
  assert progress.update(100)  # The last step is always shown.
  assert len(stream.getvalue().splitlines()) == 3


def test_progress_slow_rate_and_long_eta():
  progress, clock, stream = make_progress(total_steps=10_000, every_seconds=0)
  progress.update(0)
  clock.now += 50
  progress.update(10)  # 0.2 steps/s -> 5 s/step; 9990 steps left -> 49950 s.
  assert stream.getvalue().splitlines()[-1] == (
      "[sft] step 10/10000 (0%) | 5.00 s/step | ETA 13h52m30s")


def test_progress_disabled_on_other_processes(monkeypatch):
  monkeypatch.setattr(jax, "process_index", lambda: 3)
  stream = io.StringIO()
  progress = metrics_lib.Progress("sft", 10, clock=FakeClock(), stream=stream)
  assert not progress.update(1, loss=1.0)
  assert stream.getvalue() == ""


def test_progress_prints_to_stdout_by_default(capsys):
  progress = metrics_lib.Progress("rm", 4, clock=FakeClock(), enabled=True)
  progress.update(1, loss=0.5)
  assert capsys.readouterr().out == "[rm] step 1/4 (25%) loss 0.5\n"


def test_progress_rejects_empty_run():
  with pytest.raises(InputError, match="total_steps must be > 0"):
    metrics_lib.Progress("sft", 0)


@pytest.mark.parametrize("seconds, text", [
    (0, "0s"), (8.4, "8s"), (68, "1m08s"), (3600, "1h00m00s"), (3723, "1h02m03s"), (-5, "0s")])
def test_format_duration(seconds, text):
  assert metrics_lib.format_duration(seconds) == text


# ---------------------------------------------------------------------------------------------
# Memory stats.


def test_device_memory_stats_is_best_effort():
  stats = metrics_lib.device_memory_stats()
  assert stats["platform"] == jax.local_devices()[0].platform
  assert stats["num_devices"] == jax.local_device_count()
  for key in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit"):
    assert stats[key] is None or (isinstance(stats[key], int) and stats[key] >= 0)
