//! Benchmark floor for the Buck2 protocol's transport: a grpcio server (the
//! worker's grpcio version, features and channel settings) on the Unix socket
//! named by `WORKER_SOCKET`, whose methods echo their input as raw bytes:
//!
//! - `/worker.Worker/Execute`, unary: the request comes back as the response;
//! - `/worker.Worker/Exec`, client-streaming: the first message comes back;
//! - `/worker.WorkerStreaming/ExecuteStream`, bidi-streaming: every message
//!   is answered as it arrives with what the worker answers a no-op, an
//!   `ExecuteResponseStream` of exit code 0 and the message's `id` (read off
//!   the wire without decoding the command). An echo would hand the client a
//!   larger message, argv and env as unknown fields to decode and drop, and
//!   the worker, answering less, would come out faster than its floor.
//!
//! With `--execute-as-duplex`, `Execute` is served the way the worker serves
//! it: as a bidi stream that carries one message each way (so that a client
//! dropping the call is seen while the request runs). The difference between
//! the two `Execute` floors is the price of that, not of the worker's code.
//!
//! With `--write`, `Execute` is a write request of the demo tool: the floor
//! decodes the command and writes the file its last argument names, as the
//! demo does, before answering, so that a write row is compared with a floor
//! that creates the same files.
//!
//! With `--answer-from-pool`, `Execute` is answered from a thread of the
//! worker's own pool (`persistent_worker::pool`, one thread per core, a
//! no-op handler), as the worker answers it: the request waits for a pool
//! thread as the worker's do, awake after a lockstep answer, asleep on the
//! pool's own condition variable otherwise. Beside normal-priority load the
//! floor answered on gRPC's thread had 10-14 % of its requests over 2 ms
//! where the worker had 7-12 %, one answered from a plain second thread
//! more still (26-38 %), and this one 6-9 %; beside niced load the two floors
//! trade places from run to run. The tail benchmark (`ci/bench-tail.sh`)
//! runs both.
//!
//! `ExecuteStream` keeps reading while an answer is being written, as the
//! worker's calls do: a floor that stopped reading for each write would
//! alternate the two and come out slower than the worker it bounds.
//!
//! No protobuf decoding (but `--write`'s) and no thread beyond gRPC's own. An echoed
//! `ExecuteCommand` decodes as an `ExecuteResponse` with exit code 0 (argv and
//! env have wire types that `ExecuteResponse` does not use for those numbers,
//! so they become unknown fields), so the benchmark client drives this floor
//! as it drives the worker.

#[path = "floor_support/mod.rs"]
mod floor_support;

use std::collections::VecDeque;
use std::future::Future;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use futures_util::{FutureExt, Sink, SinkExt, Stream, TryStreamExt};
use grpcio::{
    DuplexSink, EnvBuilder, GrpcSlice, Marshaller, MessageReader, Method, MethodType,
    RequestStream, ServerBuilder, ServerCredentials, ServiceBuilder, UnarySinkResult, WriteFlags,
};
use persistent_worker::proto::worker::{ExecuteCommand, ExecuteResponseStream};
use protobuf::{CodedInputStream, Message};

fn read_bytes(mut reader: MessageReader) -> grpcio::Result<Vec<u8>> {
    let mut bytes = Vec::with_capacity(reader.len());
    reader
        .read_to_end(&mut bytes)
        .map_err(|e| grpcio::Error::Codec(Box::new(e)))?;
    Ok(bytes)
}

// The marshaller's signature fixes `&Vec<u8>`: the message type is `Vec<u8>`.
#[allow(clippy::ptr_arg)]
fn write_bytes(bytes: &Vec<u8>, slice: &mut GrpcSlice) -> grpcio::Result<()> {
    *slice = GrpcSlice::from(&bytes[..]);
    Ok(())
}

const fn echo_method(ty: MethodType, name: &'static str) -> Method<Vec<u8>, Vec<u8>> {
    let bytes = Marshaller {
        ser: write_bytes,
        de: read_bytes,
    };
    Method {
        ty,
        name,
        req_mar: Marshaller { ..bytes },
        resp_mar: bytes,
    }
}

const UNARY: Method<Vec<u8>, Vec<u8>> = echo_method(MethodType::Unary, "/worker.Worker/Execute");
const CLIENT_STREAMING: Method<Vec<u8>, Vec<u8>> =
    echo_method(MethodType::ClientStreaming, "/worker.Worker/Exec");
const BIDI: Method<Vec<u8>, Vec<u8>> =
    echo_method(MethodType::Duplex, "/worker.WorkerStreaming/ExecuteStream");
const UNARY_AS_DUPLEX: Method<Vec<u8>, Vec<u8>> =
    echo_method(MethodType::Duplex, "/worker.Worker/Execute");

/// What the worker answers an `ExecuteCommandStream` whose command is a
/// no-op: exit code 0 under the message's `id` (field 2, a varint; the
/// command, field 1, is skipped unread). `None` for a message that is not one.
fn noop_answer(message: &[u8]) -> Option<Vec<u8>> {
    let mut input = CodedInputStream::from_bytes(message);
    let mut id = 0;
    while let Some(tag) = input.read_raw_tag_or_eof().ok()? {
        if tag == 2 << 3 {
            id = input.read_uint64().ok()?;
        } else {
            input
                .skip_field(protobuf::rt::WireType::new(tag & 7)?)
                .ok()?;
        }
    }
    let mut answer = ExecuteResponseStream::new();
    answer.response = protobuf::MessageField::some(Default::default());
    answer.id = id;
    answer.write_to_bytes().ok()
}

/// An `ExecuteStream` call served the way the worker serves one: each turn
/// sends the next answer when the sink is ready and reads the next message
/// whether or not a write is in flight.
struct Answer {
    input: RequestStream<Vec<u8>>,
    sink: DuplexSink<Vec<u8>>,
    queued: VecDeque<Vec<u8>>,
    reading: bool,
}

impl Future for Answer {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        loop {
            let mut progress = false;
            if !this.queued.is_empty() {
                match Pin::new(&mut this.sink).poll_ready(cx) {
                    Poll::Ready(Ok(())) => {
                        if let Some(message) = this.queued.pop_front() {
                            let sent = Pin::new(&mut this.sink)
                                .start_send((message, WriteFlags::default()));
                            if sent.is_err() {
                                return Poll::Ready(());
                            }
                            progress = true;
                        }
                    }
                    Poll::Ready(Err(_)) => return Poll::Ready(()),
                    Poll::Pending => {}
                }
            }
            if this.reading {
                match Pin::new(&mut this.input).poll_next(cx) {
                    Poll::Ready(Some(Ok(message))) => {
                        let Some(answer) = noop_answer(&message) else {
                            return Poll::Ready(());
                        };
                        this.queued.push_back(answer);
                        progress = true;
                    }
                    Poll::Ready(Some(Err(_))) => return Poll::Ready(()),
                    Poll::Ready(None) => {
                        this.reading = false;
                        progress = true;
                    }
                    Poll::Pending => {}
                }
            }
            if !this.reading && this.queued.is_empty() {
                return Pin::new(&mut this.sink).poll_close(cx).map(|_| ());
            }
            if !progress {
                return Poll::Pending;
            }
        }
    }
}

/// The demo tool's write, for an echoed `ExecuteCommand`: its last argument
/// is OUTFILE.
fn write_outfile(request: &[u8]) {
    let command = match ExecuteCommand::parse_from_bytes(request) {
        Ok(command) => command,
        Err(e) => return eprintln!("bench_floor_grpc: cannot decode the command: {e}"),
    };
    let Some(last) = command.argv.last() else {
        return eprintln!("bench_floor_grpc: a write request needs OUTFILE");
    };
    let path = std::path::Path::new(std::ffi::OsStr::from_bytes(last));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    if let Err(e) = std::fs::write(path, format!("{name}\n")) {
        eprintln!("bench_floor_grpc: cannot write {}: {e}", path.display());
    }
}

/// An answer started on a pool thread (`--answer-from-pool`), for the
/// call's task to see through: dropped unfinished, grpcio cancels it.
#[derive(Default)]
struct Handed(Mutex<(Option<UnarySinkResult>, Option<Waker>)>);

impl Handed {
    fn put(&self, result: UnarySinkResult) {
        let waker = {
            let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
            slot.0 = Some(result);
            slot.1.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// The call's task: done when the answer handed to it is.
struct Awaiting(Arc<Handed>);

impl Future for Awaiting {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut slot = self.0 .0.lock().unwrap_or_else(|e| e.into_inner());
        match slot.0.as_mut() {
            Some(result) => result.poll_unpin(cx).map(|_| ()),
            None => {
                slot.1 = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

fn main() -> ExitCode {
    floor_support::schedule_as_the_worker();
    let Some(socket) = std::env::var_os("WORKER_SOCKET") else {
        eprintln!("bench_floor_grpc: WORKER_SOCKET is not set");
        return ExitCode::from(2);
    };
    let (mut as_duplex, mut write, mut from_pool) = (false, false, false);
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--execute-as-duplex" => as_duplex = true,
            "--answer-from-pool" => from_pool = true,
            "--write" => write = true,
            other => {
                eprintln!("bench_floor_grpc: unknown argument {other:?}");
                return ExitCode::from(2);
            }
        }
    }
    let env = Arc::new(EnvBuilder::new().cq_count(1).name_prefix("grpc-cq").build());
    let service = ServiceBuilder::new();
    let service = if as_duplex {
        service.add_duplex_streaming_handler(
            &UNARY_AS_DUPLEX,
            move |ctx, mut requests, mut sink| {
                ctx.spawn(async move {
                    if let Ok(Some(request)) = requests.try_next().await {
                        if write {
                            write_outfile(&request);
                        }
                        let _ = sink.send((request, WriteFlags::default())).await;
                    }
                    let _ = sink.close().await;
                });
            },
        )
    } else if from_pool {
        use persistent_worker::pool::{Pace, Pool};
        use persistent_worker::request::{Handler, Request, Response};
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let pool = Arc::new(Pool::new(threads));
        let noop: Arc<dyn Handler> = Arc::new(|_: &Request| Response::ok(""));
        service.add_unary_handler(&UNARY, move |ctx, request, sink| {
            let handed = Arc::new(Handed::default());
            let answer = Arc::clone(&handed);
            let _ = pool.submit(
                Arc::clone(&noop),
                Request::new(Vec::new(), std::path::PathBuf::new()),
                Pace::Lockstep,
                move |_| {
                    if write {
                        write_outfile(&request);
                    }
                    answer.put(sink.success(request));
                },
            );
            ctx.spawn(Awaiting(handed));
        })
    } else {
        service.add_unary_handler(&UNARY, move |ctx, request, sink| {
            if write {
                write_outfile(&request);
            }
            ctx.spawn(sink.success(request).map(|_| ()));
        })
    };
    let service = service
        .add_client_streaming_handler(&CLIENT_STREAMING, |ctx, mut requests, sink| {
            ctx.spawn(async move {
                if let Ok(Some(first)) = requests.try_next().await {
                    let _ = sink.success(first).await;
                }
            });
        })
        .add_duplex_streaming_handler(&BIDI, |ctx, input, sink| {
            ctx.spawn(Answer {
                input,
                sink,
                queued: VecDeque::new(),
                reading: true,
            });
        })
        .build();
    let built = ServerBuilder::new(Arc::clone(&env))
        .channel_args(
            persistent_worker::buck2::service::unlimited_channel(Arc::clone(&env)).build_args(),
        )
        .register_service(service)
        .build();
    let mut server = match built {
        Ok(server) => server,
        Err(e) => {
            eprintln!("bench_floor_grpc: {e}");
            return ExitCode::from(2);
        }
    };
    let uri = format!("unix:{}", socket.to_string_lossy());
    if let Err(e) = server.add_listening_port(uri.as_str(), ServerCredentials::insecure()) {
        eprintln!("bench_floor_grpc: cannot listen on {uri}: {e}");
        return ExitCode::from(2);
    }
    server.start();
    // Serve until killed (the benchmark client ends it with SIGTERM).
    loop {
        std::thread::park();
    }
}
