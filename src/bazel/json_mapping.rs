//! Protobuf's JSON mapping of `WorkRequest` and `WorkResponse`, written out
//! by hand for the shapes Bazel and executors send.
//!
//! `protobuf-json-mapping` walks messages through reflection, which made a
//! JSON round trip cost three times a protobuf one. These two messages have
//! ten fields between them, so printing is a few lines, and parsing handles
//! what clients write: known fields once each, integers, booleans, strings
//! and standard base64. Anything else (unknown fields, `null`, numbers as
//! strings or floats, duplicates, invalid text) returns `None` and the caller
//! falls back to the library, which stays the reference: the tests check that
//! both give the same messages and the same bytes.

use std::fmt::Write;

use crate::proto::worker_protocol::{Input, WorkRequest, WorkResponse};

/// Prints like `protobuf_json_mapping::print_to_string`: default values left
/// out, `"name": value` pairs joined by `", "`.
pub fn print_request(request: &WorkRequest) -> String {
    let mut out = Object::new();
    if !request.arguments.is_empty() {
        out.key("arguments");
        out.array(&request.arguments, |out, argument| out.string(argument));
    }
    if !request.inputs.is_empty() {
        out.key("inputs");
        out.array(&request.inputs, |out, input| {
            let mut object = Object::nested(std::mem::take(&mut out.buf));
            if !input.path.is_empty() {
                object.key("path");
                object.string(&input.path);
            }
            if !input.digest.is_empty() {
                object.key("digest");
                object.string(&base64(&input.digest));
            }
            out.buf = object.finish();
        });
    }
    out.int("requestId", request.request_id);
    out.boolean("cancel", request.cancel);
    out.int("verbosity", request.verbosity);
    if !request.sandbox_dir.is_empty() {
        out.key("sandboxDir");
        out.string(&request.sandbox_dir);
    }
    out.finish()
}

/// Prints like `protobuf_json_mapping::print_to_string`.
pub fn print_response(response: &WorkResponse) -> String {
    let mut out = Object::new();
    out.int("exitCode", response.exit_code);
    if !response.output.is_empty() {
        out.key("output");
        out.string(&response.output);
    }
    out.int("requestId", response.request_id);
    out.boolean("wasCancelled", response.was_cancelled);
    out.finish()
}

/// `None`: not a shape this parser takes; ask the library.
pub fn parse_request(text: &str) -> Option<WorkRequest> {
    let mut p = Parser::new(text);
    let mut request = WorkRequest::new();
    let mut seen = 0u8;
    p.object(|p, key| {
        let field = match key {
            "arguments" => 0,
            "inputs" => 1,
            "requestId" | "request_id" => 2,
            "cancel" => 3,
            "verbosity" => 4,
            "sandboxDir" | "sandbox_dir" => 5,
            _ => return None,
        };
        once(&mut seen, field)?;
        match field {
            0 => request.arguments = p.array(Parser::string)?,
            1 => request.inputs = p.array(Parser::input)?,
            2 => request.request_id = p.int()?,
            3 => request.cancel = p.boolean()?,
            4 => request.verbosity = p.int()?,
            _ => request.sandbox_dir = p.string()?,
        }
        Some(())
    })?;
    p.end()?;
    Some(request)
}

/// `None`: not a shape this parser takes; ask the library.
pub fn parse_response(text: &str) -> Option<WorkResponse> {
    let mut p = Parser::new(text);
    let mut response = WorkResponse::new();
    let mut seen = 0u8;
    p.object(|p, key| {
        let field = match key {
            "exitCode" | "exit_code" => 0,
            "output" => 1,
            "requestId" | "request_id" => 2,
            "wasCancelled" | "was_cancelled" => 3,
            _ => return None,
        };
        once(&mut seen, field)?;
        match field {
            0 => response.exit_code = p.int()?,
            1 => response.output = p.string()?,
            2 => response.request_id = p.int()?,
            _ => response.was_cancelled = p.boolean()?,
        }
        Some(())
    })?;
    p.end()?;
    Some(response)
}

/// A field given twice (also under its two names) is left to the library.
fn once(seen: &mut u8, field: u8) -> Option<()> {
    let bit = 1 << field;
    if *seen & bit != 0 {
        return None;
    }
    *seen |= bit;
    Some(())
}

struct Object {
    buf: String,
    first: bool,
}

impl Object {
    fn new() -> Object {
        Object::nested(String::with_capacity(64))
    }

    fn nested(mut buf: String) -> Object {
        buf.push('{');
        Object { buf, first: true }
    }

    fn key(&mut self, name: &str) {
        if !self.first {
            self.buf.push_str(", ");
        }
        self.first = false;
        self.buf.push('"');
        self.buf.push_str(name);
        self.buf.push_str("\": ");
    }

    fn int(&mut self, name: &str, value: i32) {
        if value != 0 {
            self.key(name);
            let _ = write!(self.buf, "{value}");
        }
    }

    fn boolean(&mut self, name: &str, value: bool) {
        if value {
            self.key(name);
            self.buf.push_str("true");
        }
    }

    fn array<T>(&mut self, items: &[T], mut each: impl FnMut(&mut Object, &T)) {
        self.buf.push('[');
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                self.buf.push_str(", ");
            }
            each(self, item);
        }
        self.buf.push(']');
    }

    /// Escapes exactly what the library escapes, the same way.
    fn string(&mut self, text: &str) {
        let buf = &mut self.buf;
        buf.reserve(text.len() + 2);
        buf.push('"');
        let mut plain = 0;
        for (i, c) in text.char_indices() {
            let escape = match c {
                '"' => "\\\"",
                '\\' => "\\\\",
                '\n' => "\\n",
                '\r' => "\\r",
                '\t' => "\\t",
                c if c.is_control() => "",
                _ => continue,
            };
            buf.push_str(&text[plain..i]);
            if escape.is_empty() {
                let _ = write!(buf, "\\u{:04x}", c as u32);
            } else {
                buf.push_str(escape);
            }
            plain = i + c.len_utf8();
        }
        buf.push_str(&text[plain..]);
        buf.push('"');
    }

    fn finish(mut self) -> String {
        self.buf.push('}');
        self.buf
    }
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard alphabet, padded: what the library prints.
fn base64(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(BASE64[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Only the canonical form `base64` prints; any other spelling (no padding,
/// the URL alphabet, line breaks, stray bits) goes to the library.
fn unbase64(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    for (c, chunk) in bytes.chunks(4).enumerate() {
        let last = c + 1 == bytes.len() / 4;
        let pad = chunk.iter().rev().take_while(|&&b| b == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut n = 0u32;
        for &b in &chunk[..4 - pad] {
            let v = BASE64.iter().position(|&x| x == b)?;
            n = n << 6 | v as u32;
        }
        n <<= 6 * pad as u32;
        let decoded = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        let keep = 3 - pad;
        if decoded[keep..].iter().any(|&b| b != 0) {
            return None;
        }
        out.extend_from_slice(&decoded[..keep]);
    }
    Some(out)
}

struct Parser<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Parser<'a> {
    fn new(text: &'a str) -> Parser<'a> {
        Parser { text, at: 0 }
    }

    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.at).copied()
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.at += 1;
        }
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        self.ws();
        (self.peek()? == byte).then(|| self.at += 1)
    }

    fn end(&mut self) -> Option<()> {
        self.ws();
        (self.at == self.text.len()).then_some(())
    }

    /// `{ "key": value, ... }`, each value read by `field`.
    fn object(&mut self, mut field: impl FnMut(&mut Self, &str) -> Option<()>) -> Option<()> {
        self.list(b'{', b'}', |p| {
            let key = p.string()?;
            p.eat(b':')?;
            p.ws();
            field(p, &key)
        })
    }

    fn array<T>(&mut self, mut item: impl FnMut(&mut Self) -> Option<T>) -> Option<Vec<T>> {
        let mut items = Vec::new();
        self.list(b'[', b']', |p| {
            items.push(item(p)?);
            Some(())
        })?;
        Some(items)
    }

    /// `open` item, item, ... `close`: no trailing comma.
    fn list(
        &mut self,
        open: u8,
        close: u8,
        mut item: impl FnMut(&mut Self) -> Option<()>,
    ) -> Option<()> {
        self.eat(open)?;
        self.ws();
        if self.peek()? == close {
            self.at += 1;
            return Some(());
        }
        loop {
            self.ws();
            item(self)?;
            self.ws();
            match self.peek()? {
                b',' => self.at += 1,
                b if b == close => {
                    self.at += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    fn input(&mut self) -> Option<Input> {
        let mut input = Input::new();
        let mut seen = 0u8;
        self.object(|p, key| {
            match key {
                "path" => {
                    once(&mut seen, 0)?;
                    input.path = p.string()?;
                }
                "digest" => {
                    once(&mut seen, 1)?;
                    input.digest = unbase64(&p.string()?)?;
                }
                _ => return None,
            }
            Some(())
        })?;
        Some(input)
    }

    fn boolean(&mut self) -> Option<bool> {
        let rest = &self.text[self.at..];
        let (value, len) = if rest.starts_with("true") {
            (true, 4)
        } else if rest.starts_with("false") {
            (false, 5)
        } else {
            return None;
        };
        self.at += len;
        Some(value)
    }

    /// A plain decimal integer within `i32`.
    fn int(&mut self) -> Option<i32> {
        let bytes = self.text.as_bytes();
        let start = self.at;
        if self.peek() == Some(b'-') {
            self.at += 1;
        }
        let digits = self.at;
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.at += 1;
        }
        let count = self.at - digits;
        let leading_zero = count > 1 && bytes[digits] == b'0';
        // A fraction or exponent (`1.0`, `1e2`) is the library's to judge.
        if count == 0
            || count > 10
            || leading_zero
            || matches!(self.peek(), Some(b'.' | b'e' | b'E'))
        {
            return None;
        }
        self.text[start..self.at].parse().ok()
    }

    fn string(&mut self) -> Option<String> {
        self.ws();
        if self.peek()? != b'"' {
            return None;
        }
        self.at += 1;
        let bytes = self.text.as_bytes();
        let mut out = String::new();
        let mut plain = self.at;
        loop {
            match *bytes.get(self.at)? {
                b'"' => {
                    out.push_str(&self.text[plain..self.at]);
                    self.at += 1;
                    return Some(out);
                }
                b'\\' => {
                    out.push_str(&self.text[plain..self.at]);
                    self.at += 1;
                    let escaped = match *bytes.get(self.at)? {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            self.at += 1;
                            let unit = self.hex4()?;
                            let c = if (0xd800..0xdc00).contains(&unit) {
                                if bytes.get(self.at..self.at + 2)? != b"\\u" {
                                    return None;
                                }
                                self.at += 2;
                                let low = self.hex4()?;
                                if !(0xdc00..0xe000).contains(&low) {
                                    return None;
                                }
                                char::from_u32(0x10000 + ((unit - 0xd800) << 10) + (low - 0xdc00))?
                            } else {
                                char::from_u32(unit)?
                            };
                            out.push(c);
                            plain = self.at;
                            continue;
                        }
                        _ => return None,
                    };
                    out.push(escaped);
                    self.at += 1;
                    plain = self.at;
                }
                // Raw control characters are not JSON.
                0..=0x1f => return None,
                _ => self.at += 1,
            }
        }
    }

    fn hex4(&mut self) -> Option<u32> {
        let digits = self.text.get(self.at..self.at + 4)?;
        if !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        self.at += 4;
        u32::from_str_radix(digits, 16).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn library_request(text: &str) -> Option<WorkRequest> {
        let options = protobuf_json_mapping::ParseOptions {
            ignore_unknown_fields: true,
            ..Default::default()
        };
        protobuf_json_mapping::parse_from_str_with_options(text, &options).ok()
    }

    #[test]
    fn prints_what_the_library_prints() {
        let mut request = WorkRequest::new();
        request.arguments = vec![
            "a \"q\" \\ \n\t\r\u{1}\u{7f}\u{85} é 🦀".into(),
            String::new(),
        ];
        let mut input = Input::new();
        input.path = "p".into();
        input.digest = vec![0, 1, 2, 250, 251];
        request.inputs = vec![input, Input::new()];
        request.request_id = -7;
        request.cancel = true;
        request.verbosity = 10;
        request.sandbox_dir = "sb".into();
        assert_eq!(
            print_request(&request),
            protobuf_json_mapping::print_to_string(&request).unwrap()
        );
        assert_eq!(
            print_request(&WorkRequest::new()),
            protobuf_json_mapping::print_to_string(&WorkRequest::new()).unwrap()
        );
        let mut response = WorkResponse::new();
        response.exit_code = i32::MIN;
        response.output = "out\n".into();
        response.request_id = i32::MAX;
        response.was_cancelled = true;
        assert_eq!(
            print_response(&response),
            protobuf_json_mapping::print_to_string(&response).unwrap()
        );
    }

    #[test]
    fn parses_what_the_library_parses() {
        for text in [
            r#"{}"#,
            r#" { "arguments" : [ "a" , "b\"\\\/\b\f\n\r\t\u00e9" ] , "requestId" : -12 } "#,
            r#"{"arguments":[],"inputs":[{"path":"x","digest":"AAECAw=="},{}],"cancel":false}"#,
            r#"{"request_id":2147483647,"verbosity":-2147483648,"sandbox_dir":"d","cancel":true}"#,
        ] {
            let fast = parse_request(text).unwrap_or_else(|| panic!("not taken: {text}"));
            assert_eq!(Some(fast), library_request(text), "{text}");
        }
    }

    #[test]
    fn decodes_surrogate_pairs_which_the_library_refuses() {
        // JSON spells a character outside the BMP as two escapes; the
        // library calls that an incorrect character.
        let text = r#"{"arguments":["\ud83e\udd80"]}"#;
        assert_eq!(parse_request(text).unwrap().arguments, ["\u{1f980}"]);
        assert_eq!(library_request(text), None);
    }

    #[test]
    fn leaves_other_shapes_to_the_library() {
        for text in [
            r#"{"unknown":1}"#,
            r#"{"requestId":"5"}"#,
            r#"{"requestId":5.0}"#,
            r#"{"requestId":1e1}"#,
            r#"{"requestId":2147483648}"#,
            r#"{"requestId":007}"#,
            r#"{"requestId":null}"#,
            r#"{"requestId":1,"request_id":2}"#,
            r#"{"arguments":["a"],"arguments":["b"]}"#,
            r#"{"arguments":["\ud800"]}"#,
            "{\"arguments\":[\"raw\u{1}control\"]}",
            r#"{"inputs":[{"digest":"AAE"}]}"#,
            r#"{"inputs":[{"digest":"AA-_"}]}"#,
            r#"{"inputs":[{"digest":"AB=="}]}"#,
            r#"{} {}"#,
            r#"{"arguments":["a",]}"#,
        ] {
            assert_eq!(parse_request(text), None, "{text}");
        }
    }

    #[test]
    fn base64_round_trips() {
        for len in 0..10 {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 200) as u8).collect();
            assert_eq!(unbase64(&base64(&bytes)), Some(bytes));
        }
    }
}
