//! `anyvm job run`, `clone` and `up` SIGKILLed at every phase, as a batch system kills a job
//! (the process and every process under it; the VMs libvirtd runs stay). Each trial waits for
//! the phase's marker in the debug log, kills, runs `anyvm gc`, runs the same command again to
//! its end and compares everything anyvm owns (domains and their states, files in the state
//! dir, port leases, mounts) with what a clean run leaves. Then it tears down and checks the
//! baseline again: anything extra is leaked, anything missing is lost.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyvm::{Client, ClientOptions};
use tokio::io::AsyncBufReadExt;

use crate::common::guest;
use crate::Tally;

const TEMPLATE: &str = "fk-tmpl";
const UP: &str = "fk-up";
const CLONE: &str = "fk-c";

struct Setup {
    dir: tempfile::TempDir,
    cfg: PathBuf,
    state: PathBuf,
    client: Client,
}

impl Setup {
    fn cmd(&self, args: &[&str]) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_anyvm"));
        c.arg("-c")
            .arg(&self.cfg)
            .args(args)
            .current_dir(self.dir.path())
            .env("ANYVM_STATE_DIR", &self.state)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        c
    }

    /// Runs to its end; `Err` with its stderr unless it exits 0.
    async fn run(&self, args: &[&str]) -> Result<(), String> {
        let o = tokio::time::timeout(
            Duration::from_secs(180),
            self.cmd(args).stdout(Stdio::null()).output(),
        )
        .await
        .map_err(|_| format!("anyvm {} did not finish in 180 s", args.join(" ")))?
        .map_err(|e| e.to_string())?;
        if o.status.success() {
            Ok(())
        } else {
            Err(format!(
                "anyvm {} failed ({}): {}",
                args.join(" "),
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            ))
        }
    }

    /// Starts the command, waits for `marker` in its log, sleeps `delay`, then SIGKILLs it and
    /// everything under it. `Ok(false)` when it had finished before the kill.
    async fn kill_at(&self, args: &[&str], marker: &str, delay: Duration) -> Result<bool, String> {
        let mut child = self
            .cmd(args)
            .env("ANYVM_LOG", "anyvm=debug")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        let pid = child.id().ok_or("no pid")? as i32;
        let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let (quoted, bare) = (format!("phase=\"{marker}\""), format!("phase={marker}"));
        let seen = tokio::time::timeout(Duration::from_secs(120), async {
            while let Ok(Some(l)) = lines.next_line().await {
                if l.contains(&quoted) || l.split_whitespace().any(|w| w == bare) {
                    return true;
                }
            }
            false
        })
        .await
        .unwrap_or(false);
        if !seen {
            let _ = child.kill().await;
            return Err(format!("phase '{marker}' never began"));
        }
        // Keep draining the log: a full pipe would stall the process instead of the kill.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        tokio::time::sleep(delay).await;
        if let Ok(Some(_)) = child.try_wait() {
            return Ok(false);
        }
        let tree = descendants(pid);
        for p in std::iter::once(pid).chain(tree.iter().copied()) {
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
        let _ = child.wait().await;
        for p in tree {
            if !super::gone_within(p, Duration::from_secs(10)).await {
                return Err(format!(
                    "process {p} under the killed anyvm survived SIGKILL"
                ));
            }
        }
        Ok(true)
    }

    /// Everything anyvm owns for this drill, as comparable lines.
    async fn snapshot(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for info in self.client.list().await.unwrap_or_default() {
            if info.name.starts_with("fk-") {
                out.insert(format!("domain {} {}", norm(&info.name), info.state));
            }
        }
        for f in files_under(&self.state) {
            let rel = f.strip_prefix(&self.state).unwrap().display().to_string();
            // Lock files are made once and stay, empty, by design.
            if !rel.ends_with(".lock") && rel != "ports.json" {
                out.insert(format!("file {}", norm(&rel)));
            }
        }
        for l in self.client.ports().leases().unwrap_or_default() {
            out.insert(format!("lease {} {}", norm(&l.vm), l.purpose));
        }
        let state = self.state.display().to_string();
        for m in std::fs::read_to_string("/proc/mounts")
            .unwrap_or_default()
            .lines()
        {
            if m.contains(&state) {
                out.insert(format!("mount {m}"));
            }
        }
        out
    }
}

/// Job ids and time stamps differ between runs; everything else must not.
fn norm(s: &str) -> String {
    let mut out = String::new();
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        if run.len() >= 10 {
            out.push('#');
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for c in s.chars() {
        if c.is_ascii_hexdigit() {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    out
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Every process under `pid`, read from /proc.
fn descendants(pid: i32) -> Vec<i32> {
    let parent_of = |p: i32| -> Option<i32> {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
        let rest = &stat[stat.rfind(')')? + 2..];
        rest.split_whitespace().nth(1)?.parse().ok()
    };
    let all: Vec<(i32, i32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|p| Some((p, parent_of(p)?)))
        .collect();
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        for &(c, _) in all.iter().filter(|(_, pp)| *pp == p) {
            out.push(c);
            frontier.push(c);
        }
    }
    out
}

fn diff(
    what: &str,
    want: &BTreeSet<String>,
    got: &BTreeSet<String>,
) -> Result<(), (u32, u32, String)> {
    let extra: Vec<&String> = got.difference(want).collect();
    let missing: Vec<&String> = want.difference(got).collect();
    if extra.is_empty() && missing.is_empty() {
        return Ok(());
    }
    Err((
        extra.len() as u32,
        missing.len() as u32,
        format!("{what}: left behind {extra:?}, missing {missing:?}"),
    ))
}

async fn setup() -> Setup {
    let g = guest();
    let dir = tempfile::Builder::new()
        .prefix("anyvm-faults-kill-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let d = dir.path();
    let mut machines = String::new();
    for m in [TEMPLATE, UP] {
        std::fs::copy(g.dir.join("data.qcow2"), d.join(format!("{m}.qcow2"))).unwrap();
        machines.push_str(&format!(
            "[machines.{m}]\nmemory_mib = 192\naccel = \"tcg\"\nkernel = \"{k}\"\ninitrd = \"{i}\"\n\
             cmdline = \"console=ttyS0 quiet\"\ndisks = [{{ path = \"{disk}\" }}]\n\
             forwards = [{{ name = \"ssh\", guest_port = 22 }}]\n",
            k = g.kernel().display(),
            i = g.initrd().display(),
            disk = d.join(format!("{m}.qcow2")).display(),
        ));
    }
    let cfg = d.join("anyvm.toml");
    std::fs::write(
        &cfg,
        format!("backend = \"libvirt:qemu:///system\"\nport_range = [49000, 49499]\n{machines}"),
    )
    .unwrap();
    std::fs::write(d.join("in.txt"), "payload\n").unwrap();
    let state = d.join("state");
    let client = Client::connect_with(
        "libvirt:qemu:///system",
        ClientOptions::default()
            .state_dir(&state)
            .port_range(49000..=49499),
    )
    .await
    .expect("libvirtd");
    Setup {
        dir,
        cfg,
        state,
        client,
    }
}

/// One command killed at each (marker, delay), each kill followed by gc and a clean rerun.
struct Case<'a> {
    what: &'a str,
    args: Vec<String>,
    teardown: Option<Vec<String>>,
    /// The VM the command makes when it refuses to make it again (`clone`): killed after its
    /// define, the clone is whole and the rerun is skipped.
    makes: Option<&'a str>,
    kills: Vec<(&'a str, u64)>,
}

async fn drill(s: &Setup, t: &mut Tally, case: Case<'_>) {
    let args: Vec<&str> = case.args.iter().map(String::as_str).collect();
    let teardown: Option<Vec<&str>> = case
        .teardown
        .as_ref()
        .map(|v| v.iter().map(String::as_str).collect());
    let down = || async {
        if let Some(td) = &teardown {
            s.run(td).await
        } else {
            Ok(())
        }
    };
    let baseline = s.snapshot().await;
    // What a clean run leaves.
    let clean = match s.run(&args).await {
        Ok(()) => s.snapshot().await,
        Err(e) => {
            t.trial(&format!("{}: clean run", case.what), Err(e));
            return;
        }
    };
    if let Err(e) = down().await {
        t.trial(&format!("{}: clean teardown", case.what), Err(e));
        return;
    }
    // What a run adds to and removes from the state it starts in.
    let added: BTreeSet<String> = clean.difference(&baseline).cloned().collect();
    let removed: BTreeSet<String> = baseline.difference(&clean).cloned().collect();
    for (marker, ms) in case.kills {
        let started = Instant::now();
        // Each trial is judged from where the last one left off: a leak counts once.
        let before = s.snapshot().await;
        let after_run: BTreeSet<String> = before
            .difference(&removed)
            .chain(added.iter())
            .cloned()
            .collect();
        let mut name = format!("{} killed at {marker}+{ms}ms", case.what);
        let r: Result<(), String> = async {
            let killed = s.kill_at(&args, marker, Duration::from_millis(ms)).await?;
            if !killed {
                name.push_str(" (had finished)");
            }
            s.run(&["gc"]).await?;
            let made = match case.makes {
                Some(vm) => s.client.vm(vm).await.is_ok(),
                None => false,
            };
            if made {
                name.push_str(" (whole before the kill)");
            } else {
                s.run(&args).await?;
            }
            if let Err((extra, missing, why)) =
                diff("after gc and a rerun", &after_run, &s.snapshot().await)
            {
                t.leaked += extra;
                t.lost += missing;
                return Err(why);
            }
            down().await?;
            if let Err((extra, missing, why)) = diff("after teardown", &before, &s.snapshot().await)
            {
                t.leaked += extra;
                t.lost += missing;
                return Err(why);
            }
            Ok(())
        }
        .await;
        name.push_str(&format!(" ({:.1}s)", started.elapsed().as_secs_f64()));
        if r.is_err() {
            // Start the next trial from the baseline anyway.
            let _ = s.run(&["gc"]).await;
            let _ = down().await;
        }
        t.trial(&name, r);
    }
}

pub async fn killed() -> Tally {
    let s = setup().await;
    let mut t = Tally::default();
    let strings = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let job = strings(&[
        "job",
        "run",
        "--template",
        TEMPLATE,
        "--in",
        "in.txt:/work/in.txt",
        "--out",
        "/work/o.txt:out/o.txt",
        "--",
        "sh",
        "-c",
        "tr a-z A-Z < /work/in.txt > /work/o.txt; sleep 1",
    ]);
    let cold: Vec<String> = job[..2]
        .iter()
        .cloned()
        .chain(["--cold".to_string()])
        .chain(job[2..].iter().cloned())
        .collect();
    // From nothing: the first job defines the template from the config and prepares its warm
    // state (a helper clone booted, saved, removed). Teardown removes the template again.
    drill(
        &s,
        &mut t,
        Case {
            what: "first job run (template defined, warm state made)",
            args: job.clone(),
            teardown: Some(strings(&["destroy", TEMPLATE])),
            makes: None,
            kills: vec![
                ("create", 0),
                ("warm-prepare", 0),
                ("warm-prepare", 1500),
                ("warm-save", 0),
                ("restore", 0),
            ],
        },
    )
    .await;
    // The template and its warm state stay from here on: part of every later baseline.
    if let Err(e) = s
        .run(&job.iter().map(String::as_str).collect::<Vec<_>>())
        .await
    {
        t.trial("job run: template defined", Err(e));
        return t;
    }
    drill(
        &s,
        &mut t,
        Case {
            what: "job run (warm)",
            args: job,
            teardown: None,
            makes: None,
            kills: vec![
                ("clone", 0),
                ("restore", 0),
                ("resume", 0),
                ("ready", 0),
                ("stage_in", 0),
                ("run", 300),
                ("stage_out", 0),
                ("teardown", 0),
                ("teardown", 700),
            ],
        },
    )
    .await;
    drill(
        &s,
        &mut t,
        Case {
            what: "job run --cold",
            args: cold,
            teardown: None,
            makes: None,
            kills: vec![
                ("freeze", 0),
                ("overlay", 0),
                ("define", 0),
                ("boot", 0),
                ("ready", 0),
                ("ready", 1500),
            ],
        },
    )
    .await;
    drill(
        &s,
        &mut t,
        Case {
            what: "clone",
            args: strings(&["clone", TEMPLATE, CLONE]),
            teardown: Some(strings(&["destroy", CLONE])),
            makes: Some(CLONE),
            kills: vec![("create", 0), ("freeze", 0), ("overlay", 0), ("define", 0)],
        },
    )
    .await;
    drill(
        &s,
        &mut t,
        Case {
            what: "up",
            args: strings(&["up", UP]),
            teardown: Some(strings(&["destroy", UP])),
            makes: None,
            kills: vec![
                ("define", 0),
                ("create", 0),
                ("start", 0),
                // Mid-start: libvirt holds the domain paused while it starts it.
                ("start", 50),
                ("start", 150),
                ("ready", 0),
                ("ready", 1500),
            ],
        },
    )
    .await;
    let _ = s.run(&["destroy", TEMPLATE]).await;
    t
}
