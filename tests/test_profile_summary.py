"""experiments.profile_summary on a hand-made trace shaped like a GPU's Perfetto trace."""
import gzip
import json

import pytest

from experiments import profile_summary


def write_trace(folder, events):
  path = folder / "plugins" / "profile" / "run" / "perfetto_trace.json.gz"
  path.parent.mkdir(parents=True)
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": events}, f)


def meta(kind, pid, name, tid=None):
  event = {"ph": "M", "name": kind, "pid": pid, "args": {"name": name}}
  if tid is not None:
    event["tid"] = tid
  return event


def op(name, dur, pid, tid):
  return {"ph": "X", "name": name, "dur": dur, "pid": pid, "tid": tid, "ts": 0}


def test_kernels_on_the_device_streams_are_summed_by_name_and_kind(tmp_path):
  write_trace(tmp_path, [
      meta("process_name", 1, "/host:CPU"), meta("process_name", 2, "/device:GPU:0"),
      meta("thread_name", 2, "Stream #13(Compute)", tid=13),
      meta("thread_name", 2, "XLA Ops", tid=99),
      op("nvjet_sm90_tst_128x160_h_bz_NNT", 300, 2, 13),
      op("nvjet_sm90_tst_128x160_h_bz_NNT", 100, 2, 13),
      op("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 250, 2, 13),
      op("loop_add_fusion", 150, 2, 13), op("memcpy128", 100, 2, 13),
      op("fusion.12", 5000, 2, 99),          # an HLO-op span over the same kernels: not counted
      op("$python_call", 9000, 1, 1),        # host time: not counted
  ])
  summary = profile_summary.summarise(str(tmp_path), top=2)
  assert summary["total_ms"] == pytest.approx(0.9)
  kinds = {k: v["ms"] for k, v in summary["kinds"].items()}
  assert kinds == pytest.approx({"matmul": 0.4, "attention": 0.25, "fusion": 0.15, "copy": 0.1})
  assert [o["name"] for o in summary["top_ops"]] == [
      "nvjet_sm90_tst_128x160_h_bz_NNT", "cudnn_generated_fort_native_sdpa_sm90_flash_fprop"]
  assert summary["timelines"] == ["/device:GPU:0 Stream #13(Compute)"]


def test_a_folder_without_a_trace_is_a_clear_error(tmp_path):
  with pytest.raises(SystemExit, match="no perfetto_trace.json.gz"):
    profile_summary.summarise(str(tmp_path))
