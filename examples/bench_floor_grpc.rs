//! Benchmark floor for the Buck2 protocol's transport: a grpcio server (the
//! worker's grpcio version, features and channel settings) on the Unix socket
//! named by `WORKER_SOCKET`, whose methods echo their input as raw bytes:
//!
//! - `/worker.Worker/Execute`, unary: the request comes back as the response;
//! - `/worker.Worker/Exec`, client-streaming: the first message comes back;
//! - `/worker.WorkerStreaming/ExecuteStream`, bidi-streaming: every message
//!   comes back as it arrives.
//!
//! With `--execute-as-duplex`, `Execute` is served the way the worker serves
//! it: as a bidi stream that carries one message each way (so that a client
//! dropping the call is seen while the request runs). The difference between
//! the two `Execute` floors is the price of that, not of the worker's code.
//!
//! With `--execute-via-thread`, `Execute` is served as a duplex call whose
//! request goes through a crossbeam channel to a second thread, which hands
//! the bytes back and wakes the call: the hop between gRPC's thread and a
//! pool thread that the worker makes, and nothing else of the worker.
//!
//! No protobuf decoding and no thread beyond gRPC's own. An echoed
//! `ExecuteCommand` decodes as an `ExecuteResponse` with exit code 0 (argv and
//! env have wire types that `ExecuteResponse` does not use for those numbers,
//! so they become unknown fields), and an echoed `ExecuteCommandStream` keeps
//! its `id`, so the benchmark client drives this floor as it drives the worker.

use std::future::Future;
use std::io::Read;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use futures_util::{FutureExt, SinkExt, TryStreamExt};
use grpcio::{
    EnvBuilder, GrpcSlice, Marshaller, MessageReader, Method, MethodType, ServerBuilder,
    ServerCredentials, ServiceBuilder, WriteFlags,
};

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

/// A one-shot slot the echo thread fills, waking the call that waits on it.
#[derive(Clone, Default)]
struct Reply(Arc<Mutex<Slot>>);

/// The echoed bytes once there, and the call's waker until then.
type Slot = (Option<Vec<u8>>, Option<Waker>);

impl Future for Reply {
    type Output = Vec<u8>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Vec<u8>> {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match slot.0.take() {
            Some(bytes) => Poll::Ready(bytes),
            None => {
                slot.1 = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

fn start_echo_thread() -> crossbeam_channel::Sender<(Vec<u8>, Reply)> {
    let (sender, receiver) = crossbeam_channel::unbounded::<(Vec<u8>, Reply)>();
    std::thread::spawn(move || {
        for (bytes, reply) in receiver {
            let waker = {
                let mut slot = reply.0.lock().unwrap_or_else(|e| e.into_inner());
                slot.0 = Some(bytes);
                slot.1.take()
            };
            if let Some(waker) = waker {
                waker.wake();
            }
        }
    });
    sender
}

fn main() -> ExitCode {
    let Some(socket) = std::env::var_os("WORKER_SOCKET") else {
        eprintln!("bench_floor_grpc: WORKER_SOCKET is not set");
        return ExitCode::from(2);
    };
    let (as_duplex, via_thread) = match std::env::args().nth(1).as_deref() {
        None => (false, false),
        Some("--execute-as-duplex") => (true, false),
        Some("--execute-via-thread") => (true, true),
        Some(other) => {
            eprintln!("bench_floor_grpc: unknown argument {other:?}");
            return ExitCode::from(2);
        }
    };
    let env = Arc::new(EnvBuilder::new().cq_count(1).name_prefix("grpc-cq").build());
    let service = ServiceBuilder::new();
    let hop = via_thread.then(start_echo_thread);
    let service = if as_duplex {
        service.add_duplex_streaming_handler(
            &UNARY_AS_DUPLEX,
            move |ctx, mut requests, mut sink| {
                let hop = hop.clone();
                ctx.spawn(async move {
                    if let Ok(Some(mut request)) = requests.try_next().await {
                        if let Some(hop) = &hop {
                            let reply = Reply::default();
                            if hop.send((request, reply.clone())).is_err() {
                                return;
                            }
                            request = reply.await;
                        }
                        let _ = sink.send((request, WriteFlags::default())).await;
                    }
                    let _ = sink.close().await;
                });
            },
        )
    } else {
        service.add_unary_handler(&UNARY, |ctx, request, sink| {
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
        .add_duplex_streaming_handler(&BIDI, |ctx, requests, mut sink| {
            ctx.spawn(async move {
                let mut echoed = requests.map_ok(|m| (m, WriteFlags::default()));
                let _ = sink.send_all(&mut echoed).await;
                let _ = sink.close().await;
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
