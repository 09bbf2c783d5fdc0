//! `check`: reads packs back and verifies every chunk in them, and that the location files
//! of given indexes point at intact chunks.
//!
//! Without indexes every pack of the store is read (the store must be listable: a local
//! directory or S3). With indexes, their location files are read and only the packs they
//! name: that works over HTTP too. Each pack is read whole; its name must be the BLAKE3 of
//! its bytes, its table of contents must parse, and every frame must decompress to the
//! length the table gives and hash to its chunk id.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use super::{locations_path, pack_path, PackId, StoreRead};
use crate::chunk::decompress_verified;
use crate::error::{Error, Result};
use crate::index::Index;
use crate::pack::{parse_toc, toc_tail_len, Locations, TocEntry, PACK_TRAILER};
use crate::ChunkId;

/// What is wrong, for one problem `check` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// A pack named by a location file (or listed) is not in the store.
    MissingPack,
    /// A pack's bytes do not hash to its name, or its table of contents is malformed.
    CorruptPack,
    /// A frame does not decompress to its length or does not hash to its chunk id.
    CorruptChunk,
    /// A location file points at a pack or offset that does not hold the chunk.
    MissingChunk,
    /// An index has no location file in the store.
    MissingLocations,
    /// An index's location file is malformed.
    CorruptLocations,
}

/// One problem: what, which chunk, where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// What is wrong.
    pub kind: ProblemKind,
    /// The chunk concerned (hex), if one is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunk: Option<String>,
    /// The pack concerned (hex), if one is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pack: Option<String>,
    /// Offset of the chunk's frame in the pack, if a chunk is concerned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// Root hash (hex) of the index whose location file is concerned, if one is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<String>,
    /// The details, naming the file.
    pub detail: String,
}

/// What `check` did and found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckReport {
    /// The store checked.
    pub store: String,
    /// Indexes whose location files were checked.
    pub indexes: usize,
    /// Packs read.
    pub packs: usize,
    /// Chunks (frames) verified.
    pub chunks: u64,
    /// Bytes read.
    pub bytes_read: u64,
    /// Everything wrong; empty when the store is intact.
    pub problems: Vec<Problem>,
}

impl CheckReport {
    /// Whether nothing is wrong.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// A chunk some index expects at `offset` of a pack.
struct Expected {
    id: ChunkId,
    offset: u64,
    clen: u32,
    index: [u8; 32],
}

/// Checks `store`: every pack when `indexes` is empty (the store must be listable),
/// otherwise the location files of `indexes` and the packs they name.
///
/// # Errors
/// Listing fails (an HTTP store given no index: [`Error::InvalidInput`] saying to name
/// indexes); transport failures other than a missing file. Damage is not an error: it is
/// reported in [`CheckReport::problems`].
pub fn check(store: &dyn StoreRead, indexes: &[Index]) -> Result<CheckReport> {
    let mut report = CheckReport {
        store: store.location(),
        indexes: indexes.len(),
        ..CheckReport::default()
    };
    let mut expected: BTreeMap<PackId, Vec<Expected>> = BTreeMap::new();
    if indexes.is_empty() {
        let packs = store.list_packs().map_err(|e| match e {
            Error::InvalidInput(msg) => Error::InvalidInput(format!(
                "{msg}; to check it, name the indexes whose chunks to check \
                 (tessera check --store {} INDEX...)",
                store.location()
            )),
            e => e,
        })?;
        for p in packs {
            expected.entry(p).or_default();
        }
    }
    for index in indexes {
        let root = index.root_hash();
        let Some(locs) = read_locations(store, index, &mut report)? else {
            continue;
        };
        let ids = distinct_ids(index);
        for (id, r) in ids.iter().zip(&locs.records) {
            expected
                .entry(locs.packs[r.pack as usize])
                .or_default()
                .push(Expected {
                    id: *id,
                    offset: r.offset,
                    clen: r.clen,
                    index: root,
                });
        }
    }
    for (pack, wanted) in &expected {
        check_pack(store, pack, wanted, &mut report)?;
    }
    Ok(report)
}

/// The distinct non-zero chunk ids of `index`, in order of first appearance (the order of
/// its location file's records).
pub(crate) fn distinct_ids(index: &Index) -> Vec<ChunkId> {
    let mut seen = std::collections::HashSet::new();
    index
        .chunks()
        .iter()
        .filter(|e| !e.zero && seen.insert(e.id))
        .map(|e| e.id)
        .collect()
}

/// Reads and parses the location file of `index`, `None` (with a problem recorded) if it
/// is missing or malformed.
pub(crate) fn read_locations(
    store: &dyn StoreRead,
    index: &Index,
    report: &mut CheckReport,
) -> Result<Option<Locations>> {
    let root = index.root_hash();
    let rel = locations_path(&root);
    let distinct = distinct_ids(index).len();
    let limit = 4096 + distinct as u64 * 64;
    let origin = format!("{}/{rel}", store.location().trim_end_matches('/'));
    let problem = |kind, detail| Problem {
        kind,
        chunk: None,
        pack: None,
        offset: None,
        index: Some(ChunkId(root).to_string()),
        detail,
    };
    let bytes = match store.read_file(&rel, limit) {
        Ok(Some(b)) => b,
        Ok(None) => {
            report.problems.push(problem(
                ProblemKind::MissingLocations,
                format!("no location file {origin} for index {}", ChunkId(root)),
            ));
            return Ok(None);
        }
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::FileTooLarge => {
            report.problems.push(problem(
                ProblemKind::CorruptLocations,
                format!("{origin}: larger than {limit} bytes, too large for its index"),
            ));
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    report.bytes_read += bytes.len() as u64;
    match Locations::parse(&bytes, &root, distinct, &origin) {
        Ok(l) => Ok(Some(l)),
        Err(e) => {
            report
                .problems
                .push(problem(ProblemKind::CorruptLocations, e.to_string()));
            Ok(None)
        }
    }
}

/// Reads pack `id` whole and verifies it, and that it holds every chunk of `wanted` where
/// a location file says.
fn check_pack(
    store: &dyn StoreRead,
    id: &PackId,
    wanted: &[Expected],
    report: &mut CheckReport,
) -> Result<()> {
    let rel = pack_path(id);
    let origin = format!("{}/{rel}", store.location().trim_end_matches('/'));
    let mut problem = |kind: ProblemKind,
                       chunk: Option<ChunkId>,
                       offset: Option<u64>,
                       index: Option<[u8; 32]>,
                       detail: String| {
        report.problems.push(Problem {
            kind,
            chunk: chunk.map(|c| c.to_string()),
            pack: Some(id.to_string()),
            offset,
            index: index.map(|r| ChunkId(r).to_string()),
            detail,
        });
    };
    let bytes = match read_pack(store, &rel) {
        Ok(Some(b)) => b,
        Err(e @ Error::CorruptStore { .. }) => {
            problem(ProblemKind::CorruptPack, None, None, None, e.to_string());
            return Ok(());
        }
        Ok(None) => {
            problem(
                ProblemKind::MissingPack,
                None,
                None,
                None,
                format!("pack {origin} is missing"),
            );
            for w in wanted {
                problem(
                    ProblemKind::MissingChunk,
                    Some(w.id),
                    Some(w.offset),
                    Some(w.index),
                    format!(
                        "chunk {} of index {} is in missing pack {origin} at offset {}",
                        w.id,
                        ChunkId(w.index),
                        w.offset
                    ),
                );
            }
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    report.packs += 1;
    report.bytes_read += bytes.len() as u64;
    let actual = PackId::of(&bytes);
    if actual != *id {
        problem(
            ProblemKind::CorruptPack,
            None,
            None,
            None,
            format!("pack {origin} hashes to {actual}, not to its name"),
        );
    }
    let size = bytes.len() as u64;
    let toc = toc_tail_len(
        &bytes[bytes.len().saturating_sub(PACK_TRAILER as usize)..],
        size,
        &origin,
    )
    .and_then(|tail| parse_toc(&bytes[(size - tail) as usize..], size, &origin));
    let toc: Vec<TocEntry> = match toc {
        Ok(t) => t,
        Err(e) => {
            problem(ProblemKind::CorruptPack, None, None, None, e.to_string());
            for w in wanted {
                problem(
                    ProblemKind::MissingChunk,
                    Some(w.id),
                    Some(w.offset),
                    Some(w.index),
                    format!(
                        "chunk {} of index {} cannot be found in pack {origin} at offset {}: \
                         the pack's table of contents is unreadable",
                        w.id,
                        ChunkId(w.index),
                        w.offset
                    ),
                );
            }
            return Ok(());
        }
    };
    let mut by_offset: HashMap<u64, (TocEntry, bool)> = HashMap::new();
    for e in &toc {
        let frame = &bytes[e.offset as usize..(e.offset + u64::from(e.clen)) as usize];
        report.chunks += 1;
        let good = match decompress_verified(e.id, frame, e.len, &origin) {
            Ok(_) => true,
            Err(err) => {
                problem(
                    ProblemKind::CorruptChunk,
                    Some(e.id),
                    Some(e.offset),
                    None,
                    format!(
                        "chunk {} at offset {} of pack {origin} is corrupt: {err}",
                        e.id, e.offset
                    ),
                );
                false
            }
        };
        by_offset.insert(e.offset, (*e, good));
    }
    for w in wanted {
        match by_offset.get(&w.offset) {
            Some((e, _)) if e.id == w.id && e.clen == w.clen => {}
            other => problem(
                ProblemKind::MissingChunk,
                Some(w.id),
                Some(w.offset),
                Some(w.index),
                format!(
                    "the location file of index {} puts chunk {} at offset {} ({} bytes) of \
                     pack {origin}, which holds {} there",
                    ChunkId(w.index),
                    w.id,
                    w.offset,
                    w.clen,
                    match other {
                        Some((e, _)) => format!("chunk {} ({} bytes)", e.id, e.clen),
                        None => "no frame".to_string(),
                    }
                ),
            ),
        }
    }
    Ok(())
}

/// The largest pack read whole: `make` closes a pack at [`crate::pack::PACK_TARGET`] of
/// frames, plus at most one frame (a chunk is at most 16 MiB) and its table of contents.
pub(crate) const MAX_PACK: u64 = 4 * crate::pack::PACK_TARGET;

/// The whole pack file `rel`, `None` if absent.
///
/// # Errors
/// [`Error::CorruptStore`] for a pack larger than [`MAX_PACK`] (never read into memory);
/// I/O and transport failures.
pub(crate) fn read_pack(store: &dyn StoreRead, rel: &str) -> Result<Option<Vec<u8>>> {
    let Some(size) = store.file_size(rel)? else {
        return Ok(None);
    };
    if size > MAX_PACK {
        return Err(Error::CorruptStore {
            origin: format!("{}/{rel}", store.location().trim_end_matches('/')),
            reason: format!("{size} bytes, larger than any pack make writes ({MAX_PACK})"),
        });
    }
    match store.read_range(rel, 0, size) {
        Ok(b) => Ok(Some(b)),
        Err(Error::MissingFile { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LocalStore;

    #[test]
    fn an_oversized_pack_is_reported_not_read() {
        let tmp = tempfile::tempdir().unwrap();
        let store = LocalStore::open(tmp.path(), true).unwrap();
        let id = PackId::of(b"huge");
        let path = store.path_of(&pack_path(&id));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        // Sparse: no disk space, and check must not allocate it either.
        std::fs::File::create(&path)
            .unwrap()
            .set_len(MAX_PACK + 1)
            .unwrap();
        let r = check(&store, &[]).unwrap();
        assert_eq!(r.problems.len(), 1, "{r:?}");
        assert_eq!(r.problems[0].kind, ProblemKind::CorruptPack);
        assert!(
            r.problems[0].detail.contains("larger than any pack"),
            "{r:?}"
        );
        assert_eq!(r.bytes_read, 0);
    }
}
