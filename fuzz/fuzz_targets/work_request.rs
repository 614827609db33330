//! `WorkRequest` decoding from one frame's bytes: never a panic, and what
//! decodes survives an encode/decode round trip unchanged.
#![no_main]

use std::io::BufReader;

use libfuzzer_sys::fuzz_target;
use persistent_worker::bazel::framing::encode_frame;
use persistent_worker::bazel::WireFormat;
use persistent_worker::proto::worker_protocol::WorkRequest;
use protobuf::Message;

fuzz_target!(|data: &[u8]| {
    let frame = encode_frame(data);
    let decoded = WireFormat::Proto.read_request(&mut BufReader::new(&frame[..]), 1 << 20);
    let direct = WorkRequest::parse_from_bytes(data);
    assert_eq!(
        decoded.as_ref().ok().cloned().flatten(),
        direct.as_ref().ok().cloned(),
        "framed and direct decoding disagree"
    );
    if let Ok(request) = direct {
        let again = WireFormat::Proto.encode_request(&request);
        let back = WireFormat::Proto
            .read_request(&mut BufReader::new(&again[..]), 1 << 20)
            .expect("re-encoded request decodes")
            .expect("one request");
        assert_eq!(back, request);
    }
});
