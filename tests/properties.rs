//! Properties over generated input: encoding round trips, streams that decode
//! the same however they are split into reads, and argument files that give
//! back the list written into them.

use std::io::{self, BufReader, Read};

use persistent_worker::argfile;
use persistent_worker::bazel::WireFormat;
use persistent_worker::proto::worker_protocol::{Input, WorkRequest};
use proptest::prelude::*;

fn work_request() -> impl Strategy<Value = WorkRequest> {
    (
        prop::collection::vec(any::<String>(), 0..6),
        prop::collection::vec(
            (any::<String>(), prop::collection::vec(any::<u8>(), 0..8)),
            0..3,
        ),
        any::<i32>(),
        any::<bool>(),
        any::<i32>(),
        any::<String>(),
    )
        .prop_map(|(arguments, inputs, id, cancel, verbosity, sandbox)| {
            let mut r = WorkRequest::new();
            r.arguments = arguments;
            r.inputs = inputs
                .into_iter()
                .map(|(path, digest)| {
                    let mut i = Input::new();
                    i.path = path;
                    i.digest = digest;
                    i
                })
                .collect();
            r.request_id = id;
            r.cancel = cancel;
            r.verbosity = verbosity;
            r.sandbox_dir = sandbox;
            r
        })
}

/// Hands out `bytes` in reads whose sizes cycle through `sizes`.
struct Pieces {
    bytes: Vec<u8>,
    at: usize,
    sizes: Vec<usize>,
    turn: usize,
}

impl Read for Pieces {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let size = self.sizes[self.turn % self.sizes.len()];
        self.turn += 1;
        let n = size.min(buf.len()).min(self.bytes.len() - self.at);
        buf[..n].copy_from_slice(&self.bytes[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

fn decode_all(format: WireFormat, input: impl Read, buffer: usize) -> Vec<WorkRequest> {
    let mut input = BufReader::with_capacity(buffer, input);
    let mut out = Vec::new();
    while let Some(request) = format
        .read_request(&mut input, 1 << 20)
        .expect("a valid stream decodes")
    {
        out.push(request);
    }
    out
}

fn formats() -> impl Strategy<Value = WireFormat> {
    prop_oneof![Just(WireFormat::Proto), Just(WireFormat::Json)]
}

proptest! {
    #[test]
    fn encode_then_decode_gives_the_request_back(format in formats(), request in work_request()) {
        let bytes = format.encode_request(&request);
        let back = decode_all(format, &bytes[..], 8192);
        prop_assert_eq!(back, vec![request]);
    }

    #[test]
    fn any_split_of_a_stream_decodes_the_same(
        format in formats(),
        requests in prop::collection::vec(work_request(), 0..8),
        sizes in prop::collection::vec(1usize..40, 1..8),
        buffer in 1usize..64,
    ) {
        let bytes: Vec<u8> = requests.iter().flat_map(|r| format.encode_request(r)).collect();
        let pieces = Pieces { bytes, at: 0, sizes, turn: 0 };
        prop_assert_eq!(decode_all(format, pieces, buffer), requests);
    }

    #[test]
    fn an_argument_file_gives_back_the_list_written_into_it(
        list in prop::collection::vec("[^\n\r]*", 0..12)
            .prop_filter("flagfile spellings are expanded", |list| {
                list.iter().all(|a| !a.starts_with("--flagfile") && !a.starts_with("-flagfile"))
            }),
        crlf in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let ending = if crlf { "\r\n" } else { "\n" };
        let text: String = argfile::escape(list.clone())
            .iter()
            .map(|a| format!("{a}{ending}"))
            .collect();
        std::fs::write(dir.path().join("list"), text).unwrap();
        let got = argfile::expand(&["@list".to_owned()], dir.path()).unwrap();
        prop_assert_eq!(got, list);
    }
}
