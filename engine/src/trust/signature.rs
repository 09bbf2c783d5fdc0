//! Signed indexes: minisign-compatible Ed25519 signatures.
//!
//! Keys and signatures are minisign's own files, so `minisign -V` checks what
//! [`sign_index_file`] writes and [`verify_index`] accepts what `minisign -S` writes.
//! Signatures are pre-hashed (BLAKE2b-512 of the index, minisign's default) and carry a
//! *trusted comment*, signed as well, of whitespace-separated `key:value` fields:
//!
//! ```text
//! timestamp:1767225600 file:disk.tidx root:<index BLAKE3 hex> version:42
//! ```
//!
//! `version:N` is the image version used for rollback protection; `root:` repeats the
//! index's root hash. Both are optional when checking (a signature made by hand with
//! `minisign -S -t 'version:42'` is fine), but when present they must be well formed and
//! `root:` must match.
//!
//! Verification uses the `minisign-verify` crate, which validates every length before
//! use; signing and key generation use the `minisign` crate.

use std::fmt;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::index::hex;
use crate::Index;

/// The 8-byte id minisign gives a key pair; signatures name the key that made them.
/// Displays as 16 uppercase hex digits, like minisign.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub [u8; 8]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016X}", u64::from_le_bytes(self.0))
    }
}

impl KeyId {
    fn from_slice(bytes: &[u8]) -> Option<KeyId> {
        bytes.try_into().ok().map(KeyId)
    }
}

/// A public key whose signatures are trusted.
#[derive(Debug, Clone)]
pub struct TrustedKey {
    key: minisign_verify::PublicKey,
    base64: String,
    id: KeyId,
    origin: String,
}

/// Longest key file read: a minisign public key file is about 100 bytes.
const MAX_KEY_FILE_LEN: u64 = 4096;

impl TrustedKey {
    /// Parses a public key: either a minisign public key file's text (an untrusted
    /// comment line, then the base64 key) or the base64 key alone. `origin` names where
    /// it came from, for messages.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] if it is not a minisign Ed25519 public key.
    pub fn parse(text: &str, origin: &str) -> Result<TrustedKey> {
        let bad = |why: &str| {
            Error::InvalidInput(format!("{origin} is not a minisign public key: {why}"))
        };
        let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
        let first = lines.next().ok_or_else(|| bad("it is empty"))?;
        let b64 = if first.starts_with("untrusted comment:") {
            lines
                .next()
                .ok_or_else(|| bad("no key after the comment line"))?
        } else {
            first
        };
        let key = minisign_verify::PublicKey::from_base64(b64).map_err(|e| bad(&e.to_string()))?;
        let id = minisign::PublicKey::from_base64(b64)
            .ok()
            .and_then(|k| KeyId::from_slice(k.keynum()))
            .ok_or_else(|| bad("cannot read its key id"))?;
        Ok(TrustedKey {
            key,
            base64: b64.to_string(),
            id,
            origin: origin.to_string(),
        })
    }

    /// Reads a minisign public key file (as written by `tessera keygen` or
    /// `minisign -G`).
    ///
    /// # Errors
    /// [`Error::Io`] if it cannot be read, [`Error::InvalidInput`] if it is not a key.
    pub fn load(path: &Path) -> Result<TrustedKey> {
        use std::io::Read;
        let file =
            std::fs::File::open(path).map_err(|e| Error::io("reading public key", path, e))?;
        let mut text = String::new();
        file.take(MAX_KEY_FILE_LEN)
            .read_to_string(&mut text)
            .map_err(|e| Error::io("reading public key", path, e))?;
        TrustedKey::parse(&text, &path.display().to_string())
    }

    /// A public key given as its base64 text alone (the second line of a minisign public
    /// key file, as `minisign -P` takes it). Never read from a file: a key and a path are
    /// different arguments ([`TrustedKey::load`] reads files), so a file that happens to
    /// be named like a key cannot stand in for it.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] if `b64` is not one minisign Ed25519 public key.
    pub fn from_base64(b64: &str) -> Result<TrustedKey> {
        let b64 = b64.trim();
        let origin = format!("public key {b64:?}");
        if b64.is_empty() || b64.contains(char::is_whitespace) || b64.contains(':') {
            return Err(Error::InvalidInput(format!(
                "{origin} is not a minisign public key: expected the base64 key alone \
                 (for a key file, give its path as a file)"
            )));
        }
        TrustedKey::parse(b64, &origin)
    }

    /// The key's id.
    pub fn id(&self) -> KeyId {
        self.id
    }
}

/// What a verified signature said.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SignatureInfo {
    /// Id of the trusted key that made the signature.
    pub key_id: String,
    /// The signed trusted comment.
    pub trusted_comment: String,
    /// The image version from the trusted comment's `version:` field.
    pub version: Option<u64>,
}

/// The fields tessera reads from a trusted comment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommentFields {
    /// `version:N`.
    pub version: Option<u64>,
    /// `root:HEX`, the index's BLAKE3 root hash.
    pub root: Option<[u8; 32]>,
}

/// Reads `version:` and `root:` from a trusted comment; other fields are ignored.
///
/// # Errors
/// [`Error::Untrusted`] if either field is repeated or malformed: a signer's intent
/// must not be guessed.
pub fn parse_trusted_comment(comment: &str) -> Result<CommentFields> {
    let bad = |why: String| Error::Untrusted(format!("trusted comment {comment:?}: {why}"));
    let mut fields = CommentFields::default();
    for token in comment.split_whitespace() {
        if let Some(v) = token.strip_prefix("version:") {
            // Digits only: `u64::from_str` would also take `+5`.
            let n = Some(v)
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| bad(format!("version {v:?} is not a whole number")))?;
            if fields.version.replace(n).is_some() {
                return Err(bad("more than one version field".into()));
            }
        } else if let Some(r) = token.strip_prefix("root:") {
            let id: crate::ChunkId = r
                .parse()
                .map_err(|_| bad(format!("root {r:?} is not a 64-digit hex hash")))?;
            if fields.root.replace(id.0).is_some() {
                return Err(bad("more than one root field".into()));
            }
        }
    }
    Ok(fields)
}

/// Checks a minisign signature (`text`, read from `origin`) over index `bytes` whose
/// BLAKE3 is `root`, by any of `keys`.
///
/// # Errors
/// [`Error::Untrusted`]: malformed signature, a key that is not trusted, an altered index
/// or trusted comment, or a trusted comment whose `root:` names another index.
pub fn verify_index(
    bytes: &[u8],
    root: &[u8; 32],
    text: &str,
    origin: &str,
    keys: &[TrustedKey],
) -> Result<SignatureInfo> {
    let untrusted = |why: String| Error::Untrusted(format!("signature {origin}: {why}"));
    let sig = minisign_verify::Signature::decode(text)
        .map_err(|e| untrusted(format!("not a minisign signature ({e})")))?;
    // For messages only: which key made it (minisign-verify keeps that private). Safe to
    // parse with the `minisign` crate now that the lengths were validated above.
    let sig_key = minisign::SignatureBox::from_string(text)
        .ok()
        .and_then(|b| KeyId::from_slice(b.keynum()));
    let Some(sig_key) = sig_key else {
        // Refused either way; but "not a trusted key" would send the user after keys.
        return Err(untrusted(
            "not a minisign signature (its key id cannot be read: a byte-order mark, \
             or a first line that is not \"untrusted comment: ...\")"
                .to_string(),
        ));
    };
    let Some(key) = keys.iter().find(|k| k.id == sig_key) else {
        let trusted: Vec<String> = keys.iter().map(|k| k.id.to_string()).collect();
        return Err(untrusted(format!(
            "made by key {sig_key}, which is not a trusted key (trusted: {})",
            trusted.join(", ")
        )));
    };
    if let Err(e) = key.key.verify(bytes, &sig, false) {
        let why = match e {
            minisign_verify::Error::UnexpectedAlgorithm => {
                "legacy (not pre-hashed) signatures are not accepted".to_string()
            }
            minisign_verify::Error::InvalidSignature => diagnose(bytes, text, key),
            other => other.to_string(),
        };
        return Err(untrusted(format!(
            "does not verify with trusted key {} ({}): {why}",
            key.id, key.origin
        )));
    }
    let comment = sig.trusted_comment().to_string();
    let fields = parse_trusted_comment(&comment)?;
    if let Some(signed_root) = fields.root {
        if &signed_root != root {
            return Err(untrusted(format!(
                "its trusted comment names index root {}, but the index's root hash is {}",
                hex(&signed_root),
                hex(root)
            )));
        }
    }
    Ok(SignatureInfo {
        key_id: key.id.to_string(),
        trusted_comment: comment,
        version: fields.version,
    })
}

/// Says which half of a failed signature is wrong: the index or the trusted comment.
fn diagnose(bytes: &[u8], text: &str, key: &TrustedKey) -> String {
    let generic = "the index or the signature's trusted comment was altered".to_string();
    let (Ok(sig_box), Ok(pk)) = (
        minisign::SignatureBox::from_string(text),
        minisign::PublicKey::from_base64(&key.base64),
    ) else {
        return generic;
    };
    match minisign::verify(&pk, &sig_box, Cursor::new(bytes), true, false, false) {
        Err(e) if e.to_string().contains("Comment") => {
            "the trusted comment was altered after signing".to_string()
        }
        Err(_) => "the index is not the one that was signed (altered or replaced)".to_string(),
        Ok(()) => generic,
    }
}

/// A secret key that signs indexes.
pub struct SigningKey {
    sk: minisign::SecretKey,
    pk: minisign::PublicKey,
    id: KeyId,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({})", self.id)
    }
}

impl SigningKey {
    /// Reads a minisign secret key file. Unencrypted keys (as `tessera keygen` and
    /// `minisign -G -W` write) need no `password`; password-protected ones do.
    ///
    /// # Errors
    /// [`Error::Io`] if unreadable; [`Error::InvalidInput`] if it is not a secret key,
    /// is password-protected and no password was given, or the password is wrong.
    pub fn load(path: &Path, password: Option<String>) -> Result<SigningKey> {
        let text =
            std::fs::read_to_string(path).map_err(|e| Error::io("reading secret key", path, e))?;
        let bad = |why: String| {
            Error::InvalidInput(format!("cannot use secret key {}: {why}", path.display()))
        };
        let sk_box = minisign::SecretKeyBox::from_string(&text).map_err(|e| bad(e.to_string()))?;
        let sk = match password {
            Some(pw) => minisign::SecretKey::from_box(sk_box, Some(pw)),
            None => minisign::SecretKey::from_unencrypted_box(sk_box),
        }
        .or_else(|e| match e.to_string().as_str() {
            "Key might be encrypted" => Err(bad(
                "it is password-protected and no password was given".into(),
            )),
            "Corrupted key" => minisign_unencrypted_key(&text).ok_or_else(|| bad(e.to_string())),
            other => Err(bad(other.to_string())),
        })?;
        let pk = minisign::PublicKey::from_secret_key(&sk).map_err(|e| bad(e.to_string()))?;
        let id = KeyId::from_slice(sk.keynum()).ok_or_else(|| bad("no key id".into()))?;
        Ok(SigningKey { sk, pk, id })
    }

    /// The key's id.
    pub fn id(&self) -> KeyId {
        self.id
    }
}

/// `minisign -G -W` (minisign 0.11) writes unencrypted secret keys with an all-zero
/// checksum, which the `minisign` crate calls corrupted; minisign itself accepts them, so
/// tessera does too. `None` unless the key is exactly that: unencrypted, zero checksum.
fn minisign_unencrypted_key(text: &str) -> Option<minisign::SecretKey> {
    use ct_codecs::{Base64, Decoder};
    let line = text.lines().nth(1)?.trim();
    let raw = Base64::decode_to_vec(line, None).ok()?;
    // sig_alg(2) kdf_alg(2) ... checksum: the last 32 bytes.
    let unencrypted = raw.get(2..4)? == [0, 0];
    let zero_checksum = raw.len() >= 32 && raw[raw.len() - 32..].iter().all(|&b| b == 0);
    if !(unencrypted && zero_checksum) {
        return None;
    }
    minisign::SecretKey::from_bytes(&raw).ok()
}

/// Generates an unencrypted key pair and writes both minisign key files; the secret key
/// file has mode 0600 whatever the umask, and is never readable by others, not even for
/// a moment. Each file is written whole under a random temporary name
/// (`O_EXCL|O_NOFOLLOW`), synced, renamed into place and its directory synced. A symbolic
/// link at either path is refused (never followed, whether it dangles or not). Existing
/// files are replaced only with `overwrite` (and never a file that appears meanwhile
/// without it).
///
/// # Errors
/// [`Error::InvalidInput`] if a path is a symbolic link, or exists and `overwrite` is
/// false; [`Error::Io`].
pub fn generate_keypair(secret: &Path, public: &Path, overwrite: bool) -> Result<KeyId> {
    use crate::fsutil::{refuse_symlink, write_file, Output};
    use crate::sync::fs::is_io_kind;
    let exists = |p: &Path| {
        Error::InvalidInput(format!(
            "{} already exists; refusing to replace a key (use --force)",
            p.display()
        ))
    };
    for (p, what) in [(secret, "secret key"), (public, "public key")] {
        refuse_symlink(p, what)?;
        if !overwrite && std::fs::symlink_metadata(p).is_ok() {
            return Err(exists(p));
        }
    }
    let failed = |e: minisign::PError| Error::InvalidInput(format!("generating a key pair: {e}"));
    let pair = minisign::KeyPair::generate_unencrypted_keypair().map_err(failed)?;
    let id = KeyId::from_slice(pair.pk.keynum())
        .ok_or_else(|| Error::InvalidInput("generated key has no id".into()))?;
    let sk_text = pair
        .sk
        .to_box(Some(&format!("tessera secret key {id}, unencrypted")))
        .map_err(failed)?
        .into_string();
    let pk_text = pair.pk.to_box().map_err(failed)?.into_string();
    let place = |p: &Path, text: &str, mode: u32| {
        let how = Output {
            mode,
            replace: overwrite,
        };
        write_file(p, text.as_bytes(), &how).map_err(|e| {
            if is_io_kind(&e, std::io::ErrorKind::AlreadyExists) {
                exists(p)
            } else {
                e
            }
        })
    };
    place(secret, &sk_text, 0o600)?;
    place(public, &pk_text, 0o666)?;
    Ok(id)
}

/// What [`sign_index_file`] did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SignReport {
    /// Where the signature was written.
    pub signature: PathBuf,
    /// Id of the signing key.
    pub key_id: String,
    /// The signed trusted comment.
    pub trusted_comment: String,
    /// BLAKE3 root hash of the signed index.
    pub root_hash: String,
}

/// Signs an index file, writing the minisign signature to `out` (atomically).
///
/// The index is parsed first: a malformed index is never signed. The trusted comment
/// carries a timestamp, the file name, the root hash and, if given, `version`.
///
/// # Errors
/// [`Error::Io`], [`Error::InvalidIndex`], or [`Error::InvalidInput`] if signing fails.
pub fn sign_index_file(
    index: &Path,
    key: &SigningKey,
    version: Option<u64>,
    out: &Path,
) -> Result<SignReport> {
    let bytes = std::fs::read(index).map_err(|e| Error::io("reading index", index, e))?;
    let origin = index.display().to_string();
    // A tessera index or a casync .caibx: either is signed as the bytes of its file.
    let parsed = if crate::casync::is_index(&bytes) {
        crate::casync::parse_index(&bytes, &origin)?
    } else {
        Index::from_bytes(&bytes, &origin)?
    };
    let root = hex(&parsed.root_hash());
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // Whitespace separates fields, so none may appear inside the file name.
    let name: String = index
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default()
        .chars()
        .map(|c| if c.is_whitespace() { '_' } else { c })
        .collect();
    let mut comment = format!("timestamp:{timestamp}\tfile:{name}\troot:{root}");
    if let Some(v) = version {
        comment.push_str(&format!("\tversion:{v}"));
    }
    let untrusted = format!("signature from tessera secret key {}", key.id);
    let sig = minisign::sign(
        Some(&key.pk),
        &key.sk,
        Cursor::new(&bytes),
        Some(&comment),
        Some(&untrusted),
    )
    .map_err(|e| Error::InvalidInput(format!("signing {}: {e}", index.display())))?;
    crate::write_atomic(out, sig.to_string().as_bytes())?;
    Ok(SignReport {
        signature: out.to_path_buf(),
        key_id: key.id.to_string(),
        trusted_comment: comment,
        root_hash: root,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ChunkId, ChunkerParams};

    struct Fixture {
        _dir: tempfile::TempDir,
        index: PathBuf,
        sig: PathBuf,
        key: TrustedKey,
    }

    fn fixture(version: Option<u64>) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let (sk, pk) = (dir.path().join("k.sec"), dir.path().join("k.pub"));
        let id = generate_keypair(&sk, &pk, false).unwrap();
        let index = dir.path().join("i.tidx");
        Index::new(
            ChunkerParams::default(),
            [3; 32],
            vec![(ChunkId::of(b"hello"), 5)],
        )
        .unwrap()
        .save(&index)
        .unwrap();
        let signer = SigningKey::load(&sk, None).unwrap();
        assert_eq!(signer.id(), id);
        let sig = dir.path().join("i.tidx.minisig");
        sign_index_file(&index, &signer, version, &sig).unwrap();
        let key = TrustedKey::load(&pk).unwrap();
        assert_eq!(key.id(), id);
        Fixture {
            _dir: dir,
            index,
            sig,
            key,
        }
    }

    fn check(bytes: &[u8], text: &str, keys: &[TrustedKey]) -> Result<SignatureInfo> {
        let root = *blake3::hash(bytes).as_bytes();
        verify_index(bytes, &root, text, "sig", keys)
    }

    #[test]
    fn sign_then_verify_carries_version() {
        let f = fixture(Some(7));
        let bytes = std::fs::read(&f.index).unwrap();
        let text = std::fs::read_to_string(&f.sig).unwrap();
        let info = check(&bytes, &text, std::slice::from_ref(&f.key)).unwrap();
        assert_eq!(info.version, Some(7));
        assert_eq!(info.key_id, f.key.id().to_string());
        assert!(info.trusted_comment.contains("file:i.tidx"));
    }

    #[test]
    fn refuses_other_key_altered_index_and_altered_comment() {
        let f = fixture(Some(1));
        let other = fixture(None);
        let bytes = std::fs::read(&f.index).unwrap();
        let text = std::fs::read_to_string(&f.sig).unwrap();

        let e = check(&bytes, &text, std::slice::from_ref(&other.key))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a trusted key"), "{e}");

        let mut altered = bytes.clone();
        altered[50] ^= 1;
        let e = check(&altered, &text, std::slice::from_ref(&f.key))
            .unwrap_err()
            .to_string();
        assert!(e.contains("index is not the one that was signed"), "{e}");

        let tampered = text.replace("version:1", "version:9");
        assert_ne!(tampered, text);
        let e = check(&bytes, &tampered, std::slice::from_ref(&f.key))
            .unwrap_err()
            .to_string();
        assert!(e.contains("trusted comment was altered"), "{e}");

        // Several trusted keys: the right one is found.
        let keys = [other.key.clone(), f.key.clone()];
        assert!(check(&bytes, &text, &keys).is_ok());
    }

    #[test]
    fn garbage_signatures_are_refused_not_panicked_on() {
        let f = fixture(None);
        let bytes = std::fs::read(&f.index).unwrap();
        for text in [
            "",
            "untrusted comment: x",
            "a\nb\nc\nd",
            "untrusted comment: x\n!!!\n\n",
        ] {
            let e = check(&bytes, text, std::slice::from_ref(&f.key)).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::Untrusted, "{text:?}");
        }
    }

    #[test]
    fn a_signature_whose_key_id_cannot_be_read_is_called_malformed_not_untrusted() {
        let f = fixture(None);
        let bytes = std::fs::read(&f.index).unwrap();
        let good = std::fs::read_to_string(&f.sig).unwrap();
        // Windows line ends verify; a byte-order mark is refused as malformed (one
        // parser reads past it, the other does not), not blamed on the key.
        let crlf = good.replace('\n', "\r\n");
        assert!(check(&bytes, &crlf, std::slice::from_ref(&f.key)).is_ok());
        let bom = format!("\u{feff}{good}");
        let e = check(&bytes, &bom, std::slice::from_ref(&f.key))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a minisign signature"), "{e}");
        assert!(!e.contains("not a trusted key"), "{e}");
    }

    #[test]
    fn trusted_comment_fields() {
        let c = parse_trusted_comment("timestamp:1\tfile:a version:12").unwrap();
        assert_eq!(c.version, Some(12));
        assert_eq!(c.root, None);
        assert!(parse_trusted_comment("version:1 version:2").is_err());
        assert!(parse_trusted_comment("version:-1").is_err());
        assert!(parse_trusted_comment("version:+5").is_err());
        assert!(parse_trusted_comment("version:").is_err());
        assert!(parse_trusted_comment("root:abc").is_err());
        assert_eq!(
            parse_trusted_comment("no fields").unwrap(),
            CommentFields::default()
        );
    }

    #[test]
    fn keygen_refuses_to_overwrite_and_keys_parse_from_base64() {
        let f = fixture(None);
        let dir = f.index.parent().unwrap();
        let e = generate_keypair(&dir.join("k.sec"), &dir.join("new.pub"), false).unwrap_err();
        assert!(e.to_string().contains("already exists"), "{e}");
        let text = std::fs::read_to_string(dir.join("k.pub")).unwrap();
        let b64 = text.lines().nth(1).unwrap();
        assert_eq!(TrustedKey::from_base64(b64).unwrap().id(), f.key.id());
        assert!(TrustedKey::from_base64("not-a-key").is_err());
        // The file's text is not a base64 key, even though it holds one.
        assert!(TrustedKey::from_base64(&text).is_err());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("k.sec"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    /// Planted links at the key paths are never followed (dangling or not, forced or
    /// not), and a forced key replaces a world-readable file with a 0600 one.
    #[test]
    fn keygen_never_writes_through_links_and_keeps_secrets_private() {
        use std::os::unix::fs::{symlink, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        std::fs::write(p("victim"), b"precious").unwrap();
        symlink(p("victim"), p("a.sec")).unwrap();
        symlink(p("absent"), p("b.sec")).unwrap();
        symlink(p("victim"), p("c.pub")).unwrap();
        for force in [false, true] {
            for (sk, pk) in [("a.sec", "a.pub"), ("b.sec", "b.pub"), ("c.sec", "c.pub")] {
                let e = generate_keypair(&p(sk), &p(pk), force).unwrap_err();
                assert!(e.to_string().contains("symbolic link"), "{e}");
            }
        }
        assert_eq!(std::fs::read(p("victim")).unwrap(), b"precious");
        assert!(!p("absent").exists(), "a dangling link was followed");
        assert!(!p("a.pub").exists() && !p("c.sec").exists());

        std::fs::write(p("d.sec"), b"old").unwrap();
        std::fs::set_permissions(p("d.sec"), std::fs::Permissions::from_mode(0o644)).unwrap();
        generate_keypair(&p("d.sec"), &p("d.pub"), true).unwrap();
        let mode = std::fs::metadata(p("d.sec")).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "a forced secret key is readable by others"
        );
        assert!(SigningKey::load(&p("d.sec"), None).is_ok());
        // No temporary file is left beside the keys.
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp."))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}
