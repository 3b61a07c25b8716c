//! Profiles, `anyvm check`, network policy, read-only shares, exec allowlist and the audit log,
//! against the real libvirtd, the test guest and a real MariaDB server on the host (reached from
//! the restricted guest through QEMU user networking at 10.0.2.100; everything else, the host
//! at 10.0.2.2 included, is out of its reach).

mod common;
#[path = "../support/mariadb.rs"]
mod mariadb;

use std::process::{Command, Output};

use common::*;

fn run(cfg: &std::path::Path, state: &std::path::Path, args: &[&str]) -> Output {
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

fn resource<'a>(rep: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    rep["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no resource {name} in {rep}"))
}

#[test]
fn profile_check_policy_and_shares_on_a_real_guest() {
    let g = guest();
    let mut db = mariadb::MariaDb::start();
    // Another host service the restricted guest must NOT reach.
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let other_port = other.local_addr().unwrap().port();

    let dir = tempfile::Builder::new()
        .prefix("anyvm-prof-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let d = dir.path();
    let state = d.join("state");
    let disk = d.join("data.qcow2");
    std::fs::copy(g.dir.join("data.qcow2"), &disk).unwrap();
    let calib = d.join("archive/calib");
    let out = d.join("archive/out");
    let home = d.join("home/alice");
    for p in [&calib, &out, &home] {
        std::fs::create_dir_all(p).unwrap();
    }
    std::fs::write(calib.join("run1.cal"), "gain=1.02\n").unwrap();
    std::fs::write(d.join("pw"), "S3cret-Audit-Pw\n").unwrap();
    let audit = d.join("audit.jsonl");
    let name = format!("prof-{}", std::process::id());
    let _c = Cleanup::named(&name);
    let cfg = d.join("anyvm.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"backend = "libvirt:qemu:///system"
port_range = [47100, 47199]

[machines.{name}]
memory_mib = 256
accel = "tcg"
kernel = "{kernel}"
initrd = "{initrd}"
cmdline = "console=ttyS0 quiet"
disks = [{{ path = "{disk}" }}]
credentials = {{ user = "root", password_file = "{pw}" }}
ready = {{ timeout_s = 120, probes = [{{ kind = "agent" }}] }}

[profiles.mc]
machine = "{name}"
description = "Monte Carlo production"
network = {{ mode = "restricted", allow = [{{ port = {db} }}] }}
shares = [
  {{ name = "calib", host_path = "{calib}", readonly = true, guest_path = "/mnt/calib" }},
  {{ name = "out", host_path = "{out}", guest_path = "/mnt/out" }},
]
policy = {{ exec_allow = ["/bin/sh", "/bin/cat"], share_roots_allow = ["{archive}"], share_roots_deny = ["{homes}"], audit_log = "{audit}" }}

[profiles.mc.resources]
calibdb = {{ kind = "mysql", host = "10.0.2.100", port = {db} }}
elsewhere = {{ kind = "tcp", host = "10.0.2.2", port = {other_port} }}
"#,
            kernel = g.kernel().display(),
            initrd = g.initrd().display(),
            disk = disk.display(),
            pw = d.join("pw").display(),
            db = db.port,
            calib = calib.display(),
            out = out.display(),
            archive = d.join("archive").display(),
            homes = d.join("home").display(),
            audit = audit.display(),
        ),
    )
    .unwrap();

    let o = run(&cfg, &state, &["up", &name]);
    assert!(o.status.success(), "up: {}", text(&o.stderr));

    // The check mounts the shares and probes every resource from inside the guest.
    let o = run(&cfg, &state, &["--json", "check", "mc", "--timeout", "5"]);
    let rep: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {} {}", text(&o.stdout), text(&o.stderr)));
    // the restricted guest reaches the allowed MariaDB with a real greeting...
    let r = resource(&rep, "calibdb");
    assert_eq!(r["ok"], true, "{rep}");
    assert!(r["detail"].as_str().unwrap().contains("MariaDB"), "{rep}");
    // ...and nothing else on the host
    assert_eq!(resource(&rep, "elsewhere")["ok"], false, "{rep}");
    // the read-only share is read-only even for the guest's root; the other is writable
    let r = resource(&rep, "share:calib");
    assert_eq!(r["ok"], true, "{rep}");
    assert!(
        r["detail"].as_str().unwrap().contains("not writable"),
        "{rep}"
    );
    assert_eq!(resource(&rep, "share:out")["ok"], true, "{rep}");
    assert_eq!(
        o.status.code(),
        Some(1),
        "a failing resource fails the check"
    );

    // Even after remounting its side read-write, guest root cannot write the read-only share
    // (the host serves it from a read-only bind mount); the read-write one is written through.
    let o = run(
        &cfg,
        &state,
        &[
            "exec", &name, "--", "/bin/sh", "-c",
            "cat /mnt/calib/run1.cal; mount -o remount,rw /mnt/calib; echo x > /mnt/calib/evil && echo WROTE; echo result > /mnt/out/r.txt",
        ],
    );
    assert!(text(&o.stdout).contains("gain=1.02"), "{}", text(&o.stderr));
    assert!(!text(&o.stdout).contains("WROTE"), "{}", text(&o.stdout));
    assert!(!calib.join("evil").exists());
    assert_eq!(
        std::fs::read_to_string(out.join("r.txt")).unwrap(),
        "result\n"
    );

    // exec outside the allowlist is refused before anything runs
    let o = run(&cfg, &state, &["exec", &name, "--", "/usr/bin/id"]);
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("allowlist"), "{}", text(&o.stderr));
    let o = run(&cfg, &state, &["exec", &name, "--", "sh", "-c", "true"]);
    assert!(
        text(&o.stderr).contains("absolute path"),
        "{}",
        text(&o.stderr)
    );

    // a denylisted host folder (here through a symlink inside the allowed root) is refused
    std::os::unix::fs::symlink(&home, d.join("archive/sneaky")).unwrap();
    let o = run(&cfg, &state, &["stop", &name, "--force"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let sneaky = d.join("archive/sneaky").display().to_string();
    let o = run(
        &cfg,
        &state,
        &["share", "add", &name, "--name", "h", "--host-path", &sneaky],
    );
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("denied root"),
        "{}",
        text(&o.stderr)
    );

    // an account with an empty password is flagged; a stopped MariaDB fails with the reason
    let o = run(&cfg, &state, &["up", &name]);
    assert!(o.status.success(), "up: {}", text(&o.stderr));
    let o = run(
        &cfg,
        &state,
        &[
            "exec",
            &name,
            "--",
            "/bin/sh",
            "-c",
            "echo 'mcuser::19000:0:99999:7:::' >> /etc/shadow",
        ],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    db.stop();
    let o = run(&cfg, &state, &["--json", "check", "mc", "--timeout", "5"]);
    let rep: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let r = resource(&rep, "calibdb");
    assert_eq!(r["ok"], false, "{rep}");
    assert!(!r["detail"].as_str().unwrap().is_empty(), "{rep}");
    let r = resource(&rep, "accounts");
    assert_eq!(r["ok"], false, "{rep}");
    assert!(r["detail"].as_str().unwrap().contains("mcuser"), "{rep}");
    // The human report names each resource and why.
    let o = run(&cfg, &state, &["check", "mc", "--timeout", "5"]);
    let t = text(&o.stdout);
    assert!(t.contains("FAILED") && t.contains("calibdb"), "{t}");

    let o = run(&cfg, &state, &["destroy", &name]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    // destroy released the read-only bind mount
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        !mounts.contains(&state.join("shares").display().to_string()),
        "{mounts}"
    );

    // The audit log has one JSON line per operation, refusals included, and no secret.
    let log = std::fs::read_to_string(&audit).unwrap();
    assert!(!log.contains("S3cret-Audit-Pw"));
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ops: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| {
            (
                l["operation"].as_str().unwrap(),
                l["outcome"].as_str().unwrap(),
            )
        })
        .collect();
    for want in [
        ("check", "ok"),
        ("exec", "ok"),
        ("exec", "error"),
        ("shared_folder_add", "error"),
        ("destroy", "ok"),
    ] {
        assert!(ops.contains(&want), "{want:?} missing from {ops:?}");
    }
    assert!(lines
        .iter()
        .all(|l| l["vm"] == name.as_str() && l["time"].is_string() && l["user"].is_string()));
    drop(other);
}

#[test]
fn bad_profiles_name_the_file_key_and_reason() {
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("anyvm.toml");
    let base = "[machines.m]\nkernel = \"/k\"\n";
    let cases = [
        ("[profiles.p]\nmachine = \"nope\"\n", "profiles.p.machine", "no machine named"),
        ("[profiles.p]\nmachine = \"m\"\nresources.db = { kind = \"mysql\", host = \"a b\" }\n", "profiles.p.resources.db", "host"),
        ("[profiles.p]\nmachine = \"m\"\nresources.db = { kind = \"postgres\", host = \"h\" }\n", "profiles.p.resources.db", "unknown variant"),
        ("[profiles.p]\nmachine = \"m\"\npolicy = { exec_allow = [\"sh\"] }\n", "profiles.p.policy.exec_allow", "absolute"),
        ("[profiles.p]\nmachine = \"m\"\nnetwork = { mode = \"open\" }\n", "profiles.p.network", "unknown variant"),
        ("[profiles.p]\nmachine = \"m\"\npolicy = { share_roots_deny = [\"/home\"] }\nshares = [{ name = \"h\", host_path = \"/home/x\" }]\n", "profiles.p.shares[0]", "denied root"),
        ("[profiles.p]\nmachine = \"m\"\n[profiles.q]\nmachine = \"m\"\n", "profiles.q.machine", "already belongs"),
    ];
    for (extra, key, why) in cases {
        std::fs::write(&cfg, format!("{base}{extra}")).unwrap();
        let e = anyvm::Config::load(&cfg).unwrap_err().to_string();
        assert!(e.contains(&cfg.display().to_string()), "{e}");
        assert!(e.contains(key), "{key} not in {e}");
        assert!(e.contains(why), "{why} not in {e}");
    }
}
