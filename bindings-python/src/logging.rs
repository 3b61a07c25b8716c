//! tracing events from the core reach Python's `logging` (logger "anyvm"). The level threshold
//! is cached so events below it never take the GIL.

use std::sync::atomic::{AtomicU8, Ordering};

use pyo3::prelude::*;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

/// Python logging levels: DEBUG 10, INFO 20, WARNING 30, ERROR 40.
static THRESHOLD: AtomicU8 = AtomicU8::new(30);

fn py_level(l: &Level) -> u8 {
    match *l {
        Level::ERROR => 40,
        Level::WARN => 30,
        Level::INFO => 20,
        _ => 10,
    }
}

/// Called by the Python package with `logging.getLogger("anyvm").getEffectiveLevel()`.
#[pyfunction]
pub fn set_log_level(level: u8) {
    THRESHOLD.store(level, Ordering::Relaxed);
}

struct Collect(String);

impl Visit for Collect {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0.insert_str(0, &format!("{value:?}"));
        } else {
            self.0.push_str(&format!(" {}={value:?}", field.name()));
        }
    }
}

struct PyLogLayer;

impl<S: Subscriber> Layer<S> for PyLogLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let level = py_level(event.metadata().level());
        if level < THRESHOLD.load(Ordering::Relaxed)
            || !event.metadata().target().starts_with("anyvm")
        {
            return;
        }
        let mut msg = Collect(String::new());
        event.record(&mut msg);
        Python::attach(|py| {
            if let Ok(logging) = py.import("logging") {
                if let Ok(logger) = logging.call_method1("getLogger", ("anyvm",)) {
                    let _ = logger.call_method1("log", (level, msg.0));
                }
            }
        });
    }
}

pub fn install() {
    let _ =
        tracing::subscriber::set_global_default(tracing_subscriber::registry().with(PyLogLayer));
}
