//! Processes by pid, read from /proc: a start time tells a pid from its reuse.

/// Field 22 of `/proc/PID/stat` (start time in clock ticks since boot); `None` when the process
/// is gone. The command name (field 2) may hold spaces and parentheses, so fields are counted
/// after its closing parenthesis.
pub(crate) fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the process `pid` that started at `ticks` still runs (a zombie does not).
pub(crate) fn runs(pid: u32, ticks: u64) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return false;
    };
    let mut f = rest.split_whitespace();
    let state = f.next();
    state != Some("Z")
        && state != Some("X")
        && f.nth(18).and_then(|t| t.parse().ok()) == Some(ticks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_runs_and_a_dead_child_does_not() {
        let me = std::process::id();
        let t = start_ticks(me).unwrap();
        assert!(runs(me, t));
        assert!(!runs(me, t + 1), "another start time is another process");
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id();
        let ticks = start_ticks(pid);
        std::thread::sleep(std::time::Duration::from_millis(200));
        // Exited, not reaped yet: a zombie.
        if let Some(ticks) = ticks {
            assert!(!runs(pid, ticks));
        }
        c.wait().unwrap();
        assert!(start_ticks(pid).is_none() || !runs(pid, ticks.unwrap_or(0)));
    }
}
