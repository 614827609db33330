//! Buck2's local persistent-worker protocol: gRPC on the Unix socket named by
//! `WORKER_SOCKET`. Not built yet.

use std::path::Path;
use std::sync::Arc;

use crate::pool::Pool;
use crate::request::Handler;

/// Serves Buck2 on `socket`; returns the process exit code.
pub fn serve(
    _handler: Arc<dyn Handler>,
    _pool: Pool,
    socket: &Path,
    _grace: std::time::Duration,
) -> i32 {
    eprintln!(
        "persistent-worker: WORKER_SOCKET={} is set, but the Buck2 worker is not built yet",
        socket.display()
    );
    2
}
