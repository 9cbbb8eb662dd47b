"""Process-start settings of the entry points: huge-page malloc and the CPU device count."""
import pytest

from experiments import host


def test_cpu_devices_are_added_or_replaced_in_xla_flags():
  env = host._with_cpu_devices({"XLA_FLAGS": "--xla_dump_to=/tmp/x"}, 2)
  assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=2"
  again = host._with_cpu_devices(env, 4)
  assert host.cpu_device_count(again["XLA_FLAGS"]) == 4
  assert again["XLA_FLAGS"].count("device_count") == 1 and "--xla_dump_to=/tmp/x" in again["XLA_FLAGS"]
  assert host._with_cpu_devices(env, 2) is env  # already so: nothing to restart for
  assert host._with_cpu_devices({}, None) == {}


def test_requested_cpu_devices_reads_the_environment_variable():
  assert host.requested_cpu_devices({}) is None
  assert host.requested_cpu_devices({host.CPU_DEVICES_ENV: " 2 "}) == 2
  for bad in ("0", "two", "-1"):
    with pytest.raises(SystemExit, match=host.CPU_DEVICES_ENV):
      host.requested_cpu_devices({host.CPU_DEVICES_ENV: bad})


def test_hugetlb_is_added_once_and_can_be_turned_off(monkeypatch):
  monkeypatch.setattr(host.sys, "platform", "linux")
  env = host._with_hugetlb({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, disabled=False)
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + host.HUGETLB
  assert host._with_hugetlb(env, disabled=False) is env
  assert host._with_hugetlb({}, disabled=True) == {}
  assert host._with_hugetlb({"INSTRUCTJAX_NO_HUGETLB": "1"}, disabled=False) == {
      "INSTRUCTJAX_NO_HUGETLB": "1"}
