//! The gRPC glue for Buck2's `worker.proto`, written once by hand because the
//! build has neither `protoc` nor grpcio's code generator: method descriptors
//! (shared by the server and by any grpcio client), server registration, and
//! the channel settings both sides need.

use std::io;
use std::path::Path;
use std::sync::Arc;

use grpcio::{
    ChannelBuilder, Environment, Marshaller, Method, MethodType, RpcContext, Service,
    ServiceBuilder,
};

use crate::proto::worker::{
    ExecuteCommand, ExecuteCommandStream, ExecuteEvent, ExecuteResponse, ExecuteResponseStream,
};

/// A method whose messages travel in protobuf encoding.
const fn protobuf_method<Req: protobuf::Message, Resp: protobuf::Message>(
    ty: MethodType,
    name: &'static str,
) -> Method<Req, Resp> {
    Method {
        ty,
        name,
        req_mar: Marshaller {
            ser: grpcio::pb_ser,
            de: grpcio::pb_de,
        },
        resp_mar: Marshaller {
            ser: grpcio::pb_ser,
            de: grpcio::pb_de,
        },
    }
}

/// `rpc Execute(ExecuteCommand) returns (ExecuteResponse)`.
pub const EXECUTE: Method<ExecuteCommand, ExecuteResponse> =
    protobuf_method(MethodType::Unary, "/worker.Worker/Execute");

/// `rpc Exec(stream ExecuteEvent) returns (ExecuteResponse)`.
pub const EXEC: Method<ExecuteEvent, ExecuteResponse> =
    protobuf_method(MethodType::ClientStreaming, "/worker.Worker/Exec");

/// `rpc ExecuteStream(stream ExecuteCommandStream) returns (stream ExecuteResponseStream)`.
pub const EXECUTE_STREAM: Method<ExecuteCommandStream, ExecuteResponseStream> =
    protobuf_method(MethodType::Duplex, "/worker.WorkerStreaming/ExecuteStream");

/// The server answers every method through grpcio's duplex handler, even the
/// unary and client-streaming ones. Only a streaming sink reports that the
/// client dropped the call (its `poll_ready` fails with `RemoteStopped`); a
/// unary sink stays silent until it is completed, so a cancelled request
/// would hold its pool slot to the end. On the wire a unary call is a stream
/// with one message each way, so clients cannot tell the difference.
const fn served_as_duplex<Req, Resp>(method: Method<Req, Resp>) -> Method<Req, Resp> {
    Method {
        ty: MethodType::Duplex,
        ..method
    }
}

/// The three RPC bodies the server provides. Each is called on a
/// completion-queue thread and must only start asynchronous work there.
pub trait WorkerService: Clone + Send + 'static {
    fn execute(
        &mut self,
        ctx: RpcContext<'_>,
        requests: grpcio::RequestStream<ExecuteCommand>,
        sink: grpcio::DuplexSink<ExecuteResponse>,
    );
    fn exec(
        &mut self,
        ctx: RpcContext<'_>,
        requests: grpcio::RequestStream<ExecuteEvent>,
        sink: grpcio::DuplexSink<ExecuteResponse>,
    );
    fn execute_stream(
        &mut self,
        ctx: RpcContext<'_>,
        requests: grpcio::RequestStream<ExecuteCommandStream>,
        sink: grpcio::DuplexSink<ExecuteResponseStream>,
    );
}

/// Registers `worker.Worker` and `worker.WorkerStreaming` as one service.
pub fn create_service(service: impl WorkerService) -> Service {
    let (mut a, mut b, mut c) = (service.clone(), service.clone(), service);
    ServiceBuilder::new()
        .add_duplex_streaming_handler(&served_as_duplex(EXECUTE), move |ctx, requests, sink| {
            a.execute(ctx, requests, sink)
        })
        .add_duplex_streaming_handler(&served_as_duplex(EXEC), move |ctx, requests, sink| {
            b.exec(ctx, requests, sink)
        })
        .add_duplex_streaming_handler(&EXECUTE_STREAM, move |ctx, requests, sink| {
            c.execute_stream(ctx, requests, sink)
        })
        .build()
}

/// Channel settings for either side: Buck2 sets no message size limit, and
/// gRPC's default of 4 MiB on receive would fail large argv.
pub fn unlimited_channel(env: Arc<Environment>) -> ChannelBuilder {
    ChannelBuilder::new(env)
        .max_receive_message_len(-1)
        .max_send_message_len(-1)
}

/// A grpcio channel to a worker socket, usable by clients (tests, tools).
/// Paths longer than the Unix socket limit are reached through the socket's
/// directory, which this value keeps open for as long as the channel may
/// reconnect.
pub struct Connection {
    pub channel: grpcio::Channel,
    _dir: Option<std::os::fd::OwnedFd>,
}

impl Connection {
    pub fn client(&self) -> grpcio::Client {
        grpcio::Client::new(self.channel.clone())
    }
}

/// Connects (lazily, as gRPC does) to the worker listening on `socket`.
pub fn connect(env: Arc<Environment>, socket: &Path) -> io::Result<Connection> {
    let address = super::socket::Address::for_path(socket)?;
    let channel = unlimited_channel(env).connect(&address.uri);
    Ok(Connection {
        channel,
        _dir: address.dir,
    })
}
