//! The QEMU guest agent protocol (qemu-ga): command JSON in, reply JSON out. Pure functions, so
//! the protocol is unit-tested without a guest; the backend sends them through libvirt.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Value};

use crate::types::ExecRequest;

/// PATH given to guest programs when the caller sets env but no PATH: qemu-ga replaces the
/// whole environment when any variable is passed.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub fn ping() -> String {
    json!({"execute": "guest-ping"}).to_string()
}

/// `guest-exec` for a request. A working directory is applied by a fixed `sh` prologue that
/// takes the directory and argv as positional parameters: nothing is ever interpolated.
pub fn exec(req: &ExecRequest) -> String {
    let (path, args): (String, Vec<String>) = match &req.cwd {
        None => (req.program.clone(), req.args.clone()),
        Some(dir) => {
            let mut a = vec![
                "-c".to_string(),
                "cd -- \"$1\" || exit 127; shift; exec \"$@\"".into(),
                "sh".into(),
                dir.clone(),
            ];
            a.push(req.program.clone());
            a.extend(req.args.iter().cloned());
            ("/bin/sh".into(), a)
        }
    };
    guest_exec(req, path, args, true)
}

/// The fixed `sh` prologue of a streamed exec: output appended to `$1/out` and `$1/err`, then
/// into directory `$2` when it is not empty, then the program. Everything is a positional
/// parameter; nothing is interpolated.
pub const STREAM_PROLOGUE: &str =
    "d=$1; c=$2; shift 2; exec >>\"$d/out\" 2>>\"$d/err\"; if [ -n \"$c\" ]; then cd -- \"$c\" || exit 127; fi; exec \"$@\"";

/// `guest-exec` of a request whose output goes to two files in the guest directory `dir`
/// (tailed with `guest-file-read`: qemu-ga itself returns output only at exit).
pub fn exec_to_files(req: &ExecRequest, dir: &str) -> String {
    let mut args = vec![
        "-c".to_string(),
        STREAM_PROLOGUE.into(),
        "sh".into(),
        dir.into(),
        req.cwd.clone().unwrap_or_default(),
        req.program.clone(),
    ];
    args.extend(req.args.iter().cloned());
    guest_exec(req, "/bin/sh".into(), args, false)
}

fn guest_exec(req: &ExecRequest, path: String, args: Vec<String>, capture: bool) -> String {
    let mut args_obj = json!({"path": path, "arg": args, "capture-output": capture});
    if !req.env.is_empty() {
        let mut env: Vec<String> = req.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        if !req.env.contains_key("PATH") {
            env.push(format!("PATH={DEFAULT_PATH}"));
        }
        args_obj["env"] = json!(env);
    }
    if let Some(input) = &req.stdin {
        args_obj["input-data"] = json!(B64.encode(input));
    }
    json!({"execute": "guest-exec", "arguments": args_obj}).to_string()
}

/// A program run for anyvm's own housekeeping, output not captured (`rm -rf -- DIR`).
pub fn spawn(path: &str, args: &[&str]) -> String {
    json!({"execute": "guest-exec", "arguments": {"path": path, "arg": args}}).to_string()
}

pub fn exec_status(pid: i64) -> String {
    json!({"execute": "guest-exec-status", "arguments": {"pid": pid}}).to_string()
}

pub fn kill(pid: i64) -> String {
    json!({"execute": "guest-exec", "arguments": {"path": "kill", "arg": ["-KILL", pid.to_string()]}}).to_string()
}

pub fn file_open(path: &str, mode: &str) -> String {
    json!({"execute": "guest-file-open", "arguments": {"path": path, "mode": mode}}).to_string()
}
pub fn file_read(handle: i64, count: usize) -> String {
    json!({"execute": "guest-file-read", "arguments": {"handle": handle, "count": count}})
        .to_string()
}
pub fn file_write(handle: i64, data: &[u8]) -> String {
    json!({"execute": "guest-file-write", "arguments": {"handle": handle, "buf-b64": B64.encode(data)}}).to_string()
}
/// Move a guest file's position to `offset` from its start; after a read at end of file this
/// clears the end-of-file state, so data appended since can be read.
pub fn file_seek(handle: i64, offset: u64) -> String {
    json!({"execute": "guest-file-seek", "arguments": {"handle": handle, "offset": offset, "whence": 0}}).to_string()
}
pub fn file_close(handle: i64) -> String {
    json!({"execute": "guest-file-close", "arguments": {"handle": handle}}).to_string()
}

/// The `return` member of a reply.
pub fn ret(reply: &str) -> Result<Value, String> {
    let v: Value = serde_json::from_str(reply)
        .map_err(|e| format!("malformed agent reply ({e}): {reply:.200}"))?;
    if let Some(err) = v.get("error") {
        return Err(format!(
            "agent error: {}",
            err.get("desc").and_then(Value::as_str).unwrap_or("unknown")
        ));
    }
    v.get("return")
        .cloned()
        .ok_or_else(|| format!("agent reply without 'return': {reply:.200}"))
}

pub fn int_field(v: &Value, key: &str) -> Result<i64, String> {
    v.get(key)
        .and_then(Value::as_i64)
        .ok_or_else(|| format!("agent reply lacks integer '{key}'"))
}

/// A finished `guest-exec-status`.
#[derive(Debug, PartialEq, Eq)]
pub struct ExecStatus {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
}

/// `None` while the program still runs.
pub fn parse_exec_status(v: &Value) -> Result<Option<ExecStatus>, String> {
    if !v.get("exited").and_then(Value::as_bool).unwrap_or(false) {
        return Ok(None);
    }
    let data = |k: &str| -> Result<Vec<u8>, String> {
        match v.get(k).and_then(Value::as_str) {
            None => Ok(Vec::new()),
            Some(s) => B64
                .decode(s)
                .map_err(|e| format!("bad base64 in '{k}': {e}")),
        }
    };
    let flag = |k: &str| v.get(k).and_then(Value::as_bool).unwrap_or(false);
    Ok(Some(ExecStatus {
        exit_code: v.get("exitcode").and_then(Value::as_i64).map(|c| c as i32),
        signal: v.get("signal").and_then(Value::as_i64).map(|c| c as i32),
        stdout: data("out-data")?,
        stderr: data("err-data")?,
        stdout_truncated: flag("out-truncated"),
        stderr_truncated: flag("err-truncated"),
    }))
}

/// Bytes and end-of-file flag from `guest-file-read`.
pub fn parse_read(v: &Value) -> Result<(Vec<u8>, bool), String> {
    let buf = v.get("buf-b64").and_then(Value::as_str).unwrap_or("");
    let data = B64
        .decode(buf)
        .map_err(|e| format!("bad base64 in guest-file-read: {e}"))?;
    Ok((
        data,
        v.get("eof")
            .and_then(Value::as_bool)
            .unwrap_or(data_is_empty(buf)),
    ))
}

fn data_is_empty(b: &str) -> bool {
    b.is_empty()
}

#[cfg(test)]
mod tests {
    #[test]
    fn stream_prologue_appends_both_streams_and_keeps_argv_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        let req = ExecRequest::new("/bin/sh")
            .arg("-c")
            .arg("pwd; printf '%s|' \"$@\"; echo err >&2; exit 4")
            .arg("x")
            .arg("a b")
            .arg("$HOME;`id`")
            .cwd("/tmp");
        let cmd: Value = serde_json::from_str(&exec_to_files(&req, d)).unwrap();
        let args = &cmd["arguments"];
        assert_eq!(args["capture-output"], false);
        let argv: Vec<String> = serde_json::from_value(args["arg"].clone()).unwrap();
        let st = std::process::Command::new(args["path"].as_str().unwrap())
            .args(&argv)
            .status()
            .unwrap();
        assert_eq!(st.code(), Some(4));
        let out = std::fs::read_to_string(dir.path().join("out")).unwrap();
        assert_eq!(out, "/tmp\na b|$HOME;`id`|");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("err")).unwrap(),
            "err\n"
        );
    }

    use super::*;

    #[test]
    fn exec_with_cwd_passes_directory_as_a_parameter() {
        let req = ExecRequest::new("ls")
            .arg("-l")
            .cwd("/tmp/$(rm -rf /)")
            .env("A", "1")
            .stdin(b"x".to_vec());
        let v: Value = serde_json::from_str(&exec(&req)).unwrap();
        let a = &v["arguments"];
        assert_eq!(a["path"], "/bin/sh");
        assert_eq!(a["arg"][1], "cd -- \"$1\" || exit 127; shift; exec \"$@\"");
        assert_eq!(a["arg"][3], "/tmp/$(rm -rf /)");
        assert_eq!(a["arg"][4], "ls");
        assert_eq!(a["env"][0], "A=1");
        assert!(a["env"][1].as_str().unwrap().starts_with("PATH="));
        assert_eq!(a["input-data"], "eA==");
    }

    #[test]
    fn parses_exec_status() {
        let v = json!({"exited": false});
        assert_eq!(parse_exec_status(&v).unwrap(), None);
        let v = json!({"exited": true, "exitcode": 3, "out-data": "aGkK", "err-truncated": true});
        let s = parse_exec_status(&v).unwrap().unwrap();
        assert_eq!(
            (s.exit_code, s.stdout.as_slice(), s.stderr_truncated),
            (Some(3), &b"hi\n"[..], true)
        );
        let v = json!({"exited": true, "signal": 9});
        assert_eq!(parse_exec_status(&v).unwrap().unwrap().signal, Some(9));
        assert!(parse_exec_status(&json!({"exited": true, "out-data": "!!"})).is_err());
    }

    #[test]
    fn reply_errors_are_reported() {
        assert_eq!(ret(r#"{"return":{"pid":5}}"#).unwrap()["pid"], 5);
        assert!(ret(r#"{"error":{"class":"GenericError","desc":"boom"}}"#)
            .unwrap_err()
            .contains("boom"));
        assert!(ret("not json").is_err());
    }
}
