//! A real single-node Slurm (munged, slurmctld, slurmd) for tests, configured in a private
//! directory through `SLURM_CONF`: no cgroups, root daemons, state and logs in the temp dir.
//! Everything it started is stopped when dropped.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Slurm {
    pub dir: tempfile::TempDir,
    pub conf: PathBuf,
    pub node: String,
    daemons: Vec<Child>,
}

fn ok(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn munge_works() -> bool {
    ok(Command::new("sh").args(["-c", "munge -n | unmunge"]))
}

impl Slurm {
    pub fn start() -> Slurm {
        let dir = tempfile::Builder::new()
            .prefix("anyvm-slurm-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let d = dir.path();
        let mut daemons = Vec::new();
        if !munge_works() {
            let key = std::path::Path::new("/etc/munge/munge.key");
            if !key.exists() {
                assert!(ok(Command::new("sh").args([
                    "-c",
                    "mkdir -p /etc/munge && head -c 128 /dev/urandom > /etc/munge/munge.key && \
                     chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key"
                ])));
            }
            assert!(ok(Command::new("sh").args([
                "-c",
                "mkdir -p /run/munge && chown munge:munge /run/munge && chmod 0755 /run/munge"
            ])));
            daemons.push(
                Command::new("setpriv")
                    .args(["--reuid=munge", "--regid=munge", "--init-groups"])
                    .args(["/usr/sbin/munged", "--foreground"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("munged (package munge)"),
            );
            let until = Instant::now() + Duration::from_secs(10);
            while !munge_works() {
                assert!(Instant::now() < until, "munged did not come up");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let node = String::from_utf8(Command::new("hostname").arg("-s").output().unwrap().stdout)
            .unwrap()
            .trim()
            .to_string();
        // slurmd's own view of the node; a hand-written line drains it.
        let probe = Command::new("slurmd")
            .arg("-C")
            .output()
            .expect("slurmd -C");
        let first = String::from_utf8_lossy(&probe.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string();
        let node_line = first
            .split_whitespace()
            .map(|w| match w.strip_prefix("RealMemory=") {
                Some(m) => format!("RealMemory={}", m.parse::<u64>().unwrap() * 95 / 100),
                None => w.to_string(),
            })
            .collect::<Vec<_>>()
            .join(" ");
        assert!(node_line.starts_with("NodeName="), "slurmd -C: {first}");
        for sub in ["state", "spool"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        let conf = d.join("slurm.conf");
        std::fs::write(
            &conf,
            format!(
                "ClusterName=anyvmtest\nSlurmctldHost={node}(127.0.0.1)\nSlurmUser=root\n\
                 SlurmdUser=root\nAuthType=auth/munge\nProctrackType=proctrack/linuxproc\n\
                 TaskPlugin=task/none\nJobAcctGatherType=jobacct_gather/none\n\
                 AccountingStorageType=accounting_storage/none\nMpiDefault=none\n\
                 MailProg=/bin/true\nSelectType=select/cons_tres\nSelectTypeParameters=CR_Core\n\
                 ReturnToService=2\nKillWait=30\nStateSaveLocation={d}/state\n\
                 SlurmdSpoolDir={d}/spool\nSlurmctldPidFile={d}/slurmctld.pid\n\
                 SlurmdPidFile={d}/slurmd.pid\nSlurmctldLogFile={d}/slurmctld.log\n\
                 SlurmdLogFile={d}/slurmd.log\n\
                 {node_line} NodeAddr=127.0.0.1 State=UNKNOWN\n\
                 PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP\n",
                d = d.display()
            ),
        )
        .unwrap();
        for argv in [&["slurmctld", "-D", "-i"][..], &["slurmd", "-D"][..]] {
            daemons.push(
                Command::new("setsid")
                    .args(argv)
                    .env("SLURM_CONF", &conf)
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(d.join(format!("{}.err", argv[0]))).unwrap())
                    .spawn()
                    .unwrap(),
            );
        }
        let s = Slurm {
            dir,
            conf,
            node,
            daemons,
        };
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let st = s
                .cmd("sinfo")
                .args(["-h", "-n", &s.node, "-o", "%T"])
                .output();
            if st.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "idle") {
                break;
            }
            assert!(Instant::now() < until, "slurm node never became idle");
            std::thread::sleep(Duration::from_millis(200));
        }
        s
    }

    /// A Slurm client command bound to this cluster.
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("SLURM_CONF", &self.conf);
        c
    }

    /// Submit a script; returns the job id.
    pub fn sbatch(&self, script: &std::path::Path, envs: &[(&str, &str)]) -> u32 {
        let mut c = self.cmd("sbatch");
        c.arg("--parsable").arg(script);
        for (k, v) in envs {
            c.env(k, v);
        }
        let o = c.output().unwrap();
        assert!(
            o.status.success(),
            "sbatch: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout)
            .trim()
            .split(';')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    }

    /// JobState of a job (`PENDING`, `RUNNING`, `COMPLETED`, `FAILED`, `CANCELLED`, `TIMEOUT`...)
    /// and its exit code `N:S`.
    pub fn state(&self, id: u32) -> (String, String) {
        let o = self
            .cmd("scontrol")
            .args(["-o", "show", "job", &id.to_string()])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&o.stdout);
        let field = |k: &str| {
            text.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .unwrap_or_default()
                .to_string()
        };
        (field("JobState="), field("ExitCode="))
    }

    /// Wait until the job leaves PENDING/RUNNING/COMPLETING; returns its final state.
    pub fn wait(&self, id: u32, limit: Duration) -> (String, String) {
        let until = Instant::now() + limit;
        loop {
            let s = self.state(id);
            if !matches!(
                s.0.as_str(),
                "PENDING" | "RUNNING" | "COMPLETING" | "CONFIGURING" | ""
            ) {
                return s;
            }
            assert!(
                Instant::now() < until,
                "job {id} still {} after {limit:?}",
                s.0
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }
}

impl Drop for Slurm {
    fn drop(&mut self) {
        let _ = self.cmd("scancel").args(["--user", "root"]).output();
        let until = Instant::now() + Duration::from_secs(40);
        while Instant::now() < until && ok(Command::new("pgrep").args(["-x", "slurmstepd"])) {
            std::thread::sleep(Duration::from_millis(200));
        }
        for c in self.daemons.iter_mut().rev() {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }
}
