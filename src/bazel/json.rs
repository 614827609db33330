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

/// The first thing seen that JSON does not have.
enum NotJson {
    /// The byte after a backslash in a string.
    Escape(u8),
    /// A byte outside strings that begins no JSON token.
    Byte(u8),
}

/// Reads the next top-level object's bytes. `Ok(None)` is end of input with
/// only whitespace since the last object.
pub fn read_object(input: &mut impl BufRead, max: usize) -> Result<Option<Vec<u8>>, FrameError> {
    let mut object = Vec::new();
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    // JSON's grammar only. The protobuf JSON parser behind the fast path
    // shares a lexer with the text format: it takes C's octal escapes, and
    // `\777` overflows its byte arithmetic (a panic in a debug build, a wrong
    // byte in a release one), and it takes single-quoted strings, inside which
    // the same escapes reach it. So an escape JSON lacks, and outside strings
    // any byte no JSON token has (a quote `'`, a backslash, a comment's `/`),
    // makes the object malformed. It is read to its end first, by JSON's rules,
    // so the stream stays at an object boundary.
    let mut not_json: Option<NotJson> = None;
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
                            not_json.get_or_insert(NotJson::Escape(byte));
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
                // Numbers, `true`, `false`, `null`, separators, whitespace.
                b',' | b':' | b'-' | b'+' | b'.' | b' ' | b'\t' | b'\n' | b'\r' => {}
                _ if byte.is_ascii_alphanumeric() => {}
                _ => {
                    not_json.get_or_insert(NotJson::Byte(byte));
                }
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
            return match not_json {
                None => Ok(Some(object)),
                Some(NotJson::Escape(byte)) => Err(FrameError::Malformed(format!(
                    "\\{} is not a JSON escape (JSON has \\\" \\\\ \\/ \\b \\f \\n \\r \\t \\uXXXX)",
                    byte.escape_ascii()
                ))),
                Some(NotJson::Byte(byte)) => Err(FrameError::Malformed(format!(
                    "`{}` outside a string is not JSON",
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
    fn bytes_no_json_token_has_are_refused_and_the_stream_goes_on() {
        // A single-quoted string carries the octal escape past the check of
        // escapes in double-quoted ones; a comment, a backslash, likewise.
        for (input, named) in [
            (r#"{"arguments":['\777']} {"b":1}"#, "`\\'`"),
            (r#"{"a":1 /* c */} {"b":1}"#, "`/`"),
            (r#"{"a":\7} {"b":1}"#, "`\\\\`"),
            (r#"{"a":#} {"b":1}"#, "`#`"),
        ] {
            let mut reader = std::io::BufReader::with_capacity(3, input.as_bytes());
            let err = read_object(&mut reader, 1 << 20).unwrap_err();
            assert!(err.to_string().contains(named), "{input}: {err}");
            let next = read_object(&mut reader, 1 << 20).unwrap().unwrap();
            assert_eq!(next, b"{\"b\":1}", "{input}");
        }
        // Everything JSON has outside strings still passes.
        let all = r#"{"a":[-1.5e+3,2E-1,true,false,null],"b":{},	"c":""}"#;
        assert_eq!(objects(all).unwrap(), vec![all.to_string()]);
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
