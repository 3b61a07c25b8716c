//! Progress on stderr while waiting, only when stderr is a terminal: a spinner line, or a
//! board of one line per VM (`anyvm up` of several), each naming the step it waits on and
//! its elapsed time.

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const FRAMES: [char; 4] = ['|', '/', '-', '\\'];
const TICK: Duration = Duration::from_millis(120);

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
            let mut i = 0;
            loop {
                eprint!(
                    "\r{} {what} ({:.1}s)",
                    FRAMES[i % 4],
                    started.elapsed().as_secs_f64()
                );
                let _ = std::io::stderr().flush();
                i += 1;
                tokio::time::sleep(TICK).await;
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

struct Line {
    name: String,
    step: String,
    started: Instant,
    /// Set when it ended: ok, and the seconds it took.
    done: Option<(bool, f64)>,
}

struct Lines {
    lines: Vec<Line>,
    /// Whether they are on the screen (then a redraw moves up over them first).
    shown: bool,
}

/// One line per VM, redrawn in place.
pub struct Board {
    lines: Arc<Mutex<Lines>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

fn draw(b: &mut Lines, frame: usize) {
    let mut e = std::io::stderr().lock();
    if b.shown {
        let _ = write!(e, "\x1b[{}A", b.lines.len());
    }
    b.shown = true;
    for l in &b.lines {
        let _ = match l.done {
            None => writeln!(
                e,
                "\r\x1b[2K{} {}: {} ({:.1}s)",
                FRAMES[frame % 4],
                l.name,
                l.step,
                l.started.elapsed().as_secs_f64()
            ),
            Some((ok, secs)) => writeln!(
                e,
                "\r\x1b[2K{} {}: {} ({secs:.1}s)",
                if ok { '+' } else { '!' },
                l.name,
                if ok { "ready" } else { "failed" }
            ),
        };
    }
    let _ = e.flush();
}

impl Board {
    pub fn start(names: &[String]) -> Board {
        let now = Instant::now();
        let lines = Arc::new(Mutex::new(Lines {
            lines: names
                .iter()
                .map(|n| Line {
                    name: n.clone(),
                    step: "starting".into(),
                    started: now,
                    done: None,
                })
                .collect(),
            shown: false,
        }));
        if !std::io::stderr().is_terminal() {
            return Board { lines, task: None };
        }
        let l = lines.clone();
        let task = tokio::spawn(async move {
            let mut frame = 0;
            loop {
                draw(&mut l.lock().unwrap_or_else(|p| p.into_inner()), frame);
                frame += 1;
                tokio::time::sleep(TICK).await;
            }
        });
        Board {
            lines,
            task: Some(task),
        }
    }

    fn with(&self, i: usize, f: impl FnOnce(&mut Line)) {
        if let Some(l) = self
            .lines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .lines
            .get_mut(i)
        {
            f(l);
        }
    }

    pub fn step(&self, i: usize, step: String) {
        self.with(i, |l| l.step = step);
    }

    pub fn finish(&self, i: usize, ok: bool) {
        self.with(i, |l| {
            l.done = Some((ok, l.started.elapsed().as_secs_f64()))
        });
    }

    /// Stop redrawing and leave the final lines.
    pub fn stop(self) {
        if let Some(t) = self.task {
            t.abort();
            draw(&mut self.lines.lock().unwrap_or_else(|p| p.into_inner()), 0);
        }
    }
}
