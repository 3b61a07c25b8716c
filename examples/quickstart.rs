//! Boot a kernel + initrd guest, wait until its agent answers, run `uname -a`, stop it.
//! `cargo run --example quickstart -- /path/vmlinuz /path/initrd.img`

use std::time::Duration;

use anyvm::{
    Accel, Boot, Client, ExecRequest, ForwardSpec, ReadySpec, StopOptions, VmName, VmSpec,
};

#[tokio::main]
async fn main() -> anyvm::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (kernel, initrd) = match args.as_slice() {
        [_, k, i] => (k.clone(), i.clone()),
        _ => {
            eprintln!("usage: quickstart KERNEL INITRD   (tests/guest/build-guest.sh builds both)");
            std::process::exit(2);
        }
    };
    let client = Client::connect("libvirt:qemu:///system").await?;
    let mut spec = VmSpec::new(
        VmName::new("anyvm-quickstart")?,
        Boot::Kernel {
            kernel: kernel.into(),
            initrd: Some(initrd.into()),
            cmdline: "console=ttyS0 quiet".into(),
        },
    );
    spec.memory_mib = 256;
    spec.accel = Accel::Tcg;
    spec.forwards.push(ForwardSpec::new("ssh", 22));

    let vm = client
        .up(
            spec,
            &ReadySpec::default().timeout(Duration::from_secs(120)),
        )
        .await?;
    let out = vm.exec(&ExecRequest::new("uname").arg("-a")).await?;
    print!("{}", out.stdout_str());
    for f in vm.forwards().await? {
        println!("forward: {f}");
    }
    vm.stop(StopOptions::default()).await?;
    vm.destroy().await?;
    Ok(())
}
