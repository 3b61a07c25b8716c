//! A one-line spinner on stderr while waiting, only when stderr is a terminal.

use std::io::{IsTerminal, Write};
use std::time::Instant;

pub struct Spinner {
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Spinner {
    pub fn start(what: String) -> Spinner {
        if !std::io::stderr().is_terminal() {
            return Spinner { task: None };
        }
        let started = Instant::now();
        let task = tokio::spawn(async move {
            const FRAMES: [char; 4] = ['|', '/', '-', '\\'];
            let mut i = 0;
            loop {
                eprint!(
                    "\r{} {what} ({:.1}s)",
                    FRAMES[i % 4],
                    started.elapsed().as_secs_f64()
                );
                let _ = std::io::stderr().flush();
                i += 1;
                tokio::time::sleep(std::time::Duration::from_millis(120)).await;
            }
        });
        Spinner { task: Some(task) }
    }

    pub fn stop(self) {
        if let Some(t) = self.task {
            t.abort();
            eprint!("\r\x1b[2K");
        }
    }
}
