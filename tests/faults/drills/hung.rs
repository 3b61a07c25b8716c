//! Hung hypervisor tools (the fakes' `hang` switch: the tool and a child sleep forever): every
//! operation fails with a typed Timeout naming VM and operation within its deadline + 1 s, the
//! tool's whole process group is gone, and the same operation works once the tool answers.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::time::{Duration, Instant};

use anyvm::{Client, Credentials, ErrorKind, ExecRequest, Secret, SecretSource, StopOptions, Vm};

use super::{gone_within, virtualbox_vm, vmware_vm, FakeVm};
use crate::Tally;

/// The backends' deadlines in the drill: ordinary calls, and calls that copy disks or files
/// (snapshots, clones, guest copies).
const CALL: Duration = Duration::from_secs(1);
const LONG: Duration = Duration::from_secs(2);

type Op = Box<
    dyn Fn(Vm, Client) -> Pin<Box<dyn Future<Output = anyvm::Result<()>> + Send>> + Send + Sync,
>;

/// One operation under a hung tool: (name, the tool's subcommand that hangs, its deadline, call).
struct Case {
    name: &'static str,
    sub: &'static str,
    deadline: Duration,
    op: Op,
}

fn case<F, Fut>(name: &'static str, sub: &'static str, deadline: Duration, f: F) -> Case
where
    F: Fn(Vm, Client) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyvm::Result<()>> + Send + 'static,
{
    Case {
        name,
        sub,
        deadline,
        op: Box::new(move |v, c| Box::pin(f(v, c))),
    }
}

fn creds() -> Credentials {
    Credentials::user("mc").password(SecretSource::Value(Secret::new("secret")))
}

/// A fresh snapshot name per call: a hung `snapshot` must be the take, not a clean-up.
fn next_snapshot() -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    format!(
        "drill{}",
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// Run every case with its subcommand hung, then again with the tool answering.
async fn drill(home: &Path, vm: &Vm, client: &Client, cases: Vec<Case>) -> Tally {
    let mut t = Tally::default();
    for c in cases {
        std::fs::write(
            home.join("faults.json"),
            format!(r#"{{"hang": ["{}"]}}"#, c.sub),
        )
        .unwrap();
        let _ = std::fs::remove_file(home.join("hung.pids"));
        let started = Instant::now();
        let r = (c.op)(vm.clone(), client.clone()).await;
        let took = started.elapsed();
        std::fs::write(home.join("faults.json"), "{}").unwrap();
        let mut verdict = match &r {
            Ok(()) => Err("succeeded against a hung tool".to_string()),
            Err(e) if e.kind() != ErrorKind::Timeout => Err(format!("not a Timeout: {e}")),
            Err(_) if took > c.deadline + Duration::from_secs(1) => {
                Err(format!("took {took:?}, deadline {:?} + 1 s", c.deadline))
            }
            Err(e) if c.name != "list" && !e.to_string().contains(vm.name().as_str()) => {
                Err(format!("the message does not name the VM: {e}"))
            }
            Err(_) => Ok(()),
        };
        // The hung tool and its child: killed as a group.
        let pids = std::fs::read_to_string(home.join("hung.pids")).unwrap_or_default();
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            if !gone_within(pid, Duration::from_secs(1)).await {
                t.leaked += 1;
                verdict = verdict.and(Err(format!("process {pid} outlived the timeout")));
            }
        }
        if pids.trim().is_empty() && verdict.is_ok() {
            verdict = Err("the tool never hung (the fault was not hit)".into());
        }
        // Normal service afterwards.
        if verdict.is_ok() {
            if let Err(e) = (c.op)(vm.clone(), client.clone()).await {
                verdict = Err(format!("failed again once the tool answered: {e}"));
            }
        }
        t.trial(c.name, verdict);
    }
    t
}

/// Every VirtualBox operation anyvm makes through VBoxManage.
pub async fn virtualbox() -> Tally {
    let FakeVm {
        dir,
        home,
        client,
        vm,
    } = virtualbox_vm("hung-vb", 48500..=48599, "{}", |o| {
        o.call_timeout = CALL;
        o.long_timeout = LONG;
    })
    .await;
    let vm = vm.with_credentials(creds());
    vm.start().await.unwrap();
    let src = dir.path().join("in.txt");
    std::fs::write(&src, b"data").unwrap();
    let guest = dir.path().join("in-guest.txt").display().to_string();
    let exec_limit = Duration::from_secs(1);
    let cases = vec![
        case("state", "showvminfo", CALL, |v, _| async move {
            v.state().await.map(|_| ())
        }),
        case("list", "list", CALL, |_, c| async move {
            c.list().await.map(|_| ())
        }),
        case("pause", "controlvm", CALL, |v, _| async move {
            v.pause().await?;
            v.resume().await
        }),
        case("snapshot take", "snapshot", LONG, |v, _| async move {
            v.snapshot_take(&next_snapshot(), "").await
        }),
        case(
            "copy to the guest",
            "guestcontrol",
            Duration::from_secs(2),
            move |v, _| {
                let (src, guest) = (src.clone(), guest.clone());
                async move { v.copy_to(&src, &guest).await.map(|_| ()) }
            },
        ),
        // guestcontrol run: VBoxManage gets the guest timeout, anyvm adds 15 s for its report.
        case(
            "exec",
            "guestcontrol",
            exec_limit + Duration::from_secs(15),
            move |v, _| async move {
                v.exec(&ExecRequest::new("true").timeout(exec_limit))
                    .await
                    .map(|_| ())
            },
        ),
        case("power off", "controlvm", CALL, |v, _| async move {
            v.stop(StopOptions {
                force: true,
                ..Default::default()
            })
            .await?;
            v.start().await
        }),
        case("start", "startvm", CALL, |v, _| async move {
            v.stop(StopOptions {
                force: true,
                ..Default::default()
            })
            .await?;
            v.start().await
        }),
    ];
    let t = drill(&home, &vm, &client, cases).await;
    let _ = vm.destroy().await;
    t
}

/// Every VMware operation anyvm makes through vmrun.
pub async fn vmware() -> Tally {
    let FakeVm {
        dir,
        home,
        client,
        vm,
    } = vmware_vm("hung-vw", 48600..=48699, "{}", |o| {
        o.call_timeout = CALL;
        o.long_timeout = LONG;
    })
    .await;
    let vm = vm.with_credentials(creds());
    vm.start().await.unwrap();
    let src = dir.path().join("in.txt");
    std::fs::write(&src, b"data").unwrap();
    let guest = dir.path().join("in-guest.txt").display().to_string();
    let cases = vec![
        case("state", "list", CALL, |v, _| async move {
            v.state().await.map(|_| ())
        }),
        case("snapshot take", "snapshot", LONG, |v, _| async move {
            v.snapshot_take(&next_snapshot(), "").await
        }),
        case("pause", "pause", CALL, |v, _| async move {
            v.pause().await?;
            v.resume().await
        }),
        case(
            "copy to the guest",
            "copyFileFromHostToGuest",
            LONG,
            move |v, _| {
                let (src, guest) = (src.clone(), guest.clone());
                async move { v.copy_to(&src, &guest).await.map(|_| ()) }
            },
        ),
        case(
            "exec",
            "runProgramInGuest",
            Duration::from_secs(1),
            |v, _| async move {
                v.exec(&ExecRequest::new("/bin/true").timeout(Duration::from_secs(1)))
                    .await
                    .map(|_| ())
            },
        ),
        case("power off", "stop", CALL, |v, _| async move {
            v.stop(StopOptions {
                force: true,
                ..Default::default()
            })
            .await?;
            v.start().await
        }),
        case("start", "start", CALL, |v, _| async move {
            v.stop(StopOptions {
                force: true,
                ..Default::default()
            })
            .await?;
            v.start().await
        }),
    ];
    let t = drill(&home, &vm, &client, cases).await;
    let _ = vm.destroy().await;
    t
}

/// "Already locked" answers are retried, then reported as Busy; the next call works.
pub async fn lock_errors() -> Tally {
    let FakeVm {
        dir: _dir,
        home,
        vm,
        ..
    } = virtualbox_vm("locked-vb", 48700..=48799, "{}", |_| {}).await;
    let mut t = Tally::default();
    std::fs::write(home.join("faults.json"), r#"{"lock_failures": 2}"#).unwrap();
    let r = vm.start().await;
    t.trial(
        "2 lock errors, then the lock",
        r.map_err(|e| format!("not retried: {e}")),
    );
    std::fs::write(home.join("faults.json"), r#"{"lock_failures": 100}"#).unwrap();
    let r = match vm.pause().await {
        Err(e) if e.kind() == ErrorKind::Busy && e.to_string().contains("locked-vb") => Ok(()),
        Err(e) => Err(format!("not Busy naming the VM: {e}")),
        Ok(()) => Err("succeeded while locked".into()),
    };
    t.trial("locked for good: Busy", r);
    std::fs::write(home.join("faults.json"), "{}").unwrap();
    t.trial(
        "unlocked: works again",
        vm.pause().await.map_err(|e| e.to_string()),
    );
    let _ = vm.destroy().await;
    t
}
