//! `anyvm job run`, `anyvm job sbatch` and `anyvm gc`.

use std::path::PathBuf;

use anyvm::job::{self, gc, slurm, Cancel, JobReport, JobSpec, Outcome};
use anyvm::Error;
use clap::{Args, Subcommand};
use serde_json::json;

use crate::app::{secs, App};

#[derive(Subcommand, Debug)]
pub enum JobCmd {
    /// Run a command in a fresh linked clone of a template VM, then remove the clone (also on
    /// failure, timeout, SIGINT and SIGTERM). The exit code is the command's; 124 on timeout,
    /// 125 when anyvm failed, 128+N when stopped by signal N.
    Run(JobArgs),
    /// Print an sbatch script that runs this job as one Slurm step.
    Sbatch {
        #[command(flatten)]
        job: JobArgs,
        /// Slurm job name (default: anyvm-TEMPLATE).
        #[arg(long)]
        job_name: Option<String>,
        #[arg(long)]
        partition: Option<String>,
        /// Slurm time limit, e.g. 01:00:00.
        #[arg(long)]
        time: Option<String>,
        /// Slurm output file pattern.
        #[arg(long)]
        output: Option<String>,
    },
}

#[derive(Args, Debug, Clone)]
pub struct JobArgs {
    /// The template VM (defined through anyvm, off unless --snapshot); defined from the config
    /// when it is not yet. Default: the profile's machine.
    #[arg(long)]
    template: Option<String>,
    /// Profile whose resources are checked from inside the clone before the command runs.
    #[arg(long)]
    profile: Option<String>,
    /// Clone from this snapshot of the template (the template may then be running).
    #[arg(long)]
    snapshot: Option<String>,
    /// Boot the clone instead of starting it from the template's warm state (`anyvm warm`).
    #[arg(long)]
    cold: bool,
    /// HOST:GUEST, repeatable: copied into the guest before the command (directories whole).
    #[arg(long = "in", value_name = "HOST:GUEST")]
    inputs: Vec<String>,
    /// GUEST:HOST, repeatable: copied out after the command, even when it failed.
    #[arg(long = "out", value_name = "GUEST:HOST")]
    outputs: Vec<String>,
    /// Wall-clock limit of the command, in seconds (default: none; the batch system's).
    #[arg(long)]
    timeout: Option<f64>,
    /// Seconds allowed for the clone to become ready (default: the machine's readiness timeout).
    #[arg(long)]
    ready_timeout: Option<f64>,
    /// KEY=VALUE, repeatable.
    #[arg(long = "env", short = 'e')]
    env: Vec<String>,
    #[arg(long)]
    cwd: Option<String>,
    #[arg(last = true, required = true)]
    argv: Vec<String>,
}

/// `HOST:GUEST` — the guest path is absolute, so the split is at the last ":/".
fn parse_in(s: &str) -> anyvm::Result<(PathBuf, String)> {
    match s.rfind(":/") {
        Some(i) if i > 0 => Ok((PathBuf::from(&s[..i]), s[i + 1..].to_string())),
        _ => Err(Error::invalid_arg(
            format!("--in {s:?}"),
            "expected HOST:GUEST with an absolute guest path, e.g. data/run.cfg:/work/run.cfg",
        )),
    }
}

/// `GUEST:HOST` — the guest path comes first and has no ':'.
fn parse_out(s: &str) -> anyvm::Result<(String, PathBuf)> {
    match s.split_once(':') {
        Some((g, h)) if g.starts_with('/') && !h.is_empty() => {
            Ok((g.to_string(), PathBuf::from(h)))
        }
        _ => Err(Error::invalid_arg(
            format!("--out {s:?}"),
            "expected GUEST:HOST with an absolute guest path, e.g. /work/out.root:results/out.root",
        )),
    }
}

fn summary(r: &JobReport) -> String {
    let what = match r.outcome {
        Outcome::Succeeded => "succeeded".to_string(),
        Outcome::Failed => match (r.exit_code, r.signal) {
            (Some(c), _) => format!("failed (exit {c})"),
            (None, Some(s)) => format!("failed (signal {s})"),
            _ => "failed".into(),
        },
        Outcome::TimedOut => "timed out".into(),
        Outcome::Cancelled => "cancelled".into(),
        Outcome::Error => "could not run".into(),
    };
    let phases: Vec<String> = r
        .phases
        .iter()
        .map(|p| {
            format!(
                "{} {:.2}s{}",
                p.phase,
                p.seconds,
                if p.ok { "" } else { "!" }
            )
        })
        .collect();
    let mut s = format!(
        "anyvm: job {} on {}: {what} in {:.1}s [{}]",
        r.job_id,
        if r.vm.is_empty() { "-" } else { &r.vm },
        r.seconds,
        phases.join(", ")
    );
    if let Some(e) = &r.error {
        s.push_str(&format!("\nanyvm: {} failed: {}", e.phase, e.message));
    }
    if let Some(e) = &r.teardown_error {
        s.push_str(&format!(
            "\nanyvm: error: the clone was NOT removed: {e}; run 'anyvm gc'"
        ));
    }
    s
}

/// SIGINT, SIGTERM and SIGHUP cancel the job; the number of the first one is kept for the
/// exit status.
fn cancel_on_signals(cancel: Cancel) -> std::sync::Arc<std::sync::atomic::AtomicI32> {
    use tokio::signal::unix::{signal, SignalKind};
    let got = std::sync::Arc::new(std::sync::atomic::AtomicI32::new(0));
    for (kind, num) in [
        (SignalKind::interrupt(), libc::SIGINT),
        (SignalKind::terminate(), libc::SIGTERM),
        (SignalKind::hangup(), libc::SIGHUP),
    ] {
        let Ok(mut s) = signal(kind) else { continue };
        let cancel = cancel.clone();
        let got = got.clone();
        tokio::spawn(async move {
            while s.recv().await.is_some() {
                let _ = got.compare_exchange(
                    0,
                    num,
                    std::sync::atomic::Ordering::SeqCst,
                    std::sync::atomic::Ordering::SeqCst,
                );
                if !cancel.is_cancelled() {
                    eprintln!("anyvm: signal {num}: stopping the job and removing its VM");
                }
                cancel.cancel();
            }
        });
    }
    got
}

impl App {
    /// The template handle (defined from the config when missing) and the job spec.
    async fn job_spec(&self, a: &JobArgs) -> anyvm::Result<(anyvm::Vm, JobSpec)> {
        let (vm, mut spec) = job::prepare(
            &self.client,
            a.template.as_deref(),
            a.profile.as_deref(),
            &a.argv,
        )
        .await?;
        if let Some(t) = a.ready_timeout {
            spec.ready.timeout = secs(t, "--ready-timeout")?;
        }
        if let Some(t) = a.timeout {
            spec = spec.timeout(secs(t, "--timeout")?);
        }
        for kv in &a.env {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| Error::invalid_arg(format!("--env {kv:?}"), "expected KEY=VALUE"))?;
            spec = spec.env(k, v);
        }
        if let Some(d) = &a.cwd {
            spec = spec.cwd(d.clone());
        }
        for s in &a.inputs {
            let (h, g) = parse_in(s)?;
            spec = spec.input(h, g);
        }
        for s in &a.outputs {
            let (g, h) = parse_out(s)?;
            spec = spec.output(g, h);
        }
        if let Some(s) = &a.snapshot {
            spec = spec.snapshot(s.clone());
        }
        if a.cold {
            spec = spec.cold();
        }
        spec.validate()?;
        Ok((vm, spec))
    }

    pub async fn job(&self, cmd: JobCmd) -> anyvm::Result<u8> {
        match cmd {
            JobCmd::Run(a) => {
                let (template, spec) = self.job_spec(&a).await?;
                let cancel = Cancel::new();
                let signal = cancel_on_signals(cancel.clone());
                let r = job::run_job(&self.client, &template, &spec, &cancel).await;
                if self.json {
                    println!("{}", serde_json::to_string_pretty(&r).expect("json"));
                } else {
                    use std::io::Write;
                    let _ = std::io::stdout().write_all(&r.stdout);
                    let _ = std::io::stdout().flush();
                    let _ = std::io::stderr().write_all(&r.stderr);
                    eprintln!("{}", summary(&r));
                }
                let sig = signal.load(std::sync::atomic::Ordering::SeqCst);
                let status = if r.outcome == Outcome::Cancelled && sig != 0 {
                    128 + sig
                } else {
                    r.exit_status()
                };
                Ok(status.clamp(0, 255) as u8)
            }
            JobCmd::Sbatch {
                job,
                job_name,
                partition,
                time,
                output,
            } => {
                let (template, _) = self.job_spec(&job).await?;
                let tspec = template.spec().await?.ok_or_else(|| {
                    Error::invalid_arg("--template", "the template is not defined by anyvm")
                })?;
                let exe = std::env::current_exe()
                    .map_err(|e| Error::io(anyvm::Ctx::new("find anyvm"), "/proc/self/exe", e))?;
                let mut argv = vec![exe.display().to_string()];
                if let Some(c) = self.client.config().and_then(|c| c.path.clone()) {
                    let c = std::fs::canonicalize(&c).unwrap_or(c);
                    argv.extend(["--config".into(), c.display().to_string()]);
                }
                argv.extend(["--backend".into(), self.client.backend().uri()]);
                argv.extend(["job".into(), "run".into()]);
                argv.extend(job_argv(&job));
                let script = slurm::sbatch_script(
                    &slurm::SbatchOptions {
                        job_name: job_name.or_else(|| Some(format!("anyvm-{}", template.name()))),
                        partition,
                        time,
                        cpus: tspec.cpus,
                        memory_mib: slurm::step_memory_mib(tspec.memory_mib),
                        output,
                    },
                    &argv,
                );
                print!("{script}");
                Ok(0)
            }
        }
    }

    pub async fn gc(&self, dry_run: bool) -> anyvm::Result<u8> {
        let r = gc::gc(&self.client, dry_run).await?;
        self.out(json!(r), || {
            let mut lines: Vec<String> = r
                .clones
                .iter()
                .map(|e| {
                    format!(
                        "{:<40} {:<13} owner pid {} on {} ({:?}){}",
                        e.vm,
                        format!("{:?}", e.action).to_lowercase(),
                        e.owner.pid,
                        e.owner.host,
                        e.liveness,
                        e.error
                            .as_ref()
                            .map(|m| format!(": {m}"))
                            .unwrap_or_default()
                    )
                })
                .collect();
            for l in &r.leases_released {
                lines.push(format!("released port {} (vm {} is gone)", l.port, l.vm));
            }
            let verb = if dry_run { "would release" } else { "released" };
            for l in &r.host_state_released {
                lines.push(format!("{verb} {} {} (its vm is gone)", l.kind, l.path));
            }
            if let Some(why) = &r.host_state_skipped {
                lines.push(format!("not swept: {why}"));
            }
            if lines.is_empty() {
                lines.push("nothing to collect".into());
            }
            lines.join("\n")
        });
        let failed = r.clones.iter().any(|e| e.action == gc::GcAction::Failed);
        Ok(u8::from(failed))
    }
}

/// The `job run` arguments again, absolute where they name host paths (the batch job may start
/// in another directory).
fn job_argv(a: &JobArgs) -> Vec<String> {
    let abs = |p: &str| {
        let p = PathBuf::from(p);
        if p.is_relative() {
            std::env::current_dir()
                .map(|d| d.join(&p))
                .unwrap_or(p)
                .display()
                .to_string()
        } else {
            p.display().to_string()
        }
    };
    let mut v = Vec::new();
    let mut opt = |k: &str, val: Option<String>| {
        if let Some(val) = val {
            v.push(format!("--{k}"));
            v.push(val);
        }
    };
    opt("template", a.template.clone());
    opt("profile", a.profile.clone());
    opt("snapshot", a.snapshot.clone());
    opt("timeout", a.timeout.map(|t| t.to_string()));
    opt("ready-timeout", a.ready_timeout.map(|t| t.to_string()));
    opt("cwd", a.cwd.clone());
    for s in &a.inputs {
        if let Ok((h, g)) = parse_in(s) {
            opt("in", Some(format!("{}:{g}", abs(&h.display().to_string()))));
        }
    }
    for s in &a.outputs {
        if let Ok((g, h)) = parse_out(s) {
            opt(
                "out",
                Some(format!("{g}:{}", abs(&h.display().to_string()))),
            );
        }
    }
    for e in &a.env {
        opt("env", Some(e.clone()));
    }
    if a.cold {
        v.push("--cold".into());
    }
    v.push("--".into());
    v.extend(a.argv.iter().cloned());
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_arguments_split_at_the_guest_path() {
        assert_eq!(
            parse_in("data/a:b.txt:/tmp/a").unwrap(),
            (PathBuf::from("data/a:b.txt"), "/tmp/a".to_string())
        );
        assert!(parse_in("data/a.txt:tmp/a").is_err());
        assert!(parse_in(":/tmp/a").is_err());
        assert_eq!(
            parse_out("/work/out:res/o:1").unwrap(),
            ("/work/out".to_string(), PathBuf::from("res/o:1"))
        );
        assert!(parse_out("work/out:res").is_err());
        assert!(parse_out("/work/out:").is_err());
    }
}

/// Arguments of `anyvm gc`.
#[derive(Args, Debug)]
pub struct GcArgs {
    /// Only report what would be removed.
    #[arg(long)]
    pub dry_run: bool,
}
