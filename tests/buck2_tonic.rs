//! Interop with Buck2's own gRPC stack: a tonic client over tokio, with the
//! messages declared as prost structs from the field table (no protoc),
//! connecting the way Buck2's worker client does.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::codec::ProstCodec;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint, Uri};

const BIN: &str = env!("CARGO_BIN_EXE_persistent-worker");

#[derive(Clone, PartialEq, prost::Message)]
struct ExecuteCommand {
    #[prost(bytes = "vec", repeated, tag = "1")]
    argv: Vec<Vec<u8>>,
    #[prost(message, repeated, tag = "2")]
    env: Vec<EnvironmentEntry>,
    #[prost(uint64, optional, tag = "3")]
    timeout_s: Option<u64>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct EnvironmentEntry {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ExecuteResponse {
    #[prost(int32, tag = "1")]
    exit_code: i32,
    #[prost(string, tag = "2")]
    stderr: String,
    #[prost(uint64, optional, tag = "3")]
    timed_out_after_s: Option<u64>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ExecuteCommandStream {
    #[prost(message, optional, tag = "1")]
    request: Option<ExecuteCommand>,
    #[prost(uint64, tag = "2")]
    id: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ExecuteResponseStream {
    #[prost(message, optional, tag = "1")]
    response: Option<ExecuteResponse>,
    #[prost(uint64, tag = "2")]
    id: u64,
}

/// Connects over the Unix socket like Buck2: the URI is a placeholder, the
/// connector dials the socket; the first attempt after 50 ms, then backing
/// off up to 500 ms, giving up after 60 s (here: the test's own limit).
async fn connect_with_retries(
    socket: PathBuf,
    limit: Duration,
    failed: Option<tokio::sync::mpsc::UnboundedSender<String>>,
) -> (Channel, u32) {
    let started = Instant::now();
    let mut delay = Duration::from_millis(50);
    let mut attempts = 0;
    loop {
        tokio::time::sleep(delay).await;
        attempts += 1;
        let path = socket.clone();
        let connected =
            Endpoint::from_static("http://[::]:50051")
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?))
                    }
                }))
                .await;
        match connected {
            Ok(channel) => return (channel, attempts),
            Err(e) if started.elapsed() < limit => {
                if let Some(failed) = &failed {
                    let _ = failed.send(e.to_string());
                }
                delay = (delay * 2).min(Duration::from_millis(500));
            }
            Err(e) => panic!("no connection after {attempts} attempts: {e}"),
        }
    }
}

fn start_worker(dir: &Path, args: &[&str]) -> Child {
    Command::new(BIN)
        .args(args)
        .env("WORKER_SOCKET", dir.join("socket"))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning the worker")
}

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn command(argv: &[&str]) -> ExecuteCommand {
    ExecuteCommand {
        argv: argv.iter().map(|a| a.as_bytes().to_vec()).collect(),
        env: Vec::new(),
        timeout_s: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tonic_execute_with_buck2_style_connect_retries() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().to_path_buf();
        std::fs::write(dir.join("args"), "--print-env\nCACHE_SILO_KEY\ntonic.txt\n").unwrap();
        // The client starts dialing before the worker exists, as Buck2 does,
        // and the worker starts only once a first attempt has failed.
        let (failed_tx, mut failed) = tokio::sync::mpsc::unbounded_channel();
        let connecting = tokio::spawn(connect_with_retries(
            dir.join("socket"),
            Duration::from_secs(20),
            Some(failed_tx),
        ));
        failed.recv().await.expect("a first, failed attempt");
        let worker = Kill(start_worker(&dir, &[]));
        let (channel, attempts) = connecting.await.unwrap();
        assert!(attempts > 1);

        let mut grpc = tonic::client::Grpc::new(channel);
        let mut request = command(&["@args"]);
        request.env.push(EnvironmentEntry {
            key: b"CACHE_SILO_KEY".to_vec(),
            value: b"silo-42".to_vec(),
        });
        // Buck2 retries Execute on UNAVAILABLE.
        let mut response = None;
        for _ in 0..5 {
            grpc.ready().await.unwrap();
            let call = grpc
                .unary(
                    tonic::Request::new(request.clone()),
                    PathAndQuery::from_static("/worker.Worker/Execute"),
                    ProstCodec::<ExecuteCommand, ExecuteResponse>::default(),
                )
                .await;
            match call {
                Err(status) if status.code() == tonic::Code::Unavailable => continue,
                other => {
                    response = Some(other.expect("Execute").into_inner());
                    break;
                }
            }
        }
        let response = response.expect("Execute answered within 5 attempts");
        assert_eq!(response.exit_code, 0, "{}", response.stderr);
        let first_line = format!("Buck2 persistent worker {} {} ", hostname(), worker.0.id());
        assert!(
            response.stderr.starts_with(&first_line),
            "{}",
            response.stderr
        );
        assert!(response.stderr.contains("demo: wrote tonic.txt"));
        // The env entry went through tonic's encoding and reached the tool.
        assert!(
            response
                .stderr
                .contains("demo: env CACHE_SILO_KEY=silo-42\n"),
            "{}",
            response.stderr
        );
        assert_eq!(response.timed_out_after_s, None);
        assert_eq!(
            std::fs::read_to_string(dir.join("tonic.txt")).unwrap(),
            "tonic.txt\n"
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tonic_execute_stream_gets_every_id_back() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().to_path_buf();
        let _worker = Kill(start_worker(&dir, &["--concurrency", "4"]));
        let (channel, _) =
            connect_with_retries(dir.join("socket"), Duration::from_secs(20), None).await;
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.unwrap();
        let commands: Vec<_> = (0..6u64)
            .map(|id| ExecuteCommandStream {
                request: Some(command(&[
                    "--work-ms",
                    &((6 - id) * 30).to_string(),
                    &format!("s{id}"),
                ])),
                id,
            })
            .collect();
        let mut responses = grpc
            .streaming(
                tonic::Request::new(futures_util::stream::iter(commands)),
                PathAndQuery::from_static("/worker.WorkerStreaming/ExecuteStream"),
                ProstCodec::<ExecuteCommandStream, ExecuteResponseStream>::default(),
            )
            .await
            .expect("ExecuteStream")
            .into_inner();
        let mut ids = Vec::new();
        while let Some(message) = responses.message().await.expect("a response") {
            let response = message.response.expect("response set");
            assert_eq!(response.exit_code, 0, "{}", response.stderr);
            assert!(response
                .stderr
                .contains(&format!("wrote s{}\n", message.id)));
            ids.push(message.id);
        }
        ids.sort();
        assert_eq!(ids, (0..6).collect::<Vec<_>>());
    })
    .await
    .expect("test timed out");
}

fn hostname() -> String {
    persistent_worker::process::hostname()
}
