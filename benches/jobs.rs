//! Prints figures (no pass/fail) for transient jobs on this host:
//! - one job alone: wall time, host CPU time, and its phases;
//! - per-job overhead beyond the guest's own boot and run (clone + boot call + ready detection
//!   lag + teardown + the runner's own work);
//! - clone to ready cold (booting) and warm (from the template's saved state; goal warm ≤ 0.15 ×
//!   cold), the warm state's size and whether clones share its pages (KSM);
//! - N jobs (default 8, warm) through a `JobPool` of cores + 1 vCPUs (`ANYVM_BENCH_POOL_CPUS`): wall
//!   time ÷ ideal, where ideal = N × (CPU time of one warm job alone) ÷ cores. Goal: ≤ 1.10.
//!
//! `cargo bench -p anyvm --bench jobs` (needs libvirtd: scripts/setup-host.sh).
//! `ANYVM_BENCH_JOBS=N`, `ANYVM_BENCH_WORK=LOOPS` (guest busy loop length) adjust the run.

mod common;

use std::time::Instant;

use anyvm::job::pool::{Budget, JobPool};
use anyvm::job::{run_job, Cancel, JobReport, JobSpec, Outcome, Phase};
use common::{fresh_client, guest_dir, spec};

/// Busy (non-idle, non-iowait) jiffies of the whole host, in seconds.
fn host_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v[3] + v[4];
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (total - idle) as f64 / hz
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

fn phases(r: &JobReport) -> String {
    r.phases
        .iter()
        .map(|p| format!("{} {:.2}s", p.phase, p.seconds))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What the runner adds to the guest's own boot and run: everything but the ready wait (the
/// guest booting) and the run phase (the command).
fn overhead(r: &JobReport) -> f64 {
    r.seconds
        - r.phase_seconds(Phase::Ready)
        - r.phase_seconds(Phase::Run)
        - r.phase_seconds(Phase::Queue)
}

fn main() {
    let n: usize = std::env::var("ANYVM_BENCH_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let work: u64 = std::env::var("ANYVM_BENCH_WORK")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300_000);
    let g = guest_dir();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let name = "anyvm-bench-tmpl";
    let client = fresh_client(&rt, dir.path(), name);
    let mut s = spec(&g, dir.path(), name);
    s.forwards.clear();
    let template = rt.block_on(client.define(s)).unwrap();
    let job = JobSpec::new(
        name,
        &[
            "sh",
            "-c",
            &format!("i=0; while [ $i -lt {work} ]; do i=$((i+1)); done; echo $i"),
        ],
    )
    .unwrap();
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());

    // Cold first (every clone boots), then warm (clones start from the template's saved state).
    let cold_job = job.clone().cold();
    let r = rt.block_on(run_job(&client, &template, &cold_job, &Cancel::new()));
    assert_eq!(r.outcome, Outcome::Succeeded, "{r:#?}");
    let run_singles = |label: &str, job: &JobSpec| {
        let mut out = Vec::new();
        for _ in 0..3 {
            let cpu0 = host_cpu_seconds();
            let r = rt.block_on(run_job(&client, &template, job, &Cancel::new()));
            let cpu = host_cpu_seconds() - cpu0;
            assert_eq!(r.outcome, Outcome::Succeeded, "{r:#?}");
            println!(
                "{label} job: wall {:.2}s, host CPU {:.2}s  [{}]",
                r.seconds,
                cpu,
                phases(&r)
            );
            out.push((r, cpu));
        }
        out
    };
    let to_ready = |v: &[(JobReport, f64)]| {
        mean(
            &v.iter()
                .map(|s| {
                    s.0.phase_seconds(Phase::Clone)
                        + s.0.phase_seconds(Phase::Boot)
                        + s.0.phase_seconds(Phase::Ready)
                })
                .collect::<Vec<_>>(),
        )
    };
    let cold = run_singles("cold", &cold_job);
    let t_warm = Instant::now();
    let info = rt.block_on(template.warm(&job.ready)).unwrap();
    println!(
        "warm state: prepared in {:.2}s (boot to ready, save {:.2}s); memory {:.1} MiB, disks {:.1} MiB",
        t_warm.elapsed().as_secs_f64(),
        info.saved_in.map_or(0.0, |d| d.as_secs_f64()),
        info.memory_bytes as f64 / 1048576.0,
        info.disk_bytes as f64 / 1048576.0
    );
    let ksm = std::fs::read_to_string("/sys/kernel/mm/ksm/run").unwrap_or_default();
    println!(
        "  clones of one state share pages only through KSM: /sys/kernel/mm/ksm/run = {} ({})",
        ksm.trim(),
        if ksm.trim() == "1" {
            "on"
        } else {
            "off: each clone has its own copy of the memory"
        }
    );
    let singles = run_singles("warm", &job);
    let (cold_ready, warm_ready) = (to_ready(&cold), to_ready(&singles));
    println!(
        "clone to ready: cold {cold_ready:.2}s, warm {warm_ready:.2}s, warm/cold = {:.3} (goal <= 0.15)",
        warm_ready / cold_ready
    );
    let cpu1 = mean(&singles.iter().map(|s| s.1).collect::<Vec<_>>());
    let wall1 = mean(&singles.iter().map(|s| s.0.seconds).collect::<Vec<_>>());
    let over: Vec<f64> = singles.iter().map(|s| overhead(&s.0)).collect();
    let pick = |p: Phase| {
        mean(
            &singles
                .iter()
                .map(|s| s.0.phase_seconds(p))
                .collect::<Vec<_>>(),
        )
    };
    println!(
        "per-job overhead, warm (clone + boot call + stage + teardown + runner): mean {:.3}s \
         [clone {:.3}s, boot call {:.3}s, teardown {:.3}s]; ready wait {:.2}s, run {:.2}s",
        mean(&over),
        pick(Phase::Clone),
        pick(Phase::Boot),
        pick(Phase::Teardown),
        pick(Phase::Ready),
        pick(Phase::Run)
    );

    // One guest per core leaves a core idle whenever a guest waits (QEMU start-up, the
    // agent's first answer) and at the end of the queue; one extra guest fills those gaps.
    let pool_cpus: u32 = std::env::var("ANYVM_BENCH_POOL_CPUS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(Budget::host().cpus);
    let pool = JobPool::new(
        client.clone(),
        Budget {
            cpus: pool_cpus,
            ..Budget::host()
        },
    )
    .unwrap();
    let jobs: Vec<_> = (0..n).map(|_| (template.clone(), job.clone())).collect();
    let cpu0 = host_cpu_seconds();
    let t0 = Instant::now();
    let reports = rt.block_on(pool.run_all(&jobs, &Cancel::new()));
    let wall = t0.elapsed().as_secs_f64();
    let cpu = host_cpu_seconds() - cpu0;
    assert!(reports.iter().all(|r| r.outcome == Outcome::Succeeded));
    let ideal = n as f64 * cpu1 / cores as f64;
    println!(
        "{n} jobs on {cores} cores (pool of {pool_cpus} vCPUs): wall {wall:.2}s, host CPU {cpu:.2}s; \
         ideal {ideal:.2}s (= {n} x {cpu1:.2}s / {cores}); wall/ideal = {:.3} (goal <= 1.10, warm); \
         single-job wall {wall1:.2}s",
        wall / ideal
    );
    println!(
        "  mean queue wait {:.2}s, mean per-job overhead {:.3}s",
        mean(
            &reports
                .iter()
                .map(|r| r.phase_seconds(Phase::Queue))
                .collect::<Vec<_>>()
        ),
        mean(&reports.iter().map(overhead).collect::<Vec<_>>())
    );
    rt.block_on(template.destroy()).unwrap();
}
