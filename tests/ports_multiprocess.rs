//! Auto ports are distinct across processes, not only threads: this test re-runs its own binary
//! as several child processes that allocate from one registry at the same moment.

use std::collections::HashSet;
use std::process::Command;

use anyvm::ports::PortAllocator;
use anyvm::Protocol;

const CHILD_ENV: &str = "ANYVM_PORTS_CHILD_DIR";

#[test]
fn child_allocates() {
    // Only does work when started by `processes_get_distinct_ports`.
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let a = PortAllocator::new(dir, 42000..=42099);
    let me = std::process::id();
    for i in 0..4 {
        let p = a
            .allocate(
                "test",
                &format!("vm-{me}-{i}"),
                "forward:ssh",
                "127.0.0.1",
                Protocol::Tcp,
            )
            .unwrap();
        println!("PORT {p}");
    }
}

#[test]
fn processes_get_distinct_ports() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..8)
        .map(|_| {
            Command::new(&exe)
                .args([
                    "--exact",
                    "child_allocates",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD_ENV, dir.path())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut ports = Vec::new();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success());
        ports.extend(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                // The harness may print "test child_allocates ... " on the same line first.
                .filter_map(|l| {
                    l.split_once("PORT ")
                        .map(|(_, p)| p.trim().parse::<u16>().unwrap())
                }),
        );
    }
    assert_eq!(ports.len(), 32);
    let distinct: HashSet<_> = ports.iter().collect();
    assert_eq!(distinct.len(), 32, "duplicate ports handed out: {ports:?}");
    let leases = PortAllocator::new(dir.path(), 42000..=42099)
        .leases()
        .unwrap();
    assert_eq!(leases.len(), 32);
}
