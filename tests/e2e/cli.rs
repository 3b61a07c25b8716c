//! The `anyvm` command line against the real libvirtd: exit codes, JSON output, error lines.

mod common;

use std::process::{Command, Output};

use common::*;

fn anyvm(cfg: &std::path::Path, state: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_anyvm"))
        .arg("-c")
        .arg(cfg)
        .args(args)
        .env("ANYVM_STATE_DIR", state)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn cli_end_to_end() {
    let g = guest();
    let dir = tempfile::Builder::new()
        .prefix("anyvm-cli-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let state = dir.path().join("state");
    let cfg = config_with_machine(
        dir.path(),
        "e2e-cli",
        &format!(
            "forwards = [{{ name = \"ssh\", guest_port = 22 }}]\n\
             credentials = {{ user = \"root\", identity_file = \"{key}\" }}\n\
             ready = {{ timeout_s = 120, probes = [{{ kind = \"agent\" }}, {{ kind = \"ssh_banner\", guest_port = 22 }}] }}",
            key = g.client_key().display()
        ),
    );
    let _c = Cleanup::named("e2e-cli");
    let _ = anyvm(&cfg, &state, &["destroy", "e2e-cli"]);

    let o = anyvm(&cfg, &state, &["up", "e2e-cli"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains("running and ready"));

    // exit code and both streams propagate
    let o = anyvm(
        &cfg,
        &state,
        &[
            "exec",
            "e2e-cli",
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 42",
        ],
    );
    assert_eq!(o.status.code(), Some(42));
    assert_eq!(text(&o.stdout), "out\n");
    assert_eq!(text(&o.stderr), "err\n");

    // stdin, env and cwd
    let mut child = Command::new(env!("CARGO_BIN_EXE_anyvm"))
        .arg("-c")
        .arg(&cfg)
        .args([
            "exec",
            "e2e-cli",
            "--stdin",
            "-e",
            "X=1",
            "--cwd",
            "/tmp",
            "--",
            "sh",
            "-c",
            "cat; echo $X; pwd",
        ])
        .env("ANYVM_STATE_DIR", &state)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"piped\n").unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(text(&o.stdout), "piped\n1\n/tmp\n");

    // Output is shown as the guest writes it: the first line is here while the program runs.
    let spawn = |script: &str| {
        Command::new(env!("CARGO_BIN_EXE_anyvm"))
            .arg("-c")
            .arg(&cfg)
            .args(["exec", "e2e-cli", "--", "sh", "-c", script])
            .env("ANYVM_STATE_DIR", &state)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    use std::io::BufRead;
    let mut child = spawn("echo first; sleep 3; echo second");
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    lines.read_line(&mut line).unwrap();
    assert_eq!(line, "first\n");
    assert!(
        child.try_wait().unwrap().is_none(),
        "anyvm exec ended before showing output"
    );
    line.clear();
    lines.read_line(&mut line).unwrap();
    assert_eq!(line, "second\n");
    assert!(child.wait().unwrap().success());

    // Ctrl-C kills the guest program before anyvm exits 130.
    let mut child = spawn("echo up; exec sleep 608");
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap());
    line.clear();
    lines.read_line(&mut line).unwrap();
    assert_eq!(line, "up\n");
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let st = child.wait_with_output().unwrap();
    assert_eq!(st.status.code(), Some(130), "{}", text(&st.stderr));
    assert!(text(&st.stderr).contains("guest program was killed"));
    let o = anyvm(&cfg, &state, &["exec", "e2e-cli", "--", "ps", "-o", "args"]);
    assert!(
        !text(&o.stdout).contains("sleep 608"),
        "{}",
        text(&o.stdout)
    );

    // JSON queries parse
    let o = anyvm(&cfg, &state, &["--json", "list"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v
        .as_array()
        .unwrap()
        .iter()
        .any(|x| x["name"] == "e2e-cli" && x["state"] == "running"));
    let o = anyvm(&cfg, &state, &["--json", "status", "e2e-cli"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let port = v["forwards"][0]["host_port"].as_u64().unwrap();
    assert!((48000..=48999).contains(&port), "{v}");

    // forward add/remove and ports
    let o = anyvm(
        &cfg,
        &state,
        &[
            "--json",
            "forward",
            "add",
            "e2e-cli",
            "--guest-port",
            "22",
            "--name",
            "ssh2",
        ],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let f: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let o = anyvm(&cfg, &state, &["--json", "ports"]);
    let leases: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(leases.as_array().unwrap().len(), 2, "{leases}");
    let o = anyvm(
        &cfg,
        &state,
        &[
            "forward",
            "remove",
            "e2e-cli",
            f["host_port"].to_string().as_str(),
        ],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));

    // cp round trip
    let src = dir.path().join("f.txt");
    std::fs::write(&src, b"hello through the agent\n").unwrap();
    let o = anyvm(
        &cfg,
        &state,
        &["cp", src.to_str().unwrap(), "e2e-cli:/tmp/f.txt"],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let back = dir.path().join("back.txt");
    let o = anyvm(
        &cfg,
        &state,
        &["cp", "e2e-cli:/tmp/f.txt", back.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(std::fs::read(&back).unwrap(), b"hello through the agent\n");

    // ssh-config output works with the real OpenSSH client
    let o = anyvm(&cfg, &state, &["ssh-config", "e2e-cli"]);
    let sshcfg = dir.path().join("ssh_config");
    std::fs::write(&sshcfg, &o.stdout).unwrap();
    let o = Command::new("ssh")
        .args([
            "-F",
            sshcfg.to_str().unwrap(),
            "-o",
            "BatchMode=yes",
            "anyvm-e2e-cli",
            "echo",
            "ok",
        ])
        .output()
        .unwrap();
    assert_eq!(text(&o.stdout), "ok\n", "{}", text(&o.stderr));

    // errors: one line, non-zero, names the VM; bad names never reach libvirt
    let o = anyvm(&cfg, &state, &["exec", "no-such-vm", "--", "true"]);
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("anyvm: error: vm 'no-such-vm': open: not found"),
        "{err}"
    );
    let o = anyvm(&cfg, &state, &["stop", "a;reboot"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("invalid argument: VM name"),
        "{}",
        text(&o.stderr)
    );
    let o = anyvm(&cfg, &state, &["--json", "start", "no-such-vm"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["error"]["kind"], "not_found");

    let o = anyvm(&cfg, &state, &["stop", "e2e-cli", "--timeout", "60"]);
    assert!(
        text(&o.stdout).contains("stopped (graceful)"),
        "{}",
        text(&o.stdout)
    );
    let o = anyvm(&cfg, &state, &["destroy", "e2e-cli"]);
    assert!(o.status.success());
    let o = anyvm(&cfg, &state, &["--json", "ports"]);
    assert_eq!(text(&o.stdout).trim(), "[]");
}
