//! Buck2's local persistent-worker protocol: gRPC (grpcio, the C core) on the
//! Unix socket named by `WORKER_SOCKET`.
//!
//! - [`service`]: method descriptors for `worker.Worker` and
//!   `worker.WorkerStreaming` (public, for clients too) and registration.
//! - [`command`]: `ExecuteCommand` → request (no gRPC; fuzzed).
//! - [`calls`]: Execute, Exec and ExecuteStream as futures that move messages
//!   between gRPC and the pool.
//! - `mailbox`: what a call shares with the pool threads running its
//!   requests (its sink, and what they finished).
//! - [`socket`]: path checks, long paths, mode 0600, removal.
//! - [`lifecycle`]: signals, parent death, in-flight tracking for shutdown.

pub mod calls;
pub mod command;
pub mod lifecycle;
mod mailbox;
pub mod service;
pub mod socket;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use grpcio::{EnvBuilder, ServerBuilder, ServerCredentials};

use crate::pool::Pool;
use crate::request::Handler;
use lifecycle::{block_on_until, Parent, Signals, Tracker};

/// Start-up settings of the Buck2 front end.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Pool threads: requests that run at once (`--concurrency`).
    pub concurrency: usize,
    /// After SIGTERM/SIGINT, how long running requests may finish.
    pub shutdown_grace: Duration,
    /// Log each request's start and end on stderr.
    pub verbose: bool,
}

/// Serves Buck2 on `socket` until a stop signal or the parent's death, then
/// exits the process. Returns (exit code 2) only when the worker cannot start.
///
/// Exiting rather than returning after a stop is deliberate: a handler that
/// ignores its cancellation token must not keep the process alive by holding
/// a pool thread that a return would join.
pub fn serve(handler: Arc<dyn Handler>, socket: &Path, settings: &Settings) -> i32 {
    // Before any thread exists, so that every thread inherits the mask.
    let signals = match Signals::block() {
        Ok(signals) => signals,
        Err(e) => {
            crate::elog!("persistent-worker: cannot block stop signals: {e}");
            return 2;
        }
    };
    let parent = Parent::watch();
    let cwd = match std::env::current_dir() {
        Ok(cwd) => cwd,
        Err(e) => {
            crate::elog!("persistent-worker: cannot read the current directory: {e}");
            return 2;
        }
    };
    if let Err(e) = socket::prepare(socket) {
        crate::elog!("persistent-worker: {e}");
        return 2;
    }
    let address = match socket::Address::for_path(socket) {
        Ok(address) => address,
        Err(e) => {
            crate::elog!("persistent-worker: {e}");
            return 2;
        }
    };

    // One completion queue is plenty: its thread only moves messages.
    let env = Arc::new(EnvBuilder::new().cq_count(1).name_prefix("grpc-cq").build());
    let tracker = Arc::new(Tracker::default());
    let tool = Arc::clone(&handler);
    let shared = Arc::new(calls::Shared {
        handler,
        pool: Pool::unstarted(settings.concurrency),
        cwd: cwd.clone(),
        identity: crate::process::identity(),
        tracker: Arc::clone(&tracker),
        verbose: settings.verbose,
        calls: Default::default(),
    });
    let worker = calls::Worker::new(Arc::clone(&shared));
    let built = ServerBuilder::new(Arc::clone(&env))
        .channel_args(service::unlimited_channel(Arc::clone(&env)).build_args())
        .register_service(service::create_service(worker))
        .build();
    let mut server = match built {
        Ok(server) => server,
        Err(e) => {
            crate::elog!("persistent-worker: cannot create the gRPC server: {e}");
            return 2;
        }
    };
    let listening = socket::with_private_umask(|| {
        server.add_listening_port(address.uri.as_str(), ServerCredentials::insecure())
    });
    if let Err(e) = listening {
        crate::elog!(
            "persistent-worker: cannot listen on {}: {e}",
            socket.display()
        );
        return 2;
    }
    server.start();
    // Buck2 waits for the socket to accept before it sends anything: the pool
    // threads are made once it does.
    shared.pool.start();
    let bound = socket::Bound::new(socket);
    crate::elog!(
        "persistent-worker: Buck2 worker listening on {} (concurrency {}, pid {}, cwd {})",
        socket.display(),
        settings.concurrency,
        std::process::id(),
        cwd.display()
    );

    loop {
        let signal = signals.wait();
        if signal == libc::SIGHUP {
            if !parent.is_gone() {
                crate::elog!(
                    "persistent-worker: SIGHUP while parent {} is alive (the thread that started \
                     this worker exited); watching the parent by polling",
                    parent.pid()
                );
                parent.poll_from_now_on();
                continue;
            }
            let cancelled = tracker.drain();
            tracker.cancel_all();
            crate::elog!(
                "persistent-worker: parent process {} exited; stopping ({cancelled} request(s) cancelled)",
                parent.pid()
            );
            bound.remove();
            tool.shutdown();
            std::process::exit(0);
        }
        let name = lifecycle::signal_name(signal);
        let running = tracker.drain();
        crate::elog!(
            "persistent-worker: {name}: no new requests; waiting up to {} ms for {running} running request(s)",
            settings.shutdown_grace.as_millis()
        );
        bound.remove();
        // Answers first, connections last. gRPC closes every connection as
        // soon as its shutdown completes, and a client that writes (an HTTP/2
        // acknowledgement) into a closed connection before it has read the
        // answer already on its way fails the call with UNAVAILABLE "Broken
        // pipe". So the calls end while the server still runs (draining
        // refuses new ones), and the connections close a linger later.
        let deadline = Instant::now() + settings.shutdown_grace;
        let mut idle = tracker.wait_idle(deadline);
        if !idle {
            let cancelled = tracker.cancel_all();
            crate::elog!("persistent-worker: grace period over; cancelled {cancelled} request(s)");
            idle = tracker.wait_idle(Instant::now() + lifecycle::AFTER_CANCEL);
        }
        if idle {
            std::thread::sleep(lifecycle::LINGER);
        }
        let mut shutdown = server.shutdown();
        if block_on_until(&mut shutdown, Instant::now() + lifecycle::AFTER_CANCEL).is_none() {
            server.cancel_all_calls();
            let _ = block_on_until(&mut shutdown, Instant::now() + Duration::from_millis(200));
        }
        // Dropping the server and its environment joins gRPC's threads. A
        // call still tied to a tool that ignores its cancellation can keep
        // that join waiting, so it gets a bounded time on a thread of its own.
        let (flushed_tx, flushed) = crossbeam_channel::bounded::<()>(1);
        let _ = std::thread::Builder::new()
            .name("grpc-teardown".into())
            .spawn(move || {
                drop(server);
                drop(env);
                let _ = flushed_tx.send(());
            });
        let _ = flushed.recv_timeout(lifecycle::TEARDOWN);
        tool.shutdown();
        crate::elog!("persistent-worker: stopped");
        drop(address);
        std::process::exit(0);
    }
}
