//! The environment a request asks for, as the key that picks its children:
//! the request's entries in a canonical form (sorted by name, the last of
//! repeated names winning, as a process environment would apply them), a
//! short stable hash for logs, and what a child's `/proc/PID/status` says
//! about its resident memory.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The canonical environment of a request. Requests with equal keys are
/// served by the same children; the empty key means "the bridge's own".
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct EnvKey {
    vars: Vec<(String, String)>,
}

impl EnvKey {
    /// The key of a request's environment entries, in any order.
    pub fn new(entries: &[(String, String)]) -> EnvKey {
        let map: BTreeMap<&str, &str> = entries
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        EnvKey {
            vars: map
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        }
    }

    /// The variables a child of this key gets on top of the bridge's.
    pub fn vars(&self) -> &[(String, String)] {
        &self.vars
    }

    /// How logs name the key: `none` for the empty one, otherwise eight hex
    /// digits of a hash (FNV-1a, stable across runs and builds) and the count.
    pub fn label(&self) -> String {
        if self.vars.is_empty() {
            return "env none".to_owned();
        }
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for (name, value) in &self.vars {
            // NUL separates the parts: it cannot occur in either.
            for byte in name.bytes().chain([0]).chain(value.bytes()).chain([0]) {
                hash ^= u64::from(byte);
                hash = hash.wrapping_mul(0x0100_0000_01b3);
            }
        }
        let mut label = String::from("env ");
        let _ = write!(label, "{:08x}", (hash ^ (hash >> 32)) as u32);
        let _ = write!(
            label,
            " ({} var{})",
            self.vars.len(),
            if self.vars.len() == 1 { "" } else { "s" }
        );
        label
    }
}

/// The resident memory of process `pid` in MiB (rounded down), from the
/// `VmRSS` line of `/proc/PID/status`; `None` if the process is gone or the
/// line is missing (kernel threads, other systems).
pub fn rss_mib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vm_rss_kib(&status).map(|kib| kib / 1024)
}

fn parse_vm_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut words = line["VmRSS:".len()..].split_whitespace();
    let number: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") | None => Some(number),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn order_does_not_matter_and_the_last_repeat_wins() {
        let a = EnvKey::new(&entries(&[("B", "2"), ("A", "1")]));
        let b = EnvKey::new(&entries(&[("A", "0"), ("B", "2"), ("A", "1")]));
        assert_eq!(a, b);
        assert_eq!(a.label(), b.label());
        assert_eq!(a.vars(), entries(&[("A", "1"), ("B", "2")]));
    }

    #[test]
    fn labels_tell_keys_apart() {
        assert_eq!(EnvKey::new(&[]).label(), "env none");
        let one = EnvKey::new(&entries(&[("A", "1")])).label();
        let other = EnvKey::new(&entries(&[("A", "2")])).label();
        // Moving a character between name and value is another key too.
        let shifted = EnvKey::new(&entries(&[("A1", "")])).label();
        assert!(
            one.starts_with("env ") && one.ends_with(" (1 var)"),
            "{one}"
        );
        assert_ne!(one, other);
        assert_ne!(one, shifted);
        let two = EnvKey::new(&entries(&[("A", "1"), ("B", "2")])).label();
        assert!(two.ends_with(" (2 vars)"), "{two}");
    }

    #[test]
    fn vm_rss_is_read_from_the_status_text() {
        let status = "Name:\tpython3\nVmPeak:\t  300000 kB\nVmRSS:\t  204800 kB\nThreads:\t1\n";
        assert_eq!(parse_vm_rss_kib(status), Some(204800));
        assert_eq!(parse_vm_rss_kib("Name:\tkthreadd\n"), None);
        assert_eq!(parse_vm_rss_kib("VmRSS:\tlots kB\n"), None);
        assert!(rss_mib(std::process::id()).is_some_and(|mib| mib > 0));
    }
}
