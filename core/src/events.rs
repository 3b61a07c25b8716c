//! What happens to VMs, jobs and copies, as one stream per client ([`crate::Client::events`]).
//!
//! Backends with their own events (libvirt) are relayed as they arrive; on the others
//! (VirtualBox, VMware) anyvm reports the changes its own operations make. Job phases are
//! announced as each begins, copies at most every [`COPY_EVENT_INTERVAL`] and at their end.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::broadcast;

use crate::types::Phase;

/// Something that happened to a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmEvent {
    /// The VM's name.
    pub vm: String,
    /// What happened.
    pub kind: VmEventKind,
}

/// The kinds of [`VmEvent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VmEventKind {
    /// The VM was defined (created).
    Defined,
    /// The VM's definition was removed.
    Undefined,
    /// The VM started (or was restored from saved state).
    Started,
    /// The VM powered off.
    Stopped,
    /// The guest or its hypervisor process crashed.
    Crashed,
    /// The VM was paused.
    Paused,
    /// The VM was resumed.
    Resumed,
    /// The guest agent connected (libvirt: qemu-ga's channel came up).
    AgentConnected,
    /// The guest agent went away.
    AgentDisconnected,
}

impl VmEventKind {
    /// The name the bindings use (`"started"`, `"agent_connected"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            VmEventKind::Defined => "defined",
            VmEventKind::Undefined => "undefined",
            VmEventKind::Started => "started",
            VmEventKind::Stopped => "stopped",
            VmEventKind::Crashed => "crashed",
            VmEventKind::Paused => "paused",
            VmEventKind::Resumed => "resumed",
            VmEventKind::AgentConnected => "agent_connected",
            VmEventKind::AgentDisconnected => "agent_disconnected",
        }
    }
}

/// Which way a copy goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyDirection {
    /// Host to guest.
    ToGuest,
    /// Guest to host.
    FromGuest,
}

/// How far a file copy has come.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyEvent {
    /// The VM copied to or from.
    pub vm: String,
    /// Which way.
    pub direction: CopyDirection,
    /// The guest path.
    pub guest: String,
    /// The host path.
    pub host: PathBuf,
    /// Bytes copied so far.
    pub done: u64,
    /// Bytes in all, when known (uploads; downloads know it at the end).
    pub total: Option<u64>,
    /// The copy has ended (successfully or not).
    pub finished: bool,
}

/// A job entered a phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobEvent {
    /// The job's id.
    pub job: String,
    /// The transient clone the job runs in, once it has a name.
    pub vm: Option<String>,
    /// The phase now beginning.
    pub phase: Phase,
}

/// One item of a client's event stream. Serialized (JSON for the C API, dicts in Python) as an
/// object with a `"type"` of `"vm"` (vm, kind), `"job"` (job, vm, phase), `"copy"` (vm,
/// direction, guest, host, done, total, finished) or `"lagged"` (missed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A VM changed.
    Vm(VmEvent),
    /// A job entered a phase.
    Job(JobEvent),
    /// A copy made progress.
    Copy(CopyEvent),
    /// The reader fell behind and this many events were dropped for it.
    Lagged(u64),
}

/// The one wire shape of an [`Event`], so every binding spells it alike.
#[derive(serde::Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Wire<'a> {
    Vm {
        vm: &'a str,
        kind: VmEventKind,
    },
    Job {
        job: &'a str,
        vm: Option<&'a str>,
        phase: Phase,
    },
    Copy {
        vm: &'a str,
        direction: CopyDirection,
        guest: &'a str,
        host: &'a std::path::Path,
        done: u64,
        total: Option<u64>,
        finished: bool,
    },
    Lagged {
        missed: u64,
    },
}

impl serde::Serialize for Event {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Event::Vm(v) => Wire::Vm {
                vm: &v.vm,
                kind: v.kind,
            },
            Event::Job(j) => Wire::Job {
                job: &j.job,
                vm: j.vm.as_deref(),
                phase: j.phase,
            },
            Event::Copy(c) => Wire::Copy {
                vm: &c.vm,
                direction: c.direction,
                guest: &c.guest,
                host: &c.host,
                done: c.done,
                total: c.total,
                finished: c.finished,
            },
            Event::Lagged(n) => Wire::Lagged { missed: *n },
        }
        .serialize(s)
    }
}

/// Copies report progress at most this often (and always at their end).
pub const COPY_EVENT_INTERVAL: Duration = Duration::from_millis(200);

/// Events a client's stream buffers for a slow reader before it lags.
const BUS_CAPACITY: usize = 1024;

/// The broadcast every handle of one client shares.
#[derive(Debug, Clone)]
pub(crate) struct EventBus {
    tx: broadcast::Sender<Event>,
    /// Whether the backend reports VM changes itself (then anyvm's operations do not).
    pushes: bool,
    relaying: Arc<Mutex<bool>>,
}

impl EventBus {
    pub(crate) fn new(pushes: bool) -> Self {
        EventBus {
            tx: broadcast::channel(BUS_CAPACITY).0,
            pushes,
            relaying: Arc::new(Mutex::new(false)),
        }
    }

    pub(crate) fn publish(&self, e: Event) {
        // No subscriber is not an error: events are for whoever listens now.
        let _ = self.tx.send(e);
    }

    /// What an anyvm operation changed, on backends that do not report it themselves.
    pub(crate) fn vm_changed(&self, vm: &str, kind: VmEventKind) {
        if !self.pushes {
            self.publish(Event::Vm(VmEvent {
                vm: vm.to_string(),
                kind,
            }));
        }
    }

    /// A new stream; the first one starts relaying the backend's own events (`source`).
    pub(crate) fn subscribe(
        &self,
        source: impl FnOnce() -> Option<broadcast::Receiver<VmEvent>>,
    ) -> EventStream {
        let rx = self.tx.subscribe();
        let mut relaying = self.relaying.lock().expect("relay flag");
        if !*relaying {
            if let Some(src) = source() {
                *relaying = spawn_relay(src, self.tx.clone());
            }
        }
        EventStream { rx }
    }
}

/// Forward backend events to the bus, on the caller's runtime or else on a thread of its own.
fn spawn_relay(mut src: broadcast::Receiver<VmEvent>, tx: broadcast::Sender<Event>) -> bool {
    let forward = move |r: Result<VmEvent, broadcast::error::RecvError>| match r {
        Ok(e) => {
            let _ = tx.send(Event::Vm(e));
            true
        }
        Err(broadcast::error::RecvError::Lagged(n)) => {
            let _ = tx.send(Event::Lagged(n));
            true
        }
        Err(broadcast::error::RecvError::Closed) => false,
    };
    match tokio::runtime::Handle::try_current() {
        Ok(h) => {
            h.spawn(async move { while forward(src.recv().await) {} });
            true
        }
        Err(_) => std::thread::Builder::new()
            .name("anyvm-events".into())
            .spawn(move || while forward(src.blocking_recv()) {})
            .is_ok(),
    }
}

/// A client's events from the moment it was made ([`crate::Client::events`]).
#[derive(Debug)]
pub struct EventStream {
    rx: broadcast::Receiver<Event>,
}

impl EventStream {
    /// The next event; `None` only when the client and all its handles are gone. A reader that
    /// fell behind gets one [`Event::Lagged`] with the number it missed, then the newest.
    pub async fn next(&mut self) -> Option<Event> {
        match self.rx.recv().await {
            Ok(e) => Some(e),
            Err(broadcast::error::RecvError::Lagged(n)) => Some(Event::Lagged(n)),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }

    /// The next event if one is waiting, without waiting.
    pub fn try_next(&mut self) -> Option<Event> {
        match self.rx.try_recv() {
            Ok(e) => Some(e),
            Err(broadcast::error::TryRecvError::Lagged(n)) => Some(Event::Lagged(n)),
            Err(_) => None,
        }
    }

    /// The events as a [`futures::Stream`].
    pub fn into_stream(self) -> impl futures::Stream<Item = Event> + Send + Unpin {
        Box::pin(futures::stream::unfold(self, |mut s| async move {
            s.next().await.map(|e| (e, s))
        }))
    }
}

/// What a backend calls as a copy moves: bytes done so far. Cheap to clone; the default
/// reports to nobody.
#[derive(Clone, Default)]
pub struct CopyProgress(Option<Arc<dyn Fn(u64) + Send + Sync>>);

impl CopyProgress {
    /// Reports to nobody.
    pub fn none() -> Self {
        CopyProgress(None)
    }
    /// Calls `f` with the bytes done so far.
    pub fn new(f: impl Fn(u64) + Send + Sync + 'static) -> Self {
        CopyProgress(Some(Arc::new(f)))
    }
    /// `done` bytes have been copied.
    pub fn report(&self, done: u64) {
        if let Some(f) = &self.0 {
            f(done);
        }
    }
}

impl std::fmt::Debug for CopyProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "CopyProgress(..)"
        } else {
            "CopyProgress(none)"
        })
    }
}

/// A caller's progress callback: bytes done, bytes in all when known.
pub type ProgressFn = Arc<dyn Fn(u64, Option<u64>) + Send + Sync>;

/// Tells a copy's caller every report and the event stream at most one per interval.
pub(crate) struct CopyReporter {
    bus: EventBus,
    event: CopyEvent,
    last: Option<Instant>,
    callback: Option<ProgressFn>,
}

impl CopyReporter {
    pub(crate) fn new(
        bus: EventBus,
        vm: &str,
        direction: CopyDirection,
        guest: &str,
        host: PathBuf,
        total: Option<u64>,
        callback: Option<ProgressFn>,
    ) -> Self {
        CopyReporter {
            bus,
            event: CopyEvent {
                vm: vm.to_string(),
                direction,
                guest: guest.to_string(),
                host,
                done: 0,
                total,
                finished: false,
            },
            last: None,
            callback,
        }
    }

    /// `done` bytes so far.
    pub(crate) fn progress(&mut self, done: u64) {
        self.event.done = done;
        if let Some(cb) = &self.callback {
            cb(done, self.event.total);
        }
        let now = Instant::now();
        if self.last.is_none_or(|t| now - t >= COPY_EVENT_INTERVAL) {
            self.last = Some(now);
            self.bus.publish(Event::Copy(self.event.clone()));
        }
    }

    /// The copy ended with `done` bytes copied.
    pub(crate) fn finish(&mut self, done: u64) {
        self.event.done = done;
        self.event.finished = true;
        if self.event.total.is_none() {
            self.event.total = Some(done);
        }
        if let Some(cb) = &self.callback {
            cb(done, self.event.total);
        }
        self.bus.publish(Event::Copy(self.event.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn relays_backend_events_once_and_reports_own_changes_only_without_them() {
        let (btx, _) = broadcast::channel(8);
        let bus = EventBus::new(true);
        let mut a = bus.subscribe(|| Some(btx.subscribe()));
        let mut b = bus.subscribe(|| panic!("the relay starts once"));
        bus.vm_changed("v", VmEventKind::Started); // the backend reports it: not published
        btx.send(VmEvent {
            vm: "v".into(),
            kind: VmEventKind::Defined,
        })
        .unwrap();
        for s in [&mut a, &mut b] {
            assert_eq!(
                s.next().await,
                Some(Event::Vm(VmEvent {
                    vm: "v".into(),
                    kind: VmEventKind::Defined
                }))
            );
        }
        let own = EventBus::new(false);
        let mut s = own.subscribe(|| None);
        own.vm_changed("w", VmEventKind::Stopped);
        assert!(matches!(
            s.try_next(),
            Some(Event::Vm(VmEvent {
                kind: VmEventKind::Stopped,
                ..
            }))
        ));
        assert_eq!(s.try_next(), None);
    }

    #[test]
    fn a_slow_reader_is_told_how_many_it_missed() {
        let bus = EventBus::new(false);
        let mut s = bus.subscribe(|| None);
        for _ in 0..BUS_CAPACITY + 5 {
            bus.vm_changed("v", VmEventKind::Paused);
        }
        assert_eq!(s.try_next(), Some(Event::Lagged(5)));
    }

    #[test]
    fn copy_progress_is_throttled_on_the_stream_but_not_for_the_callback() {
        let bus = EventBus::new(false);
        let mut s = bus.subscribe(|| None);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let cb: ProgressFn = Arc::new(move |d, t| s2.lock().unwrap().push((d, t)));
        let mut r = CopyReporter::new(
            bus.clone(),
            "v",
            CopyDirection::ToGuest,
            "/g",
            "/h".into(),
            Some(30),
            Some(cb),
        );
        for d in [10, 20, 30] {
            r.progress(d);
        }
        r.finish(30);
        assert_eq!(seen.lock().unwrap().len(), 4);
        let mut events = Vec::new();
        while let Some(Event::Copy(c)) = s.try_next() {
            events.push((c.done, c.finished));
        }
        assert_eq!(events, vec![(10, false), (30, true)]);
    }

    #[test]
    fn events_serialize_to_one_tagged_shape() {
        let j = |e: Event| serde_json::to_string(&e).unwrap();
        assert_eq!(
            j(Event::Vm(VmEvent {
                vm: "v".into(),
                kind: VmEventKind::AgentConnected
            })),
            r#"{"type":"vm","vm":"v","kind":"agent_connected"}"#
        );
        assert_eq!(
            j(Event::Job(JobEvent {
                job: "7".into(),
                vm: None,
                phase: Phase::StageIn
            })),
            r#"{"type":"job","job":"7","vm":null,"phase":"stage_in"}"#
        );
        assert_eq!(
            j(Event::Copy(CopyEvent {
                vm: "v".into(),
                direction: CopyDirection::FromGuest,
                guest: "/g".into(),
                host: "/h".into(),
                done: 3,
                total: None,
                finished: true
            })),
            r#"{"type":"copy","vm":"v","direction":"from_guest","guest":"/g","host":"/h","done":3,"total":null,"finished":true}"#
        );
        assert_eq!(j(Event::Lagged(4)), r#"{"type":"lagged","missed":4}"#);
        // The kind's binding name and its wire name are one spelling.
        for k in [VmEventKind::Defined, VmEventKind::AgentDisconnected] {
            assert_eq!(serde_json::to_value(k).unwrap(), k.as_str());
        }
    }
}
