//! The tessera engine: content-defined chunking, chunk stores, indexes, sync and
//! verification of disk images.
//!
//! Data flows one way:
//! - [`make()`]: source → [`Chunker`] → hash/compress workers → packs in a [`StoreWrite`]
//!   store + the index's location file + [`Index`];
//! - [`PackFetcher`]: a [`StoreRead`] store + an [`Index`] → a [`ChunkStore`] that fetches
//!   the index's chunks with coalesced range requests, verified;
//! - [`sync()`] / [`sync_with()`]: [`Index`] + target + seeds → scan → [`SyncPlan`] (pure,
//!   printable) → ordered, journaled, verified writes in place → final check (`sync` module);
//! - [`verify()`]: target → chunk hashes compared with the index;
//! - [`ImageReader`]: random-access verified reads for the NBD server, with a byte-bounded
//!   cache and an optional copy-on-write [`Overlay`];
//! - [`trust`]: root-hash pins, minisign signatures, dm-verity trees.
//!
//! Remote (HTTP, S3) stores implement [`StoreRead`] (and S3 [`StoreWrite`]) in the
//! `tessera-stores` crate.
//!
//! Every chunk that leaves a store passes through [`VerifiedChunk::verify`].
//!
//! ```no_run
//! use std::path::Path;
//! use std::sync::Arc;
//! use tessera_engine::{make, sync, Index, LocalStore, MakeOptions, NoProgress, PackFetcher};
//!
//! # fn main() -> tessera_engine::Result<()> {
//! let store = Arc::new(LocalStore::open("store", true)?);
//! let (index, report) = make(Path::new("disk.img"), &*store, Path::new("disk.tidx"),
//!                            &MakeOptions::default(), &NoProgress)?;
//! println!("{} chunks, root hash {}", report.chunk_count, report.root_hash);
//! let index = Index::load(Path::new("disk.tidx"))?;
//! let chunks = PackFetcher::open(store, &index)?;
//! sync(&index, Path::new("copy.img"), &chunks, &NoProgress)?;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

pub mod casync;
pub mod chunk;
pub mod chunker;
pub mod commit;
pub mod device;
pub mod digest;
pub mod error;
mod fsutil;
mod id;
pub mod index;
pub mod make;
pub mod pack;
pub mod progress;
pub mod reader;
pub mod store;
pub mod sync;
mod sys;
pub mod trust;
pub mod verify;

pub use chunk::VerifiedChunk;
pub use chunker::{parse_size, Chunker, ChunkerParams};
pub use commit::{commit, CommitReport};
pub use device::{Device, DeviceKind};
pub use digest::ChunkDigest;
pub use error::{Error, ErrorKind, Result};
pub use fsutil::write_atomic;
pub use id::{ChunkId, ParseIdError};
pub use index::{ChunkEntry, Index};
pub use make::{make, make_from, MakeOptions, MakeReport, MakeSource};
pub use progress::{NoProgress, Progress, UNKNOWN_TOTAL};
pub use reader::{ImageReader, Overlay, ReaderOptions, ReaderPool, ReaderStats};
pub use store::{
    CacheOptions, CacheStore, ChunkStore, Estimate, FetchStream, Fetched, LocalStore, PackFetcher,
    PackId, StoreRead, StoreWrite,
};
pub use sync::{sync, sync_with, SeedSpec, SyncOptions, SyncPlan, SyncReport};
pub use trust::{TrustPolicy, TrustReport, TrustedKey};
pub use verify::{verify, verify_ok, verify_stream, VerifyReport};
