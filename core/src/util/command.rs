//! Running hypervisor tools (qemu-img today, VBoxManage and vmrun later) safely: argv vectors only,
//! C locale, stdin closed unless given, every call under a deadline, and the whole process group
//! killed when it passes, because these tools fork helpers that otherwise outlive them.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::error::{Ctx, Error, Result};
use crate::types::{OutputChunk, OutputSink, OutputStream};

/// How much of each stream a streamed call still keeps (for error classification: the tools'
/// own error lines come last).
pub const STREAM_TAIL: usize = 64 * 1024;

#[derive(Debug, Clone)]
pub struct ToolCommand {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub env: Vec<(String, String)>,
    pub stdin: Option<Vec<u8>>,
    pub timeout: Duration,
    /// What messages call this command. Never holds a secret.
    pub display: String,
    /// Forward output here as it is read; the returned output then keeps only the last
    /// [`STREAM_TAIL`] bytes of each stream.
    pub sink: Option<OutputSink>,
    /// With no `stdin` data: give the child a pipe that stays open until it exits, instead of
    /// /dev/null (the ssh channel's remote watcher ends the guest program when it closes).
    pub hold_stdin: bool,
}

#[derive(Debug, Clone)]
pub struct ToolOutput {
    /// None when killed by a signal.
    pub code: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub duration: Duration,
}

impl ToolOutput {
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

impl ToolCommand {
    pub fn new<I, S>(program: impl Into<PathBuf>, args: I, timeout: Duration) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        let program = program.into();
        let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
        let display = std::iter::once(program.display().to_string())
            .chain(
                args.iter()
                    .take(2)
                    .map(|a| a.to_string_lossy().into_owned()),
            )
            .collect::<Vec<_>>()
            .join(" ");
        ToolCommand {
            program,
            args,
            env: Vec::new(),
            stdin: None,
            timeout,
            display,
            sink: None,
            hold_stdin: false,
        }
    }

    /// Run to completion or kill the process group at the deadline.
    pub async fn run(&self, ctx: &Ctx) -> Result<ToolOutput> {
        let started = Instant::now();
        let mut cmd = tokio::process::Command::new(&self.program);
        cmd.args(&self.args)
            .env("LC_ALL", "C")
            .env("LANG", "C")
            .stdin(if self.stdin.is_some() || self.hold_stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::BackendUnavailable {
                    ctx: ctx.clone(),
                    backend: self.program.display().to_string(),
                    reason: "program not found; install it or set its path in the configuration"
                        .into(),
                }
            } else {
                Error::io(ctx.clone(), &self.program, e)
            }
        })?;
        let pgid = child.id().map(|p| p as i32);
        // Dropping this future (a cancelled caller) must not leave the tool's helpers running:
        // the guard kills the whole process group unless the call completes.
        let mut group = GroupGuard(pgid);
        let mut stdout = child.stdout.take().expect("piped");
        let mut stderr = child.stderr.take().expect("piped");
        let mut stdin = child.stdin.take();
        let input = self.stdin.clone();
        // Held until the child exits: its end of the pipe stays open as long as it runs.
        let held = if input.is_none() { stdin.take() } else { None };
        let sink = self.sink.clone();
        let io = async move {
            let feed = async move {
                if let (Some(mut w), Some(data)) = (stdin, input) {
                    let _ = w.write_all(&data).await;
                }
            };
            let (_, out, err) = tokio::join!(
                feed,
                drain(&mut stdout, OutputStream::Stdout, sink.as_ref()),
                drain(&mut stderr, OutputStream::Stderr, sink.as_ref())
            );
            Ok::<_, std::io::Error>((out?, err?))
        };
        let waited = tokio::time::timeout(self.timeout, async {
            let (out, err) = io.await?;
            let status = child.wait().await?;
            drop(held);
            Ok::<_, std::io::Error>((status, out, err))
        })
        .await;
        if matches!(waited, Ok(Ok(_))) {
            group.0 = None;
        }
        match waited {
            Ok(Ok((status, stdout, stderr))) => Ok(ToolOutput {
                code: status.code(),
                stdout,
                stderr,
                duration: started.elapsed(),
            }),
            Ok(Err(e)) => Err(Error::io(ctx.clone(), &self.program, e)),
            Err(_) => {
                drop(group);
                Err(Error::Timeout {
                    ctx: ctx.clone(),
                    after: Some(self.timeout),
                    what: format!("'{}' (killed)", self.display),
                })
            }
        }
    }
}

/// Read a pipe to its end: all of it, or, with a sink, forward each read and keep the tail.
async fn drain<R: AsyncRead + Unpin>(
    r: &mut R,
    stream: OutputStream,
    sink: Option<&OutputSink>,
) -> std::io::Result<Vec<u8>> {
    let mut kept = Vec::new();
    let Some(sink) = sink else {
        r.read_to_end(&mut kept).await?;
        return Ok(kept);
    };
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok(kept);
        }
        let data = buf[..n].to_vec();
        kept.extend_from_slice(&data);
        if kept.len() > STREAM_TAIL {
            kept.drain(..kept.len() - STREAM_TAIL);
        }
        // A reader that went away must not stall the program: keep draining the pipe.
        let _ = sink.send(OutputChunk { stream, data }).await;
    }
}

/// Kills a process group when dropped, unless emptied first.
struct GroupGuard(Option<i32>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pg) = self.0.take() {
            // SAFETY: plain syscall on a process group this module created.
            unsafe { libc::killpg(pg, libc::SIGKILL) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn captures_output_and_exit_code() {
        let out = ToolCommand::new(
            "/bin/sh",
            ["-c", "echo out; echo err >&2; exit 3"],
            Duration::from_secs(5),
        )
        .run(&Ctx::new("t"))
        .await
        .unwrap();
        assert_eq!(out.code, Some(3));
        assert_eq!(out.stdout_str(), "out\n");
        assert_eq!(out.stderr_str(), "err\n");
    }

    #[tokio::test]
    async fn a_sink_gets_output_as_it_is_written_and_the_tail_is_kept() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let mut c = ToolCommand::new(
            "/bin/sh",
            ["-c", "echo first; sleep 1; echo second; echo oops >&2"],
            Duration::from_secs(10),
        );
        c.sink = Some(tx);
        let started = Instant::now();
        let run = tokio::spawn(async move { c.run(&Ctx::new("t")).await });
        let first = rx.recv().await.unwrap();
        assert_eq!(first.stream, OutputStream::Stdout);
        assert_eq!(first.data, b"first\n");
        assert!(
            started.elapsed() < Duration::from_millis(900),
            "first chunk came late"
        );
        let out = run.await.unwrap().unwrap();
        let mut rest = Vec::new();
        while let Some(c) = rx.recv().await {
            rest.push((c.stream, c.data));
        }
        assert!(rest.contains(&(OutputStream::Stdout, b"second\n".to_vec())));
        assert!(rest.contains(&(OutputStream::Stderr, b"oops\n".to_vec())));
        assert_eq!(out.stderr_str(), "oops\n");
        assert_eq!(out.code, Some(0));
    }

    #[tokio::test]
    async fn feeds_stdin_and_forces_c_locale() {
        let mut c = ToolCommand::new(
            "/bin/sh",
            ["-c", "cat; echo $LC_ALL"],
            Duration::from_secs(5),
        );
        c.stdin = Some(b"abc\n".to_vec());
        let out = c.run(&Ctx::new("t")).await.unwrap();
        assert_eq!(out.stdout_str(), "abc\nC\n");
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("child.pid");
        let script = format!("sleep 300 & echo $! > {}; wait", pidfile.display());
        let e = ToolCommand::new(
            "/bin/sh",
            ["-c", script.as_str()],
            Duration::from_millis(300),
        )
        .run(&Ctx::vm("stop", "v"))
        .await
        .unwrap_err();
        assert!(matches!(e, Error::Timeout { .. }), "{e}");
        assert!(e.to_string().contains("vm 'v': stop: timed out"), "{e}");
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The grandchild must be gone (or a zombie about to be reaped by init).
        let gone = gone_soon(pid);
        assert!(gone, "sleep {pid} survived the timeout");
    }

    #[tokio::test]
    async fn missing_program_is_backend_unavailable() {
        let e = ToolCommand::new("/nonexistent/VBoxManage", ["list"], Duration::from_secs(1))
            .run(&Ctx::new("list"))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::BackendUnavailable { .. }), "{e}");
    }

    /// The process exits (or is a zombie about to be reaped) within a second.
    fn gone_soon(pid: i32) -> bool {
        (0..50).any(|_| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let gone = stat.is_empty() || stat.contains(") Z ");
            if !gone {
                std::thread::sleep(Duration::from_millis(20));
            }
            gone
        })
    }

    #[tokio::test]
    async fn dropping_the_call_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("child.pid");
        let script = format!("sleep 300 & echo $! > {}; wait", pidfile.display());
        let cmd = ToolCommand::new("/bin/sh", ["-c", script.as_str()], Duration::from_secs(60));
        let ctx = Ctx::new("t");
        let r = tokio::time::timeout(Duration::from_millis(500), cmd.run(&ctx)).await;
        assert!(r.is_err(), "the call cannot have finished");
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let gone = gone_soon(pid);
        assert!(gone, "sleep {pid} survived the dropped call");
    }
}
