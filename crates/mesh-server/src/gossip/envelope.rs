//! The envelope in front of every gossip packet: `[b"MSHG"][major u8][minor u8][dc len u8][dc bytes][foca payload]`.
//!
//! It lets a node drop foreign traffic (garbage, a future incompatible protocol, another datacenter's pool)
//! before foca decodes anything. A different MINOR version is accepted: minor bumps must stay compatible.

/// The four bytes every mesh gossip packet starts with.
pub const MAGIC: &[u8; 4] = b"MSHG";
/// The protocol's major version: a packet with another major version is dropped.
pub const VERSION_MAJOR: u8 = 1;
/// The protocol's minor version: informative, any minor of [`VERSION_MAJOR`] is accepted.
pub const VERSION_MINOR: u8 = 0;
/// The longest datacenter name the envelope can carry (its length is one byte).
pub const MAX_DATACENTER_LEN: usize = u8::MAX as usize;

/// Why an envelope was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// Shorter than a header, or not starting with [`MAGIC`]: not a mesh gossip packet.
    #[error("not a mesh gossip packet ({len} bytes, no MSHG header)")]
    Garbage {
        /// The packet's length in bytes.
        len: usize,
    },
    /// A major protocol version this node does not speak.
    #[error("protocol version {major}.{minor}, this node speaks {VERSION_MAJOR}.x")]
    Version {
        /// The packet's major version.
        major: u8,
        /// The packet's minor version.
        minor: u8,
    },
    /// A packet of another datacenter's pool.
    #[error("datacenter {theirs}, this pool is {ours}")]
    Datacenter {
        /// The datacenter named in the packet (lossily decoded).
        theirs: String,
        /// This node's datacenter.
        ours: String,
    },
}

/// The envelope's length for datacenter `dc`.
pub fn header_len(dc: &str) -> usize {
    MAGIC.len() + 3 + dc.len()
}

/// Appends the envelope for datacenter `dc` (at most [`MAX_DATACENTER_LEN`] bytes) and then `payload` to `out`.
pub fn encode(dc: &str, payload: &[u8], out: &mut Vec<u8>) {
    debug_assert!(dc.len() <= MAX_DATACENTER_LEN);
    out.reserve(header_len(dc) + payload.len());
    out.extend_from_slice(MAGIC);
    out.push(VERSION_MAJOR);
    out.push(VERSION_MINOR);
    out.push(dc.len() as u8);
    out.extend_from_slice(dc.as_bytes());
    out.extend_from_slice(payload);
}

/// Checks the envelope of `packet` against this node's datacenter `our_dc` and returns the foca payload.
pub fn decode<'a>(packet: &'a [u8], our_dc: &str) -> Result<&'a [u8], EnvelopeError> {
    let garbage = || EnvelopeError::Garbage { len: packet.len() };
    let rest = packet.strip_prefix(MAGIC.as_slice()).ok_or_else(garbage)?;
    let [major, minor, dc_len, rest @ ..] = rest else {
        return Err(garbage());
    };
    if *major != VERSION_MAJOR {
        return Err(EnvelopeError::Version { major: *major, minor: *minor });
    }
    let dc_len = usize::from(*dc_len);
    if rest.len() < dc_len {
        return Err(garbage());
    }
    let (dc, payload) = rest.split_at(dc_len);
    if dc != our_dc.as_bytes() {
        return Err(EnvelopeError::Datacenter {
            theirs: String::from_utf8_lossy(dc).into_owned(),
            ours: our_dc.to_owned(),
        });
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut out = Vec::new();
        encode("dc1", b"payload", &mut out);
        assert_eq!(&out[..4], b"MSHG");
        assert_eq!(out.len(), header_len("dc1") + 7);
        assert_eq!(decode(&out, "dc1"), Ok(&b"payload"[..]));
    }

    #[test]
    fn refusals() {
        assert_eq!(decode(b"", "dc1"), Err(EnvelopeError::Garbage { len: 0 }));
        assert_eq!(decode(b"MSHG\x01", "dc1"), Err(EnvelopeError::Garbage { len: 5 }));
        assert_eq!(decode(b"XXXX\x01\x00\x03dc1", "dc1"), Err(EnvelopeError::Garbage { len: 10 }));
        // The datacenter length says 9 bytes, there are 3.
        assert_eq!(decode(b"MSHG\x01\x00\x09dc1", "dc1"), Err(EnvelopeError::Garbage { len: 10 }));
        assert_eq!(decode(b"MSHG\x63\x00\x03dc1x", "dc1"), Err(EnvelopeError::Version { major: 99, minor: 0 }));
        let err = decode(b"MSHG\x01\x00\x03dc2x", "dc1").unwrap_err();
        assert_eq!(err.to_string(), "datacenter dc2, this pool is dc1");
        // A newer minor version of the same major is accepted.
        assert_eq!(decode(b"MSHG\x01\x07\x03dc1x", "dc1"), Ok(&b"x"[..]));
    }
}
