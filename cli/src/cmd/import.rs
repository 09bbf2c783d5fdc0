//! `tessera import`: convert an image published with casync into a tessera store.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use tessera_engine::store::prune::MakeGuard;
use tessera_engine::{ChunkDigest, ChunkerParams, MakeOptions, SyncOptions};

use crate::output::{human_bytes, Output};
use crate::store_args::StoreArgs;
use crate::trust_args::TrustArgs;

/// Convert an image published with casync (a .caibx index and its .castr chunk store)
/// into a tessera index and store.
///
/// The image is rebuilt from the casync store into a private temporary directory (every
/// chunk checked against the .caibx's SHA-512/256 or SHA-256 id, exactly as `sync` does),
/// then cut again with tessera's chunker (--chunk-size) into --to-store, as `make` would
/// cut it: later releases made with `tessera make` then share chunks with it, and the
/// smaller default chunks download less on updates than casync's 64 KiB average
/// (benches/RESULTS.md). The rebuilt image is removed afterwards; it needs the image's
/// size of free space in --work-dir while the import runs.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The casync index (.caibx): a path or an http(s):// URL.
    caibx: PathBuf,
    /// The casync chunk store (.castr) the index's chunks are read from.
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    trust: TrustArgs,
    /// The tessera store to write: a directory (created if missing) or s3://BUCKET/PREFIX.
    #[arg(long, value_name = "DIR|URL")]
    to_store: String,
    /// Where to write the tessera index (a local path).
    #[arg(long, value_name = "OUT.tidx")]
    index: PathBuf,
    /// Chunk sizes of the tessera index, as MIN:AVG:MAX (as `make --chunk-size`).
    #[arg(long, value_name = "MIN:AVG:MAX", default_value = "4K:16K:64K")]
    chunk_size: String,
    /// Directory for the rebuilt image [default: the directory of --index].
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(serde::Serialize)]
struct Json<'a> {
    casync_root_hash: String,
    casync_digest: ChunkDigest,
    casync_chunks: u64,
    bytes_downloaded: u64,
    #[serde(flatten)]
    make: &'a tessera_engine::MakeReport,
}

/// A directory only this run uses (created, never reused), removed with its contents.
struct WorkDir(PathBuf);

impl WorkDir {
    fn create(parent: &Path) -> anyhow::Result<WorkDir> {
        use std::os::unix::fs::DirBuilderExt;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = parent.join(format!(
            ".tessera-import.{}.{nanos:08x}",
            std::process::id()
        ));
        // create_dir fails on anything already there (a planted link included).
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating the work directory {}", dir.display()))?;
        Ok(WorkDir(dir))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn run(args: Args, out: &Output) -> anyhow::Result<ExitCode> {
    let params = ChunkerParams::parse(&args.chunk_size)?;
    let index = args.trust.load(&args.store.fetch_index(&args.caibx)?)?;
    anyhow::ensure!(
        index.digest() != ChunkDigest::Blake3,
        "{} is a tessera index, not a casync one: nothing to import",
        args.caibx.display()
    );
    let chunks = args.store.chunks(args.store.open()?, &index)?;
    let to_store = tessera_stores::open_store_for_write(&args.to_store, &args.store.options()?)
        .with_context(|| format!("opening store {}", args.to_store))?;
    let parent = match (&args.work_dir, args.index.parent()) {
        (Some(d), _) => d.clone(),
        (None, Some(p)) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let work = WorkDir::create(&parent)?;
    let image = work.0.join("image");
    let started = Instant::now();
    let synced = tessera_engine::sync_with(
        &index,
        &image,
        &*chunks,
        &SyncOptions {
            journal: Some(work.0.join("journal")),
            ..SyncOptions::default()
        },
        out,
    )
    .with_context(|| format!("rebuilding the image of {}", args.caibx.display()))?;
    let opts = MakeOptions {
        params,
        ..MakeOptions::default()
    };
    let guard = MakeGuard::begin(to_store).context("starting make")?;
    let mut attempt = 0;
    let (_, report) = loop {
        attempt += 1;
        guard.reset();
        match tessera_engine::make(&image, &guard, &args.index, &opts, out) {
            Err(_) if guard.raced() && attempt < 3 => continue,
            r => break r,
        }
    }
    .with_context(|| format!("storing the image of {}", args.caibx.display()))?;
    guard.end().context("ending make")?;
    drop(work);
    if args.json {
        out.json(&Json {
            casync_root_hash: tessera_engine::index::hex(&index.root_hash()),
            casync_digest: index.digest(),
            casync_chunks: index.chunks().len() as u64,
            bytes_downloaded: synced.bytes_downloaded,
            make: &report,
        })?;
        return Ok(ExitCode::SUCCESS);
    }
    out.line(format!(
        "{}: {} imported from {} ({} casync chunks, {} downloaded) in {:.2}s: {} chunks \
         ({} new, {} zero), {} stored in {} new packs",
        args.index.display(),
        human_bytes(report.image_size),
        args.caibx.display(),
        index.chunks().len(),
        human_bytes(synced.bytes_downloaded),
        started.elapsed().as_secs_f64(),
        report.chunk_count,
        report.new_chunks,
        report.zero_chunks,
        human_bytes(report.stored_bytes),
        report.new_packs,
    ));
    out.line(format!("root hash {}", report.root_hash));
    Ok(ExitCode::SUCCESS)
}
