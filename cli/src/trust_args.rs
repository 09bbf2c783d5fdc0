//! The trust flags shared by every command that uses an index (`sync`, `serve`,
//! `verify`), and the one function that applies them.

use std::path::{Path, PathBuf};

use anyhow::Context;
use tessera_engine::trust::{
    check_index_bytes, load_index, read_signature, signature_text, TrustPolicy, TrustedKey,
};
use tessera_engine::{ChunkId, Index};
use tessera_stores::IndexSource;

/// Checks that the index is the one its owner published, before anything is written or
/// served.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TrustArgs {
    /// Refuse the index unless its root hash (the BLAKE3 of the index file, as `make` and
    /// `info` print it) is HEX.
    #[arg(long, value_name = "HEX", value_parser = parse_root_hash)]
    root_hash: Option<ChunkId>,
    /// Refuse the index unless it carries a valid minisign signature by the public key in
    /// FILE (a key file as `tessera keygen` or `minisign -G` write it). Always a path:
    /// give a key as text with --trusted-key-base64. Repeat to trust several keys.
    #[arg(long = "trusted-key", value_name = "FILE")]
    trusted_key_files: Vec<PathBuf>,
    /// Like --trusted-key, with the public key given as its base64 text (the second line
    /// of a key file, as `minisign -P` takes it); never read from a file. Repeatable, and
    /// combines with --trusted-key.
    #[arg(long = "trusted-key-base64", value_name = "KEY")]
    trusted_keys_base64: Vec<String>,
    /// The index's signature [default: INDEX.minisig, or INDEX_URL.minisig fetched with
    /// it]. Needs --trusted-key or --trusted-key-base64.
    #[arg(long, value_name = "FILE")]
    signature: Option<PathBuf>,
    /// Refuse an index signed as a version older than N (the `version:` of the signature's
    /// trusted comment, set by `tessera sign --version`): no rollback to an older release.
    /// Needs --trusted-key or --trusted-key-base64.
    #[arg(long, value_name = "N")]
    min_version: Option<u64>,
}

fn parse_root_hash(s: &str) -> Result<ChunkId, String> {
    s.parse().map_err(|e| format!("{e}"))
}

impl TrustArgs {
    /// The policy these flags ask for, keys read.
    fn policy(&self) -> anyhow::Result<TrustPolicy> {
        let keys = self.trusted_key_files.len() + self.trusted_keys_base64.len();
        for (flag, given) in [
            ("--signature", self.signature.is_some()),
            ("--min-version", self.min_version.is_some()),
        ] {
            anyhow::ensure!(
                keys > 0 || !given,
                "{flag} needs --trusted-key FILE or --trusted-key-base64 KEY: an index's \
                 signature is only checked against trusted keys"
            );
        }
        let mut trusted_keys = Vec::new();
        for path in &self.trusted_key_files {
            // A path that is also a valid base64 key is ambiguous: whoever can create a
            // file of that name in the working directory would choose the trusted key.
            if let Some(text) = path.to_str().filter(|t| TrustedKey::from_base64(t).is_ok()) {
                anyhow::bail!(
                    "--trusted-key takes a key file, but {text:?} is a base64 public key: give \
                     it with --trusted-key-base64 (a file of that name is never read in its \
                     place)"
                );
            }
            let key = TrustedKey::load(path).with_context(|| {
                format!(
                    "reading --trusted-key {} (a key file; give a base64 key with \
                     --trusted-key-base64)",
                    path.display()
                )
            })?;
            trusted_keys.push(key);
        }
        for b64 in &self.trusted_keys_base64 {
            trusted_keys
                .push(TrustedKey::from_base64(b64).context("reading a --trusted-key-base64")?);
        }
        Ok(TrustPolicy {
            root_hash: self.root_hash.map(|id| id.0),
            trusted_keys,
            min_version: self.min_version,
        })
    }

    /// Loads the index file at `path`, refusing it unless it passes every check asked for.
    pub fn load_index(&self, path: &Path) -> anyhow::Result<Index> {
        let policy = self.policy()?;
        let (index, _) = load_index(path, self.signature.as_deref(), &policy)
            .with_context(|| format!("refusing index {}", path.display()))?;
        Ok(index)
    }

    /// Loads an index given as a path or fetched by URL (`StoreArgs::fetch_index`),
    /// refusing it unless it passes every check asked for. A fetched index is checked
    /// from its bytes in memory, with the signature fetched beside it unless --signature
    /// names a local file.
    pub fn load(&self, source: &IndexSource) -> anyhow::Result<Index> {
        let remote = match source {
            IndexSource::Local(path) => return self.load_index(path),
            IndexSource::Remote(remote) => remote,
        };
        let policy = self.policy()?;
        let refusing = || format!("refusing index {}", remote.url);
        let signature = if policy.trusted_keys.is_empty() {
            None
        } else if let Some(path) = &self.signature {
            Some((
                read_signature(path).with_context(refusing)?,
                path.display().to_string(),
            ))
        } else {
            // Fetched only now that keys require it; a bucket that hides missing keys
            // answers 403 rather than 404, so every failure is reported as such.
            let bytes = match remote.fetch_signature() {
                Ok(Some(bytes)) => bytes,
                Ok(None) => {
                    return Err(tessera_engine::Error::Untrusted(format!(
                        "{}: trusted keys are required but the signature {} is not on the \
                         server (HTTP 404)",
                        refusing(),
                        remote.signature_url
                    ))
                    .into())
                }
                Err(e) => {
                    return Err(anyhow::Error::from(e).context(format!(
                        "{}: trusted keys are required but the signature {} cannot be fetched",
                        refusing(),
                        remote.signature_url
                    )))
                }
            };
            let text = signature_text(bytes, &remote.signature_url).with_context(refusing)?;
            Some((text, remote.signature_url.clone()))
        };
        let signature = signature.as_ref().map(|(t, o)| (t.as_str(), o.as_str()));
        let (index, _) = check_index_bytes(&remote.bytes, &remote.url, signature, &policy)
            .with_context(refusing)?;
        Ok(index)
    }
}
