//! The JSON object-stream splitter and JSON decoding over arbitrary bytes,
//! through a small buffer so objects straddle refills: never a panic or a
//! stack overflow, and every decoded request survives a JSON round trip.
#![no_main]

use std::io::BufReader;

use libfuzzer_sys::fuzz_target;
use persistent_worker::bazel::WireFormat;

fuzz_target!(|data: &[u8]| {
    let Some((&capacity, stream)) = data.split_first() else {
        return;
    };
    let mut input = BufReader::with_capacity(usize::from(capacity % 64) + 1, stream);
    for _ in 0..1000 {
        match WireFormat::Json.read_request(&mut input, 1 << 16) {
            Ok(Some(request)) => {
                let line = WireFormat::Json.encode_request(&request);
                let back = WireFormat::Json
                    .read_request(&mut BufReader::new(&line[..]), 1 << 20)
                    .expect("re-encoded request decodes")
                    .expect("one request");
                assert_eq!(back, request);
            }
            Ok(None) | Err(_) => return,
        }
    }
});
