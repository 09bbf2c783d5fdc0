//! Trust: deciding whether an index is the one its owner published, and handing the
//! kernel what it needs to keep checking a partition after it was written.
//!
//! Chunk hashes only prove that chunk bytes match the index; the index itself must be
//! authentic. Three independent checks make it so, each optional, all applied by
//! [`load_index`] (or [`check_index_bytes`] for an index already in memory) *before* the
//! index is parsed or used:
//!
//! - a pinned **root hash**: the BLAKE3 hash of the index file ([`TrustPolicy::root_hash`]);
//! - a **signature** by one of a set of trusted keys, in minisign's format
//!   ([`signature`]), whose trusted comment carries the image version;
//! - a **minimum version**: signed indexes older than it are refused (rollback protection).
//!
//! [`verity`] writes a standard dm-verity hash tree for an image so that the kernel can
//! keep verifying the partition at every read after tessera wrote it.
//!
//! ```no_run
//! use std::path::Path;
//! use tessera_engine::trust::{load_index, TrustPolicy, TrustedKey};
//!
//! # fn main() -> tessera_engine::Result<()> {
//! let policy = TrustPolicy {
//!     trusted_keys: vec![TrustedKey::load(Path::new("release.pub"))?],
//!     min_version: Some(42),
//!     ..TrustPolicy::default()
//! };
//! let (index, report) = load_index(Path::new("disk.tidx"), None, &policy)?;
//! println!("{} chunks, signed version {:?}", index.chunks().len(), report.version());
//! # Ok(()) }
//! ```

pub mod signature;
pub mod verity;

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::index::hex;
use crate::Index;

pub use signature::{generate_keypair, sign_index_file, KeyId, SignReport, SigningKey, TrustedKey};
pub use verity::{build_verity, VerityOptions, VerityReport};

/// What an index must satisfy to be used. The default checks nothing.
#[derive(Debug, Clone, Default)]
pub struct TrustPolicy {
    /// Refuse any index whose BLAKE3 root hash differs from this one.
    pub root_hash: Option<[u8; 32]>,
    /// Keys allowed to sign the index. When not empty, a valid signature by one of them
    /// is required.
    pub trusted_keys: Vec<TrustedKey>,
    /// Refuse an index whose signed version is lower than this. Needs trusted keys: an
    /// unsigned version number proves nothing.
    pub min_version: Option<u64>,
}

impl TrustPolicy {
    /// True when the policy requires nothing.
    pub fn is_empty(&self) -> bool {
        self.root_hash.is_none() && self.trusted_keys.is_empty() && self.min_version.is_none()
    }
}

/// What was established about an index that passed a [`TrustPolicy`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TrustReport {
    /// BLAKE3 of the index file, lowercase hex.
    pub root_hash: String,
    /// Whether the pinned root hash was checked.
    pub root_hash_pinned: bool,
    /// The signature that was checked, if any.
    pub signature: Option<signature::SignatureInfo>,
}

impl TrustReport {
    /// The image version from the signed trusted comment, if signed and present.
    pub fn version(&self) -> Option<u64> {
        self.signature.as_ref().and_then(|s| s.version)
    }
}

/// The default signature path of an index: `INDEX.minisig` beside it.
pub fn signature_path(index: &Path) -> PathBuf {
    let mut s = index.as_os_str().to_owned();
    s.push(".minisig");
    PathBuf::from(s)
}

/// Checks index bytes against `policy`, then parses them: a tessera index, or a casync
/// `.caibx` ([`crate::casync::parse_index`]).
///
/// `origin` names the index and `signature` gives the text of its signature with where
/// it came from, for messages. Nothing is parsed before the root hash and the signature
/// were checked.
///
/// # Errors
/// [`Error::Untrusted`] saying which check failed and why; [`Error::InvalidInput`] for a
/// policy that cannot be applied (a minimum version without trusted keys, or trusted
/// keys and no signature); [`Error::InvalidIndex`] if the trusted bytes are malformed.
pub fn check_index_bytes(
    bytes: &[u8],
    origin: &str,
    signature: Option<(&str, &str)>,
    policy: &TrustPolicy,
) -> Result<(Index, TrustReport)> {
    if policy.min_version.is_some() && policy.trusted_keys.is_empty() {
        return Err(Error::InvalidInput(
            "a minimum version needs trusted keys: an unsigned version proves nothing".into(),
        ));
    }
    let root = *blake3::hash(bytes).as_bytes();
    if let Some(pinned) = policy.root_hash {
        if pinned != root {
            return Err(Error::Untrusted(format!(
                "index {origin} has root hash {}, not the pinned {}",
                hex(&root),
                hex(&pinned)
            )));
        }
    }
    let signature = if policy.trusted_keys.is_empty() {
        None
    } else {
        let (text, sig_origin) = signature.ok_or_else(|| {
            Error::Untrusted(format!(
                "index {origin} is not signed and trusted keys are required"
            ))
        })?;
        let info = signature::verify_index(bytes, &root, text, sig_origin, &policy.trusted_keys)?;
        if let Some(min) = policy.min_version {
            match info.version {
                None => {
                    return Err(Error::Untrusted(format!(
                        "signature {sig_origin} carries no version in its trusted comment \
                         ({:?}), so the minimum version {min} cannot be checked",
                        info.trusted_comment
                    )))
                }
                Some(v) if v < min => {
                    return Err(Error::Untrusted(format!(
                        "rollback refused: index {origin} is signed as version {v}, older than \
                         the minimum version {min}"
                    )))
                }
                Some(_) => {}
            }
        }
        Some(info)
    };
    let index = if crate::casync::is_index(bytes) {
        crate::casync::parse_index(bytes, origin)?
    } else {
        Index::from_bytes(bytes, origin)?
    };
    Ok((
        index,
        TrustReport {
            root_hash: hex(&root),
            root_hash_pinned: policy.root_hash.is_some(),
            signature,
        },
    ))
}

/// Reads an index file and applies `policy` to it (see [`check_index_bytes`]).
///
/// The signature is read from `signature` or, by default, from `INDEX.minisig`; it is
/// read only when the policy has trusted keys.
///
/// # Errors
/// As [`check_index_bytes`], plus [`Error::Io`] if the index cannot be read and
/// [`Error::Untrusted`] if a required signature file cannot be read.
pub fn load_index(
    path: &Path,
    signature: Option<&Path>,
    policy: &TrustPolicy,
) -> Result<(Index, TrustReport)> {
    let mut bytes = Index::read_file(path)?;
    if crate::casync::is_index(&bytes) {
        bytes = crate::casync::read_index_file(path)?;
    }
    let origin = path.display().to_string();
    if policy.trusted_keys.is_empty() {
        return check_index_bytes(&bytes, &origin, None, policy);
    }
    let sig_path = signature.map_or_else(|| signature_path(path), Path::to_path_buf);
    let text = read_signature(&sig_path)?;
    let sig_origin = sig_path.display().to_string();
    check_index_bytes(&bytes, &origin, Some((&text, &sig_origin)), policy)
}

/// Reads a signature file (at most 64 KiB of text) for [`check_index_bytes`].
///
/// # Errors
/// [`Error::Untrusted`] naming the path if it cannot be read, is too large or is not text.
pub fn read_signature(path: &Path) -> Result<String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| {
        Error::Untrusted(format!(
            "trusted keys are required but the signature {} cannot be read: {e}",
            path.display()
        ))
    })?;
    let mut bytes = Vec::new();
    file.take(MAX_SIGNATURE_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io("reading signature", path, e))?;
    signature_text(bytes, &path.display().to_string())
}

/// Turns signature bytes from `origin` (a file or a URL) into text for
/// [`check_index_bytes`]: what [`read_signature`] does for a file, for bytes fetched into
/// memory.
///
/// # Errors
/// [`Error::Untrusted`] naming `origin` if the bytes are over 64 KiB or not UTF-8.
pub fn signature_text(bytes: Vec<u8>, origin: &str) -> Result<String> {
    if bytes.len() as u64 > MAX_SIGNATURE_LEN {
        return Err(Error::Untrusted(format!(
            "signature {origin} is larger than {MAX_SIGNATURE_LEN} bytes: not a minisign signature"
        )));
    }
    String::from_utf8(bytes).map_err(|_| {
        Error::Untrusted(format!(
            "signature {origin} is not text: not a minisign signature"
        ))
    })
}

/// Longest signature accepted, in bytes: minisign signatures are a few hundred bytes, the
/// trusted comment being the only free-form part.
pub const MAX_SIGNATURE_LEN: u64 = 64 * 1024;

/// Decodes hex digits (either case) into bytes.
///
/// # Errors
/// [`Error::InvalidInput`] naming `what` for an odd length or a non-hex digit.
pub fn parse_hex(s: &str, what: &str) -> Result<Vec<u8>> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    if s.len() % 2 != 0 {
        return Err(Error::InvalidInput(format!(
            "{what} {s:?} has an odd number of hex digits"
        )));
    }
    s.as_bytes()
        .chunks_exact(2)
        .map(|p| match (digit(p[0]), digit(p[1])) {
            (Some(h), Some(l)) => Ok((h << 4) | l),
            _ => Err(Error::InvalidInput(format!("{what} {s:?} is not hex"))),
        })
        .collect()
}

/// Lowercase hex of any bytes.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ChunkId, ChunkerParams};

    fn index_bytes() -> Vec<u8> {
        Index::new(
            ChunkerParams::default(),
            [1; 32],
            vec![(ChunkId::of(b"abc"), 3)],
        )
        .unwrap()
        .to_bytes()
    }

    #[test]
    fn empty_policy_accepts_and_reports_root() {
        let bytes = index_bytes();
        let (index, report) =
            check_index_bytes(&bytes, "t", None, &TrustPolicy::default()).unwrap();
        assert_eq!(report.root_hash, hex(&index.root_hash()));
        assert!(!report.root_hash_pinned);
        assert!(report.signature.is_none());
    }

    #[test]
    fn a_file_that_is_no_index_is_refused_without_being_read_whole() {
        let rchar = crate::index::tests::thread_read_bytes;
        // An image given as the index by mistake (1 GiB, sparse).
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(1 << 30)
            .unwrap();
        let before = rchar();
        let e = load_index(&image, None, &TrustPolicy::default()).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::InvalidIndex, "{e}");
        assert!(e.to_string().contains("disk.img"), "{e}");
        assert!(rchar() - before < 1 << 20, "the whole file was read");
    }

    #[test]
    fn pinned_root_hash_is_enforced() {
        let bytes = index_bytes();
        let root = *blake3::hash(&bytes).as_bytes();
        let ok = TrustPolicy {
            root_hash: Some(root),
            ..TrustPolicy::default()
        };
        assert!(
            check_index_bytes(&bytes, "t", None, &ok)
                .unwrap()
                .1
                .root_hash_pinned
        );
        let mut wrong = root;
        wrong[0] ^= 1;
        let bad = TrustPolicy {
            root_hash: Some(wrong),
            ..TrustPolicy::default()
        };
        let err = check_index_bytes(&bytes, "t", None, &bad).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Untrusted);
        assert!(err.to_string().contains("not the pinned"), "{err}");
    }

    #[test]
    fn min_version_without_keys_is_a_usage_error() {
        let policy = TrustPolicy {
            min_version: Some(1),
            ..TrustPolicy::default()
        };
        let err = check_index_bytes(&index_bytes(), "t", None, &policy).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::InvalidInput);
    }

    #[test]
    fn hex_round_trip_and_errors() {
        assert_eq!(parse_hex("00fFa1", "salt").unwrap(), vec![0, 0xff, 0xa1]);
        assert_eq!(to_hex(&[0, 0xff, 0xa1]), "00ffa1");
        assert!(parse_hex("abc", "salt").is_err());
        assert!(parse_hex("zz", "salt").is_err());
        assert!(parse_hex("", "salt").unwrap().is_empty());
    }
}
