//! Parser fuzzing: every reader of hypervisor output and configuration gets real samples
//! mutated (cut, spliced, duplicated lines, format tokens and odd characters inserted) and
//! random text, for a bounded time each. A trial survives with 0 panics and no input slower
//! than a second; the spec written to libvirt metadata must also read back unchanged whatever its
//! strings hold. proptest shrinks a failing input before it is printed.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyvm::fuzzing::{self, Target};
use anyvm::{Boot, DiskSpec, VmName, VmSpec};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};

use crate::Tally;

/// Seconds per target (CI keeps the default).
const SECS_ENV: &str = "ANYVM_FUZZ_SECS";
/// An input taking longer than this is reported as a hang.
const SLOW: Duration = Duration::from_secs(1);

fn fixture(name: &str) -> String {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/vboxmanage")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn example(name: &str) -> String {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Real-shaped samples per target: the fixtures captured from VBoxManage 6.1–7.2, the
/// documented vmrun formats, agent replies as qemu-ga sends them, the example configs.
fn seeds(t: Target) -> Vec<String> {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    match t {
        Target::VboxShowvminfo => {
            let mut v: Vec<String> = ["6.1", "7.0", "7.1", "7.2"]
                .iter()
                .map(|ver| fixture(&format!("showvminfo-{ver}.txt")))
                .collect();
            v.push(format!(
                "WARNING: The vboxdrv kernel module is not loaded. Either there is no module\n         available for the current kernel (6.1.0-18-amd64) or it failed to\n\n{}",
                fixture("showvminfo-7.2.txt")
            ));
            v.push("SnapshotName=\"base\"\nSnapshotUUID=\"1\"\nSnapshotName-1=\"s1\"\nSnapshotName-1-1=\"s (2)\"\nCurrentSnapshotName=\"s1\"\n".into());
            v
        }
        Target::VboxList => s(&[
            "\"sl6 build\" {0b6c1d0e-6a3f-4c1e-9f5e-3d2a1b0c9d8e}\n\"q\"uote\" {2222}\n",
            "7.2.4r170995\n",
            "WARNING: The vboxdrv kernel module is not loaded.\n6.1.50_Debianr161033\n",
            "Value: 10.0.2.15\n",
            "No value set!\n",
        ]),
        Target::VboxMedia => s(&[
            "UUID:           d0\nParent UUID:    base\nState:          created\nType:           normal (base)\nLocation:       /v/sl6.vdi\nStorage format: VDI\nCapacity:       64 MBytes\nEncryption:     disabled\nIn use by VMs:  base (UUID: B) [s1 (UUID: S1), s (2) (UUID: S2)], c (UUID: C)\nChild UUIDs:    d1\n                c1a\n\nUUID:           d1\nParent UUID:    d0\nType:           normal (differencing)\nLocation:       /v/base/Snapshots/{d1}.vdi\nStorage format: VDI\nIn use by VMs:  c1 (UUID: C1) [cs1 (UUID: CS1)]\n",
            "Extension Packs: 1\nPack no. 0:   VNC\nVersion:        7.2.22\nRevision:       175245\nEdition:        \nDescription:    VNC plugin module\nVRDE Module:    VBoxVNC\nCrypto Module:  \nUsable:         true\nWhy unusable:   \n",
        ]),
        Target::VboxErrors => s(&[
            "VBoxManage: error: Could not find a registered machine named 'x'\nVBoxManage: error: Details: code VBOX_E_OBJECT_NOT_FOUND (0x80bb0001), component VirtualBoxWrap, interface IVirtualBox, callee nsISupports\nVBoxManage: error: Context: \"FindMachine(Bstr(a->argv[0]).raw(), machine.asOutParam())\" at line 3269 of file VBoxManageInfo.cpp\n",
            "VBoxManage: error: The machine 'a' is already locked for a session (or being unlocked)\nVBoxManage: error: Details: code VBOX_E_INVALID_OBJECT_STATE (0x80bb0007)\n",
            "0%...10%...20%...30%...40%...50%...60%...70%...80%...90%...100%\n",
            "VBoxManage: error: VERR_AUTHENTICATION_FAILURE\n",
        ]),
        Target::VmrunOutput => s(&[
            "Total running VMs: 2\n/vms/a b/a.vmx\n/vms/c.vmx\n",
            "Total snapshots: 2\nclean\nafter build\n",
            "Guest program exited with non-zero exit code: 3\n",
            "Total host networks: 3\nINDEX  NAME         TYPE         DHCP         SUBNET           MASK\n0      vmnet0       bridged      false        empty            empty\n1      vmnet1       hostOnly     true         172.16.1.0       255.255.255.0\n8      vmnet8       nat          true         192.168.8.0      255.255.255.0\n",
            "Error: The virtual machine is not powered on: /vms/a.vmx\n",
            "Error: Invalid user name or password for the guest OS\n",
        ]),
        Target::Vmx => s(&[
            ".encoding = \"UTF-8\"\nconfig.version = \"8\"\nvirtualHW.version = \"19\"\ndisplayName = \"sl6 build\"\nguestOS = \"rhel6-64\"\nmemsize = \"1024\"\n# comment = \"x\"\nscsi0:0.fileName = \"sl6.vmdk\"\nannotation = \"a|0Ab|22c\"\n",
        ]),
        Target::AgentReply => s(&[
            "{\"return\": {\"pid\": 1234}}",
            "{\"return\": {\"exited\": true, \"exitcode\": 0, \"out-data\": \"aGVsbG8K\", \"err-data\": \"\", \"out-truncated\": false}}",
            "{\"return\": {\"exited\": true, \"signal\": 9}}",
            "{\"return\": {\"exited\": false}}",
            "{\"return\": {\"count\": 3, \"buf-b64\": \"YWJj\", \"eof\": false}}",
            "{\"error\": {\"class\": \"GenericError\", \"desc\": \"Guest agent command failed\"}}",
            "{\"return\": {}}",
        ]),
        Target::DomainXml => {
            let spec = sample_spec("a & <b> ]]> 'q' \"dq\"", "console=ttyS0 quiet");
            let json = serde_json::to_string(&spec).unwrap();
            let esc = json
                .replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;");
            vec![
                format!("<anyvm:spec xmlns:anyvm='https://anyvm.dev/xmlns/spec/1'>{esc}</anyvm:spec>"),
                "<domainsnapshot><name>s1</name><state>running</state><creationTime>1764760000</creationTime><memory snapshot='internal'/></domainsnapshot>".into(),
            ]
        }
        Target::Config => vec![example("anyvm.toml"), example("profiles.toml")],
    }
}

/// Format tokens and characters that break naive parsers.
const TOKENS: &[&str] = &[
    "\"",
    "=",
    "\n",
    "\r\n",
    "\\",
    "\\\"",
    "{",
    "}",
    "[",
    "]",
    "(",
    ")",
    ",",
    ":",
    " (UUID: ",
    "UUID:",
    "Parent UUID:",
    "In use by VMs:",
    "Forwarding(0)=",
    "natnet1=",
    "nic1=",
    "nic9=",
    "SnapshotName-1-1=",
    "VMState=",
    "WARNING:",
    "VBoxManage: error:",
    "Total running VMs: ",
    "Total snapshots: ",
    "Total host networks: ",
    "Error: ",
    "exit code:",
    "Pack no. 0:",
    "<",
    ">",
    "&",
    "&amp;",
    "&#0;",
    "&#xFFFFFF;",
    "&bogus;",
    "<![CDATA[",
    "]]>",
    "<!--",
    "-->",
    "<?xml version='1.0'?>",
    "\u{0}",
    "é",
    "€",
    "😀",
    "\u{feff}",
    "\u{fffd}",
    "99999999999999999999999",
    "-1",
    "0",
    "65536",
    "4294967296",
    "true",
    "null",
    "1e999",
    "{\"return\":",
    "\"buf-b64\":",
    "\"exitcode\":",
    "\"exited\": true",
    "[[machines]]",
    "[machines.a]",
    "[profiles.p]",
    "= \"",
    "'''",
    "\"\"\"",
    "port_range = \"1-0\"",
];

#[derive(Debug, Clone)]
enum Op {
    Truncate(usize),
    Delete(usize, usize),
    Insert(usize, usize),
    InsertChar(usize, char),
    DupLine(usize),
    SwapLines(usize, usize),
    Repeat(usize, usize, usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        any::<usize>().prop_map(Op::Truncate),
        (any::<usize>(), 1usize..64).prop_map(|(a, b)| Op::Delete(a, b)),
        (any::<usize>(), 0..TOKENS.len()).prop_map(|(a, b)| Op::Insert(a, b)),
        (any::<usize>(), any::<char>()).prop_map(|(a, c)| Op::InsertChar(a, c)),
        any::<usize>().prop_map(Op::DupLine),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Op::SwapLines(a, b)),
        (any::<usize>(), 1usize..32, 2usize..200).prop_map(|(a, b, n)| Op::Repeat(a, b, n)),
    ]
}

/// The char boundary at or before `at % (len + 1)`.
fn boundary(s: &str, at: usize) -> usize {
    let mut i = at % (s.len() + 1);
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn apply(mut s: String, ops: &[Op]) -> String {
    for o in ops {
        match *o {
            Op::Truncate(at) => {
                let i = boundary(&s, at);
                s.truncate(i);
            }
            Op::Delete(at, n) => {
                let a = boundary(&s, at);
                let b = boundary(&s, a + n.min(s.len() - a));
                s.replace_range(a..b.max(a), "");
            }
            Op::Insert(at, t) => {
                let i = boundary(&s, at);
                s.insert_str(i, TOKENS[t]);
            }
            Op::InsertChar(at, c) => {
                let i = boundary(&s, at);
                s.insert(i, c);
            }
            Op::DupLine(at) | Op::SwapLines(at, _) | Op::Repeat(at, _, _) => {
                let mut lines: Vec<String> = s.split_inclusive('\n').map(String::from).collect();
                if lines.is_empty() {
                    continue;
                }
                let i = at % lines.len();
                match *o {
                    Op::DupLine(_) => {
                        let l = lines[i].clone();
                        lines.insert(i, l);
                    }
                    Op::SwapLines(_, b) => {
                        let j = b % lines.len();
                        lines.swap(i, j);
                    }
                    Op::Repeat(_, len, n) => {
                        let l = &lines[i];
                        let cut = boundary(l, len.min(l.len()));
                        let piece = l[..cut].repeat(n);
                        lines.insert(i, piece);
                    }
                    _ => unreachable!(),
                }
                s = lines.concat();
            }
        }
    }
    s
}

fn inputs(t: Target) -> BoxedStrategy<String> {
    let seeds = seeds(t);
    let n = seeds.len();
    let mutated = (0..n, proptest::collection::vec(op(), 1..12))
        .prop_map(move |(i, ops)| apply(seeds[i].clone(), &ops));
    let tokens = proptest::collection::vec(0..TOKENS.len(), 0..40)
        .prop_map(|ix| ix.into_iter().map(|i| TOKENS[i]).collect::<String>());
    let random = proptest::collection::vec(any::<char>(), 0..200)
        .prop_map(|cs| cs.into_iter().collect::<String>());
    prop_oneof![8 => mutated, 1 => tokens, 1 => random].boxed()
}

fn sample_spec(label: &str, cmdline: &str) -> VmSpec {
    let mut spec = VmSpec::new(
        VmName::new("fuzz-1").unwrap(),
        Boot::Kernel {
            kernel: format!("/k/{label}").into(),
            initrd: Some("/k/initrd.img".into()),
            cmdline: cmdline.into(),
        },
    );
    spec.disks.push(DiskSpec {
        path: format!("/d/{label}.qcow2").into(),
        format: Default::default(),
        readonly: false,
        owned: true,
    });
    spec.labels.insert(label.into(), cmdline.into());
    spec
}

fn strings() -> impl Strategy<Value = String> {
    let token = (0..TOKENS.len()).prop_map(|i| TOKENS[i].to_string());
    let ch = any::<char>().prop_map(|c| c.to_string());
    proptest::collection::vec(prop_oneof![token, ch], 0..20).prop_map(|v| v.concat())
}

/// Panic messages caught while fuzzing (the default hook would print every shrink step).
static LAST_PANIC: Mutex<String> = Mutex::new(String::new());

/// Runs `check` on inputs from `strategy` until `budget` is spent; returns cases run and the
/// first failure (shrunk), if any.
fn fuzz<S: Strategy>(
    strategy: S,
    budget: Duration,
    check: impl Fn(&S::Value),
) -> (u64, Option<String>)
where
    S::Value: std::fmt::Debug,
{
    let deadline = Instant::now() + budget;
    let mut cases = 0u64;
    let slowest = Mutex::new(Duration::ZERO);
    while Instant::now() < deadline {
        let mut runner = TestRunner::new(Config {
            cases: 64,
            failure_persistence: None,
            max_shrink_iters: 2000,
            ..Config::default()
        });
        let r = runner.run(&strategy, |input| {
            let t = Instant::now();
            check(&input);
            let took = t.elapsed();
            let mut s = slowest.lock().unwrap();
            *s = (*s).max(took);
            if took > SLOW {
                return Err(TestCaseError::fail(format!("took {took:?}")));
            }
            Ok(())
        });
        cases += 64;
        match r {
            Ok(()) => {}
            Err(TestError::Fail(why, input)) => {
                let panic = LAST_PANIC.lock().unwrap().clone();
                return (
                    cases,
                    Some(
                        format!("{why} {panic} on input {input:?}")
                            .chars()
                            .take(2000)
                            .collect(),
                    ),
                );
            }
            Err(e) => return (cases, Some(e.to_string())),
        }
    }
    (cases, None)
}

pub async fn fuzzed() -> Tally {
    tokio::task::spawn_blocking(run).await.unwrap()
}

fn run() -> Tally {
    let secs: f64 = std::env::var(SECS_ENV)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let budget = Duration::from_secs_f64(secs);
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|info| {
        *LAST_PANIC.lock().unwrap() = info.to_string();
    }));
    let mut t = Tally::default();
    for target in Target::ALL {
        let (cases, failed) = fuzz(inputs(target), budget, |s| fuzzing::parse(target, s));
        let name = format!(
            "{}: {cases} inputs, {} panics",
            target.name(),
            failed.iter().count()
        );
        t.trial(&name, failed.map_or(Ok(()), Err));
    }
    let specs = (strings(), strings()).prop_map(|(a, b)| sample_spec(&a, &b));
    let (cases, failed) = fuzz(specs, budget, fuzzing::metadata_roundtrip);
    let name = format!(
        "domain metadata round trip: {cases} specs, {} changed",
        failed.iter().count()
    );
    t.trial(&name, failed.map_or(Ok(()), Err));
    std::panic::set_hook(hook);
    t
}
