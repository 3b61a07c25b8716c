//! Transient jobs against the real libvirtd: every phase, every way a job ends, teardown on
//! each, orphan collection, and the pool.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use anyvm::job::gc::{gc, GcAction};
use anyvm::job::owner::{Liveness, Owner};
use anyvm::job::pool::{Budget, JobPool};
use anyvm::job::{run_job, Cancel, JobSpec, Outcome, Phase};
use anyvm::{Client, Vm, VmName};
use common::*;

/// gc removes every dead owner's clone on the host, by design, and so does every job as it
/// starts. The two tests that make such clones and then run gc hold this exclusively; the
/// tests that run jobs hold it shared, so their jobs cannot collect those clones first (with
/// libvirtd under a prompt reaper a SIGKILLed owner is dead at once).
static GC_TURN: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

async fn template(env: &TestEnv, name: &str) -> Vm {
    env.fresh(name).await;
    let mut spec = env.spec(name, "");
    spec.labels.insert("team".into(), "mc".into());
    env.client.define(spec).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn job_phases_outcomes_and_teardown() {
    let _turn = GC_TURN.read().await;
    let env = env().await;
    let _c = Cleanup::new(&env.client, "e2e-job-tmpl");
    let t = template(&env, "e2e-job-tmpl").await;
    let d = env.dir.path();

    // Inputs: one file and one directory tree; outputs: a directory and a file.
    std::fs::write(d.join("run.cfg"), "events=42\n").unwrap();
    std::fs::create_dir_all(d.join("tree/sub")).unwrap();
    std::fs::write(d.join("tree/a.dat"), vec![7u8; 200_000]).unwrap();
    std::fs::write(d.join("tree/sub/b.txt"), "b\n").unwrap();
    let spec = JobSpec::new(
        "e2e-job-tmpl",
        &[
            "sh",
            "-c",
            "cat /work/run.cfg; cd /work/tree && find . -type f | sort; \
             mkdir -p /work/out/hist && wc -c < a.dat > /work/out/hist/size && \
             echo $MC_SEED > /work/seed; echo warn >&2",
        ],
    )
    .unwrap()
    .env("MC_SEED", "1234")
    .input(d.join("run.cfg"), "/work/run.cfg")
    .input(d.join("tree"), "/work/tree")
    .output("/work/out", d.join("results/out"))
    .output("/work/seed", d.join("results/seed.txt"));
    let mut events = env.client.events();
    let r = run_job(&env.client, &t, &spec, &Cancel::new()).await;
    assert_eq!(r.outcome, Outcome::Succeeded, "{r:#?}");
    // Each phase was announced on the event stream as it began, with the job and its clone.
    let mut announced = Vec::new();
    while let Some(e) = events.try_next() {
        if let anyvm::Event::Job(j) = e {
            if j.job == r.job_id {
                assert_eq!(j.vm.as_deref(), Some(r.vm.as_str()), "{j:?}");
                announced.push(j.phase);
            }
        }
    }
    assert_eq!(
        announced,
        r.phases.iter().map(|p| p.phase).collect::<Vec<_>>()
    );
    assert_eq!(r.exit_status(), 0);
    assert_eq!(
        r.stdout_str(),
        "events=42\n./a.dat\n./sub/b.txt\n",
        "{}",
        r.stdout_str()
    );
    assert_eq!(String::from_utf8_lossy(&r.stderr), "warn\n");
    assert_eq!(
        std::fs::read_to_string(d.join("results/out/hist/size"))
            .unwrap()
            .trim(),
        "200000"
    );
    assert_eq!(
        std::fs::read_to_string(d.join("results/seed.txt")).unwrap(),
        "1234\n"
    );
    let phases: Vec<Phase> = r.phases.iter().map(|p| p.phase).collect();
    assert_eq!(
        phases,
        [
            Phase::Clone,
            Phase::Boot,
            Phase::Ready,
            Phase::StageIn,
            Phase::Run,
            Phase::StageOut,
            Phase::Teardown
        ]
    );
    assert!(r.phases.iter().all(|p| p.ok && p.seconds >= 0.0));
    assert!(r.vm.starts_with("e2e-job-tmpl-"));
    assert!(
        r.console_log.contains("Linux") || !r.console_log.is_empty(),
        "console log kept"
    );
    assert!(clones_of(&env.client, "e2e-job-tmpl").await.is_empty());
    assert_eq!(leases_of(&env.client, &r.vm), 0);
    // The template is untouched: still off, still labelled by its owner only.
    assert_eq!(t.state().await.unwrap(), anyvm::VmState::ShutOff);

    // A failing command: its exit code; outputs are still attempted and a missing one named.
    let spec = JobSpec::new("e2e-job-tmpl", &["sh", "-c", "echo partial; exit 7"])
        .unwrap()
        .output("/work/never-written", d.join("never"));
    let r = run_job(&env.client, &t, &spec, &Cancel::new()).await;
    assert_eq!(r.outcome, Outcome::Failed, "{r:#?}");
    assert_eq!((r.exit_code, r.exit_status()), (Some(7), 7));
    assert_eq!(r.stdout_str(), "partial\n");
    let e = r.error.as_ref().unwrap();
    assert_eq!(e.phase, Phase::StageOut);
    assert!(e.message.contains("/work/never-written"), "{}", e.message);
    assert!(clones_of(&env.client, "e2e-job-tmpl").await.is_empty());

    // The wall-clock limit.
    let spec = JobSpec::new("e2e-job-tmpl", &["sleep", "60"])
        .unwrap()
        .timeout(Duration::from_secs(3));
    let r = run_job(&env.client, &t, &spec, &Cancel::new()).await;
    assert_eq!(r.outcome, Outcome::TimedOut, "{r:#?}");
    assert_eq!(r.exit_status(), 124);
    assert!(r.phase_seconds(Phase::Run) < 15.0);
    assert!(clones_of(&env.client, "e2e-job-tmpl").await.is_empty());

    // Cancelled while the command runs.
    let cancel = Cancel::new();
    let spec = JobSpec::new("e2e-job-tmpl", &["sleep", "120"]).unwrap();
    let job = tokio::spawn({
        let (client, t, cancel) = (env.client.clone(), t.clone(), cancel.clone());
        async move { run_job(&client, &t, &spec, &cancel).await }
    });
    let until = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let names = clones_of(&env.client, "e2e-job-tmpl").await;
        if let Some(n) = names.first() {
            let vm = env.client.vm(n).await.unwrap();
            if vm.state().await.unwrap() == anyvm::VmState::Running
                && vm.exec(&anyvm::ExecRequest::new("true")).await.is_ok()
            {
                break;
            }
        }
        assert!(std::time::Instant::now() < until, "job never started");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t0 = std::time::Instant::now();
    cancel.cancel();
    let r = job.await.unwrap();
    assert_eq!(r.outcome, Outcome::Cancelled, "{r:#?}");
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
    assert!(clones_of(&env.client, "e2e-job-tmpl").await.is_empty());

    // Bad input: refused before any clone exists.
    let spec = JobSpec::new("e2e-job-tmpl", &["true"])
        .unwrap()
        .input(d.join("missing.cfg"), "/work/x");
    let r = run_job(&env.client, &t, &spec, &Cancel::new()).await;
    assert_eq!(r.outcome, Outcome::Error);
    assert!(r.vm.is_empty());
    assert_eq!(r.error.unwrap().kind, anyvm::ErrorKind::NotFound);

    // The readiness deadline is a job error in the ready phase, and the clone still goes.
    let mut spec = JobSpec::new("e2e-job-tmpl", &["true"]).unwrap();
    spec.ready = anyvm::ReadySpec::empty()
        .probe(anyvm::Probe::Command {
            argv: vec!["false".into()],
        })
        .timeout(Duration::from_secs(3));
    let r = run_job(&env.client, &t, &spec, &Cancel::new()).await;
    assert_eq!(r.outcome, Outcome::Error, "{r:#?}");
    assert_eq!(r.error.as_ref().unwrap().phase, Phase::Ready);
    assert_eq!(r.exit_status(), 125);
    assert!(clones_of(&env.client, "e2e-job-tmpl").await.is_empty());
    t.destroy().await.unwrap();
}

/// Read from /proc directly rather than through anyvm's own helper, which gc relies on.
fn is_mounted(at: &std::path::Path) -> bool {
    let want = format!(" {} ", at.display());
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .any(|l| l.contains(&want))
}

fn unmount(at: &std::path::Path) {
    while is_mounted(at) {
        let st = std::process::Command::new("umount")
            .arg("-l")
            .arg(at)
            .status();
        if !st.is_ok_and(|s| s.success()) {
            break; // no panic from a Drop that may run while panicking
        }
    }
    let _ = std::fs::remove_dir(at);
    let _ = std::fs::remove_dir(at.parent().unwrap());
}

/// Unmounts the test's own mounts when it ends, pass or fail.
struct Unmount(Vec<std::path::PathBuf>);

impl Drop for Unmount {
    fn drop(&mut self) {
        self.0.iter().for_each(|m| unmount(m));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn gc_removes_only_clones_of_dead_owners() {
    let _turn = GC_TURN.write().await;
    let env = env().await;
    let _c = Cleanup::new(&env.client, "e2e-gc-tmpl");
    let t = template(&env, "e2e-gc-tmpl").await;
    let me = Owner::current();
    let mut dead = {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        Owner { pid, ..me.clone() }
    };
    dead.user = "gone".into();
    let foreign = Owner {
        host: "other-node.example".into(),
        ..me.clone()
    };
    let mk = |o: &Owner| {
        let mut l: BTreeMap<String, String> = o.labels();
        l.insert("anyvm.job/id".into(), "test".into());
        l
    };
    let names = [
        "e2e-gc-tmpl-dead",
        "e2e-gc-tmpl-live",
        "e2e-gc-tmpl-foreign",
    ];
    let _cs: Vec<Cleanup> = names.iter().map(|n| Cleanup::new(&env.client, n)).collect();
    for (n, o) in names.iter().zip([&dead, &me, &foreign]) {
        env.fresh(n).await;
        t.clone_linked_labeled(&VmName::new(*n).unwrap(), None, mk(o))
            .await
            .unwrap();
    }
    // Read-only share mounts left behind by a VM that is gone (its owner was killed between
    // undefine and unmount) are released; those of a VM that exists are not.
    let shares = shared_state().join("shares");
    let src = env.dir.path().join("share-src");
    std::fs::create_dir_all(&src).unwrap();
    let ghost_mount = shares.join("e2e-gc-ghost").join("data");
    let live_mount = shares.join(names[1]).join("data");
    for m in [&ghost_mount, &live_mount] {
        anyvm::backend::libvirt::ensure_readonly_mount(&anyvm::Ctx::new("test mount"), &src, m)
            .unwrap();
    }
    let _unmount = Unmount(vec![ghost_mount.clone(), live_mount.clone()]);

    // A clone started by the dead owner holds ports and runs: gc powers it off too.
    env.client
        .vm(names[0])
        .await
        .unwrap()
        .start()
        .await
        .unwrap();
    assert!(leases_of(&env.client, names[0]) > 0);

    let dry = gc(&env.client, true).await.unwrap();
    let action = |r: &anyvm::job::gc::GcReport, n: &str| {
        r.clones.iter().find(|e| e.vm == n).map(|e| e.action)
    };
    assert_eq!(action(&dry, names[0]), Some(GcAction::WouldRemove));
    assert!(env.client.vm(names[0]).await.is_ok());
    let ghost = ghost_mount.display().to_string();
    let mounts = |r: &anyvm::job::gc::GcReport| -> Vec<String> {
        r.host_state_released
            .iter()
            .filter(|l| l.kind == anyvm::backend::LeftoverKind::ShareMount)
            .map(|l| l.path.clone())
            .collect()
    };
    assert_eq!(mounts(&dry), std::slice::from_ref(&ghost));
    assert!(is_mounted(&ghost_mount));

    let r = gc(&env.client, false).await.unwrap();
    assert_eq!(action(&r, names[0]), Some(GcAction::Removed));
    assert_eq!(action(&r, names[1]), Some(GcAction::Kept));
    assert_eq!(action(&r, names[2]), Some(GcAction::Kept));
    assert_eq!(
        r.clones.iter().find(|e| e.vm == names[2]).unwrap().liveness,
        Liveness::Foreign
    );
    // The template (no job labels) is not a job clone at all.
    assert_eq!(action(&r, "e2e-gc-tmpl"), None);
    assert!(env.client.vm(names[0]).await.is_err());
    assert_eq!(leases_of(&env.client, names[0]), 0);
    assert_eq!(mounts(&r), [ghost]);
    assert!(!is_mounted(&ghost_mount));
    assert!(!ghost_mount.parent().unwrap().exists());
    assert!(is_mounted(&live_mount));
    for n in &names[1..] {
        env.client.vm(n).await.unwrap().destroy().await.unwrap();
    }
    t.destroy().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn pool_caps_concurrency_and_runs_in_order() {
    let _turn = GC_TURN.read().await;
    let env = env().await;
    let _c = Cleanup::new(&env.client, "e2e-pool-tmpl");
    let t = template(&env, "e2e-pool-tmpl").await;
    // Room for one 192 MiB guest at a time: three jobs run one after another.
    let pool = JobPool::new(
        env.client.clone(),
        Budget {
            cpus: 2,
            memory_mib: 300,
        },
    )
    .unwrap();
    let jobs: Vec<(Vm, JobSpec)> = (0..3)
        .map(|i| {
            let spec = JobSpec::new(
                "e2e-pool-tmpl",
                &[
                    "sh",
                    "-c",
                    // 2 s each, so the waits below tell queueing apart from fast jobs.
                    &format!("echo job{i}; cat /sys/class/net/eth0/address; sleep 2"),
                ],
            )
            .unwrap();
            (t.clone(), spec)
        })
        .collect();
    let reports = pool.run_all(&jobs, &Cancel::new()).await;
    for (i, r) in reports.iter().enumerate() {
        assert_eq!(r.outcome, Outcome::Succeeded, "{r:#?}");
        assert!(r.stdout_str().starts_with(&format!("job{i}\n")));
    }
    let mut queued: Vec<f64> = reports
        .iter()
        .map(|r| r.phase_seconds(Phase::Queue))
        .collect();
    queued.sort_by(f64::total_cmp);
    // The first went at once; each later one waited for the one before.
    assert!(queued[0] < 1.0, "{queued:?}");
    assert!(queued[1] > 2.0 && queued[2] > queued[1] + 2.0, "{queued:?}");
    assert!(clones_of(&env.client, "e2e-pool-tmpl").await.is_empty());

    // Cancelling a queued job ends it without a clone.
    let held = pool.acquire(1, 300).await.unwrap();
    let cancel = Cancel::new();
    let job = tokio::spawn({
        let (pool, t, cancel) = (pool.clone(), t.clone(), cancel.clone());
        let spec = JobSpec::new("e2e-pool-tmpl", &["true"]).unwrap();
        async move { pool.run(&t, &spec, &cancel).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(pool.usage().2, 1);
    cancel.cancel();
    let r = job.await.unwrap();
    assert_eq!(r.outcome, Outcome::Cancelled);
    assert!(r.vm.is_empty());
    assert_eq!(pool.usage().2, 0);
    drop(held);
    t.destroy().await.unwrap();
}

const SLEEP_JOB: [&str; 7] = [
    "job",
    "run",
    "--template",
    "e2e-jobcli",
    "--",
    "sleep",
    "300",
];

fn anyvm_cmd(cfg: &std::path::Path, state: &std::path::Path) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_anyvm"));
    c.arg("-c").arg(cfg).env("ANYVM_STATE_DIR", state);
    c
}

/// Wait until a clone of `template` is running and its agent answers.
async fn wait_clone_running(client: &Client, template: &str) -> String {
    let until = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(n) = clones_of(client, template).await.first() {
            if let Ok(vm) = client.vm(n).await {
                if vm.exec(&anyvm::ExecRequest::new("true")).await.is_ok() {
                    return n.clone();
                }
            }
        }
        assert!(std::time::Instant::now() < until, "no running clone");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_job_run_exit_codes_signals_and_gc() {
    let _turn = GC_TURN.write().await;
    let env = env().await;
    let d = env.dir.path();
    let state = d.join("state");
    let cfg = config_with_machine(d, "e2e-jobcli", "");
    let _c = Cleanup::new(&env.client, "e2e-jobcli");
    env.fresh("e2e-jobcli").await;
    std::fs::write(d.join("in.txt"), "payload\n").unwrap();

    // The template is defined from the config on first use; the job's exit code is anyvm's.
    let o = anyvm_cmd(&cfg, &state)
        .current_dir(d)
        .args([
            "job",
            "run",
            "--template",
            "e2e-jobcli",
            "--in",
            "in.txt:/work/in.txt",
        ])
        .args(["--out", "/work/o.txt:res/o.txt", "--"])
        .args([
            "sh",
            "-c",
            "tr a-z A-Z < /work/in.txt > /work/o.txt; echo out; exit 3",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "out\n");
    assert!(
        err.contains("failed (exit 3)") && err.contains("teardown"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(d.join("res/o.txt")).unwrap(),
        "PAYLOAD\n"
    );

    let o = anyvm_cmd(&cfg, &state)
        .args([
            "--json",
            "job",
            "run",
            "--template",
            "e2e-jobcli",
            "--",
            "uname",
            "-s",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["outcome"], "succeeded");
    assert_eq!(v["stdout"], "Linux\n");
    assert!(v["phases"].as_array().unwrap().len() >= 6);

    // Bad input: exit 125-free refusal before any clone (plain anyvm error, exit 1).
    let o = anyvm_cmd(&cfg, &state)
        .args([
            "job",
            "run",
            "--template",
            "e2e-jobcli",
            "--in",
            "nope.txt:/x",
            "--",
            "true",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("nope.txt"));
    let o = anyvm_cmd(&cfg, &state)
        .args(["job", "run", "--template", "no;such", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));

    // SIGTERM (what scancel and a time limit send): the clone is removed, exit 128+15.
    let mut child = anyvm_cmd(&cfg, &state)
        .args(SLEEP_JOB)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_clone_running(&env.client, "e2e-jobcli").await;
    let t0 = std::time::Instant::now();
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(143));
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
    assert!(clones_of(&env.client, "e2e-jobcli").await.is_empty());

    // SIGKILL leaves the clone; gc (or the next job) removes it.
    let mut child = anyvm_cmd(&cfg, &state)
        .args(SLEEP_JOB)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let orphan = wait_clone_running(&env.client, "e2e-jobcli").await;
    child.kill().unwrap();
    child.wait().unwrap();
    let _co = Cleanup::new(&env.client, &orphan);
    assert_eq!(
        clones_of(&env.client, "e2e-jobcli").await,
        vec![orphan.clone()]
    );
    let o = anyvm_cmd(&cfg, &state).args(["gc"]).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.contains(&orphan) && out.contains("removed"), "{out}");
    assert!(clones_of(&env.client, "e2e-jobcli").await.is_empty());

    // An sbatch script for the same job execs anyvm with absolute paths.
    let o = anyvm_cmd(&cfg, &state)
        .current_dir(d)
        .args([
            "job",
            "sbatch",
            "--template",
            "e2e-jobcli",
            "--time",
            "00:05:00",
        ])
        .args(["--in", "in.txt:/work/in.txt", "--", "cat", "/work/in.txt"])
        .output()
        .unwrap();
    let script = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{script}");
    assert!(script.contains("#SBATCH --time=00:05:00"), "{script}");
    assert!(script.contains("#SBATCH --mem=320M"), "{script}");
    assert!(
        script.contains(&format!("--in {}:/work/in.txt", d.join("in.txt").display())),
        "{script}"
    );
    assert!(script.contains("job run --template e2e-jobcli"), "{script}");
    env.client
        .vm("e2e-jobcli")
        .await
        .unwrap()
        .destroy()
        .await
        .unwrap();
}

/// `--profile`: the profile's resources are verified from inside the clone before anything is
/// staged or run; a missing one ends the job in the check phase, with the clone removed.
#[tokio::test(flavor = "multi_thread")]
async fn profile_resources_are_checked_before_the_command() {
    let _turn = GC_TURN.read().await;
    let env = env().await;
    let d = env.dir.path();
    let state = d.join("state");
    // A service on the host, reached from a NAT guest at 10.0.2.2.
    let up = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let up_port = up.local_addr().unwrap().port();
    std::thread::spawn(move || for _ in up.incoming() {});
    let down_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    // One profile per machine: two machines on their own disks.
    let profile = |machine: &str, name: &str, extra: &str| {
        let sub = d.join(name);
        std::fs::create_dir_all(&sub).unwrap();
        config_with_machine(
            &sub,
            machine,
            &format!(
                "[profiles.{name}]\nmachine = \"{machine}\"\ncheck_accounts = false\n\
                 resources.svc = {{ kind = \"tcp\", host = \"10.0.2.2\", port = {up_port} }}\n{extra}"
            ),
        )
    };
    let cfg_ok = profile("e2e-jobprof", "ok", "");
    let cfg_missing = profile(
        "e2e-jobprof2",
        "missing",
        &format!(
            "resources.gone = {{ kind = \"tcp\", host = \"10.0.2.2\", port = {down_port} }}\n"
        ),
    );
    let _c = Cleanup::new(&env.client, "e2e-jobprof");
    let _c2 = Cleanup::new(&env.client, "e2e-jobprof2");
    env.fresh("e2e-jobprof").await;
    env.fresh("e2e-jobprof2").await;

    let o = anyvm_cmd(&cfg_ok, &state)
        .args([
            "--json",
            "job",
            "run",
            "--profile",
            "ok",
            "--",
            "echo",
            "ran",
        ])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(o.status.code(), Some(0), "{v:#}");
    assert_eq!(v["stdout"], "ran\n");
    assert_eq!(v["check"]["ok"], true);
    assert!(v["phases"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["phase"] == "check"));

    let o = anyvm_cmd(&cfg_missing, &state)
        .args([
            "--json",
            "job",
            "run",
            "--profile",
            "missing",
            "--",
            "echo",
            "ran",
        ])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(o.status.code(), Some(125), "{v:#}");
    assert_eq!(v["error"]["phase"], "check");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("gone"),
        "{v:#}"
    );
    assert_eq!(v["stdout"], "", "the command must not run");
    assert!(clones_of(&env.client, "e2e-jobprof2").await.is_empty());

    // A profile of another machine than --template is refused up front.
    let o = anyvm_cmd(&cfg_ok, &state)
        .args([
            "job",
            "run",
            "--template",
            "other",
            "--profile",
            "ok",
            "--",
            "true",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("e2e-jobprof"));
    env.client
        .vm("e2e-jobprof")
        .await
        .unwrap()
        .destroy()
        .await
        .unwrap();
}
