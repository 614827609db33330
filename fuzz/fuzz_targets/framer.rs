//! The varint framer over arbitrary bytes, delivered in arbitrary pieces:
//! however the stream is split into reads, it must decode exactly as the
//! same bytes in one piece, and what decodes must survive a re-encoding.
#![no_main]

use std::io::{self, Read};

use libfuzzer_sys::fuzz_target;
use persistent_worker::bazel::framing::{encode_frame, read_frame, FrameError};

const MAX: usize = 1 << 16;

/// Hands out `bytes` in reads whose sizes cycle through `sizes`.
struct Pieces<'a> {
    bytes: &'a [u8],
    sizes: &'a [u8],
    turn: usize,
}

impl Read for Pieces<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let size = match self.sizes {
            [] => buf.len(),
            sizes => usize::from(sizes[self.turn % sizes.len()]) + 1,
        };
        self.turn += 1;
        let n = size.min(buf.len()).min(self.bytes.len());
        buf[..n].copy_from_slice(&self.bytes[..n]);
        self.bytes = &self.bytes[n..];
        Ok(n)
    }
}

/// Frames until the end or the first error (as its kind's name).
fn frames(input: &mut impl Read) -> (Vec<Vec<u8>>, Option<&'static str>) {
    let mut out = Vec::new();
    loop {
        match read_frame(input, MAX) {
            Ok(Some(frame)) => out.push(frame),
            Ok(None) => return (out, None),
            Err(e) => {
                let kind = match e {
                    FrameError::VarintTooLong => "varint",
                    FrameError::TooLarge { .. } => "large",
                    FrameError::Truncated { .. } => "truncated",
                    FrameError::Malformed(_) => "malformed",
                    FrameError::Io(_) => "io",
                };
                return (out, Some(kind));
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // First byte: how many of the following bytes give the read sizes.
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n).min(rest.len()).min(32);
    let (sizes, stream) = rest.split_at(n);
    let whole = frames(&mut &stream[..]);
    let split = frames(&mut Pieces {
        bytes: stream,
        sizes,
        turn: 0,
    });
    assert_eq!(whole, split, "split reads decode differently");
    // Re-encoding is not byte-identical (a varint may be padded, `80 00` is
    // 0), but it must decode to the same frames.
    let encoded: Vec<u8> = whole.0.iter().flat_map(|f| encode_frame(f)).collect();
    assert!(encoded.len() <= stream.len() + 5 * whole.0.len());
    assert_eq!(frames(&mut &encoded[..]), (whole.0.clone(), None));
});
