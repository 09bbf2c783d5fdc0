//! `tessera commit`: turn a served image's overlay into a new release.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use tessera_engine::store::prune::MakeGuard;
use tessera_engine::{ImageReader, Overlay, ReaderOptions, StoreRead};

use crate::output::{human_bytes, Output};
use crate::store_args::StoreArgs;

/// Turn an overlay (the writes a VM made to a served image, `serve --overlay`) into a new
/// release: a new index of the base image with the overlay's blocks applied.
///
/// Only the chunks the overlay touched are cut anew, with the neighbours it takes
/// content-defined cuts to fall back into step; every other chunk is taken whole from the
/// base index without reading it, so the cost grows with the bytes changed, not with the
/// image. New chunks are stored in new packs of STORE (the store the base image was made
/// into: a directory or s3://), the new index's location file is written and the store
/// flushed, then the index is written (atomically) — the order of `make`, which prunes of
/// the same store respect the same way. The new index records no image hash (reading
/// every unchanged byte would be needed). Stop the `serve` using the overlay (or make sure
/// it flushed) first: writes still in flight are not in the overlay file.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The overlay file (`serve --overlay`).
    overlay: PathBuf,
    /// The index the overlay belongs to: a path or URL.
    #[arg(long, value_name = "INDEX")]
    base: PathBuf,
    /// The store holding the base image's packs and location file, where the new chunks go.
    #[command(flatten)]
    store: StoreArgs,
    /// Where to write the new index: a path or s3://BUCKET/KEY.
    #[arg(long, value_name = "NEW.tidx")]
    index: PathBuf,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args, out: &Output) -> anyhow::Result<ExitCode> {
    let base = args.store.load_index(&args.base, "base index")?;
    // `Overlay::open` creates a missing overlay: a commit needs one that exists.
    std::fs::symlink_metadata(&args.overlay)
        .with_context(|| format!("opening the overlay {}", args.overlay.display()))?;
    let overlay = Overlay::open(&args.overlay, &base)
        .with_context(|| format!("opening the overlay {}", args.overlay.display()))?;
    let store = args.store.open_for_write()?;
    let read: Arc<dyn StoreRead> = store.clone();
    let chunks = args.store.chunks(read, &base)?;
    let image = ImageReader::new(base.clone(), chunks, ReaderOptions::default());
    let dest = args.store.index_dest(&args.index)?;
    let started = Instant::now();
    // The make/prune protocol (docs/STORES.md): a commit publishes like a make.
    let guard = MakeGuard::begin(store).context("starting commit")?;
    let (_, report) = tessera_engine::commit(&base, &overlay, &image, &guard, dest.path(), out)
        .with_context(|| format!("committing {}", args.overlay.display()))?;
    args.store.publish_index(&dest)?;
    guard.end().context("ending commit")?;
    if args.json {
        out.json(&report)?;
    } else {
        out.line(format!(
            "{}: {} changed of {}, {} read to cut {} chunks anew ({} new, {} stored in {} new \
             packs), {} chunks kept, {:.2} s",
            args.index.display(),
            human_bytes(report.bytes_changed),
            human_bytes(report.image_size),
            human_bytes(report.bytes_read),
            report.chunk_count - report.chunks_kept,
            report.new_chunks,
            human_bytes(report.stored_bytes),
            report.new_packs,
            report.chunks_kept,
            started.elapsed().as_secs_f64(),
        ));
        out.line(format!("root hash {}", report.root_hash));
    }
    Ok(ExitCode::SUCCESS)
}
