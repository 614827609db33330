//! Input digests as a BuildBuddy-style executor sends them: a serialized
//! REAPI `Digest { string hash = 1; int64 size_bytes = 2; }` with the file's
//! SHA-256. Workers must treat the bytes as opaque, but sending the real
//! thing catches a worker that wrongly expects Bazel's hex string.

use persistent_worker::bazel::framing::encode_varint;
use sha2::{Digest, Sha256};

/// The serialized REAPI `Digest` of `content`.
pub fn reapi_digest(content: &[u8]) -> Vec<u8> {
    let hash = hex(&Sha256::digest(content));
    let mut out = Vec::with_capacity(hash.len() + 12);
    out.push(0x0a); // field 1, length-delimited
    encode_varint(hash.len() as u64, &mut out);
    out.extend_from_slice(hash.as_bytes());
    if !content.is_empty() {
        out.push(0x10); // field 2, varint; proto3 leaves a zero out
        encode_varint(content.len() as u64, &mut out);
    }
    out
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_message_layout() {
        let d = reapi_digest(b"abc");
        assert_eq!(d[0], 0x0a);
        assert_eq!(d[1], 64);
        assert_eq!(
            std::str::from_utf8(&d[2..66]).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(&d[66..], &[0x10, 3]);
        assert_eq!(reapi_digest(b"").len(), 66);
    }
}
