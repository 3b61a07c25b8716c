//! One module per kind of fault.

pub mod agent_frozen;
pub mod disk_full;
pub mod hung;
pub mod killed;
pub mod libvirtd_restart;
pub mod parsers;
pub mod ports;
pub mod qemu_killed;
pub mod secrets;

use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyvm::backend::virtualbox::{VirtualBoxBackend, VirtualBoxOptions};
use anyvm::backend::vmware::{VmwareBackend, VmwareOptions};
use anyvm::{Boot, Client, ClientOptions, DiskSpec, Vm, VmName, VmSpec};

/// The repository's fakes.
pub fn fake(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fakes")
        .join(name)
}

/// Whether `pid` is gone (or a zombie about to be reaped) within `within`.
pub async fn gone_within(pid: i32, within: Duration) -> bool {
    let deadline = std::time::Instant::now() + within;
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.is_empty() || stat.contains(") Z ") {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A VM defined (not started) on a fake hypervisor; everything lives in `dir`, the fake's
/// state and fault switches in `home`.
pub struct FakeVm {
    pub dir: tempfile::TempDir,
    pub home: PathBuf,
    pub client: Client,
    pub vm: Vm,
}

/// A fake's home with `faults` written before the first call.
fn fake_home(dir: &Path, sub: &str, faults: &str) -> PathBuf {
    let home = dir.join(sub);
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(home.join("faults.json"), faults).unwrap();
    home
}

fn client_on(backend: Arc<dyn anyvm::Backend>, dir: &Path, ports: RangeInclusive<u16>) -> Client {
    Client::with_backend(
        backend,
        ClientOptions::default()
            .state_dir(dir.join("state"))
            .port_range(ports),
    )
}

/// A VirtualBox VM `name` with one VDI disk on the fake VBoxManage.
pub async fn virtualbox_vm(
    name: &str,
    ports: RangeInclusive<u16>,
    faults: &str,
    opts: impl FnOnce(&mut VirtualBoxOptions),
) -> FakeVm {
    let dir = tempfile::tempdir().unwrap();
    let home = fake_home(dir.path(), "vbox", faults);
    let mut o = VirtualBoxOptions {
        vboxmanage: Some(fake("VBoxManage")),
        console_dir: dir.path().join("console"),
        env: vec![("ANYVM_FAKE_VBOX_HOME".into(), home.display().to_string())],
        ..Default::default()
    };
    opts(&mut o);
    let client = client_on(
        Arc::new(VirtualBoxBackend::new(o).unwrap()),
        dir.path(),
        ports,
    );
    let disk = dir.path().join("d.vdi");
    std::fs::write(&disk, b"disk").unwrap();
    let mut spec = VmSpec::new(VmName::new(name).unwrap(), Boot::Disk);
    spec.disks.push(DiskSpec {
        path: disk,
        format: anyvm::DiskFormat::Vdi,
        readonly: false,
        owned: false,
    });
    let vm = client.define(spec).await.unwrap();
    FakeVm {
        dir,
        home,
        client,
        vm,
    }
}

/// A VMware VM `name` from a minimal .vmx on the fake vmrun.
pub async fn vmware_vm(
    name: &str,
    ports: RangeInclusive<u16>,
    faults: &str,
    opts: impl FnOnce(&mut VmwareOptions),
) -> FakeVm {
    let dir = tempfile::tempdir().unwrap();
    let home = fake_home(dir.path(), "vmw", faults);
    let mut o = VmwareOptions {
        vmrun: Some(fake("vmrun")),
        state_dir: dir.path().join("state"),
        env: vec![("ANYVM_FAKE_VMRUN_HOME".into(), home.display().to_string())],
        ..Default::default()
    };
    opts(&mut o);
    let client = client_on(Arc::new(VmwareBackend::new(o).unwrap()), dir.path(), ports);
    let vmdir = dir.path().join("vms").join(name);
    std::fs::create_dir_all(&vmdir).unwrap();
    let vmx = vmdir.join(format!("{name}.vmx"));
    std::fs::write(&vmx, ".encoding = \"UTF-8\"\nmemsize = \"512\"\n").unwrap();
    let spec = VmSpec::new(VmName::new(name).unwrap(), Boot::Existing { path: vmx });
    let vm = client.define(spec).await.unwrap();
    FakeVm {
        dir,
        home,
        client,
        vm,
    }
}
