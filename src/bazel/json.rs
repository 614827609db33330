//! Splits a byte stream into top-level JSON objects. Bazel writes one object
//! per line, older versions with nothing between objects, and a remote
//! executor may add any whitespace: so objects are found by matching braces
//! (outside strings), not by reading lines. The protobuf JSON mapping itself
//! is left to `protobuf-json-mapping`.

use std::io::BufRead;

use super::framing::FrameError;

/// Deepest nesting of arrays and objects accepted. A `WorkRequest` needs 3;
/// the JSON parser recurses once per level, even through unknown fields it
/// skips, so 100k `[` would exhaust the reading thread's stack.
pub const MAX_DEPTH: usize = 100;

/// Reads the next top-level object's bytes. `Ok(None)` is end of input with
/// only whitespace since the last object.
pub fn read_object(input: &mut impl BufRead, max: usize) -> Result<Option<Vec<u8>>, FrameError> {
    let mut object = Vec::new();
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    // JSON's escapes only. The protobuf JSON parser behind the fast path also
    // takes C's octal ones, and `\777` overflows its byte arithmetic: a panic
    // in a debug build, a wrong byte in a release one. The object is read to
    // its end first, so the stream stays at an object boundary.
    let mut bad_escape = None;
    loop {
        let buf = match input.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(FrameError::Io(e)),
        };
        if buf.is_empty() {
            return if object.is_empty() {
                Ok(None)
            } else {
                Err(FrameError::Truncated {
                    expected: object.len() + 1,
                    got: object.len(),
                })
            };
        }
        let mut used = 0;
        let mut complete = false;
        for &byte in buf {
            used += 1;
            if depth == 0 {
                if byte.is_ascii_whitespace() {
                    continue;
                }
                if byte != b'{' {
                    return Err(FrameError::Malformed(format!(
                        "expected a JSON object, found {:?}",
                        char::from(byte)
                    )));
                }
            }
            object.push(byte);
            if in_string {
                match (escaped, byte) {
                    (true, _) => {
                        escaped = false;
                        if !b"\"\\/bfnrtu".contains(&byte) {
                            bad_escape.get_or_insert(byte);
                        }
                    }
                    (false, b'\\') => escaped = true,
                    (false, b'"') => in_string = false,
                    _ => {}
                }
                continue;
            }
            match byte {
                b'"' => in_string = true,
                b'{' | b'[' => {
                    depth += 1;
                    if depth > MAX_DEPTH {
                        return Err(FrameError::Malformed(format!(
                            "JSON nested more than {MAX_DEPTH} levels deep"
                        )));
                    }
                }
                b'}' | b']' => depth = depth.saturating_sub(1),
                _ => {}
            }
            if depth == 0 {
                complete = true;
                break;
            }
        }
        input.consume(used);
        if object.len() > max {
            return Err(FrameError::TooLarge {
                length: object.len() as u64,
                max,
            });
        }
        if complete {
            return match bad_escape {
                None => Ok(Some(object)),
                Some(byte) => Err(FrameError::Malformed(format!(
                    "\\{} is not a JSON escape (JSON has \\\" \\\\ \\/ \\b \\f \\n \\r \\t \\uXXXX)",
                    byte.escape_ascii()
                ))),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn objects(input: &str) -> Result<Vec<String>, FrameError> {
        let mut reader = std::io::BufReader::with_capacity(3, input.as_bytes());
        let mut out = Vec::new();
        while let Some(obj) = read_object(&mut reader, 1 << 20)? {
            out.push(String::from_utf8(obj).unwrap());
        }
        Ok(out)
    }

    #[test]
    fn objects_with_and_without_separators() {
        let got = objects("{\"a\":1}\n{\"b\":[1,{\"c\":2}]}{\"d\":3}  \r\n\t{}\n").unwrap();
        assert_eq!(
            got,
            ["{\"a\":1}", "{\"b\":[1,{\"c\":2}]}", "{\"d\":3}", "{}"]
        );
    }

    #[test]
    fn braces_and_quotes_inside_strings_do_not_count() {
        let text = r#"{"arguments":["}{","a\"}b","\\"]}"#;
        assert_eq!(objects(text).unwrap(), [text]);
    }

    #[test]
    fn truncated_object_and_garbage_are_errors() {
        assert!(matches!(
            objects("{\"a\":"),
            Err(FrameError::Truncated { .. })
        ));
        assert!(matches!(objects("[1]"), Err(FrameError::Malformed(_))));
        assert!(matches!(objects("{} x"), Err(FrameError::Malformed(_))));
    }

    #[test]
    fn only_json_escapes_are_taken_and_the_stream_goes_on_after_the_object() {
        let mut reader = std::io::BufReader::with_capacity(
            3,
            &br#"{"a":["\777"]} {"b":"\"\\\/\b\f\n\r\t\u00e7"}"#[..],
        );
        let err = read_object(&mut reader, 1 << 20).unwrap_err();
        assert!(
            err.to_string().contains("\\7 is not a JSON escape"),
            "{err}"
        );
        let next = read_object(&mut reader, 1 << 20).unwrap().unwrap();
        assert!(
            next.starts_with(b"{\"b\""),
            "{}",
            String::from_utf8_lossy(&next)
        );
    }

    #[test]
    fn deep_nesting_is_refused_at_the_limit() {
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH - 1), "]".repeat(MAX_DEPTH - 1));
        assert!(objects(&format!("{{\"x\":{ok}}}")).is_ok());
        let deep = "[".repeat(MAX_DEPTH);
        let err = objects(&format!("{{\"x\":{deep}")).unwrap_err();
        assert!(
            matches!(&err, FrameError::Malformed(m) if m.contains("nested more than")),
            "{err:?}"
        );
    }

    #[test]
    fn an_object_that_never_closes_stops_at_the_limit() {
        // An endless stream: only the limit can end this read.
        let endless = std::io::Read::chain(&b"{\"a\":\""[..], std::io::repeat(b'x'));
        let mut reader = std::io::BufReader::new(endless);
        let err = read_object(&mut reader, 1 << 20).unwrap_err();
        assert!(
            matches!(err, FrameError::TooLarge { length, max } if max == 1 << 20 && length > 1 << 20 && length <= (1 << 20) + 8192),
            "{err:?}"
        );
    }

    #[test]
    fn oversize_object_is_rejected() {
        let mut reader = std::io::BufReader::new(&b"{\"a\":\"0123456789\"}"[..]);
        assert!(matches!(
            read_object(&mut reader, 8),
            Err(FrameError::TooLarge { .. })
        ));
    }
}
