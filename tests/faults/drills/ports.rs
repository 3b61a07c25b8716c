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

const RANGE: std::ops::RangeInclusive<u16> = 41000..=41449;

/// A worker: `EACH` allocations (or as many as the role says), one VM name each, ports
/// printed one per line.
pub fn worker(role: &str) {
    let mut parts = role.rsplitn(4, ':');
    let (id, range, count, dir) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(id), Some(r), Some(n), Some(dir)) => {
            let (lo, hi) = r.split_once('-').expect("LO-HI");
            (
                id,
                lo.parse().unwrap()..=hi.parse().unwrap(),
                n.parse().unwrap(),
                dir,
            )
        }
        _ => {
            let (dir, id) = role.rsplit_once(':').expect("DIR:ID");
            (id, RANGE, EACH, dir)
        }
    };
    let ports = PortAllocator::new(dir, range);
    for i in 0..count {
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
    let ports = PortAllocator::new(dir.path(), RANGE);
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

/// VMs brought up by three `anyvm up` processes at once, while six processes take leases from
/// the same state dir and range and two ports of it are held by programs anyvm knows nothing
/// of: every VM gets its own port, QEMU can bind it (its sshd answers there), no lease is
/// shared, and destroying and releasing leaves none.
pub async fn vms_under_contention() -> Tally {
    use std::io::Read;
    const LO: u16 = 41500;
    const HI: u16 = 41599;
    const WORKERS: usize = 6;
    const LEASES: usize = 12;
    let mut t = Tally::default();
    let g = crate::common::guest();
    let dir = tempfile::Builder::new()
        .prefix("anyvm-faults-ports-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let d = dir.path();
    let state = d.join("state");
    let names = ["fk-port-a", "fk-port-b", "fk-port-c"];
    let mut cfg = format!("backend = \"libvirt:qemu:///system\"\nport_range = [{LO}, {HI}]\n");
    for n in names {
        std::fs::copy(g.dir.join("data.qcow2"), d.join(format!("{n}.qcow2"))).unwrap();
        cfg.push_str(&format!(
            "[machines.{n}]\nmemory_mib = 192\naccel = \"tcg\"\nkernel = \"{k}\"\ninitrd = \"{i}\"\n\
             cmdline = \"console=ttyS0 quiet\"\ndisks = [{{ path = \"{disk}\" }}]\n\
             forwards = [{{ name = \"ssh\", guest_port = 22 }}]\n",
            k = g.kernel().display(),
            i = g.initrd().display(),
            disk = d.join(format!("{n}.qcow2")).display(),
        ));
    }
    std::fs::write(d.join("anyvm.toml"), cfg).unwrap();
    // Squatters: listening, unknown to anyvm.
    let squat: Vec<std::net::TcpListener> = (LO..=HI)
        .filter_map(|p| std::net::TcpListener::bind(("0.0.0.0", p)).ok())
        .take(2)
        .collect();
    let squatted: BTreeSet<u16> = squat
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect();
    let me = std::env::current_exe().unwrap();
    let workers: Vec<_> = (0..WORKERS)
        .map(|id| {
            Command::new(&me)
                .env(
                    WORKER_ENV,
                    format!("{}:{LEASES}:{LO}-{HI}:{id}", state.display()),
                )
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let ups: Vec<_> = names
        .iter()
        .map(|n| {
            Command::new(env!("CARGO_BIN_EXE_anyvm"))
                .arg("-c")
                .arg(d.join("anyvm.toml"))
                .args(["up", n])
                .env("ANYVM_STATE_DIR", &state)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut worker_ports = Vec::new();
    for c in workers {
        let out = c.wait_with_output().unwrap();
        worker_ports.extend(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| l.parse::<u16>().ok()),
        );
    }
    let mut up_errors = Vec::new();
    for (n, c) in names.iter().zip(ups) {
        let out = c.wait_with_output().unwrap();
        if !out.status.success() {
            up_errors.push(format!(
                "{n}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    t.trial(
        "3 VMs up at once beside 6 x 12 allocations",
        if up_errors.is_empty() && worker_ports.len() == WORKERS * LEASES {
            Ok(())
        } else {
            Err(format!(
                "{} worker ports; up: {up_errors:?}",
                worker_ports.len()
            ))
        },
    );
    let client = anyvm::Client::connect_with(
        "libvirt:qemu:///system",
        anyvm::ClientOptions::default()
            .state_dir(&state)
            .port_range(LO..=HI),
    )
    .await
    .expect("libvirtd");
    let mut vm_ports = Vec::new();
    for n in names {
        if let Ok(vm) = client.vm(n).await {
            for f in vm.forwards().await.unwrap_or_default() {
                vm_ports.push((n, f.host_port));
            }
        }
    }
    let mut everyone: Vec<u16> = worker_ports.clone();
    everyone.extend(vm_ports.iter().map(|(_, p)| *p));
    let distinct: BTreeSet<u16> = everyone.iter().copied().collect();
    let on_squatters: Vec<u16> = distinct.intersection(&squatted).copied().collect();
    t.trial(
        &format!(
            "0 collisions among {} ports, none on the 2 held by others",
            everyone.len()
        ),
        if distinct.len() == everyone.len() && on_squatters.is_empty() && vm_ports.len() == 3 {
            Ok(())
        } else {
            Err(format!(
                "{} ports handed out twice; on held ports: {on_squatters:?}; VM ports {vm_ports:?}",
                everyone.len() - distinct.len()
            ))
        },
    );
    // QEMU holds each VM's port: the guest's sshd answers there.
    let mut silent = Vec::new();
    for (n, p) in &vm_ports {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let ok = loop {
            let mut banner = [0u8; 4];
            let got = std::net::TcpStream::connect(("127.0.0.1", *p)).and_then(|mut s| {
                s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
                s.read_exact(&mut banner)
            });
            if got.is_ok() && &banner == b"SSH-" {
                break true;
            }
            if std::time::Instant::now() >= deadline {
                break false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        };
        if !ok {
            silent.push(format!("{n} on {p}"));
        }
    }
    t.trial(
        "each VM's sshd answers on its own port",
        if silent.is_empty() {
            Ok(())
        } else {
            Err(format!("no ssh banner: {silent:?}"))
        },
    );
    let leases = client.ports().leases().unwrap_or_default();
    let vm_leases = leases
        .iter()
        .filter(|l| names.contains(&l.vm.as_str()))
        .count();
    t.trial(
        "every lease recorded once",
        if leases.len() == WORKERS * LEASES + 3 && vm_leases == 3 {
            Ok(())
        } else {
            Err(format!("{} leases, {vm_leases} of the VMs", leases.len()))
        },
    );
    for n in names {
        if let Ok(vm) = client.vm(n).await {
            let _ = vm.destroy().await;
        }
    }
    let ports = PortAllocator::new(&state, LO..=HI);
    for id in 0..WORKERS {
        for i in 0..LEASES {
            let _ = ports.release("drill", &format!("w{id}-{i}"), None);
        }
    }
    let left = ports.leases().map(|l| l.len()).unwrap_or(usize::MAX);
    t.leaked += left as u32;
    t.trial(
        "0 leases left after destroy and release",
        if left == 0 {
            Ok(())
        } else {
            Err(format!("{left} leases left"))
        },
    );
    drop(squat);
    t
}
