//! A guest program whose output is read while it runs.
//!
//! Cancel-safety: the program runs on its own task, owned by the [`ExecStream`]. Dropping the
//! stream or calling [`ExecStream::cancel`] stops that task at its next await, and the channel
//! kills the guest program (agent `kill -KILL` of its pid, VirtualBox's and ssh's process
//! group killed) and removes the files it used.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::*;
use crate::types::{OutputChunk, OutputStream};

/// Chunks in flight between the channel and the reader; a full buffer slows the channel.
const STREAM_BUFFER: usize = 64;

impl Vm {
    /// Run a guest program and read its output as it is written: over ssh and VirtualBox
    /// guest control as the tool relays it, on the libvirt agent by polling (fast while output
    /// flows, backing off to 100 ms when it does not); vmrun returns output only at exit.
    /// The request is checked (validity, policy) before this returns.
    ///
    /// ```no_run
    /// # async fn demo(vm: anyvm::Vm) -> anyvm::Result<()> {
    /// use anyvm::{ExecRequest, OutputStream};
    /// let mut run = vm.exec_stream(&ExecRequest::new("make").arg("-j2")).await?;
    /// while let Some(chunk) = run.next().await {
    ///     if chunk.stream == OutputStream::Stderr {
    ///         eprint!("{}", String::from_utf8_lossy(&chunk.data));
    ///     }
    /// }
    /// let status = run.wait().await?; // exit code; output not read above is in here
    /// # let _ = status; Ok(()) }
    /// ```
    pub async fn exec_stream(&self, req: &ExecRequest) -> Result<ExecStream> {
        if let Err(e) = self.check_exec("exec", req, true) {
            // Refused before it ran: audited like a refused buffered exec.
            let args = super::guest::exec_audit_args(req);
            return self.audited("exec", args, async { Err(e) }).await;
        }
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let vm = self.clone();
        let r = req.clone();
        let task = tokio::spawn(async move { vm.exec_as("exec", &r, true, Some(tx)).await });
        Ok(ExecStream {
            ctx: self.ctx(&format!("exec {}", req.program)),
            rx,
            abort: task.abort_handle(),
            task: Some(task),
            cancelled: Arc::new(AtomicBool::new(false)),
        })
    }
}

/// A running guest program's output, chunk by chunk ([`Vm::exec_stream`]). Also a
/// [`futures::Stream`] of [`OutputChunk`]s. Dropping it kills the program.
#[derive(Debug)]
pub struct ExecStream {
    ctx: Ctx,
    rx: mpsc::Receiver<OutputChunk>,
    task: Option<JoinHandle<Result<ExecOutput>>>,
    abort: tokio::task::AbortHandle,
    cancelled: Arc<AtomicBool>,
}

/// Cancels one [`ExecStream`] from anywhere (another thread, a signal handler's task) without
/// access to the stream itself.
#[derive(Debug, Clone)]
pub struct ExecCanceller {
    abort: tokio::task::AbortHandle,
    cancelled: Arc<AtomicBool>,
}

impl ExecCanceller {
    /// As [`ExecStream::cancel`].
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
        self.abort.abort();
    }
}

impl ExecStream {
    /// The next chunk, or `None` once the program has ended and everything was read.
    pub async fn next(&mut self) -> Option<OutputChunk> {
        self.rx.recv().await
    }

    /// Wait for the program to end. The output not yet read through [`ExecStream::next`] is
    /// in the result's stdout/stderr; the exit code is the program's.
    pub async fn wait(mut self) -> Result<ExecOutput> {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        while let Some(c) = self.rx.recv().await {
            match c.stream {
                OutputStream::Stdout => stdout.extend_from_slice(&c.data),
                OutputStream::Stderr => stderr.extend_from_slice(&c.data),
            }
        }
        let task = self
            .task
            .take()
            .expect("a stream has its task until wait or drop");
        let mut out = match task.await {
            Ok(r) => r?,
            Err(_) => return Err(self.cancelled_error()),
        };
        out.stdout = stdout;
        out.stderr = stderr;
        Ok(out)
    }

    /// Stop the program now (it is killed in the guest). Chunks already received can still be
    /// read; [`ExecStream::wait`] then reports [`Error::Cancelled`].
    pub fn cancel(&mut self) {
        self.canceller().cancel();
    }

    /// A handle that cancels this stream and can be sent elsewhere.
    pub fn canceller(&self) -> ExecCanceller {
        ExecCanceller {
            abort: self.abort.clone(),
            cancelled: self.cancelled.clone(),
        }
    }

    /// Whether the program has ended (or was cancelled); chunks may still be unread.
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(|t| t.is_finished())
    }

    fn cancelled_error(&self) -> Error {
        Error::Cancelled {
            ctx: self.ctx.clone(),
            what: if self.cancelled.load(Ordering::SeqCst) {
                "the stream was cancelled; the guest program was killed".into()
            } else {
                "the exec task ended without a result".into()
            },
        }
    }
}

impl futures::Stream for ExecStream {
    type Item = OutputChunk;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<OutputChunk>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for ExecStream {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}
