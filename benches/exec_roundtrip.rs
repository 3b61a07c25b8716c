//! Prints figures (no pass/fail): exec of `true` through the anyvm API vs the raw guest-agent
//! round trip on the same guest vs a fresh ssh connection, and readiness lag (time from the agent
//! first answering to `wait_ready` returning).
//! `cargo bench -p anyvm --bench exec_roundtrip` (needs libvirtd: scripts/setup-host.sh).

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use anyvm::{ExecRequest, ReadySpec, SshOptions};
use common::{fresh_client, guest_dir, spec};

fn stats(name: &str, mut v: Vec<Duration>) -> f64 {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let p50 = ms(v[v.len() / 2]);
    println!(
        "{name:<44} n={:<4} p50={:>8.3} ms  p90={:>8.3} ms  min={:>8.3} ms",
        v.len(),
        p50,
        ms(v[v.len() * 9 / 10]),
        ms(v[0])
    );
    p50
}

/// What a hand-written client does: guest-exec, then poll guest-exec-status as fast as it can.
fn raw_exec_true(conn: &virt::connect::Connect, name: &str) -> Duration {
    let t = Instant::now();
    let d = conn.lookup_domain_by_name(name).unwrap();
    let r = d
        .qemu_agent_command(
            r#"{"execute":"guest-exec","arguments":{"path":"true","capture-output":true}}"#,
            10,
            0,
        )
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&r).unwrap();
    let pid = v["return"]["pid"].as_i64().unwrap();
    let cmd = format!(r#"{{"execute":"guest-exec-status","arguments":{{"pid":{pid}}}}}"#);
    loop {
        let s = d.qemu_agent_command(&cmd, 10, 0).unwrap();
        if s.contains("\"exited\":true") {
            return t.elapsed();
        }
    }
}

fn main() {
    let g = guest_dir();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let name = "anyvm-bench";
    let client = fresh_client(&rt, dir.path(), name);
    let vm = rt
        .block_on(client.up(spec(&g, dir.path(), name), &ReadySpec::default()))
        .unwrap();
    let conn = virt::connect::Connect::open(Some("qemu:///system")).unwrap();
    let t_req = ExecRequest::new("true");
    for _ in 0..5 {
        rt.block_on(vm.exec(&t_req)).unwrap();
        raw_exec_true(&conn, name);
    }
    let n = 60;
    let mut api = Vec::new();
    let mut raw = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        rt.block_on(vm.exec(&t_req)).unwrap();
        api.push(t.elapsed());
        raw.push(raw_exec_true(&conn, name));
    }
    println!("== exec of `true` (guest under TCG) ==");
    let a = stats("anyvm Vm::exec", api);
    let r = stats("raw agent guest-exec + status (busy poll)", raw);
    println!("ratio anyvm / raw agent: {:.2}x (target <= 1.2x)", a / r);

    let mut state = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        rt.block_on(vm.state()).unwrap();
        state.push(t.elapsed());
    }
    stats("anyvm Vm::state", state);

    let cfg = rt
        .block_on(vm.ssh_config(&SshOptions {
            identity_file: Some(g.join("client_key")),
            ..Default::default()
        }))
        .unwrap();
    let cfg_file = dir.path().join("ssh_config");
    std::fs::write(&cfg_file, &cfg.stanza).unwrap();
    let mut ssh = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        let ok = Command::new("ssh")
            .args([
                "-F",
                cfg_file.to_str().unwrap(),
                "-o",
                "BatchMode=yes",
                &cfg.alias,
                "true",
            ])
            .status()
            .unwrap()
            .success();
        assert!(ok);
        ssh.push(t.elapsed());
    }
    let s = stats("fresh ssh connection running `true`", ssh);
    println!("ratio ssh / anyvm exec: {:.1}x", s / a);
    rt.block_on(vm.destroy()).unwrap();

    println!("== readiness lag: agent first answers -> wait_ready returns ==");
    let mut lags = Vec::new();
    for i in 0..5 {
        let vname = format!("anyvm-bench-ready{i}");
        let vm = rt
            .block_on(client.define(spec(&g, dir.path(), &vname)))
            .unwrap();
        let first: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        rt.block_on(vm.start()).unwrap();
        let pinger = {
            let (first, stop, vname) = (first.clone(), stop.clone(), vname.clone());
            std::thread::spawn(move || {
                let conn = virt::connect::Connect::open(Some("qemu:///system")).unwrap();
                let d = conn.lookup_domain_by_name(&vname).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    if d.qemu_agent_command(r#"{"execute":"guest-ping"}"#, 1, 0)
                        .is_ok()
                    {
                        first.lock().unwrap().get_or_insert(Instant::now());
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        rt.block_on(vm.wait_ready(&ReadySpec::default())).unwrap();
        let done = Instant::now();
        stop.store(true, Ordering::Relaxed);
        pinger.join().unwrap();
        if let Some(f) = *first.lock().unwrap() {
            lags.push(done.saturating_duration_since(f));
        }
        rt.block_on(vm.destroy()).unwrap();
    }
    let p = stats("readiness lag", lags);
    println!("readiness lag p50 {p:.1} ms (target <= 20 ms)");
}
