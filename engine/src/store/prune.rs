//! `prune`: removes what no kept index needs, in two phases, and the marker protocol that
//! keeps a `make` running at the same time safe. `docs/STORES.md` states the protocol.
//!
//! # Files (all static, small, servable)
//! - `trash/<pack id>.tpack`, `trash/<root>.tloc`: a pack or location file condemned by a
//!   prune, holding the Unix time (seconds, decimal) it was condemned. Condemned files
//!   stay readable; a later prune deletes those condemned at least the grace period ago
//!   and still unneeded, and drops the marker of anything needed again.
//! - `makes/<random>.tmake`: written by `make` before it lists the store's packs, removed
//!   after it published; holds its start time. A prune deletes nothing while a fresh one
//!   exists.
//! - `prunes/<random>.tprune`: written by a prune for as long as it runs. A `make` waits
//!   for every fresh one to go before it publishes a location file, then checks that every
//!   pack it names still exists.
//!
//! Markers older than [`PruneOptions::stale`] are from a process that died and are ignored.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::check::{distinct_ids, read_locations, read_pack, CheckReport};
use super::{locations_path, pack_path, PackId, StoreRead, StoreWrite};
use crate::chunk::decompress_verified;
use crate::error::{Error, Result};
use crate::index::Index;
use crate::pack::{
    parse_toc, toc_tail_len, Location, Locations, PackBuilder, PackSink, PACK_TRAILER,
};
use crate::ChunkId;

/// Directory of condemnation markers.
pub const TRASH: &str = "trash";
/// Directory of running makes' markers.
pub const MAKES: &str = "makes";
/// Directory of running prunes' markers.
pub const PRUNES: &str = "prunes";
/// Default grace period between condemning and deleting.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(3600);
/// Make and prune markers older than this are from a process that died.
pub const DEFAULT_STALE: Duration = Duration::from_secs(24 * 3600);
/// How often a `make` looks again whether a prune is still running.
const POLL: Duration = Duration::from_millis(200);
/// How long a `make` waits for a running prune before it gives up (publishing nothing).
pub const MAX_PRUNE_WAIT: Duration = Duration::from_secs(15 * 60);

/// The current Unix time in seconds.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// How `prune` runs.
#[derive(Debug, Clone)]
pub struct PruneOptions {
    /// Files condemned at least this long ago (and still unneeded) are deleted.
    pub grace: Duration,
    /// Report what would be done, change nothing.
    pub dry_run: bool,
    /// A pack whose live frames fill less than this fraction of it is repacked.
    pub repack_below: f64,
    /// Make and prune markers older than this are ignored.
    pub stale: Duration,
    /// The time now, in Unix seconds (tests move it).
    pub now: u64,
}

impl Default for PruneOptions {
    fn default() -> Self {
        PruneOptions {
            grace: DEFAULT_GRACE,
            dry_run: false,
            repack_below: 0.5,
            stale: DEFAULT_STALE,
            now: unix_now(),
        }
    }
}

/// What `prune` did (or, with `dry_run`, would do).
#[derive(Debug, Clone, Default, Serialize)]
pub struct PruneReport {
    /// The store pruned.
    pub store: String,
    /// Nothing was changed.
    pub dry_run: bool,
    /// Indexes kept.
    pub kept_indexes: usize,
    /// Packs in the store when the prune started.
    pub packs: usize,
    /// Packs holding chunks of kept indexes (after repacking).
    pub live_packs: usize,
    /// Mostly dead packs whose live chunks were copied into new packs.
    pub repacked_packs: Vec<String>,
    /// Packs written by repacking.
    pub new_packs: Vec<String>,
    /// Location files of kept indexes rewritten to point into the new packs.
    pub rewritten_locations: usize,
    /// Packs condemned by this prune (deleted by a later one after the grace period).
    pub condemned_packs: Vec<String>,
    /// Location files (root hashes) of indexes not kept, condemned by this prune.
    pub condemned_locations: Vec<String>,
    /// Condemned files needed again, whose marker was removed.
    pub rescued: usize,
    /// Packs deleted (condemned longer than the grace period ago).
    pub deleted_packs: Vec<String>,
    /// Location files (root hashes) deleted.
    pub deleted_locations: Vec<String>,
    /// Bytes of the packs deleted.
    pub freed_bytes: u64,
    /// Why deletion was put off to a later prune, if it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deferred: Option<String>,
}

/// A marker file's name and the time in it.
#[derive(Debug, Clone)]
struct Marker {
    rel: String,
    time: u64,
}

/// Reads the markers in directory `dir`; a marker whose content is not a time counts as
/// written `now` (the cautious reading: it delays deletion).
fn markers(store: &dyn StoreWrite, dir: &str, now: u64) -> Result<Vec<Marker>> {
    let mut out = Vec::new();
    for rel in store.list_files(dir)? {
        let Some(bytes) = store.read_file(&rel, 64).ok().flatten() else {
            continue; // gone meanwhile, or not a marker
        };
        let time = std::str::from_utf8(&bytes)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(now);
        out.push(Marker { rel, time });
    }
    Ok(out)
}

/// Writes a marker holding `time` as `dir/<random>.<ext>`; returns its name.
fn write_marker(store: &dyn StoreWrite, dir: &str, ext: &str, time: u64) -> Result<String> {
    let mut r = [0u8; 16];
    crate::sys::random_bytes(&mut r)
        .map_err(|e| Error::InvalidInput(format!("getting random bytes for a marker: {e}")))?;
    let name: String = r.iter().map(|b| format!("{b:02x}")).collect();
    let rel = format!("{dir}/{name}.{ext}");
    store.put_file(&rel, format!("{time}\n").as_bytes())?;
    Ok(rel)
}

/// Whether a marker written at `time` is still fresh at `now`.
fn fresh(time: u64, now: u64, stale: Duration) -> bool {
    now.saturating_sub(time) < stale.as_secs()
}

/// The pack ids a location file's header names, read without the index (for protecting
/// the packs of location files a prune does not keep). `None` if it is not one.
fn header_packs(bytes: &[u8]) -> Option<Vec<PackId>> {
    let fixed = 8 + 4 + 4 + 32 + 4;
    if bytes.len() < fixed || &bytes[..8] != b"TESSLOC\0" {
        return None;
    }
    let count = u32::from_le_bytes(bytes[48..52].try_into().ok()?) as usize;
    let ids = bytes.get(fixed..fixed.checked_add(count.checked_mul(32)?)?)?;
    Some(
        ids.chunks_exact(32)
            .map(|c| PackId(c.try_into().expect("32 bytes")))
            .collect(),
    )
}

/// The root hash or pack id named by a store file name `dir/<64 hex>.<ext>`.
fn hex_name(rel: &str, dir: &str, ext: &str) -> Option<[u8; 32]> {
    let hex = rel
        .strip_prefix(dir)?
        .strip_prefix('/')?
        .strip_suffix(ext)?
        .strip_suffix('.')?;
    let id: ChunkId = hex.parse().ok()?;
    (id.to_string() == hex).then_some(id.0)
}

/// Removes its prune marker when the prune ends, however it ends.
struct PruneMarker<'a> {
    store: &'a dyn StoreWrite,
    rel: Option<String>,
}

impl Drop for PruneMarker<'_> {
    fn drop(&mut self) {
        if let Some(rel) = self.rel.take() {
            let _ = self.store.delete(&rel);
        }
    }
}

/// Prunes `store`, keeping every chunk of the indexes `keep`: condemns packs no kept index
/// needs and the location files of indexes not kept, repacks mostly dead packs, and
/// deletes what was condemned at least the grace period ago and is still unneeded (unless
/// a `make` is running). See the module documentation and `docs/STORES.md`.
///
/// # Errors
/// A kept index without valid location data in the store (pruning would condemn its
/// chunks); another prune running; a chunk of a kept index found corrupt while
/// repacking; I/O and transport failures. Whatever was done before an error is safe:
/// deleting comes last, and only what was condemned a grace period ago.
pub fn prune(store: &dyn StoreWrite, keep: &[Index], opts: &PruneOptions) -> Result<PruneReport> {
    let now = opts.now;
    let location = store.location();
    let mut report = PruneReport {
        store: location.clone(),
        dry_run: opts.dry_run,
        kept_indexes: keep.len(),
        ..PruneReport::default()
    };
    // One prune at a time; a make waits for us before it publishes.
    let mut marker = PruneMarker { store, rel: None };
    if !opts.dry_run {
        marker.rel = Some(write_marker(store, PRUNES, "tprune", now)?);
        for m in markers(store, PRUNES, now)? {
            if Some(&m.rel) != marker.rel.as_ref() && fresh(m.time, now, opts.stale) {
                return Err(Error::InvalidInput(format!(
                    "another prune is running on store {location} ({}/{} written at Unix \
                     time {}); run one prune at a time (remove that marker if its prune \
                     died)",
                    location.trim_end_matches('/'),
                    m.rel,
                    m.time
                )));
            }
        }
    }

    // The location data of every kept index.
    let mut kept: Vec<(Locations, Vec<ChunkId>)> = Vec::new();
    let mut scratch = CheckReport::default();
    for index in keep {
        let root = index.root_hash();
        match read_locations(store, index, &mut scratch)? {
            Some(l) => kept.push((l, distinct_ids(index))),
            None => {
                let why = scratch
                    .problems
                    .pop()
                    .map_or_else(String::new, |p| p.detail);
                return Err(Error::InvalidInput(format!(
                    "kept index {} has no valid location data in store {location} ({why}); \
                     refusing to prune, which would condemn its chunks",
                    ChunkId(root)
                )));
            }
        }
    }
    let kept_roots: BTreeSet<[u8; 32]> = kept.iter().map(|(l, _)| l.root).collect();
    let packs: BTreeSet<PackId> = store.list_packs()?.into_iter().collect();
    report.packs = packs.len();

    // Live bytes per pack (a chunk shared by several indexes counts once).
    let mut live: BTreeMap<PackId, BTreeMap<u64, u32>> = BTreeMap::new();
    for (l, _) in &kept {
        for r in &l.records {
            live.entry(l.packs[r.pack as usize])
                .or_default()
                .insert(r.offset, r.clen);
        }
    }
    let mut repack = Vec::new();
    for (pack, frames) in &live {
        let Some(size) = store.file_size(&pack_path(pack))? else {
            continue; // missing: `check` reports it; nothing to repack
        };
        let live_bytes: u64 = frames.values().map(|&c| u64::from(c)).sum();
        if (live_bytes as f64) < opts.repack_below * size as f64 {
            repack.push(*pack);
        }
    }
    report.repacked_packs = repack.iter().map(ToString::to_string).collect();
    if !opts.dry_run && !repack.is_empty() {
        let (new_packs, rewritten) = repack_packs(store, &repack, &mut kept)?;
        report.new_packs = new_packs.iter().map(ToString::to_string).collect();
        report.rewritten_locations = rewritten;
    }
    let mut live_packs: BTreeSet<PackId> = kept
        .iter()
        .flat_map(|(l, _)| {
            l.records
                .iter()
                .map(|r| l.packs[r.pack as usize])
                .collect::<Vec<_>>()
        })
        .collect();
    if opts.dry_run {
        // Repacked packs would become dead.
        for p in &repack {
            live_packs.remove(p);
        }
    }
    report.live_packs = live_packs.len();

    // Condemn, rescue, and find what is due for deletion.
    let trash = markers(store, TRASH, now)?;
    let mut marked_packs: HashMap<PackId, Marker> = HashMap::new();
    let mut marked_locs: HashMap<[u8; 32], Marker> = HashMap::new();
    for m in trash {
        if let Some(id) = hex_name(&m.rel, TRASH, "tpack") {
            marked_packs.insert(PackId(id), m);
        } else if let Some(root) = hex_name(&m.rel, TRASH, "tloc") {
            marked_locs.insert(root, m);
        }
    }
    let due = |m: &Marker| now.saturating_sub(m.time) >= opts.grace.as_secs();
    let mut pack_candidates = Vec::new();
    let all_packs: BTreeSet<PackId> = store.list_packs()?.into_iter().collect();
    for pack in &all_packs {
        let is_live = live_packs.contains(pack);
        match (is_live, marked_packs.get(pack)) {
            (true, Some(m)) => {
                report.rescued += 1;
                if !opts.dry_run {
                    store.delete(&m.rel)?;
                }
            }
            (false, None) => {
                report.condemned_packs.push(pack.to_string());
                if !opts.dry_run {
                    store.put_file(&trash_pack(pack), format!("{now}\n").as_bytes())?;
                }
            }
            (false, Some(m)) if due(m) => pack_candidates.push(*pack),
            _ => {}
        }
    }
    // Markers of packs gone already.
    if !opts.dry_run {
        for (pack, m) in &marked_packs {
            if !all_packs.contains(pack) {
                store.delete(&m.rel)?;
            }
        }
    }
    let mut loc_candidates = Vec::new();
    for rel in store.list_files("locations")? {
        let Some(root) = hex_name(&rel, "locations", "tloc") else {
            continue;
        };
        let is_kept = kept_roots.contains(&root);
        match (is_kept, marked_locs.get(&root)) {
            (true, Some(m)) => {
                report.rescued += 1;
                if !opts.dry_run {
                    store.delete(&m.rel)?;
                }
            }
            (false, None) => {
                report.condemned_locations.push(ChunkId(root).to_string());
                if !opts.dry_run {
                    store.put_file(&trash_loc(&root), format!("{now}\n").as_bytes())?;
                }
            }
            (false, Some(m)) if due(m) => loc_candidates.push((root, m.time)),
            _ => {}
        }
    }

    if pack_candidates.is_empty() && loc_candidates.is_empty() {
        return Ok(report);
    }
    if opts.dry_run {
        report.deleted_packs = pack_candidates.iter().map(ToString::to_string).collect();
        report.deleted_locations = loc_candidates
            .iter()
            .map(|(r, _)| ChunkId(*r).to_string())
            .collect();
        return Ok(report);
    }
    // Deleting: not while a make runs (it may be about to publish an index naming a
    // condemned pack). A make that starts after this look waits for our marker to go,
    // then checks that its packs exist.
    if let Some(m) = markers(store, MAKES, now)?
        .into_iter()
        .find(|m| fresh(m.time, now, opts.stale))
    {
        report.deferred = Some(format!(
            "a make is running ({} written at Unix time {}): nothing deleted; a later prune \
             deletes what is due (if that make died, delete its marker)",
            m.rel, m.time
        ));
        return Ok(report);
    }
    // A location file condemned long ago may have been published again by a make that
    // finished meanwhile (it removes the marker): keep it then.
    let trash_now: HashMap<String, u64> = markers(store, TRASH, now)?
        .into_iter()
        .map(|m| (m.rel, m.time))
        .collect();
    for (root, time) in &loc_candidates {
        if trash_now.get(&trash_loc(root)) != Some(time) {
            continue;
        }
        store.delete(&locations_path(root))?;
        store.delete(&trash_loc(root))?;
        report.deleted_locations.push(ChunkId(*root).to_string());
    }
    // Packs named by any location file still here are not deleted (an index published by
    // a make that ended after our first look, kept or not: a later prune decides).
    let mut protected: BTreeSet<PackId> = BTreeSet::new();
    for rel in store.list_files("locations")? {
        if let Some(bytes) = store.read_file(&rel, 1 << 30)? {
            protected.extend(header_packs(&bytes).unwrap_or_default());
        }
    }
    for pack in pack_candidates {
        if protected.contains(&pack) || !trash_now.contains_key(&trash_pack(&pack)) {
            continue;
        }
        let rel = pack_path(&pack);
        let size = store.file_size(&rel)?.unwrap_or(0);
        store.delete(&rel)?;
        store.delete(&trash_pack(&pack))?;
        report.freed_bytes += size;
        report.deleted_packs.push(pack.to_string());
    }
    Ok(report)
}

/// The condemnation marker of a pack.
fn trash_pack(id: &PackId) -> String {
    format!("{TRASH}/{id}.tpack")
}

/// The condemnation marker of a location file.
fn trash_loc(root: &[u8; 32]) -> String {
    format!("{TRASH}/{}.tloc", ChunkId(*root))
}

/// A pack's table of contents by frame offset: (chunk id, frame length, chunk length).
type TocByOffset = HashMap<u64, (ChunkId, u32, u32)>;

/// Copies the live frames of `old` packs into new packs (in kept-index order), makes them
/// durable, then rewrites the location files of kept indexes that pointed into them.
/// Returns the new packs and how many location files were rewritten.
fn repack_packs(
    store: &dyn StoreWrite,
    old: &[PackId],
    kept: &mut [(Locations, Vec<ChunkId>)],
) -> Result<(Vec<PackId>, usize)> {
    let old_set: BTreeSet<PackId> = old.iter().copied().collect();
    // Read each old pack once, with its table of contents by offset.
    let mut frames: HashMap<PackId, (Vec<u8>, TocByOffset)> = HashMap::new();
    for pack in old {
        let rel = pack_path(pack);
        let origin = format!("{}/{rel}", store.location().trim_end_matches('/'));
        let bytes = read_pack(store, &rel)?.ok_or(Error::MissingFile {
            origin: origin.clone(),
        })?;
        let size = bytes.len() as u64;
        let tail = toc_tail_len(
            &bytes[bytes.len().saturating_sub(PACK_TRAILER as usize)..],
            size,
            &origin,
        )?;
        let toc = parse_toc(&bytes[(size - tail) as usize..], size, &origin)?;
        let by_offset = toc
            .iter()
            .map(|e| (e.offset, (e.id, e.clen, e.len)))
            .collect();
        frames.insert(*pack, (bytes, by_offset));
    }
    // New places, chunk by chunk, in the order kept indexes need them.
    let mut moved: HashMap<(PackId, u64), (usize, u64, u32)> = HashMap::new();
    let mut built: Vec<PackId> = Vec::new();
    let mut builder = PackBuilder::new();
    let mut pending: Vec<(PackId, u64)> = Vec::new();
    let mut taken: std::collections::HashSet<(PackId, u64)> = std::collections::HashSet::new();
    let mut finish = |builder: PackBuilder,
                      pending: &mut Vec<(PackId, u64)>,
                      moved: &mut HashMap<(PackId, u64), (usize, u64, u32)>|
     -> Result<()> {
        let pack = builder.finish();
        store.put_pack(&pack.id, &pack.bytes)?;
        let n = built.len();
        built.push(pack.id);
        for (key, e) in pending.drain(..).zip(&pack.toc) {
            moved.insert(key, (n, e.offset, e.clen));
        }
        Ok(())
    };
    for (l, ids) in kept.iter() {
        for (r, id) in l.records.iter().zip(ids) {
            let pack = l.packs[r.pack as usize];
            if !old_set.contains(&pack) || !taken.insert((pack, r.offset)) {
                continue;
            }
            let (bytes, toc) = &frames[&pack];
            let origin = format!("pack {pack} of store {}", store.location());
            let Some(&(toc_id, clen, len)) = toc.get(&r.offset) else {
                return Err(Error::CorruptStore {
                    origin,
                    reason: format!(
                        "a kept index puts chunk {id} at offset {} where the pack has no frame",
                        r.offset
                    ),
                });
            };
            let frame = &bytes[r.offset as usize..(r.offset + u64::from(clen)) as usize];
            if toc_id != *id || clen != r.clen {
                return Err(Error::CorruptStore {
                    origin,
                    reason: format!(
                        "a kept index puts chunk {id} at offset {}, the pack has chunk {toc_id}",
                        r.offset
                    ),
                });
            }
            // Never copy damage into a new pack.
            decompress_verified(*id, frame, len, &origin)?;
            builder.push(*id, frame, len);
            pending.push((pack, r.offset));
            if builder.is_full() {
                finish(std::mem::take(&mut builder), &mut pending, &mut moved)?;
            }
        }
    }
    if !builder.is_empty() {
        finish(builder, &mut pending, &mut moved)?;
    }
    store.flush()?;
    // Point kept location files at the new packs.
    let mut rewritten = 0;
    for (l, _) in kept.iter_mut() {
        if !l.packs.iter().any(|p| old_set.contains(p)) {
            continue;
        }
        let mut packs: Vec<PackId> = Vec::new();
        let mut number: HashMap<PackId, u32> = HashMap::new();
        let mut records = Vec::with_capacity(l.records.len());
        for r in &l.records {
            let pack = l.packs[r.pack as usize];
            let (pack, offset, clen) = match moved.get(&(pack, r.offset)) {
                Some(&(n, offset, clen)) => (built[n], offset, clen),
                None => (pack, r.offset, r.clen),
            };
            let n = *number.entry(pack).or_insert_with(|| {
                packs.push(pack);
                (packs.len() - 1) as u32
            });
            records.push(Location {
                pack: n,
                offset,
                clen,
            });
        }
        l.packs = packs;
        l.records = records;
        store.put_file(&locations_path(&l.root), &l.to_bytes())?;
        rewritten += 1;
    }
    store.flush()?;
    Ok((built, rewritten))
}

/// `make`'s side of the protocol: a [`StoreWrite`] around the store that writes a
/// `makes/` marker when created, and before publishing a location file waits for running
/// prunes to end, then checks that every pack it names exists (and drops the location
/// file's condemnation marker, so an index made again gets a new life). The marker goes
/// with [`MakeGuard::end`] or when the guard is dropped.
pub struct MakeGuard {
    inner: Arc<dyn StoreWrite>,
    marker: std::sync::Mutex<Option<String>>,
    stale: Duration,
    max_wait: Duration,
    raced: AtomicBool,
}

impl MakeGuard {
    /// Writes the `makes/` marker of a make starting now.
    ///
    /// # Errors
    /// The marker cannot be written.
    pub fn begin(inner: Arc<dyn StoreWrite>) -> Result<MakeGuard> {
        let marker = write_marker(&*inner, MAKES, "tmake", unix_now())?;
        Ok(MakeGuard {
            inner,
            marker: std::sync::Mutex::new(Some(marker)),
            stale: DEFAULT_STALE,
            max_wait: MAX_PRUNE_WAIT,
            raced: AtomicBool::new(false),
        })
    }

    /// Waits at most `max_wait` (instead of [`MAX_PRUNE_WAIT`]) for a running prune.
    pub fn with_max_wait(mut self, max_wait: Duration) -> MakeGuard {
        self.max_wait = max_wait;
        self
    }

    /// Whether the last location file refused was refused because a prune deleted a pack
    /// it names (the make should run again; the next run will not reuse that pack).
    pub fn raced(&self) -> bool {
        self.raced.load(Ordering::SeqCst)
    }

    /// Clears [`MakeGuard::raced`] before another attempt.
    pub fn reset(&self) {
        self.raced.store(false, Ordering::SeqCst);
    }

    /// Removes the `makes/` marker (after the index is published).
    ///
    /// # Errors
    /// The marker cannot be deleted.
    pub fn end(&self) -> Result<()> {
        let marker = self.marker.lock().expect("marker").take();
        match marker {
            Some(rel) => self.inner.delete(&rel),
            None => Ok(()),
        }
    }

    /// Waits until no fresh prune marker is left, at most [`MAX_PRUNE_WAIT`].
    fn wait_for_prunes(&self) -> Result<()> {
        let started = std::time::Instant::now();
        loop {
            let now = unix_now();
            let Some(m) = markers(&*self.inner, PRUNES, now)?
                .into_iter()
                .find(|m| fresh(m.time, now, self.stale))
            else {
                return Ok(());
            };
            if started.elapsed() >= self.max_wait {
                return Err(Error::InvalidInput(format!(
                    "a prune has been running on store {} since Unix time {} ({}): make \
                     waited {} s for it to end before publishing, and published nothing; if \
                     that prune died, delete its marker and run make again",
                    self.inner.location(),
                    m.time,
                    m.rel,
                    self.max_wait.as_secs()
                )));
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for MakeGuard {
    fn drop(&mut self) {
        let _ = self.end();
    }
}

impl StoreRead for MakeGuard {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn read_file(&self, rel: &str, limit: u64) -> Result<Option<Vec<u8>>> {
        self.inner.read_file(rel, limit)
    }
    fn read_range(&self, rel: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        self.inner.read_range(rel, offset, len)
    }
    fn file_size(&self, rel: &str) -> Result<Option<u64>> {
        self.inner.file_size(rel)
    }
    fn list_packs(&self) -> Result<Vec<PackId>> {
        self.inner.list_packs()
    }
    fn in_flight(&self) -> usize {
        self.inner.in_flight()
    }
    fn retries(&self) -> u32 {
        self.inner.retries()
    }
    fn holds_chunk(&self, id: &PackId, offset: u64, clen: u32, data: &[u8]) -> Result<bool> {
        self.inner.holds_chunk(id, offset, clen, data)
    }
}

impl StoreWrite for MakeGuard {
    fn put_pack(&self, id: &PackId, bytes: &[u8]) -> Result<()> {
        self.inner.put_pack(id, bytes)
    }

    fn begin_pack(&self) -> Result<Box<dyn PackSink + '_>> {
        self.inner.begin_pack()
    }

    fn put_file(&self, rel: &str, bytes: &[u8]) -> Result<()> {
        let Some(root) = hex_name(rel, "locations", "tloc") else {
            return self.inner.put_file(rel, bytes);
        };
        self.inner.flush()?;
        self.wait_for_prunes()?;
        for pack in header_packs(bytes).unwrap_or_default() {
            if self.inner.file_size(&pack_path(&pack))?.is_none() {
                self.raced.store(true, Ordering::SeqCst);
                return Err(Error::InvalidInput(format!(
                    "pack {pack} of store {}, which this make reuses, was deleted by a \
                     prune running at the same time; the index was not published (run \
                     make again: it will not reuse that pack)",
                    self.inner.location()
                )));
            }
        }
        self.inner.delete(&trash_loc(&root))?;
        self.inner.put_file(rel, bytes)
    }

    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }

    fn delete(&self, rel: &str) -> Result<()> {
        self.inner.delete(rel)
    }

    fn list_files(&self, dir: &str) -> Result<Vec<String>> {
        self.inner.list_files(dir)
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::store::check::check;
    use crate::store::{ChunkStore, LocalStore, PackFetcher};
    use crate::{make, ChunkerParams, MakeOptions, NoProgress};

    const HOUR: u64 = 3600;

    fn opts() -> MakeOptions {
        MakeOptions {
            params: ChunkerParams::parse("1K:4K:16K").unwrap(),
            workers: 2,
        }
    }

    /// Makes `image` into `store` (through a [`MakeGuard`], as the CLI does).
    fn make_into(store: &Arc<LocalStore>, dir: &Path, name: &str, image: &[u8]) -> Index {
        let src = dir.join(format!("{name}.img"));
        std::fs::write(&src, image).unwrap();
        let out = dir.join(format!("{name}.tidx"));
        let guard = MakeGuard::begin(store.clone()).unwrap();
        let (index, _) = make(&src, &guard, &out, &opts(), &NoProgress).unwrap();
        guard.end().unwrap();
        index
    }

    fn random(seed: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        ChaCha8Rng::seed_from_u64(seed).fill(&mut v[..]);
        v
    }

    fn at(now: u64, grace: u64) -> PruneOptions {
        PruneOptions {
            grace: Duration::from_secs(grace),
            now,
            ..PruneOptions::default()
        }
    }

    fn fetch_all(fetcher: &PackFetcher, index: &Index) {
        for e in index.chunks().iter().filter(|e| !e.zero) {
            fetcher.fetch(e).unwrap();
        }
    }

    fn setup() -> (tempfile::TempDir, Arc<LocalStore>, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(LocalStore::open(tmp.path().join("store"), true).unwrap());
        let dir = tmp.path().to_path_buf();
        (tmp, store, dir)
    }

    #[test]
    fn deletion_waits_for_the_grace_and_old_readers_keep_working() {
        let (_tmp, store, dir) = setup();
        let a = make_into(&store, &dir, "a", &random(1, 200_000));
        let b = make_into(&store, &dir, "b", &random(2, 200_000));
        // A reader of `a` that started before the prune.
        let reader = PackFetcher::open(store.clone(), &a).unwrap();
        let t0 = 1_000_000;
        let r = prune(&*store, std::slice::from_ref(&b), &at(t0, HOUR)).unwrap();
        assert_eq!(r.condemned_packs.len(), 1, "{r:?}");
        assert_eq!(
            r.condemned_locations,
            vec![ChunkId(a.root_hash()).to_string()]
        );
        assert!(r.deleted_packs.is_empty());
        // Within the grace nothing goes; the old reader still works.
        let r = prune(&*store, std::slice::from_ref(&b), &at(t0 + HOUR - 1, HOUR)).unwrap();
        assert!(
            r.deleted_packs.is_empty() && r.deleted_locations.is_empty(),
            "{r:?}"
        );
        fetch_all(&reader, &a);
        assert!(check(&*store, std::slice::from_ref(&a)).unwrap().ok());
        // Past the grace: a's pack and location file go, b stays whole.
        let r = prune(&*store, std::slice::from_ref(&b), &at(t0 + HOUR, HOUR)).unwrap();
        assert_eq!(r.deleted_packs.len(), 1, "{r:?}");
        assert_eq!(r.deleted_locations.len(), 1, "{r:?}");
        assert!(r.freed_bytes > 100_000);
        assert_eq!(store.list_packs().unwrap().len(), 1);
        assert!(check(&*store, std::slice::from_ref(&b)).unwrap().ok());
        assert!(!check(&*store, std::slice::from_ref(&a)).unwrap().ok());
        assert!(store.list_files(TRASH).unwrap().is_empty());
    }

    #[test]
    fn a_pack_needed_again_is_taken_back() {
        let (_tmp, store, dir) = setup();
        let a = make_into(&store, &dir, "a", &random(1, 100_000));
        let b = make_into(&store, &dir, "b", &random(2, 100_000));
        prune(&*store, std::slice::from_ref(&b), &at(10, HOUR)).unwrap();
        // `a` kept again before the grace ends: its pack and location file are rescued.
        let r = prune(&*store, &[a.clone(), b.clone()], &at(10 + 2 * HOUR, HOUR)).unwrap();
        assert_eq!(r.rescued, 2, "{r:?}");
        assert!(r.deleted_packs.is_empty());
        assert!(store.list_files(TRASH).unwrap().is_empty());
        assert!(check(&*store, &[a, b]).unwrap().ok());
    }

    #[test]
    fn mostly_dead_packs_are_repacked_and_old_readers_keep_working() {
        let (_tmp, store, dir) = setup();
        // `a`: one pack; `b` shares only its first 20%.
        let base = random(1, 400_000);
        let a = make_into(&store, &dir, "a", &base);
        let mut other = base[..80_000].to_vec();
        other.extend(random(2, 320_000));
        let b = make_into(&store, &dir, "b", &other);
        let reader = PackFetcher::open(store.clone(), &b).unwrap();
        let old_packs = store.list_packs().unwrap();
        let r = prune(&*store, std::slice::from_ref(&b), &at(100, HOUR)).unwrap();
        assert_eq!(r.repacked_packs.len(), 1, "{r:?}");
        assert_eq!(r.new_packs.len(), 1, "{r:?}");
        assert_eq!(r.rewritten_locations, 1);
        assert_eq!(r.condemned_packs, r.repacked_packs);
        let c = check(&*store, std::slice::from_ref(&b)).unwrap();
        assert!(c.ok(), "{c:?}");
        // b's location file no longer names the repacked pack.
        assert_eq!(c.packs, 2);
        // The reader holding the old locations works through the grace.
        fetch_all(&reader, &b);
        let r = prune(&*store, std::slice::from_ref(&b), &at(100 + HOUR, HOUR)).unwrap();
        assert_eq!(r.deleted_packs, vec![r.deleted_packs[0].clone()]);
        assert!(old_packs
            .iter()
            .any(|p| p.to_string() == r.deleted_packs[0]));
        assert!(check(&*store, std::slice::from_ref(&b)).unwrap().ok());
        // A fresh reader of b works; a's location data went with a.
        fetch_all(&PackFetcher::open(store.clone(), &b).unwrap(), &b);
        assert!(!check(&*store, &[a]).unwrap().ok());
    }

    #[test]
    fn dry_run_changes_nothing() {
        let (tmp, store, dir) = setup();
        make_into(&store, &dir, "a", &random(1, 100_000));
        let b = make_into(&store, &dir, "b", &random(2, 100_000));
        let listing = |p: &Path| -> Vec<PathBuf> {
            let mut v: Vec<PathBuf> = walk(p);
            v.sort();
            v
        };
        let before = listing(&tmp.path().join("store"));
        let r = prune(
            &*store,
            &[b],
            &PruneOptions {
                dry_run: true,
                ..at(1, HOUR)
            },
        )
        .unwrap();
        assert_eq!(r.condemned_packs.len(), 1);
        assert_eq!(listing(&tmp.path().join("store")), before);
    }

    fn walk(p: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(p).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                out.extend(walk(&e.path()));
            } else {
                out.push(e.path());
            }
        }
        out
    }

    #[test]
    fn a_running_make_defers_deletion_and_a_kept_index_must_have_locations() {
        let (_tmp, store, dir) = setup();
        let a = make_into(&store, &dir, "a", &random(1, 100_000));
        let b = make_into(&store, &dir, "b", &random(2, 100_000));
        prune(&*store, std::slice::from_ref(&b), &at(10, HOUR)).unwrap();
        let guard = MakeGuard::begin(store.clone()).unwrap();
        let now = unix_now() + 2 * HOUR;
        let r = prune(&*store, std::slice::from_ref(&b), &at(now, HOUR)).unwrap();
        assert!(r.deferred.as_deref().unwrap().contains("makes/"), "{r:?}");
        assert!(r.deleted_packs.is_empty());
        assert_eq!(store.list_packs().unwrap().len(), 2);
        guard.end().unwrap();
        let r = prune(&*store, std::slice::from_ref(&b), &at(now, HOUR)).unwrap();
        assert_eq!(r.deleted_packs.len(), 1, "{r:?}");
        // `a` has no location file any more: keeping it is refused, not a silent loss.
        let e = prune(&*store, &[a], &at(now, HOUR))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no valid location data"), "{e}");
    }

    #[test]
    fn a_make_waits_for_a_running_prune_then_refuses_a_deleted_pack() {
        let (_tmp, store, dir) = setup();
        let a = make_into(&store, &dir, "a", &random(1, 100_000));
        // A prune is running (its marker is there).
        let prune_marker = write_marker(&*store, PRUNES, "tprune", unix_now()).unwrap();
        let src = dir.join("a2.img");
        std::fs::write(&src, random(1, 100_000)).unwrap();
        let guard = Arc::new(MakeGuard::begin(store.clone()).unwrap());
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let worker = {
            let (guard, src, out) = (guard.clone(), src.clone(), dir.join("a2.tidx"));
            std::thread::spawn(move || {
                let r = make(&src, &*guard, &out, &opts(), &NoProgress).map(|_| ());
                done_tx.send(()).unwrap();
                r
            })
        };
        // The make reused a's pack and now waits for the prune to end before publishing;
        // the prune deletes that pack, then ends.
        assert!(
            done_rx.recv_timeout(Duration::from_millis(1500)).is_err(),
            "make did not wait"
        );
        for p in store.list_packs().unwrap() {
            store.delete(&pack_path(&p)).unwrap();
        }
        store.delete(&prune_marker).unwrap();
        let e = worker.join().unwrap().unwrap_err().to_string();
        assert!(e.contains("deleted by a prune"), "{e}");
        assert!(guard.raced());
        // Run again (the CLI does): the chunks are written anew and the index is whole.
        guard.reset();
        let (again, _) = make(&src, &*guard, &dir.join("a2.tidx"), &opts(), &NoProgress).unwrap();
        assert_eq!(again.root_hash(), a.root_hash());
        assert!(check(&*store, &[again]).unwrap().ok());
    }

    #[test]
    fn makes_racing_prunes_publish_whole_indexes() {
        let (_tmp, store, dir) = setup();
        let images: Vec<Vec<u8>> = (0..4).map(|i| random(i, 120_000)).collect();
        let first = make_into(&store, &dir, "r0", &images[0]);
        let latest = Arc::new(std::sync::Mutex::new(first));
        let stop = Arc::new(AtomicBool::new(false));
        let pruner = {
            let (store, latest, stop) = (store.clone(), latest.clone(), stop.clone());
            std::thread::spawn(move || {
                // Each prune a minute after the last (a simulated clock), grace 10
                // minutes: condemned packs go ten prunes later, while makes keep reusing
                // them. A fresh make marker stays fresh on this clock.
                let mut now = unix_now();
                while !stop.load(Ordering::SeqCst) {
                    // The keep list changes between prunes, not during one.
                    let keep = latest.lock().unwrap();
                    now += 60;
                    let o = PruneOptions {
                        grace: Duration::from_secs(600),
                        stale: Duration::from_secs(1 << 40),
                        now,
                        ..PruneOptions::default()
                    };
                    prune(&*store, std::slice::from_ref(&*keep), &o).unwrap();
                    drop(keep);
                }
            })
        };
        for round in 1..12 {
            let image = &images[round % images.len()];
            let src = dir.join("r.img");
            std::fs::write(&src, image).unwrap();
            let guard = MakeGuard::begin(store.clone()).unwrap();
            let mut attempt = 0;
            let index = loop {
                attempt += 1;
                guard.reset();
                match make(&src, &guard, &dir.join("r.tidx"), &opts(), &NoProgress) {
                    Err(_) if guard.raced() && attempt < 3 => continue,
                    r => break r.unwrap().0,
                }
            };
            // The operator keeps each new release, before the make marker goes: on this
            // fast clock the grace passes in milliseconds, and an index not yet kept is
            // protected by its make's marker while the make runs, then by the grace.
            *latest.lock().unwrap() = index;
            guard.end().unwrap();
        }
        stop.store(true, Ordering::SeqCst);
        pruner.join().unwrap();
        let last = latest.lock().unwrap().clone();
        let c = check(&*store, std::slice::from_ref(&last)).unwrap();
        assert!(c.ok(), "{c:?}");
        for _ in 0..2 {
            prune(
                &*store,
                std::slice::from_ref(&last),
                &at(unix_now() + 2 * HOUR, HOUR),
            )
            .unwrap();
        }
        let c = check(&*store, std::slice::from_ref(&last)).unwrap();
        assert!(c.ok(), "{c:?}");
    }

    #[test]
    fn a_make_gives_up_on_a_prune_that_never_ends() {
        let (_tmp, store, dir) = setup();
        let marker = write_marker(&*store, PRUNES, "tprune", unix_now()).unwrap();
        let src = dir.join("a.img");
        std::fs::write(&src, random(1, 50_000)).unwrap();
        let guard = MakeGuard::begin(store.clone())
            .unwrap()
            .with_max_wait(Duration::from_millis(300));
        let e = make(&src, &guard, &dir.join("a.tidx"), &opts(), &NoProgress)
            .unwrap_err()
            .to_string();
        assert!(e.contains("waited") && e.contains(&marker), "{e}");
        assert!(!guard.raced());
        assert!(
            store.list_files("locations").unwrap().is_empty(),
            "published"
        );
        assert!(!dir.join("a.tidx").exists());
    }

    /// One step of a release history.
    #[derive(Debug, Clone)]
    enum Step {
        /// A release: the last one with `len` bytes at `at` (fractions) rewritten.
        Release { at: u8, len: u16, seed: u64 },
        /// A prune keeping the indexes whose bits are set (of those still kept), hours
        /// later, repacking below `repack` tenths.
        Prune { keep: u8, hours: u8, repack: u8 },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (any::<u8>(), 1u16..30_000, any::<u64>()).prop_map(|(at, len, seed)| Step::Release {
                at,
                len,
                seed
            }),
            (any::<u8>(), 0u8..3, 0u8..10).prop_map(|(keep, hours, repack)| Step::Prune {
                keep,
                hours,
                repack
            }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

        /// Under random release histories, every chunk of every kept index stays in the
        /// store, intact and where its location file says.
        #[test]
        fn kept_indexes_stay_whole(steps in proptest::collection::vec(step(), 1..10)) {
            let (_tmp, store, dir) = setup();
            let mut image = random(7, 150_000);
            let mut live: Vec<Index> = vec![make_into(&store, &dir, "r", &image)];
            let mut now = 1_000_000u64;
            for (i, s) in steps.iter().enumerate() {
                match s {
                    Step::Release { at, len, seed } => {
                        let start = image.len() * usize::from(*at) / 256;
                        let end = (start + usize::from(*len)).min(image.len());
                        image[start..end].copy_from_slice(&random(*seed, end - start));
                        live.push(make_into(&store, &dir, &format!("r{i}"), &image));
                    }
                    Step::Prune { keep, hours, repack } => {
                        // Keep a subset (never empty: the newest always stays).
                        let n = live.len();
                        live = live
                            .into_iter()
                            .enumerate()
                            .filter(|(j, _)| *j == n - 1 || keep & (1 << (j % 8)) != 0)
                            .map(|(_, x)| x)
                            .collect();
                        now += u64::from(*hours) * HOUR;
                        let o = PruneOptions {
                            repack_below: f64::from(*repack) / 10.0,
                            ..at(now, HOUR)
                        };
                        prune(&*store, &live, &o).unwrap();
                        let c = check(&*store, &live).unwrap();
                        prop_assert!(c.ok(), "after step {}: {:?}", i, c.problems);
                    }
                }
            }
            // Two more prunes far in the future delete all that may go.
            for k in 1..3 {
                prune(&*store, &live, &at(now + k * 10 * HOUR, HOUR)).unwrap();
            }
            let c = check(&*store, &live).unwrap();
            prop_assert!(c.ok(), "{:?}", c.problems);
            // And nothing more than the kept indexes need is left.
            let needed: BTreeSet<PackId> = live
                .iter()
                .flat_map(|ix| {
                    let bytes = store.read_file(&locations_path(&ix.root_hash()), 1 << 30).unwrap().unwrap();
                    header_packs(&bytes).unwrap()
                })
                .collect();
            let have: BTreeSet<PackId> = store.list_packs().unwrap().into_iter().collect();
            prop_assert_eq!(have, needed);
        }
    }
}

#[cfg(test)]
mod local_store_tests {
    use super::*;
    use crate::store::LocalStore;

    #[test]
    fn local_list_files_and_delete() {
        let tmp = tempfile::tempdir().unwrap();
        let store = LocalStore::open(tmp.path(), true).unwrap();
        assert!(
            store.list_files(TRASH).unwrap().is_empty(),
            "absent directory"
        );
        store.put_file("trash/b.tloc", b"1").unwrap();
        store.put_file("trash/a.tpack", b"2").unwrap();
        std::fs::write(tmp.path().join("trash/.tmp123"), b"x").unwrap();
        std::fs::create_dir(tmp.path().join("trash/sub")).unwrap();
        assert_eq!(
            store.list_files(TRASH).unwrap(),
            vec!["trash/a.tpack".to_string(), "trash/b.tloc".to_string()]
        );
        store.delete("trash/a.tpack").unwrap();
        store.delete("trash/a.tpack").unwrap(); // already gone: fine
        store.delete("nowhere/x").unwrap();
        assert_eq!(
            store.list_files(TRASH).unwrap(),
            vec!["trash/b.tloc".to_string()]
        );
        // A link planted in place of a directory is refused, not followed.
        std::os::unix::fs::symlink(tmp.path().join("trash"), tmp.path().join("makes")).unwrap();
        let e = store.list_files(MAKES).unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        assert!(store.delete("makes/b.tloc").is_err());
        assert!(tmp.path().join("trash/b.tloc").exists());
    }
}
