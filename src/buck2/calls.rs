//! The three RPCs, each one future per call on the completion-queue thread.
//!
//! A call future only moves messages: it turns each incoming command into a
//! [`Request`](crate::request::Request) and submits it to the pool. The call's sink sits in a mailbox
//! it shares with the pool threads running its requests.
//!
//! A call that carries one request (`Execute`, `Exec`) is answered by the
//! pool thread that finishes it: that thread writes the response and the
//! call's status straight onto the connection, and the completion-queue
//! thread only learns afterwards that the call is over. Handing the response
//! back to that thread first would put one more thread wake-up on every
//! request's path, and on a machine whose cores are all busy each wake-up
//! can wait a scheduler tick (4 ms) for a core.
//!
//! A stream's pool threads drop their responses into the mailbox and wake
//! the call's task (grpcio's task waker may be used from any thread and
//! kicks the completion queue); the call sends them in order.
//!
//! Between answers the call future polls the sink, because that is the one
//! place grpcio reports that the client dropped the call: it then trips the
//! requests' tokens.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures_util::{Sink, Stream};
use grpcio::{
    DuplexSink, DuplexSinkFailure, RequestStream, RpcContext, RpcStatus, RpcStatusCode, WriteFlags,
};
use protobuf::MessageField;

use super::command::to_request;
use super::lifecycle::{Ticket, Tracker};
use super::service::WorkerService;
use crate::pool::{Pace, Pool};
use crate::proto::worker::{
    execute_event, ExecuteCommand, ExecuteCommandStream, ExecuteEvent, ExecuteResponse,
    ExecuteResponseStream,
};
use crate::request::{lock, CancelToken, Handler, Response};

/// Everything the calls share.
pub struct Shared {
    pub handler: Arc<dyn Handler>,
    pub pool: Pool,
    /// The worker's cwd (Buck2's project root): where argfiles and relative
    /// outputs resolve.
    pub cwd: PathBuf,
    /// `<hostname> <pid> <cwd>` for the first line of every response.
    pub identity: String,
    pub tracker: Arc<Tracker>,
    pub verbose: bool,
    /// Numbers calls for the log.
    pub calls: AtomicU64,
}

/// The service registered with gRPC.
#[derive(Clone)]
pub struct Worker {
    shared: Arc<Shared>,
}

impl Worker {
    pub fn new(shared: Arc<Shared>) -> Worker {
        Worker { shared }
    }
}

impl WorkerService for Worker {
    fn execute(
        &mut self,
        ctx: RpcContext<'_>,
        requests: RequestStream<ExecuteCommand>,
        sink: DuplexSink<ExecuteResponse>,
    ) {
        ctx.spawn(Call::new(Execute::default(), requests, sink, &self.shared));
    }

    fn exec(
        &mut self,
        ctx: RpcContext<'_>,
        requests: RequestStream<ExecuteEvent>,
        sink: DuplexSink<ExecuteResponse>,
    ) {
        ctx.spawn(Call::new(Exec::default(), requests, sink, &self.shared));
    }

    fn execute_stream(
        &mut self,
        ctx: RpcContext<'_>,
        requests: RequestStream<ExecuteCommandStream>,
        sink: DuplexSink<ExecuteResponseStream>,
    ) {
        ctx.spawn(Call::new(ExecuteStream, requests, sink, &self.shared));
    }
}

/// What distinguishes the three RPCs: how incoming messages become requests
/// and how a finished request goes back on the wire.
trait Protocol: Send + Unpin + 'static {
    type In: Send + 'static;
    type Out: Send + 'static;
    const NAME: &'static str;
    /// The call carries exactly one request and ends once it is answered,
    /// whether or not the client has half-closed.
    const ONE_RESPONSE: bool;

    fn on_message(
        &mut self,
        message: Self::In,
        requests: &mut Requests<Self::Out>,
    ) -> Result<(), RpcStatus>;
    fn on_end_of_input(&mut self, requests: &Requests<Self::Out>) -> Result<(), RpcStatus>;
    fn wire(id: u64, response: ExecuteResponse) -> Self::Out;
}

/// `worker.Worker/Execute`: one command, one response.
#[derive(Default)]
struct Execute {
    started: bool,
}

impl Protocol for Execute {
    type In = ExecuteCommand;
    type Out = ExecuteResponse;
    const NAME: &'static str = "Execute";
    const ONE_RESPONSE: bool = true;

    fn on_message(
        &mut self,
        command: ExecuteCommand,
        requests: &mut Requests<ExecuteResponse>,
    ) -> Result<(), RpcStatus> {
        if self.started {
            return Err(invalid("Execute takes exactly one ExecuteCommand"));
        }
        self.started = true;
        requests.start(0, command);
        Ok(())
    }

    fn on_end_of_input(&mut self, _: &Requests<ExecuteResponse>) -> Result<(), RpcStatus> {
        if self.started {
            Ok(())
        } else {
            Err(invalid("Execute ended without an ExecuteCommand"))
        }
    }

    fn wire(_: u64, response: ExecuteResponse) -> ExecuteResponse {
        response
    }
}

/// `worker.Worker/Exec`: a command, then possibly a cancel, one response.
#[derive(Default)]
struct Exec {
    started: bool,
}

impl Protocol for Exec {
    type In = ExecuteEvent;
    type Out = ExecuteResponse;
    const NAME: &'static str = "Exec";
    const ONE_RESPONSE: bool = true;

    fn on_message(
        &mut self,
        event: ExecuteEvent,
        requests: &mut Requests<ExecuteResponse>,
    ) -> Result<(), RpcStatus> {
        match (event.data, self.started) {
            (Some(execute_event::Data::Command(command)), false) => {
                self.started = true;
                requests.start(0, command);
                Ok(())
            }
            (Some(execute_event::Data::Command(_)), true) => Err(invalid(
                "Exec carries one command: a second ExecuteEvent with a command arrived",
            )),
            (Some(execute_event::Data::Cancel(_)), true) => {
                requests.cancel_all();
                Ok(())
            }
            (Some(execute_event::Data::Cancel(_)), false) => Err(invalid(
                "the first ExecuteEvent of Exec must carry the command, not a cancel",
            )),
            _ => Err(invalid(
                "an ExecuteEvent carried neither a command nor a cancel",
            )),
        }
    }

    fn on_end_of_input(&mut self, _: &Requests<ExecuteResponse>) -> Result<(), RpcStatus> {
        if self.started {
            Ok(())
        } else {
            Err(invalid(
                "Exec ended without an ExecuteEvent carrying the command",
            ))
        }
    }

    fn wire(_: u64, response: ExecuteResponse) -> ExecuteResponse {
        response
    }
}

/// `worker.WorkerStreaming/ExecuteStream`: many commands, each answered with
/// its id as soon as it finishes.
struct ExecuteStream;

impl Protocol for ExecuteStream {
    type In = ExecuteCommandStream;
    type Out = ExecuteResponseStream;
    const NAME: &'static str = "ExecuteStream";
    const ONE_RESPONSE: bool = false;

    fn on_message(
        &mut self,
        message: ExecuteCommandStream,
        requests: &mut Requests<ExecuteResponseStream>,
    ) -> Result<(), RpcStatus> {
        let command = message.request.into_option().unwrap_or_default();
        requests.start(message.id, command);
        Ok(())
    }

    fn on_end_of_input(&mut self, _: &Requests<ExecuteResponseStream>) -> Result<(), RpcStatus> {
        Ok(())
    }

    fn wire(id: u64, response: ExecuteResponse) -> ExecuteResponseStream {
        let mut wire = ExecuteResponseStream::new();
        wire.id = id;
        wire.response = MessageField::some(response);
        wire
    }
}

fn invalid(message: &str) -> RpcStatus {
    RpcStatus::with_message(RpcStatusCode::INVALID_ARGUMENT, message.to_owned())
}

/// What a call shares with the pool threads running its requests.
struct Mailbox<T> {
    inner: Mutex<MailboxInner<T>>,
    /// The call carries one request: the thread that finishes it sends the
    /// answer and the call's status itself.
    answered_by_pool: bool,
}

struct MailboxInner<T> {
    /// The call's sink, until its status is on the way.
    sink: Option<DuplexSink<T>>,
    done: Vec<(u64, Finished)>,
    /// The call's task, to wake when something is done.
    waker: Option<Waker>,
}

/// What became of an answer a pool thread sent itself.
enum SentByPool {
    /// Sent, and the call's status behind it.
    Sent(DuplexSinkFailure),
    /// gRPC refused it.
    Lost,
}

/// A request back from the pool.
enum Finished {
    /// For the call to send.
    Response(Response),
    /// Sent with the call's status; gRPC finishes the call.
    Sent(DuplexSinkFailure),
    /// The call broke as the answer was being sent: nothing left to send.
    Lost,
}

impl<T> Mailbox<T> {
    fn new(sink: DuplexSink<T>, answered_by_pool: bool) -> Mailbox<T> {
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
    fn deliver(&self, key: u64, response: Response, wire: impl FnOnce(Response) -> T) {
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

    /// Takes the sink from the pool threads' reach.
    fn take_sink(&self) -> Option<DuplexSink<T>> {
        lock(&self.inner).sink.take()
    }

    /// What the pool finished since the last call; registers the call's task
    /// to be woken for more.
    fn take(&self, cx: &Context<'_>) -> Vec<(u64, Finished)> {
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

/// A request on the pool, as its call remembers it.
struct Running {
    id: u64,
    token: CancelToken,
    timeout_s: Option<u64>,
    _ticket: Ticket,
}

/// The requests of one call: started, running, and answered but not yet sent.
struct Requests<T> {
    shared: Arc<Shared>,
    mailbox: Arc<Mailbox<T>>,
    /// The call's message for a response to the command with an id.
    wire: fn(u64, ExecuteResponse) -> T,
    running: HashMap<u64, Running>,
    next_key: u64,
    /// Responses waiting for the sink, with the id of their command.
    ready: VecDeque<(u64, ExecuteResponse)>,
    /// How log lines name this call, e.g. `Execute #12`.
    label: String,
    /// Streams carry many requests: their log lines add the request id.
    log_ids: bool,
    /// A one-answer call's client waits for the answer; a stream's does not.
    pace: Pace,
}

impl<T: Send + 'static> Requests<T> {
    fn start(&mut self, id: u64, command: ExecuteCommand) {
        let shared = Arc::clone(&self.shared);
        let (mut request, timeout_s) = match to_request(command, &shared.cwd) {
            Ok(parsed) => parsed,
            Err(message) => {
                if shared.verbose {
                    eprint!("worker: {} refused: {message}", self.name(id));
                }
                let response = to_wire(&shared.identity, Response::error(2, message), None);
                self.ready.push_back((id, response));
                return;
            }
        };
        if let Some(seconds) = timeout_s {
            request.cancel.set_timeout(Duration::from_secs(seconds));
        }
        // How the pool names it if its tool gets stuck.
        request.id = self.name(id);
        let key = self.next_key;
        self.next_key += 1;
        if shared.verbose {
            crate::elog!(
                "worker: {} started: {} argument(s), {} env entr(ies), timeout {}",
                self.name(id),
                request.args.len(),
                request.env.len(),
                timeout_s.map_or("none".to_owned(), |s| format!("{s} s")),
            );
        }
        self.running.insert(
            key,
            Running {
                id,
                token: request.cancel.clone(),
                timeout_s,
                _ticket: shared.tracker.request(request.cancel.clone()),
            },
        );
        let mailbox = Arc::clone(&self.mailbox);
        let (name, wire) = (self.name(id), self.wire);
        shared
            .pool
            .submit(Arc::clone(&shared.handler), request, self.pace, {
                let shared = Arc::clone(&shared);
                move |response| {
                    // Logged here, not by the call: a request whose client left
                    // still ends, and this is when its pool slot frees up.
                    if shared.verbose {
                        log_finished(&name, &response);
                    }
                    mailbox.deliver(key, response, |response| {
                        wire(id, to_wire(&shared.identity, response, timeout_s))
                    })
                }
            });
    }

    fn name(&self, id: u64) -> String {
        if self.log_ids {
            format!("{} id {id}", self.label)
        } else {
            self.label.clone()
        }
    }

    fn cancel_all(&self) {
        for running in self.running.values() {
            running.token.cancel();
        }
    }

    /// Moves what the pool finished into `ready`; returns what became of an
    /// answer a pool thread sent itself.
    fn collect(&mut self, cx: &Context<'_>) -> Option<SentByPool> {
        let mut sent = None;
        for (key, finished) in self.mailbox.take(cx) {
            // A request whose call failed meanwhile is no longer listed; if
            // its answer went out anyway, that answer ends the call.
            match (finished, self.running.remove(&key)) {
                (Finished::Sent(status), _) => sent = Some(SentByPool::Sent(status)),
                (Finished::Lost, Some(_)) => sent = Some(SentByPool::Lost),
                (Finished::Response(response), Some(running)) => {
                    let wire = to_wire(&self.shared.identity, response, running.timeout_s);
                    self.ready.push_back((running.id, wire));
                }
                (Finished::Response(_) | Finished::Lost, None) => {}
            }
        }
        sent
    }
}

fn log_finished(name: &str, response: &Response) {
    let mut how = String::new();
    if response.cancelled {
        how.push_str(", cancelled");
    }
    if response.timed_out {
        how.push_str(", timed out");
    }
    crate::elog!(
        "worker: {name} finished: exit code {}{how}",
        response.exit_code
    );
}

fn to_wire(identity: &str, response: Response, timeout_s: Option<u64>) -> ExecuteResponse {
    let mut wire = ExecuteResponse::new();
    wire.exit_code = response.exit_code;
    wire.stderr = format!("Buck2 persistent worker {identity}\n{}", response.output);
    if response.timed_out {
        wire.timed_out_after_s = timeout_s;
    }
    wire
}

/// How a call ends once it stops taking work.
enum Ending<T> {
    /// Everything answered: send the OK status.
    Closing(DuplexSink<T>),
    /// A status is on its way; gRPC finishes the call.
    Status(DuplexSinkFailure),
}

/// One RPC in progress.
struct Call<P: Protocol> {
    protocol: P,
    /// Kept until the call is over even when no longer read: dropping a
    /// request stream before the client's half-close cancels the call.
    input: RequestStream<P::In>,
    reading: bool,
    requests: Requests<P::Out>,
    /// A response handed to gRPC whose write has not completed yet.
    writing: bool,
    sent: usize,
    ending: Option<Ending<P::Out>>,
    registration: Option<Ticket>,
}

impl<P: Protocol> Call<P> {
    fn new(
        protocol: P,
        input: RequestStream<P::In>,
        sink: DuplexSink<P::Out>,
        shared: &Arc<Shared>,
    ) -> Call<P> {
        Call {
            protocol,
            input,
            reading: true,
            requests: Requests {
                shared: Arc::clone(shared),
                mailbox: Arc::new(Mailbox::new(sink, P::ONE_RESPONSE)),
                wire: P::wire,
                running: HashMap::new(),
                next_key: 0,
                ready: VecDeque::new(),
                label: format!(
                    "{} #{}",
                    P::NAME,
                    shared.calls.fetch_add(1, Ordering::Relaxed)
                ),
                log_ids: !P::ONE_RESPONSE,
                pace: if P::ONE_RESPONSE {
                    Pace::Lockstep
                } else {
                    Pace::Free
                },
            },
            writing: false,
            sent: 0,
            ending: None,
            registration: None,
        }
    }

    /// The client went away (or the call broke): nobody can receive an
    /// answer, so stop the work and free the pool slots.
    fn abandon(&mut self, why: &str) -> Poll<()> {
        if self.requests.shared.verbose || !self.requests.running.is_empty() {
            crate::elog!(
                "worker: {} ended by the client ({why}); cancelling {} running request(s)",
                self.requests.label,
                self.requests.running.len()
            );
        }
        // Out of reach of the pool threads before their requests are
        // cancelled and answer.
        drop(self.requests.mailbox.take_sink());
        self.requests.cancel_all();
        self.requests.running.clear();
        Poll::Ready(())
    }

    fn fail(&mut self, status: RpcStatus) {
        crate::elog!(
            "worker: {} rejected: {}",
            self.requests.label,
            status.message()
        );
        // The sink first: a request cancelled below would otherwise answer
        // the call, with an OK status, before this failure could. Without
        // the sink, a pool thread has already sent the answer and the status,
        // which `collect` picks up next.
        let sink = self.requests.mailbox.take_sink();
        self.requests.cancel_all();
        self.requests.running.clear();
        self.reading = false;
        if let Some(sink) = sink {
            self.ending = Some(Ending::Status(sink.fail(status)));
        }
    }

    fn finished(&self) -> bool {
        let idle =
            self.requests.running.is_empty() && self.requests.ready.is_empty() && !self.writing;
        if P::ONE_RESPONSE {
            self.sent > 0 && idle
        } else {
            !self.reading && idle
        }
    }

    fn step(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.registration.is_none() {
            self.registration = Some(self.requests.shared.tracker.call(cx.waker().clone()));
        }
        loop {
            match &mut self.ending {
                Some(Ending::Status(status)) => {
                    let _ = futures_util::ready!(Pin::new(status).poll(cx));
                    return Poll::Ready(());
                }
                Some(Ending::Closing(sink)) => {
                    if let Err(e) = futures_util::ready!(Pin::new(sink).poll_close(cx)) {
                        if self.requests.shared.verbose {
                            crate::elog!("worker: {} could not finish: {e}", self.requests.label);
                        }
                    }
                    return Poll::Ready(());
                }
                None => {}
            }
            let mut progress = false;

            if self.reading && self.requests.shared.tracker.is_draining() {
                self.reading = false;
                if P::ONE_RESPONSE
                    && self.sent == 0
                    && self.requests.running.is_empty()
                    && self.requests.ready.is_empty()
                {
                    self.fail(RpcStatus::with_message(
                        RpcStatusCode::UNAVAILABLE,
                        "the worker is shutting down".to_owned(),
                    ));
                    continue;
                }
            }

            match self.requests.collect(cx) {
                Some(SentByPool::Sent(status)) => {
                    self.sent += 1;
                    self.ending = Some(Ending::Status(status));
                    continue;
                }
                // The call may be over already (the status then goes nowhere)
                // or not: either way it ends, and a client still there learns
                // why rather than waiting.
                Some(SentByPool::Lost) => {
                    self.fail(RpcStatus::with_message(
                        RpcStatusCode::INTERNAL,
                        "the worker could not send the answer".to_owned(),
                    ));
                    continue;
                }
                None => {}
            }

            let mut inner = lock(&self.requests.mailbox.inner);
            // Gone only to a pool thread that answered since `collect`.
            let Some(sink) = inner.sink.as_mut() else {
                continue;
            };
            // Also the client-gone check: the sink's readiness fails once the
            // call is over without our status, i.e. cancelled by the peer.
            match Pin::new(&mut *sink).poll_ready(cx) {
                Poll::Ready(Err(e)) => {
                    drop(inner);
                    return self.abandon(&e.to_string());
                }
                Poll::Ready(Ok(())) => {
                    if self.writing {
                        self.writing = false;
                        self.sent += 1;
                        progress = true;
                    }
                    if let Some((id, response)) = self.requests.ready.pop_front() {
                        let message = P::wire(id, response);
                        if let Err(e) =
                            Pin::new(&mut *sink).start_send((message, WriteFlags::default()))
                        {
                            drop(inner);
                            return self.abandon(&e.to_string());
                        }
                        self.writing = true;
                        continue;
                    }
                }
                Poll::Pending => {}
            }
            drop(inner);

            if self.reading {
                match Pin::new(&mut self.input).poll_next(cx) {
                    Poll::Ready(Some(Ok(message))) => {
                        progress = true;
                        if let Err(status) = self.protocol.on_message(message, &mut self.requests) {
                            self.fail(status);
                            continue;
                        }
                    }
                    Poll::Ready(Some(Err(grpcio::Error::Codec(e)))) => {
                        self.fail(RpcStatus::with_message(
                            RpcStatusCode::INVALID_ARGUMENT,
                            format!("cannot decode the request: {e}"),
                        ));
                        continue;
                    }
                    Poll::Ready(Some(Err(e))) => return self.abandon(&e.to_string()),
                    Poll::Ready(None) => {
                        progress = true;
                        self.reading = false;
                        if let Err(status) = self.protocol.on_end_of_input(&self.requests) {
                            self.fail(status);
                            continue;
                        }
                    }
                    Poll::Pending => {}
                }
            }

            if self.finished() {
                let Some(sink) = self.requests.mailbox.take_sink() else {
                    return Poll::Ready(());
                };
                self.ending = Some(Ending::Closing(sink));
                continue;
            }
            if !progress {
                return Poll::Pending;
            }
        }
    }
}

impl<P: Protocol> Future for Call<P> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.get_mut().step(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buck2::lifecycle::block_on_until;
    use crate::buck2::service;
    use grpcio::{
        CallOption, EnvBuilder, Method, MethodType, ServerBuilder, ServerCredentials,
        ServiceBuilder,
    };
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

    #[test]
    fn wire_response_starts_with_identity_and_reports_timeouts() {
        let mut r = Response::stopped(crate::request::Stop::TimedOut, "late\n");
        r.timed_out = true;
        let wire = to_wire("h 1 /x", r, Some(7));
        assert_eq!(wire.stderr, "Buck2 persistent worker h 1 /x\nlate\n");
        assert_eq!(wire.timed_out_after_s, Some(7));
        let wire = to_wire("h 1 /x", Response::ok("fine\n"), Some(7));
        assert_eq!(wire.timed_out_after_s, None);
    }
}
