//! Bounded quoting of client-supplied text in messages: an argument or file
//! name can be megabytes long, and an error response must not echo it whole.

use std::fmt;

/// How much of a quoted text an error message shows.
pub const SHOWN_BYTES: usize = 200;

/// `text` for a message: whole if short, else its first [`SHOWN_BYTES`]
/// (cut at a character boundary) and `… (N bytes)`.
pub fn quoted(text: &str) -> Quoted<'_> {
    Quoted(text)
}

/// Bytes that may not be UTF-8, shown lossily and shortened the same way.
pub fn quoted_bytes(bytes: &[u8]) -> String {
    let head = &bytes[..bytes.len().min(SHOWN_BYTES)];
    let mut shown = String::from_utf8_lossy(head).into_owned();
    if bytes.len() > SHOWN_BYTES {
        shown.push_str(&format!("… ({} bytes)", bytes.len()));
    }
    shown
}

pub struct Quoted<'a>(&'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.0;
        if text.len() <= SHOWN_BYTES {
            return f.write_str(text);
        }
        let mut end = SHOWN_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        write!(f, "{}… ({} bytes)", &text[..end], text.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_whole() {
        assert_eq!(quoted("abc").to_string(), "abc");
        let exact = "x".repeat(SHOWN_BYTES);
        assert_eq!(quoted(&exact).to_string(), exact);
    }

    #[test]
    fn long_text_is_cut_and_measured() {
        let long = "y".repeat(4 << 20);
        let shown = quoted(&long).to_string();
        assert_eq!(
            shown,
            format!("{}… ({} bytes)", "y".repeat(SHOWN_BYTES), 4 << 20)
        );
    }

    #[test]
    fn cut_never_splits_a_character() {
        // 'é' is two bytes: byte 200 falls inside one.
        let long = format!("a{}", "é".repeat(300));
        let shown = quoted(&long).to_string();
        assert!(shown.starts_with(&long[..199]), "{shown}");
        assert!(
            shown.ends_with(&format!("… ({} bytes)", long.len())),
            "{shown}"
        );
    }

    #[test]
    fn bytes_are_lossy_and_bounded() {
        assert_eq!(quoted_bytes(b"ok\xff"), "ok\u{fffd}");
        let long = vec![b'z'; 1000];
        assert_eq!(
            quoted_bytes(&long),
            format!("{}… (1000 bytes)", "z".repeat(200))
        );
    }
}
