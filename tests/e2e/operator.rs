//! The operator's everyday commands against the real libvirtd and the real OpenSSH client:
//! `up` of every machine at once and of a VM the config does not know, `ssh` with a shared
//! connection, `screenshot`, `console --remote` and `--follow`, option shapes.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

struct Cli {
    state: PathBuf,
}

impl Cli {
    fn cmd(&self, cfg: &Path, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_anyvm"));
        c.arg("-c")
            .arg(cfg)
            .args(args)
            .env("ANYVM_STATE_DIR", &self.state)
            .stdin(Stdio::null());
        c
    }
    fn run(&self, cfg: &Path, args: &[&str]) -> Output {
        self.cmd(cfg, args).output().unwrap()
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A machine of the test guest, with its own disk copy.
fn machine(dir: &Path, name: &str, extra: &str) -> String {
    let g = guest();
    let disk = dir.join(format!("{name}.qcow2"));
    std::fs::copy(g.dir.join("data.qcow2"), &disk).unwrap();
    format!(
        "[machines.{name}]\nmemory_mib = 192\naccel = \"tcg\"\nkernel = \"{k}\"\ninitrd = \"{i}\"\n\
         disks = [{{ path = \"{d}\" }}]\n\
         forwards = [{{ name = \"ssh\", guest_port = 22 }}]\n\
         credentials = {{ user = \"root\", identity_file = \"{key}\" }}\n{extra}\n",
        k = g.kernel().display(),
        i = g.initrd().display(),
        d = disk.display(),
        key = g.client_key().display(),
    )
}

fn config(dir: &Path, file: &str, machines: &[String]) -> PathBuf {
    let p = dir.join(file);
    std::fs::write(
        &p,
        format!(
            "backend = \"libvirt:qemu:///system\"\nport_range = [48000, 48999]\n{}",
            machines.join("\n")
        ),
    )
    .unwrap();
    p
}

/// The width and height in a PNG's header.
fn png_size(data: &[u8]) -> (u32, u32) {
    assert_eq!(&data[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    (be(&data[16..20]), be(&data[20..24]))
}

fn ssh_masters(dir: &Path) -> usize {
    let out = Command::new("pgrep")
        .args(["-f", &dir.display().to_string()])
        .output()
        .unwrap();
    text(&out.stdout).lines().count()
}

#[test]
fn operator_commands_on_real_guests() {
    let dir = tempfile::Builder::new()
        .prefix("anyvm-op-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let cli = Cli {
        state: dir.path().join("state"),
    };
    let probes = "ready = { timeout_s = 180, probes = [{ kind = \"agent\" }, { kind = \"ssh_banner\", guest_port = 22 }] }";
    let a = machine(
        dir.path(),
        "op-a",
        &format!(
            "cmdline = \"console=tty0 console=ttyS0\"\nconsole = {{ vnc = \"auto\" }}\n{probes}"
        ),
    );
    let b = machine(
        dir.path(),
        "op-b",
        &format!("cmdline = \"console=ttyS0 quiet\"\n{probes}"),
    );
    let c = machine(dir.path(), "op-c", "cmdline = \"console=ttyS0 quiet\"");
    let cfg = config(dir.path(), "anyvm.toml", &[a, b]);
    let other = config(dir.path(), "other.toml", &[c]);
    let _clean: Vec<Cleanup> = ["op-a", "op-b", "op-c"]
        .into_iter()
        .map(Cleanup::named)
        .collect();
    for (f, n) in [(&cfg, "op-a"), (&cfg, "op-b"), (&other, "op-c")] {
        let _ = cli.run(f, &["destroy", n]);
    }

    // `up` with no name: every machine of the config, at once.
    let o = cli.run(&cfg, &["up"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(
        out.contains("op-a: running and ready") && out.contains("op-b: running and ready"),
        "{out}"
    );
    let o = cli.run(&cfg, &["--json", "up"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["op-a", "op-b"], "{v}");
    let ports: Vec<u64> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["forwards"][0]["host_port"].as_u64().unwrap())
        .collect();
    assert_ne!(ports[0], ports[1], "{v}");

    // A VM defined elsewhere, not in this config: started and waited for with the default
    // probes. A name neither knows: a clear error, nothing made.
    let o = cli.run(&other, &["define", "op-c"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let o = cli.run(&cfg, &["up", "op-c"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains("op-c: running and ready"));
    let o = cli.run(&cfg, &["up", "op-nope"]);
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("not in the config either"),
        "{}",
        text(&o.stderr)
    );
    let o = cli.run(&cfg, &["up", "op-a", "op-nope"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains("op-a: running and ready"));
    assert!(text(&o.stderr).contains("op-nope"), "{}", text(&o.stderr));
    let o = cli.run(&other, &["destroy", "op-c"]);
    assert!(o.status.success(), "{}", text(&o.stderr));

    // `ssh`: a command's output and exit code, arguments passed as they are, shell text with
    // -c; the first call leaves a shared connection the next ones reuse.
    let o = cli.run(
        &cfg,
        &["ssh", "op-a", "--", "printf", "%s|", "a b;c", "$HOME"],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "a b;c|$HOME|");
    let o = cli.run(&cfg, &["ssh", "op-a", "--command", "echo $((6*7)); exit 7"]);
    assert_eq!(o.status.code(), Some(7), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "42\n");
    let login = cli.state.join("login");
    assert!(ssh_masters(&login) >= 1, "no shared ssh connection");
    let o = cli.run(&cfg, &["ssh", "op-a", "--", "true"]);
    assert!(o.status.success(), "{}", text(&o.stderr));

    // `screenshot`: a real picture of the guest's screen; `console --remote`: its VNC port,
    // which speaks RFB.
    let shot = dir.path().join("op-a.png");
    let o = cli.run(
        &cfg,
        &["--json", "screenshot", "op-a", shot.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let png = std::fs::read(&shot).unwrap();
    let (w, h) = png_size(&png);
    assert!(w >= 640 && h >= 400, "{w}x{h}");
    assert_eq!(
        (v["width"].as_u64(), v["height"].as_u64()),
        (Some(w.into()), Some(h.into()))
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let shot = rt.block_on(async {
        let client = anyvm::Client::connect("libvirt:qemu:///system")
            .await
            .unwrap();
        client.vm("op-a").await.unwrap().screenshot().await.unwrap()
    });
    assert!(!shot.is_blank(), "the guest's screen is blank");
    let o = cli.run(
        &cfg,
        &[
            "screenshot",
            "op-b",
            dir.path().join("b.png").to_str().unwrap(),
        ],
    );
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("no display"),
        "{}",
        text(&o.stderr)
    );

    let o = cli.run(&cfg, &["console", "op-a", "--remote"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let url = text(&o.stdout).trim().to_string();
    let port: u16 = url
        .strip_prefix("vnc://127.0.0.1:")
        .unwrap_or_else(|| panic!("{url}"))
        .parse()
        .unwrap();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut banner = [0u8; 12];
    s.read_exact(&mut banner).unwrap();
    assert!(banner.starts_with(b"RFB 003."), "{banner:?}");
    let o = cli.run(&cfg, &["console", "op-b", "--remote"]);
    assert!(
        text(&o.stdout).contains("no remote display"),
        "{}",
        text(&o.stdout)
    );

    // `console --follow`: the log so far, then lines as the guest writes them, until SIGINT.
    let mut follow = cli
        .cmd(&cfg, &["console", "op-a", "--follow"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = BufReader::new(follow.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in lines.lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let saw = |needle: &str, within: Duration| {
        let end = Instant::now() + within;
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match rx.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
        false
    };
    assert!(
        saw("boot complete", Duration::from_secs(10)),
        "the log so far"
    );
    let o = cli.run(
        &cfg,
        &[
            "exec",
            "op-a",
            "--",
            "sh",
            "-c",
            "echo follow-marker-17 >/dev/ttyS0",
        ],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        saw("follow-marker-17", Duration::from_secs(10)),
        "a line written now"
    );
    unsafe { libc::kill(follow.id() as i32, libc::SIGINT) };
    assert!(follow.wait().unwrap().success());

    // One shape for options: `forward remove VM --name L` as well as positional.
    let o = cli.run(
        &cfg,
        &[
            "forward",
            "add",
            "op-b",
            "--guest-port",
            "22",
            "--name",
            "x1",
        ],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let o = cli.run(&cfg, &["forward", "remove", "op-b", "--name", "x1"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let o = cli.run(&cfg, &["forward", "remove", "op-b", "x1"]);
    assert!(!o.status.success(), "removed twice");
    let o = cli.run(&cfg, &["forward", "remove", "op-b"]);
    assert_eq!(o.status.code(), Some(2), "clap's usage error");

    // Stop ends the shared ssh connection and its files.
    let o = cli.run(&cfg, &["stop", "op-a"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let end = Instant::now() + Duration::from_secs(5);
    while ssh_masters(&login) > 0 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(ssh_masters(&login), 0, "an ssh master outlived stop");
    assert!(
        std::fs::read_dir(&login).map_or(0, |d| d.count()) == 0,
        "login files left after stop"
    );
    for n in ["op-a", "op-b"] {
        let o = cli.run(&cfg, &["destroy", n]);
        assert!(o.status.success(), "{}", text(&o.stderr));
    }
}
