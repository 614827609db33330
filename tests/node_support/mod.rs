//! The Node program on npm's `@bazel/worker` in `testdata/node_worker`, a
//! worker nothing in this repository wrote the protocol side of: its packages
//! installed from the lockfile on first use, or a loud skip where npm is
//! missing and the run does not require it (`REQUIRE_NODE_WORKER=1`, as CI).

use std::path::Path;
use std::process::{Command, Stdio};

/// The path of `worker.js` once its packages are installed; `None` (after a
/// loud notice) when npm is missing and the run does not require the Node
/// tests. `what` names the test in the notice.
pub fn node_worker(what: &str) -> Option<String> {
    let dir = format!("{}/testdata/node_worker", env!("CARGO_MANIFEST_DIR"));
    let required = std::env::var("REQUIRE_NODE_WORKER").is_ok_and(|v| v == "1");
    if !Path::new(&dir).join("node_modules/@bazel/worker").exists() {
        let installed = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .stdout(Stdio::null())
            .status();
        match installed {
            Ok(status) if status.success() => {}
            other => {
                assert!(
                    !required,
                    "REQUIRE_NODE_WORKER=1 but `npm ci` in {dir} failed: {other:?}"
                );
                eprintln!(
                    "\n*** SKIPPED: {what} needs npm and node (`npm ci` in {dir}: {other:?}); \
                     set REQUIRE_NODE_WORKER=1 to make this a failure ***\n"
                );
                return None;
            }
        }
    }
    Some(format!("{dir}/worker.js"))
}
