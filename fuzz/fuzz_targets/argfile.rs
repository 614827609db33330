//! Argument-file expansion with arbitrary file contents: nesting, `@@`,
//! CRLF, cycles, invalid UTF-8. Never a panic; the output stays within the
//! byte budget; and expanding the escaped result again gives it back.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use persistent_worker::argfile::{escape, expand_with, Limits};

const BUDGET: usize = 1 << 14;

fn dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("temp dir"))
        .path()
}

fuzz_target!(|data: &[u8]| {
    // Files `a`, `b`, `c` and the argument list, separated by 0xff bytes
    // (which cannot occur in UTF-8, so contents stay free to be anything).
    let mut parts = data.split(|&b| b == 0xff);
    let dir = dir();
    for name in ["a", "b", "c"] {
        let contents = parts.next().unwrap_or_default();
        std::fs::write(dir.join(name), contents).expect("write argfile");
    }
    let Ok(args) = std::str::from_utf8(parts.next().unwrap_or(b"@a")) else {
        return;
    };
    let args: Vec<String> = args.split('\n').map(str::to_owned).collect();
    let limits = Limits {
        max_bytes: BUDGET,
        max_depth: 8,
    };
    if let Ok(expanded) = expand_with(&args, dir, limits) {
        let given: usize = args.iter().map(|a| a.len() + 1).sum();
        let got: usize = expanded.iter().map(|a| a.len()).sum();
        assert!(got <= given + BUDGET, "{got} bytes from a {BUDGET} budget");
        let again = expand_with(&escape(expanded.clone()), dir, limits)
            .expect("escaped arguments expand to themselves");
        assert_eq!(again, expanded);
    }
});
