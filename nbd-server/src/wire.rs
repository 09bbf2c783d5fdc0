//! Pure encoding and decoding of NBD messages on byte slices: no I/O, no state.
//!
//! Decoders return [`Decoded::Incomplete`] when more bytes are needed, kept apart from
//! invalid input (an `Err`). Numbers are big-endian on the wire. Values follow
//! `doc/proto.md` of the NetworkBlockDevice/nbd repository.

/// `NBDMAGIC`, first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second server magic and the magic of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request (compact headers).
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: fixed newstyle negotiation.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the client wants no 124 zero bytes.
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags sent with an export's size.
pub mod tflags {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// Writes will fail.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_CMD_FLUSH` is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_CMD_FLAG_FUA` is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// `NBD_CMD_TRIM` is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_CMD_WRITE_ZEROES` is supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_CMD_FLAG_DF` is supported on reads (structured replies only).
    pub const SEND_DF: u16 = 1 << 7;
    /// Several connections to the export see one consistent state.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// `NBD_CMD_CACHE` is supported.
    pub const SEND_CACHE: u16 = 1 << 10;
}

/// Option numbers (`NBD_OPT_*`).
pub mod opt {
    /// Choose an export and enter transmission, without a reply on failure.
    pub const EXPORT_NAME: u32 = 1;
    /// End negotiation.
    pub const ABORT: u32 = 2;
    /// List exports.
    pub const LIST: u32 = 3;
    /// Upgrade to TLS.
    pub const STARTTLS: u32 = 5;
    /// Describe an export.
    pub const INFO: u32 = 6;
    /// Describe an export and enter transmission.
    pub const GO: u32 = 7;
    /// Use structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
    /// Use 64-bit extended headers.
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types (`NBD_REP_*`).
pub mod rep {
    /// Success, or the end of a list.
    pub const ACK: u32 = 1;
    /// One export of a list.
    pub const SERVER: u32 = 2;
    /// One piece of export information.
    pub const INFO: u32 = 3;
    /// One metadata context.
    pub const META_CONTEXT: u32 = 4;
    /// Unknown option.
    pub const ERR_UNSUP: u32 = (1 << 31) + 1;
    /// Refused by policy.
    pub const ERR_POLICY: u32 = (1 << 31) + 2;
    /// Malformed option.
    pub const ERR_INVALID: u32 = (1 << 31) + 3;
    /// TLS must be started (`NBD_OPT_STARTTLS`) before this option.
    pub const ERR_TLS_REQD: u32 = (1 << 31) + 5;
    /// No such export.
    pub const ERR_UNKNOWN: u32 = (1 << 31) + 6;
    /// The server is shutting down.
    pub const ERR_SHUTDOWN: u32 = (1 << 31) + 7;
    /// The option is too large to process.
    pub const ERR_TOO_BIG: u32 = (1 << 31) + 9;
}

/// Information types of `NBD_REP_INFO` (`NBD_INFO_*`).
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// Canonical export name.
    pub const NAME: u16 = 1;
    /// Human-readable description.
    pub const DESCRIPTION: u16 = 2;
    /// Minimum, preferred and maximum block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Command types (`NBD_CMD_*`).
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write (payload follows the header).
    pub const WRITE: u16 = 1;
    /// Disconnect.
    pub const DISC: u16 = 2;
    /// Flush.
    pub const FLUSH: u16 = 3;
    /// Discard.
    pub const TRIM: u16 = 4;
    /// Prefetch.
    pub const CACHE: u16 = 5;
    /// Write zeroes.
    pub const WRITE_ZEROES: u16 = 6;
    /// Query metadata contexts.
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags (`NBD_CMD_FLAG_*`).
pub mod cmd_flag {
    /// Force unit access.
    pub const FUA: u16 = 1 << 0;
    /// Write zeroes without punching a hole.
    pub const NO_HOLE: u16 = 1 << 1;
    /// Send at most one content chunk.
    pub const DF: u16 = 1 << 2;
    /// Return one extent only.
    pub const REQ_ONE: u16 = 1 << 3;
}

/// Structured reply chunk types and flags.
pub mod reply {
    /// Flag: last chunk of the reply.
    pub const FLAG_DONE: u16 = 1 << 0;
    /// Empty final chunk.
    pub const NONE: u16 = 0;
    /// Data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// Zeroes at an offset.
    pub const OFFSET_HOLE: u16 = 2;
    /// Block status descriptors of one metadata context.
    pub const BLOCK_STATUS: u16 = 5;
    /// An error for the whole request.
    pub const ERROR: u16 = (1 << 15) + 1;
}

/// `base:allocation` state bits.
pub mod state {
    /// Not allocated.
    pub const HOLE: u32 = 1 << 0;
    /// Reads as zeroes.
    pub const ZERO: u32 = 1 << 1;
}

/// Bytes of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Bytes of an option request header (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Longest string (export name, query, message) the spec allows.
pub const MAX_STRING: usize = 4096;

/// The outcome of decoding from a buffer that may be short.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded<T> {
    /// A value and the number of bytes it used.
    Done(T, usize),
    /// The buffer is too short; at least this many bytes are needed in total.
    Incomplete(usize),
}

/// Malformed input, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// An option request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option number.
    pub option: u32,
    /// Bytes of option data that follow.
    pub len: u32,
}

/// Decodes an option request header.
///
/// # Errors
/// [`Invalid`] when the magic is not `IHAVEOPT`.
pub fn decode_option_header(b: &[u8]) -> Result<Decoded<OptionHeader>, Invalid> {
    if b.len() < OPTION_HEADER_LEN {
        return Ok(Decoded::Incomplete(OPTION_HEADER_LEN));
    }
    let magic = be64(b, 0);
    if magic != IHAVEOPT {
        return Err(Invalid(format!(
            "option magic {magic:#018x} is not IHAVEOPT"
        )));
    }
    Ok(Decoded::Done(
        OptionHeader {
            option: be32(b, 8),
            len: be32(b, 12),
        },
        OPTION_HEADER_LEN,
    ))
}

/// A transmission request header (any payload follows separately).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub kind: u16,
    /// Client's cookie, echoed in replies.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub len: u32,
}

/// Decodes a request header.
///
/// # Errors
/// [`Invalid`] when the magic is wrong: the stream cannot be resynchronised.
pub fn decode_request(b: &[u8]) -> Result<Decoded<Request>, Invalid> {
    if b.len() < REQUEST_LEN {
        return Ok(Decoded::Incomplete(REQUEST_LEN));
    }
    let magic = be32(b, 0);
    if magic != REQUEST_MAGIC {
        return Err(Invalid(format!(
            "request magic {magic:#010x} is not {REQUEST_MAGIC:#010x}"
        )));
    }
    Ok(Decoded::Done(
        Request {
            flags: be16(b, 4),
            kind: be16(b, 6),
            cookie: be64(b, 8),
            offset: be64(b, 16),
            len: be32(b, 24),
        },
        REQUEST_LEN,
    ))
}

/// Encodes a request header (used by tests and clients).
pub fn encode_request(r: &Request) -> [u8; REQUEST_LEN] {
    let mut out = [0u8; REQUEST_LEN];
    out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&r.flags.to_be_bytes());
    out[6..8].copy_from_slice(&r.kind.to_be_bytes());
    out[8..16].copy_from_slice(&r.cookie.to_be_bytes());
    out[16..24].copy_from_slice(&r.offset.to_be_bytes());
    out[24..28].copy_from_slice(&r.len.to_be_bytes());
    out
}

/// The server's greeting: magics and handshake flags.
pub fn encode_greeting() -> [u8; 18] {
    let mut out = [0u8; 18];
    out[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    out
}

/// Appends an option reply to `out`.
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, kind: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Appends a simple reply header to `out` (read data, if any, follows separately).
pub fn encode_simple_reply(out: &mut Vec<u8>, error: u32, cookie: u64) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// Appends a structured reply chunk header to `out`; `len` bytes of payload follow.
pub fn encode_chunk_header(out: &mut Vec<u8>, flags: u16, kind: u16, cookie: u64, len: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// Appends a structured `NBD_REPLY_TYPE_ERROR` chunk with `FLAG_DONE`; the message is cut
/// to the spec's 4096-byte limit on a character boundary.
pub fn encode_error_chunk(out: &mut Vec<u8>, cookie: u64, error: u32, message: &str) {
    let msg = truncate(message, MAX_STRING);
    encode_chunk_header(
        out,
        reply::FLAG_DONE,
        reply::ERROR,
        cookie,
        6 + msg.len() as u32,
    );
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg.as_bytes());
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A cursor over option data that fails with [`Invalid`] instead of panicking.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// Starts at the beginning of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], Invalid> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(Invalid(format!(
                "{what} needs {n} bytes at offset {}, the option has {}",
                self.pos,
                self.buf.len()
            ))),
        }
    }

    /// A big-endian u16.
    ///
    /// # Errors
    /// When the data is too short.
    pub fn u16(&mut self, what: &str) -> Result<u16, Invalid> {
        self.take(2, what).map(|b| be16(b, 0))
    }

    /// A big-endian u32.
    ///
    /// # Errors
    /// When the data is too short.
    pub fn u32(&mut self, what: &str) -> Result<u32, Invalid> {
        self.take(4, what).map(|b| be32(b, 0))
    }

    /// A string of `len` bytes: valid UTF-8, no NUL, at most 4096 bytes.
    ///
    /// # Errors
    /// When the data is too short or the string is not valid.
    pub fn string(&mut self, len: u32, what: &str) -> Result<String, Invalid> {
        let len = len as usize;
        if len > MAX_STRING {
            return Err(Invalid(format!(
                "{what} of {len} bytes exceeds {MAX_STRING}"
            )));
        }
        let b = self.take(len, what)?;
        let s = std::str::from_utf8(b).map_err(|_| Invalid(format!("{what} is not UTF-8")))?;
        if s.contains('\0') {
            return Err(Invalid(format!("{what} contains NUL")));
        }
        Ok(s.to_string())
    }

    /// Fails unless every byte was consumed.
    ///
    /// # Errors
    /// When bytes are left over.
    pub fn finish(self, what: &str) -> Result<(), Invalid> {
        if self.pos != self.buf.len() {
            return Err(Invalid(format!(
                "{what}: {} trailing bytes",
                self.buf.len() - self.pos
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip_and_short_input() {
        let r = Request {
            flags: 1,
            kind: cmd::READ,
            cookie: 0xdead_beef,
            offset: 1 << 40,
            len: 4096,
        };
        let bytes = encode_request(&r);
        for n in 0..REQUEST_LEN {
            assert_eq!(
                decode_request(&bytes[..n]),
                Ok(Decoded::Incomplete(REQUEST_LEN))
            );
        }
        assert_eq!(decode_request(&bytes), Ok(Decoded::Done(r, REQUEST_LEN)));
        let mut bad = bytes;
        bad[0] ^= 1;
        assert!(decode_request(&bad).is_err());
    }

    #[test]
    fn option_header() {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt::GO.to_be_bytes());
        b.extend_from_slice(&7u32.to_be_bytes());
        assert_eq!(decode_option_header(&b[..15]), Ok(Decoded::Incomplete(16)));
        assert_eq!(
            decode_option_header(&b),
            Ok(Decoded::Done(
                OptionHeader {
                    option: opt::GO,
                    len: 7
                },
                16
            ))
        );
        b[0] = 0;
        assert!(decode_option_header(&b).is_err());
    }

    #[test]
    fn reader_rejects_short_and_bad_strings() {
        let mut r = Reader::new(&[0, 0, 0, 5, b'a']);
        let n = r.u32("len").unwrap();
        assert!(r.string(n, "name").is_err());
        let mut r = Reader::new(&[b'a', 0]);
        assert!(r.string(2, "name").is_err());
        let mut r = Reader::new(&[0xff, 0xfe]);
        assert!(r.string(2, "name").is_err());
        let r = Reader::new(&[1]);
        assert!(r.finish("x").is_err());
    }

    #[test]
    fn error_chunk_truncates_on_char_boundary() {
        let msg = "é".repeat(3000);
        let mut out = Vec::new();
        encode_error_chunk(&mut out, 9, 5, &msg);
        let len = u32::from_be_bytes(out[16..20].try_into().unwrap()) as usize;
        assert_eq!(out.len(), 20 + len);
        assert!(len - 6 <= MAX_STRING);
        assert!(std::str::from_utf8(&out[26..]).is_ok());
    }
}
