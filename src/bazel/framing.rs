//! Length-delimited frames: each message preceded by its length as an
//! unsigned LEB128 varint (protobuf's "delimited" format), written by hand so
//! that every limit is ours to choose and test.
//!
//! Parsing is separate from I/O: [`decode_varint`] works on bytes, and the
//! readers take any [`Read`] or [`BufRead`], so a test or a fuzz target feeds
//! them a byte slice.
//!
//! ```
//! use persistent_worker::bazel::framing::{encode_frame, read_frame, FrameError};
//!
//! let mut stream = encode_frame(b"first");
//! stream.extend(encode_frame(b""));
//! let mut input = stream.as_slice();
//! assert_eq!(read_frame(&mut input, 1024).unwrap().as_deref(), Some(&b"first"[..]));
//! assert_eq!(read_frame(&mut input, 1024).unwrap().as_deref(), Some(&b""[..]));
//! assert!(read_frame(&mut input, 1024).unwrap().is_none()); // a clean end
//!
//! // A frame over the limit is refused before its payload is read.
//! let big = encode_frame(&[0; 2000]);
//! assert!(matches!(read_frame(&mut big.as_slice(), 1024), Err(FrameError::TooLarge { .. })));
//! ```

use std::fmt;
use std::io::{self, BufRead, Read};

/// A 32-bit length never needs more than 5 varint bytes.
pub const MAX_VARINT_BYTES: usize = 5;

/// Default largest frame accepted (`--max-message-bytes`).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 << 20;

/// How much a payload buffer grows per read; see [`read_frame`].
pub const READ_CHUNK: usize = 64 << 10;

/// Why the input stream cannot be read as frames. Every variant is fatal for
/// the stream: after it, frame boundaries are unknown.
#[derive(Debug)]
pub enum FrameError {
    /// The varint ran past 5 bytes or past 32 bits.
    VarintTooLong,
    /// Declared length above the configured maximum.
    TooLarge {
        length: u64,
        max: usize,
    },
    /// The stream ended inside a frame.
    Truncated {
        expected: usize,
        got: usize,
    },
    /// The bytes of a complete frame are not a valid message.
    Malformed(String),
    Io(io::Error),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::VarintTooLong => {
                write!(f, "frame length varint is longer than {MAX_VARINT_BYTES} bytes or 32 bits")
            }
            FrameError::TooLarge { length, max } => write!(
                f,
                "frame of {length} bytes is larger than the limit of {max} bytes (--max-message-bytes)"
            ),
            FrameError::Truncated { expected, got } => write!(
                f,
                "input ended inside a frame: expected {expected} bytes, got {got}"
            ),
            FrameError::Malformed(why) => write!(f, "undecodable message: {why}"),
            FrameError::Io(e) => write!(f, "reading input: {e}"),
        }
    }
}

impl std::error::Error for FrameError {}

/// Appends `value` as a varint.
///
/// ```
/// use persistent_worker::bazel::framing::{decode_varint, encode_varint};
///
/// let mut bytes = Vec::new();
/// encode_varint(300, &mut bytes);
/// assert_eq!(bytes, [0xac, 0x02]);
/// assert_eq!(decode_varint(&bytes).unwrap(), Some((300, 2)));
/// assert_eq!(decode_varint(&bytes[..1]).unwrap(), None); // needs more bytes
/// ```
pub fn encode_varint(mut value: u64, out: &mut Vec<u8>) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// `payload` with its length prefix, ready to be written in one call.
pub fn encode_frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + MAX_VARINT_BYTES);
    encode_varint(payload.len() as u64, &mut out);
    out.extend_from_slice(payload);
    out
}

/// Decodes a varint at the start of `bytes`: `Ok(None)` if more bytes are
/// needed, else the value and how many bytes it took.
pub fn decode_varint(bytes: &[u8]) -> Result<Option<(u32, usize)>, FrameError> {
    let mut value: u64 = 0;
    for (i, &byte) in bytes.iter().enumerate() {
        if i == MAX_VARINT_BYTES {
            return Err(FrameError::VarintTooLong);
        }
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return u32::try_from(value)
                .map(|v| Some((v, i + 1)))
                .map_err(|_| FrameError::VarintTooLong);
        }
    }
    if bytes.len() >= MAX_VARINT_BYTES {
        return Err(FrameError::VarintTooLong);
    }
    Ok(None)
}

/// Reads one frame. `Ok(None)` is a clean end of input at a frame boundary.
pub fn read_frame(input: &mut impl Read, max: usize) -> Result<Option<Vec<u8>>, FrameError> {
    let mut prefix = [0u8; MAX_VARINT_BYTES];
    let mut got = 0;
    let length = loop {
        match read_some(input, &mut prefix[got..=got])? {
            0 if got == 0 => return Ok(None),
            0 => {
                return Err(FrameError::Truncated {
                    expected: got + 1,
                    got,
                })
            }
            _ => got += 1,
        }
        if let Some((length, _)) = decode_varint(&prefix[..got])? {
            break length as usize;
        }
    };
    if length > max {
        return Err(FrameError::TooLarge {
            length: length as u64,
            max,
        });
    }
    // The length is the client's word, not bytes that exist: the buffer grows
    // one chunk at a time as payload arrives, so a frame announcing 60 MiB
    // and then ending costs what was sent, not 60 MiB.
    let mut payload = Vec::new();
    let mut got = 0;
    while got < length {
        if got == payload.len() {
            payload.resize(got + (length - got).min(READ_CHUNK), 0);
        }
        match read_some(input, &mut payload[got..])? {
            0 => {
                return Err(FrameError::Truncated {
                    expected: length,
                    got,
                })
            }
            n => got += n,
        }
    }
    Ok(Some(payload))
}

/// Reads one frame and hands its payload to `decode`. A frame that already
/// sits whole in `input`'s buffer (every small request of a busy client) is
/// decoded where it lies, without a copy or an allocation; any other goes
/// through [`read_frame`], and so does every error.
///
/// ```
/// use persistent_worker::bazel::framing::{encode_frame, with_frame};
///
/// let stream = encode_frame(b"hello");
/// let mut input = stream.as_slice();
/// assert_eq!(with_frame(&mut input, 1024, |payload| payload.len()).unwrap(), Some(5));
/// ```
pub fn with_frame<T>(
    input: &mut impl BufRead,
    max: usize,
    decode: impl FnOnce(&[u8]) -> T,
) -> Result<Option<T>, FrameError> {
    let buffered = loop {
        match input.fill_buf() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => break other.map_err(FrameError::Io)?,
        }
    };
    if let Ok(Some((length, prefix))) = decode_varint(buffered) {
        let (length, end) = (length as usize, prefix + length as usize);
        if length <= max && end <= buffered.len() {
            let decoded = decode(&buffered[prefix..end]);
            input.consume(end);
            return Ok(Some(decoded));
        }
    }
    Ok(read_frame(input, max)?.map(|payload| decode(&payload)))
}

fn read_some(input: &mut impl Read, buf: &mut [u8]) -> Result<usize, FrameError> {
    loop {
        match input.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other.map_err(FrameError::Io),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 3 << 20;

    fn round_trip(length: usize) -> Result<Option<Vec<u8>>, FrameError> {
        let payload: Vec<u8> = (0..length).map(|i| i as u8).collect();
        let frame = encode_frame(&payload);
        let mut input = &frame[..];
        let got = read_frame(&mut input, LIMIT)?;
        assert!(input.is_empty(), "frame of {length} not fully consumed");
        assert_eq!(got.as_deref(), Some(&payload[..]));
        Ok(got)
    }

    #[test]
    fn lengths_round_trip_at_every_varint_boundary() {
        for length in [0, 1, 127, 128, 16383, 16384, 1 << 21, LIMIT] {
            round_trip(length).unwrap_or_else(|e| panic!("length {length}: {e}"));
        }
    }

    /// Frames of every size, read through buffers of every size: a frame that
    /// lies whole in the buffer and one that straddles refills decode alike.
    #[test]
    fn with_frame_reads_what_read_frame_reads_whatever_the_buffer_holds() {
        let lengths = [0usize, 1, 127, 128, 300, 5000];
        let mut stream = Vec::new();
        for &length in &lengths {
            stream.extend(encode_frame(&vec![length as u8; length]));
        }
        for capacity in [1, 2, 7, 64, 200, 4096, 1 << 16] {
            let mut input = io::BufReader::with_capacity(capacity, &stream[..]);
            for &length in &lengths {
                let got = with_frame(&mut input, LIMIT, <[u8]>::to_vec).unwrap();
                assert_eq!(got, Some(vec![length as u8; length]), "capacity {capacity}");
            }
            let end = with_frame(&mut input, LIMIT, <[u8]>::to_vec).unwrap();
            assert_eq!(end, None, "capacity {capacity}");
        }
        // Limits and errors are read_frame's, buffered or not.
        let frame = encode_frame(&[7; 100]);
        let mut input = io::BufReader::new(&frame[..]);
        let err = with_frame(&mut input, 99, |_| ()).unwrap_err();
        assert!(
            matches!(
                err,
                FrameError::TooLarge {
                    length: 100,
                    max: 99
                }
            ),
            "{err:?}"
        );
        let mut input = io::BufReader::new(&frame[..50]);
        let err = with_frame(&mut input, LIMIT, |_| ()).unwrap_err();
        assert!(
            matches!(
                err,
                FrameError::Truncated {
                    expected: 100,
                    got: 49
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn varint_sizes_are_minimal() {
        for (value, bytes) in [
            (0u64, 1),
            (127, 1),
            (128, 2),
            (16383, 2),
            (16384, 3),
            (1 << 21, 4),
            (u32::MAX as u64, 5),
        ] {
            let mut out = Vec::new();
            encode_varint(value, &mut out);
            assert_eq!(out.len(), bytes, "value {value}");
            assert_eq!(decode_varint(&out).unwrap(), Some((value as u32, bytes)));
        }
    }

    #[test]
    fn limit_plus_one_is_rejected_before_reading_the_payload() {
        let mut prefix = Vec::new();
        encode_varint(LIMIT as u64 + 1, &mut prefix);
        let err = read_frame(&mut &prefix[..], LIMIT).unwrap_err();
        assert!(
            matches!(err, FrameError::TooLarge { length, max } if length == LIMIT as u64 + 1 && max == LIMIT)
        );
    }

    /// Records the largest buffer it was asked to fill: the allocation a
    /// reader makes before the bytes exist.
    struct Watched<'a> {
        bytes: &'a [u8],
        largest: usize,
    }

    impl Read for Watched<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.largest = self.largest.max(buf.len());
            self.bytes.read(buf)
        }
    }

    #[test]
    fn an_announced_length_is_not_allocated_before_the_bytes_come() {
        let mut input = Vec::new();
        encode_varint(60 << 20, &mut input);
        input.extend_from_slice(&[7u8; 100_000]);
        let mut watched = Watched {
            bytes: &input,
            largest: 0,
        };
        let err = read_frame(&mut watched, 64 << 20).unwrap_err();
        assert!(
            matches!(err, FrameError::Truncated { expected, got } if expected == 60 << 20 && got == 100_000),
            "{err:?}"
        );
        assert!(
            watched.largest <= READ_CHUNK,
            "asked for {}",
            watched.largest
        );
    }

    #[test]
    fn a_frame_arriving_in_pieces_is_whole() {
        let payload: Vec<u8> = (0..3 * READ_CHUNK + 17).map(|i| (i % 251) as u8).collect();
        let frame = encode_frame(&payload);
        // One byte per read: every chunk boundary is crossed mid-read.
        struct Dribble<'a>(&'a [u8]);
        impl Read for Dribble<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = buf.len().min(1).min(self.0.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let got = read_frame(&mut Dribble(&frame), LIMIT).unwrap();
        assert_eq!(got.as_deref(), Some(&payload[..]));
    }

    #[test]
    fn clean_eof_is_none() {
        assert!(read_frame(&mut &b""[..], LIMIT).unwrap().is_none());
    }

    #[test]
    fn truncated_varint_is_an_error() {
        let err = read_frame(&mut &[0x80u8, 0x80][..], LIMIT).unwrap_err();
        assert!(matches!(err, FrameError::Truncated { .. }), "{err:?}");
        assert_eq!(decode_varint(&[0x80, 0x80]).unwrap(), None);
    }

    #[test]
    fn truncated_payload_is_an_error() {
        let mut frame = encode_frame(b"hello world");
        frame.truncate(6);
        let err = read_frame(&mut &frame[..], LIMIT).unwrap_err();
        assert!(
            matches!(
                err,
                FrameError::Truncated {
                    expected: 11,
                    got: 5
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn padded_varints_decode_like_protobuf_does() {
        // Non-minimal but valid: `80 00` is 0 in two bytes. Found by the
        // framer fuzz target, whose round-trip check first assumed minimal
        // encodings.
        assert_eq!(decode_varint(&[0x80, 0x00]).unwrap(), Some((0, 2)));
        let frame = [0x81u8, 0x00, b'x'];
        assert_eq!(
            read_frame(&mut &frame[..], LIMIT).unwrap().as_deref(),
            Some(&b"x"[..])
        );
    }

    #[test]
    fn six_byte_varint_is_rejected() {
        let bytes = [0x81u8, 0x80, 0x80, 0x80, 0x80, 0x00];
        assert!(matches!(
            decode_varint(&bytes),
            Err(FrameError::VarintTooLong)
        ));
        let err = read_frame(&mut &bytes[..], LIMIT).unwrap_err();
        assert!(matches!(err, FrameError::VarintTooLong), "{err:?}");
    }

    #[test]
    fn five_byte_varint_over_32_bits_is_rejected() {
        // 0x1f in the fifth byte sets bit 32.
        let bytes = [0xffu8, 0xff, 0xff, 0xff, 0x1f];
        assert!(matches!(
            decode_varint(&bytes),
            Err(FrameError::VarintTooLong)
        ));
    }
}
