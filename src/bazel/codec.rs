//! The two encodings a Bazel-protocol worker speaks: delimited protobuf and
//! protobuf's JSON mapping. Both turn input into whole `WorkRequest`s and a
//! `WorkResponse` into one buffer that is written with a single call.

use std::io::BufRead;

use protobuf::{CodedOutputStream, Message};

use super::framing::{self, FrameError};
use super::json;
use super::json_mapping;
use crate::proto::worker_protocol::{WorkRequest, WorkResponse};
use crate::quote::quoted;

/// Chosen with `--worker-protocol`; Bazel tells the worker nothing else.
///
/// The worker reads requests and writes responses with it; a client (a test,
/// `worker-client`) uses the other two methods, so both ends share one codec.
///
/// ```
/// use std::io::Cursor;
/// use persistent_worker::bazel::WireFormat;
/// use persistent_worker::bazel::framing::DEFAULT_MAX_MESSAGE_BYTES as MAX;
/// use persistent_worker::proto::worker_protocol::{WorkRequest, WorkResponse};
///
/// for format in [WireFormat::Proto, "json".parse().unwrap()] {
///     // A client sends two requests in one write...
///     let mut request = WorkRequest::new();
///     request.arguments = vec!["out/a.txt".into()];
///     request.request_id = 7;
///     let mut stream = format.encode_request(&request);
///     stream.extend(format.encode_request(&WorkRequest::new()));
///
///     // ...and the worker reads them back one by one, then a clean end.
///     let mut input = Cursor::new(stream);
///     let first = format.read_request(&mut input, MAX).unwrap().unwrap();
///     assert_eq!(first.arguments, ["out/a.txt"]);
///     assert_eq!(first.request_id, 7);
///     assert!(format.read_request(&mut input, MAX).unwrap().is_some());
///     assert!(format.read_request(&mut input, MAX).unwrap().is_none());
///
///     // The response, one buffer for one write, as the client decodes it.
///     let mut response = WorkResponse::new();
///     response.request_id = 7;
///     response.output = "demo: wrote out/a.txt\n".into();
///     let bytes = format.encode_response(&response);
///     let back = format.read_response(&mut Cursor::new(bytes), MAX).unwrap().unwrap();
///     assert_eq!(back, response);
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireFormat {
    /// Varint-delimited protobuf, Bazel's default.
    Proto,
    /// Protobuf's JSON mapping, one object per message
    /// (`requires-worker-protocol: json`).
    Json,
}

impl std::str::FromStr for WireFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "proto" => Ok(WireFormat::Proto),
            "json" => Ok(WireFormat::Json),
            other => Err(format!(
                "unknown worker protocol '{other}' (expected proto or json)"
            )),
        }
    }
}

impl WireFormat {
    /// Reads and decodes the next request; `Ok(None)` at a clean end of input.
    pub fn read_request(
        self,
        input: &mut impl BufRead,
        max: usize,
    ) -> Result<Option<WorkRequest>, FrameError> {
        match self {
            WireFormat::Proto => read_message(input, max),
            WireFormat::Json => match json::read_object(input, max)? {
                None => Ok(None),
                Some(bytes) => {
                    let text = std::str::from_utf8(&bytes)
                        .map_err(|e| FrameError::Malformed(format!("JSON is not UTF-8: {e}")))?;
                    if let Some(request) = json_mapping::parse_request(text) {
                        return Ok(Some(request));
                    }
                    let options = protobuf_json_mapping::ParseOptions {
                        ignore_unknown_fields: true,
                        ..Default::default()
                    };
                    protobuf_json_mapping::parse_from_str_with_options(text, &options)
                        .map(Some)
                        .map_err(|e| FrameError::Malformed(format!("{e} in {}", quoted(text))))
                }
            },
        }
    }

    /// One response, ready to write: a delimited frame, or one JSON line.
    pub fn encode_response(self, response: &WorkResponse) -> Vec<u8> {
        match self {
            WireFormat::Proto => delimited(response),
            WireFormat::Json => {
                let mut line = json_mapping::print_response(response);
                line.push('\n');
                line.into_bytes()
            }
        }
    }

    /// Encodes a request the way a client does (used by tests and clients).
    pub fn encode_request(self, request: &WorkRequest) -> Vec<u8> {
        match self {
            WireFormat::Proto => delimited(request),
            WireFormat::Json => {
                let mut line = json_mapping::print_request(request);
                line.push('\n');
                line.into_bytes()
            }
        }
    }

    /// Decodes a response the way a client does (used by tests and clients).
    pub fn read_response(
        self,
        input: &mut impl BufRead,
        max: usize,
    ) -> Result<Option<WorkResponse>, FrameError> {
        match self {
            WireFormat::Proto => read_message(input, max),
            WireFormat::Json => match json::read_object(input, max)? {
                None => Ok(None),
                Some(bytes) => {
                    let text = String::from_utf8_lossy(&bytes);
                    if let Some(response) = json_mapping::parse_response(&text) {
                        return Ok(Some(response));
                    }
                    let options = protobuf_json_mapping::ParseOptions {
                        ignore_unknown_fields: true,
                        ..Default::default()
                    };
                    protobuf_json_mapping::parse_from_str_with_options(&text, &options)
                        .map(Some)
                        .map_err(|e| FrameError::Malformed(format!("{e} in {}", quoted(&text))))
                }
            },
        }
    }
}

/// The next delimited message; `Ok(None)` at a clean end of input.
fn read_message<M: Message>(input: &mut impl BufRead, max: usize) -> Result<Option<M>, FrameError> {
    framing::with_frame(input, max, M::parse_from_bytes)?
        .transpose()
        .map_err(|e| FrameError::Malformed(e.to_string()))
}

/// A message behind its length, encoded straight into one buffer of the
/// exact size: a response may carry megabytes of output.
fn delimited(message: &impl Message) -> Vec<u8> {
    let size = message.compute_size();
    let mut frame = Vec::with_capacity(size as usize + framing::MAX_VARINT_BYTES);
    framing::encode_varint(size, &mut frame);
    let mut stream = CodedOutputStream::vec(&mut frame);
    // Writing to a Vec cannot fail, and the sizes were cached just above; an
    // empty message is the fallback that still keeps the stream framed.
    let written = message
        .write_to_with_cached_sizes(&mut stream)
        .and_then(|()| stream.flush());
    drop(stream);
    if written.is_err() {
        frame.clear();
        framing::encode_varint(0, &mut frame);
    }
    frame
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufReader;

    fn json_request(text: &str) -> WorkRequest {
        WireFormat::Json
            .read_request(&mut BufReader::new(text.as_bytes()), 1 << 20)
            .unwrap()
            .unwrap()
    }

    #[test]
    fn json_accepts_both_name_styles_and_ignores_unknown_fields() {
        let camel = json_request(
            r#"{"arguments":["a"],"requestId":7,"sandboxDir":"s","future":{"x":[1]}}"#,
        );
        let snake = json_request(r#"{"arguments":["a"],"request_id":7,"sandbox_dir":"s"}"#);
        assert_eq!(camel, snake);
        assert_eq!(camel.request_id, 7);
        assert_eq!(camel.sandbox_dir, "s");
    }

    #[test]
    fn json_missing_fields_take_defaults() {
        let request = json_request("{}");
        assert_eq!(request, WorkRequest::new());
    }

    #[test]
    fn json_response_is_one_camel_case_line_without_zero_id() {
        let mut response = WorkResponse::new();
        response.exit_code = 2;
        response.output = "line one\nline two".into();
        let bytes = WireFormat::Json.encode_response(&response);
        let text = String::from_utf8(bytes).unwrap();
        assert_eq!(text.matches('\n').count(), 1, "{text}");
        assert!(
            text.contains("\"exitCode\": 2") || text.contains("\"exitCode\":2"),
            "{text}"
        );
        assert!(!text.contains("requestId"), "{text}");
    }

    #[test]
    fn proto_round_trip() {
        let mut request = WorkRequest::new();
        request.arguments = vec!["x".into()];
        request.request_id = 3;
        let bytes = WireFormat::Proto.encode_request(&request);
        let got = WireFormat::Proto
            .read_request(&mut BufReader::new(&bytes[..]), 1 << 20)
            .unwrap();
        assert_eq!(got, Some(request));
    }

    #[test]
    fn a_large_response_is_encoded_in_one_buffer_of_its_size() {
        let mut response = WorkResponse::new();
        response.request_id = 9;
        response.output = "y".repeat(3 << 20);
        let bytes = WireFormat::Proto.encode_response(&response);
        assert!(
            bytes.capacity() <= bytes.len() + framing::MAX_VARINT_BYTES,
            "{} bytes in a buffer of {}",
            bytes.len(),
            bytes.capacity()
        );
        let got = WireFormat::Proto
            .read_response(&mut BufReader::new(&bytes[..]), 4 << 20)
            .unwrap();
        assert_eq!(got, Some(response));
    }

    #[test]
    fn undecodable_proto_is_malformed() {
        let frame = framing::encode_frame(&[0xff, 0xff, 0xff]);
        let err = WireFormat::Proto
            .read_request(&mut BufReader::new(&frame[..]), 1 << 20)
            .unwrap_err();
        assert!(matches!(err, FrameError::Malformed(_)), "{err:?}");
    }
}
