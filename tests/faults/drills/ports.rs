//! Port contention: 8 processes allocate 50 forward ports each, all at once, from one state
//! dir and a range with little slack: no port is handed out twice, and releasing leaves no lease.

use std::collections::BTreeSet;
use std::process::Command;

use anyvm::ports::PortAllocator;
use anyvm::Protocol;

use crate::Tally;

/// Set in a worker process: `DIR:ID`.
pub const WORKER_ENV: &str = "ANYVM_FAULTS_PORT_WORKER";
const PROCS: usize = 8;
const EACH: usize = 50;

/// A worker: 50 allocations, one VM name each, ports printed one per line.
pub fn worker(role: &str) {
    let (dir, id) = role.rsplit_once(':').expect("DIR:ID");
    let ports = PortAllocator::new(dir, 41000..=41449);
    for i in 0..EACH {
        match ports.allocate(
            "drill",
            &format!("w{id}-{i}"),
            "forward:ssh",
            "127.0.0.1",
            Protocol::Tcp,
        ) {
            Ok(p) => println!("{p}"),
            Err(e) => println!("error {e}"),
        }
    }
}

/// The drill.
pub async fn contention() -> Tally {
    let dir = tempfile::tempdir().unwrap();
    let me = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..PROCS)
        .map(|id| {
            Command::new(&me)
                .env(WORKER_ENV, format!("{}:{id}", dir.path().display()))
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut t = Tally::default();
    let mut all = Vec::new();
    let mut errors = Vec::new();
    for c in children {
        let out = c.wait_with_output().unwrap();
        for l in String::from_utf8_lossy(&out.stdout).lines() {
            match l.parse::<u16>() {
                Ok(p) => all.push(p),
                Err(_) => errors.push(l.to_string()),
            }
        }
    }
    let distinct: BTreeSet<u16> = all.iter().copied().collect();
    let collisions = all.len() - distinct.len();
    t.trial(
        "400 allocations",
        if all.len() == PROCS * EACH && errors.is_empty() {
            Ok(())
        } else {
            Err(format!("{} ports, errors: {:?}", all.len(), errors.first()))
        },
    );
    t.trial(
        "0 collisions",
        if collisions == 0 {
            Ok(())
        } else {
            Err(format!("{collisions} ports handed out twice"))
        },
    );
    let ports = PortAllocator::new(dir.path(), 41000..=41449);
    let held = ports.leases().map(|l| l.len()).unwrap_or(usize::MAX);
    t.trial(
        "every lease recorded",
        if held == PROCS * EACH {
            Ok(())
        } else {
            Err(format!("{held} leases recorded"))
        },
    );
    for id in 0..PROCS {
        for i in 0..EACH {
            let _ = ports.release("drill", &format!("w{id}-{i}"), None);
        }
    }
    let left = ports.leases().map(|l| l.len()).unwrap_or(usize::MAX);
    t.leaked += left as u32;
    t.trial(
        "0 leases left after release",
        if left == 0 {
            Ok(())
        } else {
            Err(format!("{left} leases left"))
        },
    );
    t
}
