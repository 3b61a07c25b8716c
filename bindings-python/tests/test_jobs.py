"""Transient jobs from Python against the real libvirtd: run_job, the pool, gc, Ctrl-C."""

import json
import os
import signal
import threading
import time

import pytest

import anyvm


def clones(client: anyvm.Client, template: str):
    return [v["name"] for v in client.list() if v["name"].startswith(template + "-")]


def test_run_job_stages_files_and_reports_phases(client, make_vm, tmp_path):
    tmpl = make_vm(forwards=False)
    (tmp_path / "in.txt").write_text("hello from the host\n")
    r = client.run_job(tmpl.name, ["sh", "-c", "mkdir -p /work/out && tr a-z A-Z < /work/in.txt > /work/out/r.txt; echo ok"],
                       inputs=[(tmp_path / "in.txt", "/work/in.txt")],
                       outputs=[("/work/out", tmp_path / "out")], env={"SEED": "7"})
    assert r.check() is r
    assert (r.outcome, r.exit_code, r.exit_status) == ("succeeded", 0, 0)
    assert r.stdout == b"ok\n"
    assert (tmp_path / "out" / "r.txt").read_text() == "HELLO FROM THE HOST\n"
    assert set(r.phases) >= {"clone", "boot", "ready", "stage_in", "run", "stage_out", "teardown"}
    assert r.vm.startswith(tmpl.name + "-")
    assert json.loads(r.to_json())["outcome"] == "succeeded"
    assert clones(client, tmpl.name) == []

    failed = client.run_job(tmpl.name, ["sh", "-c", "echo bad >&2; exit 4"])
    assert (failed.outcome, failed.exit_status) == ("failed", 4)
    with pytest.raises(anyvm.GuestCommandError) as e:
        failed.check()
    assert e.value.exit_code == 4 and e.value.stderr == b"bad\n"

    late = client.run_job(tmpl.name, ["sleep", "60"], timeout=2)
    assert (late.outcome, late.exit_status) == ("timed_out", 124)
    with pytest.raises(anyvm.TimeoutError):
        late.check()
    assert clones(client, tmpl.name) == []

    with pytest.raises(anyvm.NotFoundError):
        client.run_job(tmpl.name, ["true"], inputs=[(tmp_path / "missing", "/x")])
    with pytest.raises(anyvm.InvalidArgumentError):
        client.run_job("bad;name", ["true"])
    with pytest.raises(ValueError):
        client.run_job(tmpl.name)


def test_pool_runs_jobs_from_threads_and_run_all(client, make_vm):
    tmpl = make_vm(forwards=False)
    pool = client.job_pool(cpus=2, memory_mib=400)
    assert pool.budget == (2, 400)
    reports = pool.run_all([{"template": tmpl.name, "argv": ["echo", str(i)]} for i in range(3)])
    assert [r.stdout for r in reports] == [b"0\n", b"1\n", b"2\n"]
    assert max(r.phases.get("queue", 0.0) for r in reports) > 1.0  # 400 MiB fits two guests
    with pytest.raises(ValueError):
        pool.run_all([{"template": tmpl.name, "argv": ["true"], "bogus": 1}])
    # Threads share the pool; the GIL is free while jobs run.
    out = []
    ts = [threading.Thread(target=lambda: out.append(pool.run(tmpl.name, ["true"]).outcome)) for _ in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert out == ["succeeded", "succeeded"]
    assert pool.usage == (0, 0, 0)
    assert clones(client, tmpl.name) == []


def test_ctrl_c_cancels_the_job_and_removes_its_clone(client, make_vm):
    tmpl = make_vm(forwards=False)

    def interrupt_when_running():
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            names = clones(client, tmpl.name)
            if names and client.vm(names[0]).state == "running":
                time.sleep(3)
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.2)

    threading.Thread(target=interrupt_when_running, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        client.run_job(tmpl.name, ["sleep", "300"])
    assert clones(client, tmpl.name) == []
    assert [c for c in client.gc(dry_run=True)["clones"] if c["vm"].startswith(tmpl.name)] == []


def test_a_killed_transient_clone_is_collected_by_gc(client, make_vm, tmp_path):
    import subprocess
    import sys
    base = make_vm()
    base.snapshot("golden")
    clone_name = "py-orphan-" + base.name[3:]
    script = f"""
import os, signal, anyvm
c = anyvm.connect("libvirt:qemu:///system", state_dir={str(tmp_path / 'child-state')!r}, port_range=(51000, 51999))
base = c.vm({base.name!r})
with base.transient_clone({clone_name!r}, snapshot="golden", timeout=120):
    os.kill(os.getpid(), signal.SIGKILL)
"""
    r = subprocess.run([sys.executable, "-c", script], timeout=300)
    assert r.returncode == -signal.SIGKILL
    assert client.vm(clone_name).state == "running"
    report = client.gc()
    assert clone_name in [c["vm"] for c in report["clones"]], report
    with pytest.raises(anyvm.NotFoundError):
        client.vm(clone_name)


def test_on_phase_sees_each_phase_and_an_exception_in_it_cancels_the_job(client, make_vm):
    tmpl = make_vm(forwards=False)
    seen = []
    r = client.run_job(tmpl.name, ["true"], on_phase=lambda phase, vm: seen.append((phase, vm)))
    assert r.outcome == "succeeded"
    assert [p for p, _ in seen] == ["clone", "boot", "ready", "stage_in", "run", "stage_out", "teardown"]
    assert all(vm == r.vm for _, vm in seen), seen

    def refuse(phase, vm):
        if phase == "run":
            raise RuntimeError("not this one")
    with pytest.raises(RuntimeError, match="not this one"):
        client.run_job(tmpl.name, ["sh", "-c", "touch /tmp/ran; sleep 600"], on_phase=refuse)
    assert clones(client, tmpl.name) == []
