//! Many jobs on one host: admit a job only while its clone's vCPUs and memory fit the budget,
//! strictly first come first served (a big job at the head is not overtaken by small ones, so
//! it cannot starve), and let queued jobs be cancelled.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::Notify;

use super::{job_error, new_job_id, run_job_queued, Cancel, JobReport, JobSpec, Outcome, Phase};
use crate::client::Client;
use crate::error::{Ctx, Error, Result};
use crate::vm::Vm;

/// What the pool may hand out at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// CPUs the pool's running clones may use together.
    pub cpus: u32,
    /// Memory (MiB) the pool's running clones may use together.
    pub memory_mib: u64,
}

impl Budget {
    /// This host: one vCPU per core plus one, and 90% of the memory available now. The extra
    /// guest keeps the cores busy while another starts or stops and at the end of a queue
    /// (benches/jobs.rs, 8 jobs on 2 cores: wall/ideal 1.08 with it, 1.14-1.25 without).
    pub fn host() -> Budget {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32 + 1);
        let avail_kib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("MemAvailable:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<u64>().ok())
            })
            .unwrap_or(1024 * 1024);
        Budget {
            cpus,
            memory_mib: avail_kib / 1024 * 9 / 10,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    cpus: u32,
    memory_mib: u64,
    queue: VecDeque<u64>,
    next_ticket: u64,
}

#[derive(Debug)]
struct Inner {
    budget: Budget,
    state: Mutex<State>,
    changed: Notify,
}

/// Runs jobs on one client under a [`Budget`]. Clones share nothing but the budget: each gets
/// its own forwards and console ports from the client's port allocator.
#[derive(Debug, Clone)]
pub struct JobPool {
    client: Client,
    inner: Arc<Inner>,
}

/// A share of the budget, returned when dropped.
#[derive(Debug)]
pub struct Permit {
    inner: Arc<Inner>,
    cpus: u32,
    memory_mib: u64,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut s = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        s.cpus -= self.cpus;
        s.memory_mib -= self.memory_mib;
        drop(s);
        self.inner.changed.notify_waiters();
    }
}

/// Leaves the queue when a waiting `acquire` is dropped (cancelled).
struct Waiting<'a> {
    inner: &'a Inner,
    ticket: u64,
    admitted: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if !self.admitted {
            let mut s = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
            s.queue.retain(|t| *t != self.ticket);
            drop(s);
            self.inner.changed.notify_waiters();
        }
    }
}

impl JobPool {
    /// A pool that runs jobs of `client` within `budget`.
    pub fn new(client: Client, budget: Budget) -> Result<JobPool> {
        if budget.cpus == 0 || budget.memory_mib == 0 {
            return Err(Error::invalid_arg(
                "job pool budget",
                "cpus and memory must be positive",
            ));
        }
        Ok(JobPool {
            client,
            inner: Arc::new(Inner {
                budget,
                state: Mutex::new(State::default()),
                changed: Notify::new(),
            }),
        })
    }

    /// The pool's budget.
    pub fn budget(&self) -> Budget {
        self.inner.budget
    }

    /// (vCPUs, MiB) in use and jobs waiting.
    pub fn usage(&self) -> (u32, u64, usize) {
        let s = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        (s.cpus, s.memory_mib, s.queue.len())
    }

    /// Wait in line until `cpus` and `memory_mib` fit. Dropping the future leaves the line.
    pub async fn acquire(&self, cpus: u32, memory_mib: u64) -> Result<Permit> {
        let b = self.inner.budget;
        if cpus > b.cpus || memory_mib > b.memory_mib {
            return Err(Error::invalid_arg(
                "job",
                format!(
                    "needs {cpus} vCPUs and {memory_mib} MiB but the pool has only {} vCPUs and {} MiB",
                    b.cpus, b.memory_mib
                ),
            ));
        }
        let ticket = {
            let mut s = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
            let t = s.next_ticket;
            s.next_ticket += 1;
            s.queue.push_back(t);
            t
        };
        let mut waiting = Waiting {
            inner: &self.inner,
            ticket,
            admitted: false,
        };
        loop {
            let changed = self.inner.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let mut s = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
                if s.queue.front() == Some(&ticket)
                    && s.cpus + cpus <= b.cpus
                    && s.memory_mib + memory_mib <= b.memory_mib
                {
                    s.queue.pop_front();
                    s.cpus += cpus;
                    s.memory_mib += memory_mib;
                    waiting.admitted = true;
                    drop(s);
                    // The next in line may fit too.
                    self.inner.changed.notify_waiters();
                    return Ok(Permit {
                        inner: self.inner.clone(),
                        cpus,
                        memory_mib,
                    });
                }
            }
            changed.await;
        }
    }

    /// Queue, then run one job. Cancelling while queued ends it without touching the hypervisor.
    pub async fn run(&self, template: &Vm, spec: &JobSpec, cancel: &Cancel) -> JobReport {
        let queued = Instant::now();
        let fail = |e: Error| {
            let mut r = JobReport::empty(new_job_id(), &spec.template);
            r.error = Some(job_error(Phase::Queue, &e));
            r.seconds = queued.elapsed().as_secs_f64();
            r
        };
        let ctx = Ctx::vm("job: read template", template.name());
        let tspec = match template
            .required_spec(&ctx, "job templates must be defined through anyvm")
            .await
        {
            Ok(s) => s,
            Err(e) => return fail(e),
        };
        let permit = tokio::select! {
            p = self.acquire(tspec.cpus, tspec.memory_mib) => p,
            _ = cancel.cancelled() => {
                let mut r = fail(Error::Busy { ctx, reason: "cancelled while queued".into() });
                r.outcome = Outcome::Cancelled;
                return r;
            }
        };
        let permit = match permit {
            Ok(p) => p,
            Err(e) => return fail(e),
        };
        run_job_queued(
            &self.client,
            template,
            spec,
            cancel,
            Some((queued.elapsed(), permit)),
            None,
        )
        .await
    }

    /// Run every job through the pool; reports come back in the order given.
    pub async fn run_all(&self, jobs: &[(Vm, JobSpec)], cancel: &Cancel) -> Vec<JobReport> {
        futures::future::join_all(jobs.iter().map(|(t, s)| self.run(t, s, cancel))).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn pool(cpus: u32, mem: u64) -> JobPool {
        let b: Arc<dyn crate::Backend> = Arc::new(crate::backend::mock());
        let client = Client::with_backend(
            b,
            crate::ClientOptions::default().state_dir(std::env::temp_dir()),
        );
        JobPool::new(
            client,
            Budget {
                cpus,
                memory_mib: mem,
            },
        )
        .unwrap()
    }

    #[tokio::test]
    async fn admits_within_budget_in_fifo_order() {
        let p = pool(2, 1000);
        let a = p.acquire(1, 400).await.unwrap();
        let b = p.acquire(1, 400).await.unwrap();
        assert_eq!(p.usage(), (2, 800, 0));
        // A big job at the head is not overtaken by a small one behind it.
        let big = tokio::spawn({
            let p = p.clone();
            async move { p.acquire(2, 500).await.map(|_| Instant::now()) }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let small = tokio::spawn({
            let p = p.clone();
            async move { p.acquire(1, 100).await.map(|_| Instant::now()) }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(p.usage().2, 2);
        drop(a);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!big.is_finished() && !small.is_finished());
        drop(b);
        let t_big = big.await.unwrap().unwrap();
        let t_small = small.await.unwrap().unwrap();
        assert!(t_big <= t_small);
        assert!(p.acquire(3, 1).await.is_err());
    }

    #[tokio::test]
    async fn cancelled_waiters_leave_the_queue() {
        let p = pool(1, 100);
        let held = p.acquire(1, 100).await.unwrap();
        let waiter = tokio::spawn({
            let p = p.clone();
            async move { p.acquire(1, 100).await.map(|_| ()) }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(p.usage().2, 1);
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(p.usage().2, 0);
        drop(held);
        let _again = tokio::time::timeout(Duration::from_secs(1), p.acquire(1, 100))
            .await
            .unwrap()
            .unwrap();
    }
}
