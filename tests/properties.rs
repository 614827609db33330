//! Properties over generated input: encoding round trips, streams that decode
//! the same however they are split into reads, and argument files that give
//! back the list written into them.

use std::io::{self, BufReader, Read};

use persistent_worker::argfile;
use persistent_worker::bazel::{json_mapping, WireFormat};
use persistent_worker::proto::worker_protocol::{Input, WorkRequest, WorkResponse};
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

fn work_response() -> impl Strategy<Value = WorkResponse> {
    (any::<i32>(), any::<String>(), any::<i32>(), any::<bool>()).prop_map(
        |(exit_code, output, id, cancelled)| {
            let mut r = WorkResponse::new();
            r.exit_code = exit_code;
            r.output = output;
            r.request_id = id;
            r.was_cancelled = cancelled;
            r
        },
    )
}

/// JSON values of every type a field may meet, spelled the ways clients
/// spell them and the ways they should not.
fn json_value() -> impl Strategy<Value = String> {
    let scalar = prop_oneof![
        any::<i32>().prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        (0u32..1000).prop_map(|n| format!("0{n}")),
        any::<i16>().prop_map(|n| format!("{n}.0")),
        any::<i16>().prop_map(|n| format!("{n}e0")),
        any::<i16>().prop_map(|n| format!("\"{n}\"")),
        Just("true".to_owned()),
        Just("false".to_owned()),
        Just("null".to_owned()),
        r#""([a-zA-Z0-9 +/=]|\\[\\/"bfnrt]|\\u00[0-9a-fA-F]{2}|\\x)*""#,
        r#""[A-Za-z0-9+/_-]{0,7}={0,3}""#,
    ]
    .boxed();
    prop_oneof![
        3 => scalar.clone(),
        1 => prop::collection::vec(scalar.clone(), 0..3).prop_map(|v| format!("[{}]", v.join(", "))),
        1 => prop::collection::vec(
            prop::collection::vec((prop_oneof![Just("path"), Just("digest"), Just("x")], scalar), 0..3),
            0..3,
        )
        .prop_map(|objects| {
            let objects: Vec<String> = objects
                .iter()
                .map(|fields| {
                    let fields: Vec<String> =
                        fields.iter().map(|(k, v)| format!("\"{k}\": {v}")).collect();
                    format!("{{{}}}", fields.join(", "))
                })
                .collect();
            format!("[{}]", objects.join(","))
        }),
    ]
}

fn library_options() -> protobuf_json_mapping::ParseOptions {
    protobuf_json_mapping::ParseOptions {
        ignore_unknown_fields: true,
        ..Default::default()
    }
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

/// A line of an argument file. Arbitrary text almost never starts with `@`,
/// and those are the lines `argfile::escape` exists for: half of these do.
fn argfile_line() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => "[^\n\r]*",
        1 => "@[^\n\r]*",
        1 => "@@[^\n\r]*",
        1 => prop_oneof![Just("@"), Just("@@"), Just("@list"), Just("@@list")].prop_map(String::from),
    ]
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

    // The hand-written JSON mapping against the library it stands in for.
    #[test]
    fn json_by_hand_prints_and_parses_like_the_library(
        request in work_request(),
        response in work_response(),
    ) {
        let text = json_mapping::print_request(&request);
        prop_assert_eq!(&text, &protobuf_json_mapping::print_to_string(&request).unwrap());
        prop_assert_eq!(json_mapping::parse_request(&text), Some(request));
        let text = json_mapping::print_response(&response);
        prop_assert_eq!(&text, &protobuf_json_mapping::print_to_string(&response).unwrap());
        prop_assert_eq!(json_mapping::parse_response(&text), Some(response));
    }

    // Text that is only nearly JSON, or JSON in shapes the printer never
    // writes: whatever the hand-written parser accepts, the library reads the
    // same way (the one difference, surrogate pairs, is kept out).
    #[test]
    fn json_by_hand_accepts_nothing_the_library_reads_differently(
        fields in prop::collection::vec(
            (
                prop_oneof![
                    Just("arguments"), Just("inputs"), Just("requestId"), Just("request_id"),
                    Just("cancel"), Just("verbosity"), Just("sandboxDir"), Just("exitCode"),
                    Just("output"), Just("wasCancelled"), Just("path"), Just("digest"),
                ],
                json_value(),
            ),
            0..4,
        ),
    ) {
        let body: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\": {v}")).collect();
        let text = format!("{{{}}}", body.join(", "));
        if let Some(fast) = json_mapping::parse_request(&text) {
            let slow: Result<WorkRequest, _> =
                protobuf_json_mapping::parse_from_str_with_options(&text, &library_options());
            prop_assert_eq!(Some(fast), slow.ok(), "{}", text);
        }
        if let Some(fast) = json_mapping::parse_response(&text) {
            let slow: Result<WorkResponse, _> =
                protobuf_json_mapping::parse_from_str_with_options(&text, &library_options());
            prop_assert_eq!(Some(fast), slow.ok(), "{}", text);
        }
    }

    #[test]
    fn an_argument_file_gives_back_the_list_written_into_it(
        list in prop::collection::vec(argfile_line(), 0..12)
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
