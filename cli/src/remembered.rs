//! Remembered seeds: after a verified sync, the index a target now holds is recorded in
//! tessera's state directory (`seeds/`), with the target's identity. The next sync that
//! has that target (or that slot as `--seed`) plans from the recorded index instead of
//! scanning it, when the record still matches the device: same path, device or inode,
//! size and (for a file) modification time, and a sample of its chunks hashing to the
//! recorded ids. A record that does not match is dropped and the device scanned. Nothing
//! changes about safety: every chunk read from a seed or target is hashed before it is
//! written, whatever planned it.
//!
//! While a sync of the target is unfinished (its journal exists), a record is used
//! without the checks (the interrupted run changed the target), so that the rerun plans
//! with the same seeds and resumes from the journal.

use std::fs;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{DirBuilderExt, FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use tessera_engine::{ChunkId, Index};

/// Chunks read and hashed to check that a record still matches its device.
const SAMPLES: usize = 16;
/// Records kept at most (the most recent).
const KEPT: usize = 64;

#[derive(serde::Serialize, serde::Deserialize)]
struct Record {
    /// The device or file, canonical.
    path: String,
    /// What identifies it: device number or inode, size, modification time.
    identity: String,
    /// The root hash of the index it holds (in `TAG.tidx` beside the record).
    root: String,
}

/// Where records live: `STATE/seeds`.
fn dir() -> PathBuf {
    tessera_engine::sync::state_dir().join("seeds")
}

/// Refuses a records directory that is not tessera's own: a real directory owned by this
/// user, writable by no one else (whoever can write it could only make syncs scan less
/// well, but its records are not used then).
fn check_private(dir: &Path) -> tessera_engine::Result<()> {
    tessera_engine::sync::check_private_dir(dir, "seed record directory", "fix or remove it")
}

/// The canonical path of `path`, its record's file stem, and its identity now.
fn identify(path: &Path) -> std::io::Result<(PathBuf, String, String)> {
    let canonical = fs::canonicalize(path)?;
    let meta = fs::metadata(&canonical)?;
    let identity = if meta.file_type().is_block_device() {
        let size = fs::File::open(&canonical)?.seek(SeekFrom::End(0))?;
        format!("block {:#x} size {size}", meta.rdev())
    } else {
        format!(
            "file {:#x}:{} size {} mtime {}.{:09}",
            meta.dev(),
            meta.ino(),
            meta.len(),
            meta.mtime(),
            meta.mtime_nsec()
        )
    };
    let tag = ChunkId::of(canonical.as_os_str().as_encoded_bytes()).to_string()[..16].to_string();
    Ok((canonical, tag, identity))
}

/// The index `path` holds by its record, if the record matches (always when `pending`:
/// a sync of it is unfinished). A record that does not match is removed; `note` hears why.
pub fn recall(path: &Path, pending: bool, note: &dyn Fn(String)) -> Option<Index> {
    let dir = dir();
    check_private(&dir).ok()?;
    let (canonical, tag, identity) = identify(path).ok()?;
    let json = dir.join(format!("{tag}.json"));
    let text = fs::read(&json).ok()?;
    let shown = path.display();
    let forget = |why: String| {
        let _ = fs::remove_file(&json);
        let _ = fs::remove_file(dir.join(format!("{tag}.tidx")));
        note(format!(
            "the remembered index of {shown} does not match it ({why}): scanning it"
        ));
    };
    let Ok(record) = serde_json::from_slice::<Record>(&text) else {
        forget("unreadable record".into());
        return None;
    };
    let index = match Index::load(&dir.join(format!("{tag}.tidx"))) {
        Ok(i) if tessera_engine::index::hex(&i.root_hash()) == record.root => i,
        _ => {
            forget("its index is missing or altered".into());
            return None;
        }
    };
    if record.path != canonical.to_string_lossy() {
        forget("another path".into());
        return None;
    }
    if !pending {
        if record.identity != identity {
            forget(format!("it is now {identity}, was {}", record.identity));
            return None;
        }
        if let Err(why) = sample(&canonical, &index) {
            forget(why);
            return None;
        }
    }
    note(format!(
        "planning from the remembered index of {shown} (image {}): not scanned",
        &record.root[..16]
    ));
    Some(index)
}

/// Reads up to [`SAMPLES`] chunks spread over `index` from `path` and hashes them.
fn sample(path: &Path, index: &Index) -> Result<(), String> {
    let chunks: Vec<_> = index.chunks().iter().filter(|c| !c.zero).collect();
    if chunks.is_empty() {
        return Ok(());
    }
    let file = fs::File::open(path).map_err(|e| format!("reading it: {e}"))?;
    let step = chunks.len().div_ceil(SAMPLES).max(1);
    let picks = chunks.iter().step_by(step).chain(chunks.last());
    for c in picks {
        let mut buf = vec![0u8; c.len as usize];
        file.read_exact_at(&mut buf, c.offset)
            .map_err(|e| format!("reading {} bytes at offset {}: {e}", c.len, c.offset))?;
        if ChunkId::of(&buf) != c.id {
            return Err(format!("the chunk at offset {} is not {}", c.offset, c.id));
        }
    }
    Ok(())
}

/// Records that `path` now holds `index` (after a verified sync).
///
/// # Errors
/// The state directory cannot be made private, or the record written.
pub fn remember(path: &Path, index: &Index) -> anyhow::Result<()> {
    let dir = dir();
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    check_private(&dir)?;
    let (canonical, tag, identity) =
        identify(path).with_context(|| format!("inspecting {}", path.display()))?;
    tessera_engine::write_atomic(&dir.join(format!("{tag}.tidx")), &index.to_bytes())?;
    let record = Record {
        path: canonical.to_string_lossy().into_owned(),
        identity,
        root: tessera_engine::index::hex(&index.root_hash()),
    };
    tessera_engine::write_atomic(
        &dir.join(format!("{tag}.json")),
        &serde_json::to_vec(&record)?,
    )?;
    prune(&dir);
    Ok(())
}

/// Keeps the [`KEPT`] most recent records: targets synced long ago (temporary files,
/// devices gone) do not pile up.
fn prune(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut records: Vec<(std::time::SystemTime, PathBuf)> = entries
        .filter_map(|e| {
            let path = e.ok()?.path();
            let modified = fs::symlink_metadata(&path).ok()?.modified().ok()?;
            (path.extension()? == "json").then_some((modified, path))
        })
        .collect();
    if records.len() <= KEPT {
        return;
    }
    records.sort();
    for (_, json) in &records[..records.len() - KEPT] {
        let _ = fs::remove_file(json.with_extension("tidx"));
        let _ = fs::remove_file(json);
    }
}
