//! dm-verity hash trees, byte-identical to what `veritysetup format` writes.
//!
//! The format (cryptsetup's "format 1", the kernel's `Documentation/admin-guide/
//! device-mapper/verity.rst`): the data is cut into 4096-byte blocks; each is hashed as
//! SHA-256(salt ‖ block). Digests are packed 128 to a 4096-byte hash block (the last
//! one zero-padded); hash blocks are hashed the same way into the level above, until a
//! level has one block, whose salted hash is the root hash. On disk the hash file starts
//! with a 4096-byte block holding the 512-byte superblock, then the levels from the top
//! (one block) down to the level that hashes the data. An image of a single block has no
//! levels: its root hash is the salted hash of that block and the hash file is the
//! superblock alone.
//!
//! [`VerityBuilder`] builds the tree in one streaming pass: each level keeps only the hash
//! block it is filling, and a full block is written straight to its final place (every
//! level's position is known from the data size), so memory stays at one block per
//! level (at most 10 levels, as cryptsetup allows) whatever the image size.

use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::device::{size_shortfall, Device, DeviceKind};
use crate::error::{Error, Result};
use crate::fsutil::{create_temp_beside, refuse_symlink};
use crate::index::Index;
use crate::progress::Progress;
use crate::trust::to_hex;
use crate::verify::{all_chunks, check_chunks_with};

/// Data and hash block size.
pub const BLOCK_SIZE: usize = 4096;
/// SHA-256 digest length.
const DIGEST_LEN: usize = 32;
/// Digests per hash block.
const HASHES_PER_BLOCK: u64 = (BLOCK_SIZE / DIGEST_LEN) as u64;
/// Longest salt the superblock can hold.
pub const MAX_SALT_LEN: usize = 256;
/// Bytes of the on-disk superblock (the rest of its 4096-byte block is zero).
const SUPERBLOCK_LEN: usize = 512;

/// Where each level of a tree lives in the hash file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Layout {
    /// `(first block, block count)` per level; level 0 hashes the data blocks.
    levels: Vec<(u64, u64)>,
    /// Hash file length in blocks, superblock included.
    total_blocks: u64,
}

impl Layout {
    fn new(data_blocks: u64) -> Layout {
        let mut count = 0usize;
        while count < 64 / 7 + 1 && (data_blocks - 1) >> (7 * count) != 0 {
            count += 1;
        }
        let mut levels = vec![(0, 0); count];
        let mut position = 1; // block 0 holds the superblock
        for i in (0..count).rev() {
            // Each block of level i covers 128^(i+1) data blocks.
            let shift = 7 * (i as u32 + 1);
            let size = if shift >= 64 {
                1
            } else {
                data_blocks.div_ceil(1 << shift)
            };
            levels[i] = (position, size);
            position += size;
        }
        Layout {
            levels,
            total_blocks: position,
        }
    }
}

/// Options for building a tree.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerityOptions {
    /// Salt, at most [`MAX_SALT_LEN`] bytes. Default: the index's 32-byte root hash, so
    /// the same index always gives the same tree.
    pub salt: Option<Vec<u8>>,
    /// The UUID recorded in the superblock. Default: derived from the salt and the
    /// index's root hash, for the same reason.
    pub uuid: Option<[u8; 16]>,
}

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VerityReport {
    /// The hash file (or device) written.
    pub hash_file: PathBuf,
    /// The dm-verity root hash, hex: the value to give the kernel (`veritysetup open`,
    /// `dm-mod.create=`, a signed kernel command line...).
    pub verity_root_hash: String,
    /// The salt, hex.
    pub salt: String,
    /// The UUID in the superblock.
    pub uuid: String,
    /// Data blocks covered (the image size in 4096-byte blocks, rounded up).
    pub data_blocks: u64,
    /// Bytes of the hash file, superblock included.
    pub hash_size: u64,
    /// Hash algorithm, as `veritysetup` names it.
    pub hash_algorithm: &'static str,
    /// Data and hash block size.
    pub block_size: usize,
}

/// Where a builder writes: a fresh file renamed into place at the end, or a block
/// device written in place.
enum Sink {
    File { tmp: PathBuf, file: File },
    Device(Device),
}

impl Sink {
    /// Opens where a tree of `total` bytes goes: an existing block device (also through
    /// a link such as `/dev/mapper/NAME`) is written in place; otherwise a new temporary
    /// file beside `path` (random name, `O_EXCL | O_NOFOLLOW`) that `finish` renames over
    /// it. A symbolic link to anything but a block device is refused: the rename would
    /// replace the link, not what it names.
    fn open(path: &Path, total: u64) -> Result<Sink> {
        let is_device = std::fs::metadata(path)
            .map(|m| m.file_type().is_block_device())
            .unwrap_or(false);
        if is_device {
            let device = Device::open_target(path, total)?;
            // The path may have changed between the check and the open.
            if device.kind() != DeviceKind::BlockDevice {
                return Err(Error::InvalidInput(format!(
                    "verity hash device {} stopped being a block device while it was opened",
                    path.display()
                )));
            }
            return Ok(Sink::Device(device));
        }
        refuse_symlink(path, "verity hash file")?;
        crate::fsutil::remove_stale_temps(path);
        let (tmp, file) = create_temp_beside(path)
            .map_err(|e| Error::io("creating verity hash file beside", path, e))?;
        if let Err(e) = file.set_len(total) {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::io("sizing verity hash file", tmp, e));
        }
        Ok(Sink::File { tmp, file })
    }

    fn write_at(&self, buf: &[u8], offset: u64, path: &Path) -> Result<()> {
        match self {
            Sink::File { file, .. } => file
                .write_all_at(buf, offset)
                .map_err(|e| Error::io("writing verity hash file", path, e)),
            Sink::Device(d) => d.write_all_at(buf, offset),
        }
    }
}

/// One level being filled.
struct Level {
    block: Vec<u8>,
    used: usize,
    next: u64,
    end: u64,
    /// The last block written at this level and its digest: runs of zeros give runs of
    /// identical hash blocks, hashed once.
    last: Option<(Vec<u8>, [u8; 32])>,
}

/// Builds a dm-verity hash tree from data streamed through [`VerityBuilder::update`].
pub struct VerityBuilder {
    path: PathBuf,
    /// `None` once finished.
    sink: Option<Sink>,
    salt: Vec<u8>,
    uuid: [u8; 16],
    data_blocks: u64,
    blocks_seen: u64,
    pending: Vec<u8>,
    /// Salted digest of a block of zeros, once needed.
    zero_block: Option<[u8; 32]>,
    levels: Vec<Level>,
    layout: Layout,
    root: Option<[u8; 32]>,
}

impl VerityBuilder {
    /// Starts a tree over `data_size` bytes of data (rounded up to whole blocks, the last
    /// one zero-padded), to be written to `hash_file`: a regular file is replaced
    /// atomically when [`VerityBuilder::finish`] succeeds; an existing block device is
    /// written in place and must be large enough.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for empty data or a salt over [`MAX_SALT_LEN`] bytes, or a
    /// device too small; [`Error::Io`].
    pub fn new(hash_file: &Path, data_size: u64, salt: &[u8], uuid: [u8; 16]) -> Result<Self> {
        if data_size == 0 {
            return Err(Error::InvalidInput(
                "dm-verity needs at least one data block; the image is empty".into(),
            ));
        }
        if salt.len() > MAX_SALT_LEN {
            return Err(Error::InvalidInput(format!(
                "a dm-verity salt holds at most {MAX_SALT_LEN} bytes, not {}",
                salt.len()
            )));
        }
        let data_blocks = data_size.div_ceil(BLOCK_SIZE as u64);
        let layout = Layout::new(data_blocks);
        let total = layout.total_blocks * BLOCK_SIZE as u64;
        let sink = Sink::open(hash_file, total)?;
        let levels = layout
            .levels
            .iter()
            .map(|&(start, size)| Level {
                block: vec![0; BLOCK_SIZE],
                used: 0,
                next: start,
                end: start + size,
                last: None,
            })
            .collect();
        Ok(VerityBuilder {
            path: hash_file.to_path_buf(),
            sink: Some(sink),
            salt: salt.to_vec(),
            uuid,
            data_blocks,
            blocks_seen: 0,
            pending: Vec::with_capacity(BLOCK_SIZE),
            zero_block: None,
            levels,
            layout,
            root: None,
        })
    }

    fn salted(&self, block: &[u8]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(&self.salt);
        h.update(block);
        h.finalize().into()
    }

    /// Adds a digest at `level`, writing and hashing upward every block that fills.
    fn push(&mut self, mut level: usize, mut digest: [u8; 32]) -> Result<()> {
        loop {
            if level == self.levels.len() {
                if self.root.replace(digest).is_some() {
                    return Err(self.overflow());
                }
                return Ok(());
            }
            let l = &mut self.levels[level];
            l.block[l.used * DIGEST_LEN..(l.used + 1) * DIGEST_LEN].copy_from_slice(&digest);
            l.used += 1;
            if l.used < HASHES_PER_BLOCK as usize {
                return Ok(());
            }
            digest = self.emit(level)?;
            level += 1;
        }
    }

    /// Writes level `level`'s (possibly partial, zero-padded) block and returns its hash.
    fn emit(&mut self, level: usize) -> Result<[u8; 32]> {
        let l = &self.levels[level];
        if l.next >= l.end {
            return Err(self.overflow());
        }
        let at = l.next * BLOCK_SIZE as u64;
        self.write_at(&l.block, at)?;
        let digest = match &l.last {
            Some((block, digest)) if *block == l.block => *digest,
            _ => self.salted(&l.block),
        };
        let l = &mut self.levels[level];
        l.last = Some((l.block.clone(), digest));
        l.next += 1;
        l.used = 0;
        l.block.fill(0);
        Ok(digest)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        match &self.sink {
            Some(sink) => sink.write_at(buf, offset, &self.path),
            None => Err(Error::InvalidInput("verity tree already finished".into())),
        }
    }

    fn overflow(&self) -> Error {
        Error::InvalidInput(format!(
            "more data than the {} blocks the verity tree {} was sized for",
            self.data_blocks,
            self.path.display()
        ))
    }

    fn data_block(&mut self, block: &[u8]) -> Result<()> {
        if self.blocks_seen == self.data_blocks {
            return Err(self.overflow());
        }
        self.blocks_seen += 1;
        let digest = self.salted(block);
        self.push(0, digest)
    }

    /// Feeds the next data bytes.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] past the announced data size; [`Error::Io`].
    pub fn update(&mut self, mut data: &[u8]) -> Result<()> {
        if !self.pending.is_empty() {
            let take = (BLOCK_SIZE - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.pending.len() == BLOCK_SIZE {
                let block = std::mem::take(&mut self.pending);
                self.data_block(&block)?;
                self.pending = block;
                self.pending.clear();
            }
        }
        let mut blocks = data.chunks_exact(BLOCK_SIZE);
        for block in &mut blocks {
            self.data_block(block)?;
        }
        self.pending.extend_from_slice(blocks.remainder());
        Ok(())
    }

    /// Feeds `len` zero bytes: each whole block of zeros costs one digest (computed once),
    /// not a SHA-256 of its bytes.
    ///
    /// # Errors
    /// As [`VerityBuilder::update`].
    pub fn zeros(&mut self, mut len: u64) -> Result<()> {
        static ZEROS: [u8; BLOCK_SIZE] = [0; BLOCK_SIZE];
        if !self.pending.is_empty() {
            let take = ((BLOCK_SIZE - self.pending.len()) as u64).min(len);
            self.update(&ZEROS[..take as usize])?;
            len -= take;
        }
        if len >= BLOCK_SIZE as u64 {
            let digest = *self.zero_block.get_or_insert_with(|| {
                let mut h = Sha256::new();
                h.update(&self.salt);
                h.update(ZEROS);
                h.finalize().into()
            });
            for _ in 0..len / BLOCK_SIZE as u64 {
                if self.blocks_seen == self.data_blocks {
                    return Err(self.overflow());
                }
                self.blocks_seen += 1;
                self.push(0, digest)?;
            }
            len %= BLOCK_SIZE as u64;
        }
        self.update(&ZEROS[..len as usize])
    }

    /// Pads the last block, completes every level, writes the superblock, makes the file
    /// durable and puts it in place; returns the root hash.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] if less data than announced was fed; [`Error::Io`].
    pub fn finish(mut self) -> Result<[u8; 32]> {
        if !self.pending.is_empty() {
            let mut block = std::mem::take(&mut self.pending);
            block.resize(BLOCK_SIZE, 0);
            self.data_block(&block)?;
        }
        if self.blocks_seen != self.data_blocks {
            return Err(Error::InvalidInput(format!(
                "the verity tree {} needs {} data blocks, only {} were given",
                self.path.display(),
                self.data_blocks,
                self.blocks_seen
            )));
        }
        if self.levels.is_empty() {
            // The single data block's hash was pushed straight to the root.
        } else {
            for level in 0..self.levels.len() {
                if self.levels[level].used > 0 {
                    let digest = self.emit(level)?;
                    self.push(level + 1, digest)?;
                }
            }
        }
        let complete = self.levels.iter().all(|l| l.next == l.end);
        let root = match self.root {
            Some(root) if complete => root,
            _ => {
                return Err(Error::InvalidInput(format!(
                    "internal error: verity tree {} is incomplete",
                    self.path.display()
                )))
            }
        };
        let mut first = vec![0u8; BLOCK_SIZE];
        first[..SUPERBLOCK_LEN].copy_from_slice(&superblock(
            self.data_blocks,
            &self.salt,
            &self.uuid,
        ));
        self.write_at(&first, 0)?;
        match self.sink.take() {
            None => {}
            Some(Sink::Device(d)) => d.sync()?,
            Some(Sink::File { tmp, file }) => {
                // Data, then the name, then the name durably: a power cut after
                // success never loses the hash file or leaves a short one.
                let placed = file
                    .sync_all()
                    .and_then(|()| std::fs::rename(&tmp, &self.path))
                    .and_then(|()| crate::fsutil::sync_dir_of(&self.path));
                if let Err(e) = placed {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(Error::io("writing verity hash file", &self.path, e));
                }
            }
        }
        Ok(root)
    }

    /// Hash file length in bytes, superblock included.
    pub fn hash_size(&self) -> u64 {
        self.layout.total_blocks * BLOCK_SIZE as u64
    }
}

impl Drop for VerityBuilder {
    fn drop(&mut self) {
        // An unfinished tree never appears under its final name.
        if let Some(Sink::File { tmp, .. }) = &self.sink {
            if tmp.exists() {
                let _ = std::fs::remove_file(tmp);
            }
        }
    }
}

/// The 512-byte superblock (`struct verity_sb`, little-endian).
fn superblock(data_blocks: u64, salt: &[u8], uuid: &[u8; 16]) -> [u8; SUPERBLOCK_LEN] {
    let mut sb = [0u8; SUPERBLOCK_LEN];
    sb[0..8].copy_from_slice(b"verity\0\0");
    sb[8..12].copy_from_slice(&1u32.to_le_bytes()); // superblock version
    sb[12..16].copy_from_slice(&1u32.to_le_bytes()); // hash type: normal
    sb[16..32].copy_from_slice(uuid);
    sb[32..38].copy_from_slice(b"sha256");
    sb[64..68].copy_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
    sb[68..72].copy_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
    sb[72..80].copy_from_slice(&data_blocks.to_le_bytes());
    sb[80..82].copy_from_slice(&(salt.len() as u16).to_le_bytes());
    sb[88..88 + salt.len()].copy_from_slice(salt);
    sb
}

/// Formats a UUID as `8-4-4-4-12` lowercase hex.
fn format_uuid(u: &[u8; 16]) -> String {
    let h = to_hex(u);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// A version-4-shaped UUID derived from the salt and the index, so trees are reproducible.
fn derived_uuid(salt: &[u8], root: &[u8; 32]) -> [u8; 16] {
    let mut h = Sha256::new();
    h.update(b"tessera dm-verity uuid\0");
    h.update(salt);
    h.update(root);
    let d: [u8; 32] = h.finalize().into();
    let mut u = [0u8; 16];
    u.copy_from_slice(&d[..16]);
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    u
}

/// Writes the dm-verity hash tree of the image of `index`, read from `data` (a file or
/// block device holding it), to `hash_file`.
///
/// Every chunk read is checked against the index as it streams through, so the tree
/// can only ever describe the published image: a target that differs is an error and
/// no hash file is left behind. Reading and hashing overlap (see
/// [`check_chunks_with`]: worker threads check chunk ids while this thread computes
/// SHA-256); memory stays at a few chunks per worker.
///
/// # Errors
/// [`Error::VerifyFailed`] naming the first chunk that differs (or a target too small),
/// [`Error::InvalidInput`] for a bad salt or an empty image, [`Error::Io`].
pub fn build_verity(
    index: &Index,
    data: &Path,
    hash_file: &Path,
    options: &VerityOptions,
    progress: &dyn Progress,
) -> Result<VerityReport> {
    let device = Device::open_read(data)?;
    if let Some(why) = size_shortfall(
        device.path().display(),
        device.kind(),
        device.size(),
        index.image_size(),
    ) {
        return Err(Error::VerifyFailed(why));
    }
    let salt = options
        .salt
        .clone()
        .unwrap_or_else(|| index.root_hash().to_vec());
    let uuid = options
        .uuid
        .unwrap_or_else(|| derived_uuid(&salt, &index.root_hash()));
    let mut builder = VerityBuilder::new(hash_file, index.image_size(), &salt, uuid)?;
    progress.start("verity", index.image_size());
    // Chunk ids are checked by worker threads while this thread computes SHA-256; the
    // first chunk that differs stops everything (and `builder`'s drop removes its file).
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    check_chunks_with(
        index,
        &device,
        all_chunks(index)?,
        workers,
        progress,
        |_, c, bytes, good| {
            if !good {
                return Err(Error::VerifyFailed(format!(
                    "{} does not hold the image: the {} bytes at offset {} do not hash to \
                     chunk {}",
                    device.path().display(),
                    c.len,
                    c.offset,
                    c.id
                )));
            }
            if bytes.is_empty() {
                // A zero chunk in a hole of the target.
                builder.zeros(u64::from(c.len))
            } else {
                builder.update(bytes)
            }
        },
    )?;
    let hash_size = builder.hash_size();
    let root = builder.finish()?;
    Ok(VerityReport {
        hash_file: hash_file.to_path_buf(),
        verity_root_hash: to_hex(&root),
        salt: to_hex(&salt),
        uuid: format_uuid(&uuid),
        data_blocks: index.image_size().div_ceil(BLOCK_SIZE as u64),
        hash_size,
        hash_algorithm: "sha256",
        block_size: BLOCK_SIZE,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tree built the obvious way, everything in memory: levels bottom-up.
    fn naive(data: &[u8], salt: &[u8]) -> ([u8; 32], Vec<Vec<u8>>) {
        let h = |b: &[u8]| -> [u8; 32] {
            let mut s = Sha256::new();
            s.update(salt);
            s.update(b);
            s.finalize().into()
        };
        let mut padded = data.to_vec();
        padded.resize(data.len().div_ceil(BLOCK_SIZE) * BLOCK_SIZE, 0);
        let mut digests: Vec<[u8; 32]> = padded.chunks(BLOCK_SIZE).map(h).collect();
        let mut levels = Vec::new();
        while digests.len() > 1 {
            let mut level = Vec::new();
            for group in digests.chunks(HASHES_PER_BLOCK as usize) {
                let mut block = group.concat();
                block.resize(BLOCK_SIZE, 0);
                level.push(block);
            }
            digests = level.iter().map(|b| h(b)).collect();
            levels.push(level.concat());
        }
        (digests[0], levels)
    }

    fn build(data: &[u8], salt: &[u8], piece: usize) -> (Vec<u8>, [u8; 32]) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h");
        let mut b = VerityBuilder::new(&path, data.len() as u64, salt, [9; 16]).unwrap();
        for p in data.chunks(piece) {
            b.update(p).unwrap();
        }
        let root = b.finish().unwrap();
        (std::fs::read(&path).unwrap(), root)
    }

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    #[test]
    fn matches_the_in_memory_tree() {
        for blocks in [1usize, 2, 127, 128, 129, 300, 128 * 128 + 1] {
            let d = data(blocks * BLOCK_SIZE);
            let (file, root) = build(&d, b"salt", 10_000);
            let (want_root, levels) = naive(&d, b"salt");
            assert_eq!(root, want_root, "{blocks} blocks");
            // File: superblock block, then levels top-down.
            let mut want = Vec::new();
            for l in levels.iter().rev() {
                want.extend_from_slice(l);
            }
            assert_eq!(&file[BLOCK_SIZE..], &want[..], "{blocks} blocks");
            assert_eq!(&file[..8], b"verity\0\0");
        }
    }

    #[test]
    fn zero_runs_give_the_tree_of_their_bytes() {
        let mut d = data(1300 * BLOCK_SIZE + 777);
        // Zeros unaligned, across many blocks (identical hash blocks), and at the end.
        d[1000..(1200 * BLOCK_SIZE + 5)].fill(0);
        let tail = d.len() - 3000;
        d[tail..].fill(0);
        let (want, want_root) = build(&d, b"salt", 65536);
        let (naive_root, levels) = naive(&d, b"salt");
        assert_eq!(want_root, naive_root);
        assert!(want.ends_with(&levels[0]));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h");
        let mut b = VerityBuilder::new(&path, d.len() as u64, b"salt", [9; 16]).unwrap();
        let mut at = 0;
        while at < d.len() {
            let zero = d[at] == 0;
            let n = d[at..]
                .iter()
                .position(|&x| (x == 0) != zero)
                .unwrap_or(d.len() - at);
            if zero {
                b.zeros(n as u64).unwrap();
            } else {
                b.update(&d[at..at + n]).unwrap();
            }
            at += n;
        }
        assert_eq!(b.finish().unwrap(), want_root);
        assert_eq!(std::fs::read(&path).unwrap(), want);
        // More zeros than announced is the same error as more bytes.
        let mut b = VerityBuilder::new(&path, 10, b"s", [9; 16]).unwrap();
        assert!(b.zeros(2 * BLOCK_SIZE as u64).is_err());
    }

    #[test]
    fn partial_last_block_is_zero_padded() {
        let d = data(5000);
        let (_, root) = build(&d, b"", 333);
        let mut padded = d.clone();
        padded.resize(2 * BLOCK_SIZE, 0);
        assert_eq!(root, naive(&padded, b"").0);
    }

    #[test]
    fn layout_sizes() {
        assert_eq!(Layout::new(1).levels, vec![]);
        assert_eq!(Layout::new(1).total_blocks, 1);
        assert_eq!(Layout::new(128).levels, vec![(1, 1)]);
        assert_eq!(Layout::new(129).levels, vec![(2, 2), (1, 1)]);
        assert_eq!(Layout::new(u64::MAX).levels.len(), 10);
    }

    #[test]
    fn wrong_amounts_of_data_are_errors_and_leave_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h");
        let mut b = VerityBuilder::new(&path, 8192, b"", [0; 16]).unwrap();
        b.update(&[1; 4096]).unwrap();
        assert!(b.finish().is_err());
        let mut b = VerityBuilder::new(&path, 4096, b"", [0; 16]).unwrap();
        assert!(b.update(&[1; 8192]).is_err());
        drop(b);
        assert!(!path.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert!(VerityBuilder::new(&path, 0, b"", [0; 16]).is_err());
        assert!(VerityBuilder::new(&path, 1, &[0; 257], [0; 16]).is_err());
    }

    #[test]
    fn planted_links_at_temporary_names_are_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let path = dir.path().join("h");
        // Every name the old `.h.tmp.PID.N` scheme could pick next in this process.
        for n in 0..256 {
            let planted = dir
                .path()
                .join(format!(".h.tmp.{}.{n}", std::process::id()));
            std::os::unix::fs::symlink(&victim, planted).unwrap();
        }
        let mut b = VerityBuilder::new(&path, 8192, b"", [0; 16]).unwrap();
        b.update(&[5; 8192]).unwrap();
        b.finish().unwrap();
        assert!(
            std::fs::read(&victim).unwrap() == b"precious",
            "the victim was written"
        );
        assert_eq!(std::fs::read(&path).unwrap().len(), 2 * BLOCK_SIZE);
        // A link at the output path itself is refused.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let err = VerityBuilder::new(&link, 8192, b"", [0; 16]).err().unwrap();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert!(
            std::fs::read(&victim).unwrap() == b"precious",
            "the victim was written"
        );
    }

    #[test]
    fn superblock_fields() {
        let sb = superblock(129, &[0xaa; 3], &[1; 16]);
        assert_eq!(&sb[32..39], b"sha256\0");
        assert_eq!(u64::from_le_bytes(sb[72..80].try_into().unwrap()), 129);
        assert_eq!(&sb[80..82], &[3, 0]);
        assert_eq!(&sb[88..92], &[0xaa, 0xaa, 0xaa, 0]);
        assert_eq!(
            format_uuid(&[0x12; 16]),
            "12121212-1212-1212-1212-121212121212"
        );
    }
}
