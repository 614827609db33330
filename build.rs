//! Generates the protobuf messages of both worker protocols from `protos/`
//! with the pure-Rust parser, so building needs no `protoc`.

fn main() {
    protobuf_codegen::Codegen::new()
        .pure()
        .include("protos")
        .inputs([
            "protos/bazel/worker_protocol.proto",
            "protos/buck2/worker.proto",
        ])
        .cargo_out_dir("protos")
        .run_from_script();
}
