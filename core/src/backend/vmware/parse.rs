//! Parsers for vmrun output and .vmx files. Malformed text is an `Err(String)`, never a panic.

use std::path::PathBuf;

/// `list`: `Total running VMs: N` then one .vmx path a line.
pub fn list(text: &str) -> Result<Vec<PathBuf>, String> {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let head = lines.next().ok_or("empty 'vmrun list' output")?;
    let n: usize = head
        .strip_prefix("Total running VMs:")
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| format!("unexpected 'vmrun list' header {head:?}"))?;
    let paths: Vec<PathBuf> = lines.map(PathBuf::from).collect();
    if paths.len() != n {
        return Err(format!(
            "'vmrun list' announced {n} VMs but listed {}",
            paths.len()
        ));
    }
    Ok(paths)
}

/// `listSnapshots`: `Total snapshots: N` then names.
pub fn snapshots(text: &str) -> Result<Vec<String>, String> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let head = lines.next().ok_or("empty 'vmrun listSnapshots' output")?;
    let n: usize = head
        .trim()
        .strip_prefix("Total snapshots:")
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| format!("unexpected 'vmrun listSnapshots' header {head:?}"))?;
    let names: Vec<String> = lines.map(|l| l.trim().to_string()).collect();
    if names.len() != n {
        return Err(format!(
            "'vmrun listSnapshots' announced {n} snapshots but listed {}",
            names.len()
        ));
    }
    Ok(names)
}

/// The guest exit code from `Guest program exited with non-zero exit code: N`.
pub fn guest_exit_code(text: &str) -> Option<i32> {
    text.lines()
        .find_map(|l| {
            l.split_once("exited with non-zero exit code:")
                .map(|(_, n)| n.trim().parse().ok())
        })
        .flatten()
}

/// `listHostNetworks`: `Total host networks: N` then `INDEX NAME TYPE DHCP SUBNET MASK`.
/// Returns (name, type).
pub fn host_networks(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for l in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if l.starts_with("Total host networks") || l.starts_with("INDEX") {
            continue;
        }
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 3 {
            return Err(format!("unexpected host network line {l:?}"));
        }
        out.push((f[1].to_string(), f[2].to_string()));
    }
    Ok(out)
}

/// A .vmx file: `key = "value"` lines, order and comments preserved on rewrite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vmx {
    lines: Vec<String>,
}

impl Vmx {
    pub fn parse(text: &str) -> Vmx {
        Vmx {
            lines: text.lines().map(str::to_string).collect(),
        }
    }

    fn key_of(line: &str) -> Option<&str> {
        let (k, _) = line.split_once('=')?;
        let k = k.trim();
        (!k.is_empty() && !k.starts_with('#')).then_some(k)
    }

    pub fn get(&self, key: &str) -> Option<String> {
        self.lines.iter().find_map(|l| {
            if Self::key_of(l)?.eq_ignore_ascii_case(key) {
                let v = l.split_once('=')?.1.trim();
                Some(v.trim_matches('"').to_string())
            } else {
                None
            }
        })
    }

    pub fn set(&mut self, key: &str, value: &str) {
        let line = format!("{key} = \"{}\"", value.replace('"', "|22"));
        match self
            .lines
            .iter()
            .position(|l| Self::key_of(l).is_some_and(|k| k.eq_ignore_ascii_case(key)))
        {
            Some(i) => self.lines[i] = line,
            None => self.lines.push(line),
        }
    }

    pub fn render(&self) -> String {
        let mut s = self.lines.join("\n");
        s.push('\n');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vmrun_outputs() {
        let l = list("Total running VMs: 2\n/vms/a b/a.vmx\n/vms/c.vmx\n").unwrap();
        assert_eq!(
            l,
            vec![PathBuf::from("/vms/a b/a.vmx"), PathBuf::from("/vms/c.vmx")]
        );
        assert_eq!(
            list("Total running VMs: 0\n").unwrap(),
            Vec::<PathBuf>::new()
        );
        assert!(list("Total running VMs: 2\n/x.vmx\n").is_err());
        assert!(list("garbage").is_err());
        assert_eq!(
            snapshots("Total snapshots: 2\nclean\nafter build\n").unwrap(),
            vec!["clean", "after build"]
        );
        assert!(snapshots("Total snapshots: x").is_err());
        assert_eq!(
            guest_exit_code("Guest program exited with non-zero exit code: 42\n"),
            Some(42)
        );
        assert_eq!(guest_exit_code("Error: something"), None);
        let hn = host_networks("Total host networks: 2\nINDEX  NAME    TYPE    DHCP    SUBNET  MASK\n1  vmnet1  hostOnly  true  192.168.1.0  255.255.255.0\n8  vmnet8  nat  true  192.168.80.0  255.255.255.0\n").unwrap();
        assert_eq!(hn[1], ("vmnet8".into(), "nat".into()));
    }

    #[test]
    fn vmx_round_trip_keeps_other_lines() {
        let mut v = Vmx::parse(
            "# comment\n.encoding = \"UTF-8\"\ndisplayName = \"SL6 build\"\nmemsize = \"1024\"\n",
        );
        assert_eq!(v.get("displayname").as_deref(), Some("SL6 build"));
        v.set("memsize", "2048");
        v.set("RemoteDisplay.vnc.enabled", "TRUE");
        let r = v.render();
        assert!(r.starts_with("# comment\n.encoding = \"UTF-8\"\n"));
        assert!(r.contains("memsize = \"2048\"\n"));
        assert!(r.ends_with("RemoteDisplay.vnc.enabled = \"TRUE\"\n"));
    }
}
