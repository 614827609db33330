//! The mailbox between one call and the pool threads running its requests.
//!
//! It owns the call's sink while an answer may still leave from a pool
//! thread, and the list of what the pool finished for the call to pick up.
//! A call that carries one request (`Execute`, `Exec`) is answered by the
//! pool thread that finishes it: that thread writes the response and the
//! call's status straight onto the connection, and the completion-queue
//! thread only learns afterwards that the call is over. A stream's pool
//! threads only drop their responses here and wake the call's task.
//!
//! It must never poll the sink (only the call future may: a second poll
//! after the call is over panics in grpcio), never send on a stream (a
//! stream's answers go in the call's order), and never hold its lock while
//! it wakes the call.

use std::pin::Pin;
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Waker};

use futures_util::Sink;
use grpcio::{DuplexSink, DuplexSinkFailure, RpcStatus, WriteFlags};

use crate::request::{lock, Response};

/// What a call shares with the pool threads running its requests.
pub(super) struct Mailbox<T> {
    inner: Mutex<MailboxInner<T>>,
    /// The call carries one request: the thread that finishes it sends the
    /// answer and the call's status itself.
    answered_by_pool: bool,
}

pub(super) struct MailboxInner<T> {
    /// The call's sink, until its status is on the way.
    sink: Option<DuplexSink<T>>,
    done: Vec<(u64, Finished)>,
    /// The call's task, to wake when something is done.
    waker: Option<Waker>,
}

/// A request back from the pool.
pub(super) enum Finished {
    /// For the call to send.
    Response(Response),
    /// Sent with the call's status; gRPC finishes the call.
    Sent(DuplexSinkFailure),
    /// The call broke as the answer was being sent: nothing left to send.
    Lost,
}

impl<T> Mailbox<T> {
    pub(super) fn new(sink: DuplexSink<T>, answered_by_pool: bool) -> Mailbox<T> {
        Mailbox {
            inner: Mutex::new(MailboxInner {
                sink: Some(sink),
                done: Vec::new(),
                waker: None,
            }),
            answered_by_pool,
        }
    }

    /// Called on the thread that finished request `key`; `wire` makes the
    /// message for a response sent from here.
    pub(super) fn deliver(&self, key: u64, response: Response, wire: impl FnOnce(Response) -> T) {
        let waker = {
            let mut inner = lock(&self.inner);
            let finished = if self.answered_by_pool && inner.sink.is_some() {
                inner.send_last(wire(response))
            } else {
                Finished::Response(response)
            };
            inner.done.push((key, finished));
            inner.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// The call's hold on the sink, to poll and write it: while the call
    /// holds this, no pool thread can send.
    pub(super) fn lock(&self) -> MutexGuard<'_, MailboxInner<T>> {
        lock(&self.inner)
    }

    /// Takes the sink from the pool threads' reach.
    pub(super) fn take_sink(&self) -> Option<DuplexSink<T>> {
        lock(&self.inner).sink.take()
    }

    /// What the pool finished since the last call; registers the call's task
    /// to be woken for more.
    pub(super) fn take(&self, cx: &Context<'_>) -> Vec<(u64, Finished)> {
        let mut inner = lock(&self.inner);
        if !inner
            .waker
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            inner.waker = Some(cx.waker().clone());
        }
        std::mem::take(&mut inner.done)
    }
}

impl<T> MailboxInner<T> {
    /// The sink, unless a pool thread took it with the call's one answer.
    pub(super) fn sink(&mut self) -> Option<&mut DuplexSink<T>> {
        self.sink.as_mut()
    }

    /// Sends a one-request call's answer and, right behind it, the call's
    /// status. The status does not wait for the message's write to complete:
    /// only the completion-queue thread hears of that, and waiting would put
    /// that thread back on the request's path. gRPC keeps the two in order.
    ///
    /// The sink is not polled for readiness first: only the call future may
    /// poll it, since a second poll after the call is over panics in grpcio.
    /// It is ready anyway: the call's one message is this one (a command
    /// refused before it ran is answered by the call and never reaches the
    /// pool), and a call already over fails the send, which is then left to
    /// the call future to notice.
    fn send_last(&mut self, message: T) -> Finished {
        let Some(mut sink) = self.sink.take() else {
            return Finished::Lost;
        };
        if Pin::new(&mut sink)
            .start_send((message, WriteFlags::default()))
            .is_err()
        {
            // The call broke; polling the sink tells the call so.
            self.sink = Some(sink);
            return Finished::Lost;
        }
        Finished::Sent(sink.fail(RpcStatus::ok()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buck2::calls::to_wire;
    use crate::buck2::lifecycle::block_on_until;
    use crate::buck2::service;
    use crate::proto::worker::{ExecuteCommand, ExecuteResponse};
    use grpcio::RequestStream;
    use grpcio::{
        CallOption, EnvBuilder, Method, MethodType, ServerBuilder, ServerCredentials,
        ServiceBuilder,
    };
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;
    use std::time::Instant;

    /// A gRPC server that hands each `Execute` call's stream and sink to the
    /// test, with no call future: nothing polls them but the test.
    struct BareServer {
        _server: grpcio::Server,
        calls: crossbeam_channel::Receiver<(
            RequestStream<ExecuteCommand>,
            DuplexSink<ExecuteResponse>,
        )>,
        connection: service::Connection,
        dir: PathBuf,
    }

    impl Drop for BareServer {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn bare_server() -> BareServer {
        let env = Arc::new(EnvBuilder::new().cq_count(1).build());
        let (tx, calls) = crossbeam_channel::unbounded();
        let duplex = Method {
            ty: MethodType::Duplex,
            ..service::EXECUTE
        };
        let grpc_service = ServiceBuilder::new()
            .add_duplex_streaming_handler(&duplex, move |_ctx, stream, sink| {
                let _ = tx.send((stream, sink));
            })
            .build();
        static SERVERS: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "pw-calls-test-{}-{}",
            std::process::id(),
            SERVERS.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        let socket = dir.join("s");
        let _ = std::fs::remove_file(&socket);
        let mut server = ServerBuilder::new(Arc::clone(&env))
            .register_service(grpc_service)
            .build()
            .expect("a gRPC server");
        server
            .add_listening_port(
                format!("unix:{}", socket.display()),
                ServerCredentials::insecure(),
            )
            .expect("listening");
        server.start();
        let connection = service::connect(env, &socket).expect("a channel");
        BareServer {
            _server: server,
            calls,
            connection,
            dir,
        }
    }

    type Answer = grpcio::ClientUnaryReceiver<ExecuteResponse>;

    /// A unary `Execute` from a client: its answer to come, and the server's
    /// end of it.
    fn one_call(
        server: &BareServer,
    ) -> (
        Answer,
        RequestStream<ExecuteCommand>,
        DuplexSink<ExecuteResponse>,
    ) {
        let answer = server
            .connection
            .client()
            .unary_call_async(
                &service::EXECUTE,
                &ExecuteCommand::new(),
                CallOption::default(),
            )
            .expect("the call starts");
        let (stream, sink) = server
            .calls
            .recv_timeout(Duration::from_secs(10))
            .expect("the call reaches the server");
        (answer, stream, sink)
    }

    #[test]
    fn a_one_request_call_is_answered_with_its_status_by_the_delivering_thread() {
        let server = bare_server();
        let (mut answer, stream, sink) = one_call(&server);
        let mailbox = Mailbox::new(sink, true);
        mailbox.deliver(7, Response::ok("fine\n"), |r| to_wire("h 1 /x", r, None));

        // Nothing polls the call: only a send from `deliver` reaches the client.
        let deadline = Instant::now() + Duration::from_secs(10);
        let response = block_on_until(&mut answer, deadline)
            .expect("the answer and the status arrive")
            .expect("the call succeeds");
        assert_eq!(response.stderr, "Buck2 persistent worker h 1 /x\nfine\n");
        let mut inner = lock(&mailbox.inner);
        assert!(inner.sink.is_none(), "the sink went with the answer");
        match inner.done.pop() {
            Some((7, Finished::Sent(mut status))) => {
                let finished = block_on_until(&mut status, deadline);
                assert!(matches!(finished, Some(Ok(()))), "gRPC finishes the call");
            }
            _ => panic!("the call is told its answer went"),
        }
        drop(stream);
    }

    #[test]
    fn a_stream_leaves_its_answers_to_the_call() {
        let server = bare_server();
        let (_answer, _stream, sink) = one_call(&server);
        let mailbox = Mailbox::new(sink, false);
        mailbox.deliver(3, Response::ok("later\n"), |r| to_wire("h 1 /x", r, None));
        let inner = lock(&mailbox.inner);
        assert!(inner.sink.is_some());
        assert!(matches!(
            inner.done.as_slice(),
            [(3, Finished::Response(r))] if r.output == "later\n"
        ));
    }
}
