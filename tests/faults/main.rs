//! Fault drills: things break on purpose under a running session, and each drill records what
//! the user saw: a typed error naming VM, operation and cause within a bound, then normal
//! service, nothing lost, nothing left behind. Prints a summary table (drill, trials, survived,
//! data lost, leaked) and fails when any trial did not survive.
//!
//! `cargo test -p anyvm --test faults` (part of scripts/test.sh). Each drill is bounded in time.

#[path = "../e2e/common.rs"]
mod common;
mod drills;

use std::time::{Duration, Instant};

/// What one drill found.
#[derive(Debug, Default)]
pub struct Tally {
    pub trials: u32,
    pub survived: u32,
    /// Trials after which data the user had was gone or corrupt (a lease store that is no longer
    /// valid JSON, a file that came out different).
    pub lost: u32,
    /// Objects left behind: processes, leases, disks, domains.
    pub leaked: u32,
    /// What went wrong, one line per failed trial.
    pub failures: Vec<String>,
    /// Every trial's name, in order (names carry measured figures).
    pub names: Vec<String>,
}

impl Tally {
    /// Record one trial: `Ok` survived, `Err(why)` did not.
    pub fn trial(&mut self, name: &str, r: Result<(), String>) {
        self.trials += 1;
        self.names.push(name.to_string());
        match r {
            Ok(()) => self.survived += 1,
            Err(why) => self.failures.push(format!("{name}: {why}")),
        }
    }
}

type Drill = (
    &'static str,
    Duration,
    fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Tally> + Send>>,
);

fn main() {
    // A worker process of the port-contention drill.
    if let Ok(role) = std::env::var(drills::ports::WORKER_ENV) {
        drills::ports::worker(&role);
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let drills: Vec<Drill> = vec![
        (
            "parsers fuzzed (0 panics, exact round trips)",
            Duration::from_secs(120),
            || Box::pin(drills::parsers::fuzzed()),
        ),
        (
            "hung VBoxManage, every operation",
            Duration::from_secs(120),
            || Box::pin(drills::hung::virtualbox()),
        ),
        (
            "hung vmrun, every operation",
            Duration::from_secs(120),
            || Box::pin(drills::hung::vmware()),
        ),
        ("VBoxManage lock errors", Duration::from_secs(60), || {
            Box::pin(drills::hung::lock_errors())
        }),
        (
            "port contention, 8 processes x 50",
            Duration::from_secs(120),
            || Box::pin(drills::ports::contention()),
        ),
        (
            "port contention with 3 VMs started at once",
            Duration::from_secs(300),
            || Box::pin(drills::ports::vms_under_contention()),
        ),
        (
            "secrets in argv, environment, logs, errors",
            Duration::from_secs(180),
            || Box::pin(drills::secrets::sampled()),
        ),
        (
            "disk full in the state dir",
            Duration::from_secs(60),
            || Box::pin(drills::disk_full::state_dir()),
        ),
        (
            "disk full in the clone directory",
            Duration::from_secs(120),
            || Box::pin(drills::disk_full::clone_dir()),
        ),
        (
            "libvirtd restarted between and during calls",
            Duration::from_secs(400),
            || Box::pin(drills::libvirtd_restart::restarted()),
        ),
        (
            "guest agent frozen during exec and readiness",
            Duration::from_secs(300),
            || Box::pin(drills::agent_frozen::frozen()),
        ),
        (
            "anyvm job run/clone/up SIGKILLed at every phase",
            Duration::from_secs(900),
            || Box::pin(drills::killed::killed()),
        ),
        (
            "QEMU killed during exec, wait, copy, snapshot",
            Duration::from_secs(600),
            || Box::pin(drills::qemu_killed::killed()),
        ),
    ];
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let mut rows = Vec::new();
    for (name, limit, run) in drills {
        if filter.as_ref().is_some_and(|f| !name.contains(f.as_str())) {
            continue;
        }
        let started = Instant::now();
        let tally = rt.block_on(async {
            match tokio::time::timeout(limit, run()).await {
                Ok(t) => t,
                Err(_) => Tally {
                    trials: 1,
                    failures: vec![format!("the drill did not finish within {limit:?}")],
                    ..Default::default()
                },
            }
        });
        eprintln!("drill '{name}': {:.1}s", started.elapsed().as_secs_f64());
        for n in &tally.names {
            eprintln!("  trial: {n}");
        }
        rows.push((name, tally));
    }
    println!();
    println!(
        "{:<46} {:>6} {:>8} {:>9} {:>7}",
        "drill", "trials", "survived", "data lost", "leaked"
    );
    let (mut ok, mut bad) = (0, 0);
    for (name, t) in &rows {
        println!(
            "{:<46} {:>6} {:>8} {:>9} {:>7}",
            name, t.trials, t.survived, t.lost, t.leaked
        );
        if t.survived == t.trials && t.lost == 0 && t.leaked == 0 {
            ok += 1;
        } else {
            bad += 1;
        }
    }
    for (_, t) in &rows {
        for f in &t.failures {
            println!("  FAILED {f}");
        }
    }
    let trials: u32 = rows.iter().map(|(_, t)| t.trials).sum();
    let survived: u32 = rows.iter().map(|(_, t)| t.survived).sum();
    println!(
        "faults: {survived}/{trials} trials survived ({:.0}%)",
        100.0 * f64::from(survived) / f64::from(trials.max(1))
    );
    println!("{ok} passed, {bad} failed");
    if bad > 0 {
        std::process::exit(1);
    }
}
