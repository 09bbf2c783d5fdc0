//! The trust flags shared by every command that uses an index (`sync`, `serve`,
//! `verify`), and the one function that applies them.

use std::path::{Path, PathBuf};

use anyhow::Context;
use tessera_engine::trust::{load_index, TrustPolicy, TrustedKey};
use tessera_engine::{ChunkId, Index};

/// Checks that the index is the one its owner published, before anything is written or
/// served.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TrustArgs {
    /// Refuse the index unless its root hash (the BLAKE3 of the index file, as `make` and
    /// `info` print it) is HEX.
    #[arg(long, value_name = "HEX", value_parser = parse_root_hash)]
    root_hash: Option<ChunkId>,
    /// Refuse the index unless it carries a valid minisign signature by this public key: a
    /// key file (as `tessera keygen` or `minisign -G` write) or the base64 key itself.
    /// Repeat to trust several keys.
    #[arg(long = "trusted-key", value_name = "PUB")]
    trusted_keys: Vec<String>,
    /// The index's signature [default: INDEX.minisig]. Needs --trusted-key.
    #[arg(long, value_name = "FILE", requires = "trusted_keys")]
    signature: Option<PathBuf>,
    /// Refuse an index signed as a version older than N (the `version:` of the signature's
    /// trusted comment, set by `tessera sign --version`): no rollback to an older release.
    /// Needs --trusted-key.
    #[arg(long, value_name = "N", requires = "trusted_keys")]
    min_version: Option<u64>,
}

fn parse_root_hash(s: &str) -> Result<ChunkId, String> {
    s.parse().map_err(|e| format!("{e}"))
}

impl TrustArgs {
    /// Loads the index at `path`, refusing it unless it passes every check asked for.
    pub fn load_index(&self, path: &Path) -> anyhow::Result<Index> {
        let trusted_keys = self
            .trusted_keys
            .iter()
            .map(|k| TrustedKey::from_arg(k).context("reading a --trusted-key"))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let policy = TrustPolicy {
            root_hash: self.root_hash.map(|id| id.0),
            trusted_keys,
            min_version: self.min_version,
        };
        let (index, _) = load_index(path, self.signature.as_deref(), &policy)
            .with_context(|| format!("refusing index {}", path.display()))?;
        Ok(index)
    }
}
