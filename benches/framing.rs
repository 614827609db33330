//! The Bazel path's per-message work without processes or pipes: the varint
//! framer, and a `WorkRequest` decoded / `WorkResponse` encoded in both wire
//! formats. `ci/bench.sh` measures the same through real pipes.

use std::io::{BufReader, Cursor};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use persistent_worker::bazel::framing::{encode_frame, read_frame};
use persistent_worker::bazel::WireFormat;
use persistent_worker::proto::worker_protocol::{WorkRequest, WorkResponse};

const SIZES: [usize; 4] = [16, 1 << 10, 64 << 10, 1 << 20];

fn framer(c: &mut Criterion) {
    let mut group = c.benchmark_group("framer");
    for size in SIZES {
        let payload = vec![b'x'; size];
        let frame = encode_frame(&payload);
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("encode", size), &payload, |b, payload| {
            b.iter(|| encode_frame(payload))
        });
        group.bench_with_input(BenchmarkId::new("read", size), &frame, |b, frame| {
            b.iter(|| read_frame(&mut Cursor::new(&frame[..]), usize::MAX))
        });
    }
    group.finish();
}

/// A request as Bazel sends a small action's: a few flags and paths.
fn typical_request() -> WorkRequest {
    let mut request = WorkRequest::new();
    request.arguments = [
        "--output",
        "bazel-out/k8-fastbuild/bin/pkg/out.txt",
        "--source",
        "pkg/src/main.txt",
    ]
    .map(String::from)
    .to_vec();
    request.request_id = 42;
    request
}

fn messages(c: &mut Criterion) {
    let mut group = c.benchmark_group("messages");
    let mut response = WorkResponse::new();
    response.request_id = 42;
    response.output = "Bazel persistent worker host 1234 /exec/root 42\n".into();
    for (name, format) in [("proto", WireFormat::Proto), ("json", WireFormat::Json)] {
        let bytes = format.encode_request(&typical_request());
        group.bench_function(BenchmarkId::new("read request", name), |b| {
            b.iter(|| format.read_request(&mut BufReader::new(&bytes[..]), usize::MAX))
        });
        group.bench_function(BenchmarkId::new("encode response", name), |b| {
            b.iter(|| format.encode_response(&response))
        });
    }
    group.finish();
}

criterion_group!(benches, framer, messages);
criterion_main!(benches);
