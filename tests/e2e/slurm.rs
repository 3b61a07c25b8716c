//! VM jobs under a real Slurm: sbatch scripts written by `anyvm job sbatch`, several jobs at
//! once on the single node, and Slurm's own ends (scancel, the time limit) removing the VM.

mod common;
#[path = "../support/slurm.rs"]
mod slurm;

use std::time::{Duration, Instant};

use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn slurm_jobs_run_vms_and_scancel_removes_them() {
    let env = env().await;
    let d = env.dir.path();
    let state = d.join("state");
    let cfg = config_with_machine(d, "e2e-slurm", "cpus = 1");
    let _c = Cleanup::new(&env.client, "e2e-slurm");
    env.fresh("e2e-slurm").await;
    let slurm = slurm::Slurm::start();
    let results = d.join("results");

    // `anyvm job sbatch` writes the script; Slurm runs it.
    let script = |name: &str, extra: &[&str], argv: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_anyvm"))
            .arg("-c")
            .arg(&cfg)
            .env("ANYVM_STATE_DIR", &state)
            .current_dir(d)
            .args([
                "job",
                "sbatch",
                "--template",
                "e2e-slurm",
                "--job-name",
                name,
            ])
            .arg(format!("--output={}/{name}.log", d.display()))
            .args(extra)
            .arg("--")
            .args(argv)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let p = d.join(format!("{name}.sh"));
        std::fs::write(&p, &o.stdout).unwrap();
        p
    };
    let envs = [("ANYVM_STATE_DIR", state.to_str().unwrap())];
    let mut ids = Vec::new();
    for i in 0..3 {
        let out = format!("/work/r.txt:{}/r{i}.txt", results.display());
        let p = script(
            &format!("mc{i}"),
            &["--out", &out],
            &[
                "sh",
                "-c",
                &format!("mkdir -p /work && echo event-batch-{i} > /work/r.txt"),
            ],
        );
        ids.push(slurm.sbatch(&p, &envs));
    }
    // A job over its time limit: Slurm signals it, anyvm removes its VM.
    let p = script("overtime", &["--time", "1"], &["sleep", "600"]);
    let overtime = slurm.sbatch(&p, &envs);

    for (i, id) in ids.iter().enumerate() {
        let (st, code) = slurm.wait(*id, Duration::from_secs(300));
        assert_eq!(
            (st.as_str(), code.as_str()),
            ("COMPLETED", "0:0"),
            "job {id}: {}",
            std::fs::read_to_string(d.join(format!("mc{i}.log"))).unwrap_or_default()
        );
        assert_eq!(
            std::fs::read_to_string(results.join(format!("r{i}.txt"))).unwrap(),
            format!("event-batch-{i}\n")
        );
    }

    // scancel of a running job: its VM goes away.
    let p = script("cancelme", &[], &["sleep", "600"]);
    let id = slurm.sbatch(&p, &envs);
    // Its clone: the one whose owner pid is one of the job's processes.
    let until = Instant::now() + Duration::from_secs(180);
    let clone = 'found: loop {
        assert!(Instant::now() < until, "cancelme never ran its VM");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let o = slurm
            .cmd("scontrol")
            .args(["listpids", &id.to_string()])
            .output()
            .unwrap();
        let pids: Vec<String> = String::from_utf8_lossy(&o.stdout)
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next().map(String::from))
            .collect();
        for n in clones_of(&env.client, "e2e-slurm").await {
            let Ok(vm) = env.client.vm(&n).await else {
                continue;
            };
            let owner = vm
                .spec()
                .await
                .ok()
                .flatten()
                .and_then(|s| s.labels.get("anyvm.job/owner-pid").cloned());
            if owner.is_some_and(|p| pids.contains(&p))
                && vm.exec(&anyvm::ExecRequest::new("true")).await.is_ok()
            {
                break 'found n;
            }
        }
    };
    let t0 = Instant::now();
    let o = slurm.cmd("scancel").arg(id.to_string()).output().unwrap();
    assert!(o.status.success());
    let (st, _) = slurm.wait(id, Duration::from_secs(60));
    assert_eq!(st, "CANCELLED");
    while env.client.vm(&clone).await.is_ok() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "clone {clone} survived scancel"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = std::fs::read_to_string(d.join("cancelme.log")).unwrap_or_default();
    assert!(
        log.contains("stopping the job and removing its VM"),
        "{log}"
    );

    let (st, _) = slurm.wait(overtime, Duration::from_secs(240));
    assert_eq!(st, "TIMEOUT");
    let until = Instant::now() + Duration::from_secs(30);
    while !clones_of(&env.client, "e2e-slurm").await.is_empty() {
        assert!(Instant::now() < until, "the overtime job's clone survived");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = std::fs::read_to_string(d.join("overtime.log")).unwrap_or_default();
    assert!(log.contains("cancelled"), "{log}");
    drop(slurm);
    env.client
        .vm("e2e-slurm")
        .await
        .unwrap()
        .destroy()
        .await
        .unwrap();
}
