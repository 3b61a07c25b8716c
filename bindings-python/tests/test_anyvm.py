"""The Python surface of anyvm against the real libvirtd and test guest."""

import asyncio
import hashlib
import logging
import threading
import time

import pytest

import anyvm


def test_lifecycle_exec_and_errors(make_vm, tmp_path):
    vm = make_vm()
    assert vm.state == "shut off"
    vm.start()
    rep = vm.wait_ready(timeout=120, probes=["agent", ("ssh", 22)])
    assert [p for p, _ in rep["passed"]] == ["agent", "ssh:22"]
    assert vm.state == "running"

    r = vm.exec(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (r.exit_code, r.stdout, r.stderr) == (3, b"out\n", b"err\n")
    with pytest.raises(anyvm.GuestCommandError) as ei:
        r.check()
    assert ei.value.exit_code == 3 and ei.value.stderr == b"err\n"
    assert "vm '%s'" % vm.name in str(ei.value)
    assert vm.exec(["true"]).check().exit_code == 0

    # binary stdout and stdin, env, cwd
    blob = bytes(range(256)) * 64
    assert vm.exec(["cat"], stdin=blob).stdout == blob
    r = vm.exec(["sh", "-c", 'echo "$A"; pwd'], env={"A": "b c"}, cwd="/tmp")
    assert r.stdout == b"b c\n/tmp\n"

    # timeouts are anyvm.TimeoutError and the builtin TimeoutError
    with pytest.raises(TimeoutError) as ti:
        vm.exec(["sleep", "60"], timeout=1)
    assert isinstance(ti.value, anyvm.TimeoutError)

    # file copy round trip
    src = tmp_path / "in.bin"
    src.write_bytes(blob * 10)
    assert vm.copy_to(str(src), "/tmp/in.bin") == len(blob) * 10
    back = tmp_path / "back.bin"
    vm.copy_from("/tmp/in.bin", back)
    assert hashlib.sha256(back.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()
    with pytest.raises(anyvm.NotFoundError):
        vm.copy_from("/no/such/file", tmp_path / "x")

    # forwards
    f = vm.forward(22, name="ssh2")
    assert f["guest_port"] == 22 and 50000 <= f["host_port"] <= 50999
    assert {p["name"] for p in vm.ports} == {"ssh", "ssh2"}
    vm.forward_remove("ssh2")
    assert [p["name"] for p in vm.ports] == ["ssh"]
    assert "HostKeyAlias" in vm.ssh_config()

    assert vm.stop(timeout=60) == "graceful"
    assert vm.stop() == "already_off"


def test_bad_arguments_raise_type_and_value_errors(client, make_vm):
    vm = make_vm(forwards=False)
    with pytest.raises(TypeError):
        vm.exec("ls -l")  # a string is not an argv list
    with pytest.raises(ValueError, match="timeout"):
        vm.exec(["true"], timeout=0)
    with pytest.raises(ValueError, match="mode"):
        vm.wait_ready(mode="sometimes")
    with pytest.raises(ValueError, match="probe \"psychic\""):
        vm.wait_ready(probes=["psychic"])
    with pytest.raises(ValueError, match="must name a program"):
        vm.exec([])
    with pytest.raises(anyvm.InvalidArgumentError):
        client.vm("x; rm -rf /")
    with pytest.raises(ValueError, match="invalid VM spec"):
        client.define({"name": "ok", "memory_mib": "lots"})
    with pytest.raises(anyvm.InvalidStateError):
        vm.exec(["true"])  # not running


def test_running_context_stops_even_on_exception(make_vm):
    vm = make_vm()
    with pytest.raises(RuntimeError, match="job failed"):
        with vm.running(timeout=120) as v:
            assert v.state == "running"
            raise RuntimeError("job failed")
    assert vm.state == "shut off"


def test_transient_clone_is_destroyed_after_the_block(client, make_vm):
    base = make_vm()
    base.start()
    base.wait_ready()
    base.stop()
    base.snapshot("golden")
    with pytest.raises(KeyError):
        with base.transient_clone("py-clone-" + base.name[3:], snapshot="golden") as c:
            assert c.exec(["true"]).exit_code == 0
            assert c.ports[0]["host_port"] != base.ports[0]["host_port"]
            clone_name = c.name
            raise KeyError("boom")
    with pytest.raises(anyvm.NotFoundError):
        client.vm(clone_name)


def test_asyncio_runs_execs_concurrently(make_vm):
    vm = make_vm()
    with vm.running():
        avm = vm.aio

        async def main():
            t = time.monotonic()
            results = await asyncio.gather(*[avm.exec(["sh", "-c", f"sleep 1; echo {i}"]) for i in range(4)])
            return time.monotonic() - t, results

        elapsed, results = asyncio.run(main())
        assert [r.stdout for r in results] == [b"%d\n" % i for i in range(4)]
        assert elapsed < 3.5, f"4 x 1s execs took {elapsed:.1f}s: not concurrent"
        assert asyncio.run(avm.state()) == "running"


def test_gil_is_released_during_vm_operations(make_vm):
    vm = make_vm()
    with vm.running():
        ticks = 0
        stop = threading.Event()

        def spin():
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                time.sleep(0.001)

        t = threading.Thread(target=spin)
        t.start()
        vm.exec(["sleep", "1"])
        stop.set()
        t.join()
        assert ticks > 200, f"the other thread only ran {ticks} times during a 1 s exec"


def test_core_log_events_reach_python_logging(make_vm, caplog):
    vm = make_vm("anyvm.ignore_shutdown=1", forwards=False)
    vm.start()
    vm.wait_ready()
    with caplog.at_level(logging.WARNING, logger="anyvm"):
        anyvm.set_log_level(logging.WARNING)
        assert vm.stop(timeout=2) == "forced"
    assert any("graceful shutdown timed out" in r.getMessage() and r.name == "anyvm" for r in caplog.records), \
        [r.getMessage() for r in caplog.records]


def test_ctrl_c_interrupts_a_long_wait(make_vm):
    import os
    import signal

    vm = make_vm("anyvm.noagent=1", forwards=False)
    vm.start()
    threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    t = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        vm.wait_ready(timeout=60)
    assert time.monotonic() - t < 5, "Ctrl-C did not interrupt the wait promptly"
    assert vm.state == "running"  # nothing was torn down by the interrupt itself


def test_doctor_reports_backend_and_host_checks(client):
    checks = client.doctor()
    by = {(c["backend"], c["name"]): c for c in checks}
    assert by[("libvirt", "libvirtd")]["status"] == "ok", checks
    assert "libvirt" in by[("libvirt", "libvirtd")]["detail"]
    assert by[("host", "state dir")]["status"] == "ok"
    kvm = by[("libvirt", "KVM")]
    assert kvm["status"] in ("ok", "warn", "fail")
    if kvm["status"] == "fail":
        assert "tcg" in kvm["hint"]
    assert all(set(c) == {"backend", "name", "status", "detail", "hint"} for c in checks)


def test_destroy_refuses_while_clones_depend_then_removes_them(client, make_vm):
    base = make_vm()
    clone = base.clone(base.name + "-c")
    assert base.dependants() == [clone.name]
    with pytest.raises(anyvm.InvalidStateError) as e:
        base.destroy()
    assert clone.name in str(e.value)
    assert "with_clones" in str(e.value)
    assert client.vm(base.name).state == "shut off"
    base.destroy(with_clones=True)
    names = [v["name"] for v in client.list()]
    assert base.name not in names and clone.name not in names


def test_output_streams_sync_async_and_by_callback_and_events_arrive(client, make_vm, tmp_path):
    events = client.events()
    vm = make_vm(forwards=False)
    script = ["sh", "-c", "echo one; sleep 2; echo two; echo oops >&2; exit 4"]
    with vm.running():
        # Iteration: the first chunk comes while the program still runs.
        t = time.monotonic()
        s = vm.exec_stream(script)
        first = next(s)
        first_at = time.monotonic() - t
        assert first == ("stdout", b"one\n")
        r = s.wait()
        assert time.monotonic() - t >= first_at + 1.5
        assert (r.exit_code, r.stdout, r.stderr) == (4, b"two\n", b"oops\n")
        with pytest.raises(anyvm.GuestCommandError):
            r.check()

        # The callback sees the same chunks; the result then holds no output.
        seen = []
        r = vm.exec(script, on_output=lambda stream, data: seen.append((stream, data)))
        assert r.exit_code == 4 and r.stdout == b"" and r.stderr == b""
        assert b"".join(d for k, d in seen if k == "stdout") == b"one\ntwo\n"
        assert b"".join(d for k, d in seen if k == "stderr") == b"oops\n"

        # An exception in the callback kills the program and propagates.
        def stop(stream, data):
            raise RuntimeError("enough")
        t = time.monotonic()
        with pytest.raises(RuntimeError, match="enough"):
            vm.exec(["sh", "-c", "echo up; sleep 604"], on_output=stop)
        assert time.monotonic() - t < 10

        # asyncio: async for, then wait_async.
        async def main():
            s = vm.aio.exec_stream(script)
            chunks = [c async for c in s]
            return chunks, await s.wait_async()
        chunks, r = asyncio.run(main())
        assert b"".join(d for k, d in chunks if k == "stdout") == b"one\ntwo\n"
        assert r.exit_code == 4 and r.stdout == b""

        # Leaving a with-block kills the program; cancel() makes wait() raise CancelledError.
        with vm.exec_stream(["sh", "-c", "echo up; exec sleep 605"]) as s:
            assert next(s) == ("stdout", b"up\n")
        s = vm.exec_stream(["sh", "-c", "echo up; exec sleep 606"])
        assert next(s) == ("stdout", b"up\n")
        s.cancel()
        with pytest.raises(anyvm.CancelledError):
            s.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            ps = vm.exec(["ps", "-o", "args"]).stdout
            if b"sleep 60" not in ps:
                break
            time.sleep(0.3)
        assert b"sleep 60" not in ps, ps

        # Copy progress: monotonic, ending at the size.
        src = tmp_path / "p.bin"
        src.write_bytes(b"\x05" * (1 << 20))
        prog = []
        assert vm.copy_to(src, "/tmp/p.bin", progress=lambda d, t: prog.append((d, t))) == 1 << 20
        assert len(prog) > 3 and prog == sorted(prog) and prog[-1] == (1 << 20, 1 << 20)
        assert vm.copy_from("/tmp/p.bin", tmp_path / "p.back", progress=lambda d, t: None) == 1 << 20

    seen = []
    while True:
        e = events.next_event(timeout=2)
        if e is None:
            break
        if e.get("vm") == vm.name:
            seen.append((e["type"], e.get("kind")))
    kinds = [k for t, k in seen if t == "vm"]
    assert "defined" in kinds and "started" in kinds and "stopped" in kinds, seen
    assert ("copy", None) in seen


def test_warm_state_and_warm_clones(client, make_vm):
    t = make_vm(forwards=False)
    info = t.warm(timeout=120, probes=["agent"])
    assert info["memory_bytes"] > 0 and info["template"] == t.name
    assert t.warm()["key"] == info["key"]  # made once
    started = time.monotonic()
    c = t.clone_warm(t.name + "-w", timeout=60, probes=["agent"])
    try:
        assert c.state == "running"
        assert time.monotonic() - started < 30
        r = c.exec(["cat", "/proc/sys/kernel/random/uuid"])
        assert len(r.stdout.strip()) == 36
    finally:
        c.destroy()
    # Jobs start warm by default; cold=True boots.
    for cold in (False, True):
        rep = client.run_job(t.name, ["echo", "ok"], cold=cold)
        assert rep.outcome == "succeeded" and rep.stdout == b"ok\n", rep


def test_screenshot_and_remote_display(make_vm, tmp_path):
    shown = make_vm("console=tty0", forwards=False, vnc=True)
    plain = make_vm(forwards=False)
    with shown.running(), plain.running():
        d = shown.remote_display()
        assert d["protocol"] == "vnc" and d["url"] == f"vnc://127.0.0.1:{d['port']}", d
        r = shown.screenshot(tmp_path / "s.png")
        assert r["width"] >= 640 and r["height"] >= 400, r
        assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert plain.remote_display() is None
        with pytest.raises(anyvm.InvalidStateError, match="no display"):
            plain.screenshot(tmp_path / "p.png")
        assert not (tmp_path / "p.png").exists()
