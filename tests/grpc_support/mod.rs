//! Bounds shared by the tests that drive a worker over gRPC: every test body
//! and every call has a deadline, so a hung worker fails a test instead of
//! hanging the suite.

use std::sync::mpsc::{channel, RecvTimeoutError};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use grpcio::Environment;
use persistent_worker::buck2::lifecycle::block_on_until;

/// Runs a test body on its own thread and fails it after `limit`.
pub fn within<T: Send + 'static>(limit: Duration, body: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = channel();
    let runner = thread::spawn(move || {
        let _ = tx.send(body());
    });
    match rx.recv_timeout(limit) {
        Ok(value) => value,
        Err(RecvTimeoutError::Disconnected) => match runner.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => unreachable!("the body sends before it returns"),
        },
        Err(RecvTimeoutError::Timeout) => panic!("test did not finish within {limit:?}"),
    }
}

/// Waits for a gRPC future with a deadline.
pub fn wait<F: std::future::Future + Unpin>(mut future: F, limit: Duration) -> F::Output {
    block_on_until(&mut future, Instant::now() + limit)
        .unwrap_or_else(|| panic!("call did not complete within {limit:?}"))
}

/// A one-thread gRPC environment for a test's client.
pub fn env() -> Arc<Environment> {
    Arc::new(Environment::new(1))
}
