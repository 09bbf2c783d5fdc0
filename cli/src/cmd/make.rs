//! `tessera make`: chunk an image into a store and write its index.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use tessera_engine::store::prune::MakeGuard;
use tessera_engine::trust::{build_verity, VerityOptions, VerityReport};
use tessera_engine::{ChunkerParams, MakeOptions, MakeSource};

use crate::output::{human_bytes, Output};
use crate::store_args::StoreArgs;

/// Cut an image (file or block device) into chunks, store the new ones, write the index.
///
/// Chunks are named by the BLAKE3 hash of their bytes; the chunks the store lacks are
/// zstd-compressed into new pack files (STORE/packs/, at most about 64 MiB each, named by
/// their own hash), in image order, and where each chunk of this index lives is written to
/// STORE/locations/ROOT.tloc. Chunks already in any pack of the store are not written
/// again, and all-zero chunks are not stored at all. A local store's copy of a chunk is
/// read and checked first; a damaged one is written again into the new pack and counted
/// as repaired. Packs and the location file are flushed before the index is written
/// (last, atomically), so a reader never sees an index whose chunks are missing, and an
/// interrupted make leaves only whole packs that the next make reuses. The same image,
/// chunk sizes and store always give the same index, packs and location file. --cache is
/// refused (it is for readers). tessera refuses to write through symbolic links: the index
/// path, the --verity file (unless it names a block device) and the store's directories
/// must not be links. While it runs, make keeps a marker in STORE/makes/ so that a
/// `tessera prune` of the same store deletes nothing meanwhile; before publishing it waits
/// for a running prune to end and runs again if that prune deleted a pack it reuses.
///
/// Sparse images cost what their data costs: the holes of a file are skipped
/// (SEEK_DATA/SEEK_HOLE) and all-zero blocks read from a block device are found by a scan,
/// never chunked or hashed byte by byte; each run of zeros is one record of the index.
/// The index is the same whether the zeros are holes or written.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The image: a file, a block device, or `-` to read it from stdin (read once, in
    /// order, to its end).
    source: PathBuf,
    /// Where chunks go: a directory (created if missing) or s3://BUCKET/PREFIX.
    #[command(flatten)]
    store: StoreArgs,
    /// Where to write the index: a path or s3://BUCKET/KEY (uploaded after every chunk).
    #[arg(long, value_name = "OUT.tidx")]
    index: PathBuf,
    /// Chunk sizes as MIN:AVG:MAX (K and M suffixes; AVG a power of two).
    #[arg(long, value_name = "MIN:AVG:MAX", default_value = "4K:16K:64K")]
    chunk_size: String,
    /// Worker threads for hashing and compression [default: number of CPUs].
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// Also write the image's dm-verity hash tree here (see `tessera verity`; the salt is
    /// the index's root hash).
    #[arg(long, value_name = "OUT")]
    verity: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(serde::Serialize)]
struct Json<'a> {
    #[serde(flatten)]
    report: &'a tessera_engine::MakeReport,
    #[serde(skip_serializing_if = "Option::is_none")]
    verity: Option<&'a VerityReport>,
}

pub fn run(args: Args, out: &Output) -> anyhow::Result<ExitCode> {
    let params = ChunkerParams::parse(&args.chunk_size)?;
    let mut opts = MakeOptions {
        params,
        ..MakeOptions::default()
    };
    if let Some(n) = args.threads {
        anyhow::ensure!(n > 0, "--threads must be at least 1");
        opts.workers = n;
    }
    let stdin = args.source.as_os_str() == "-";
    anyhow::ensure!(
        !(stdin && std::io::stdin().is_terminal()),
        "`make -` reads the image from stdin, which is a terminal: pipe the image in"
    );
    anyhow::ensure!(
        !(stdin && args.verity.is_some()),
        "--verity needs the image again after chunking it: it cannot be used with `make -` \
         (run `tessera verity` on the image where it lands)"
    );
    let store = args.store.open_for_write()?;
    let dest = args.store.index_dest(&args.index)?;
    let started = Instant::now();
    // The make/prune protocol (docs/STORES.md): a makes/ marker while we run; a prune
    // that deleted a pack we reuse makes us run again (the next run does not see it).
    let guard = MakeGuard::begin(store).context("starting make")?;
    let mut attempt = 0;
    let (index, report) = loop {
        attempt += 1;
        guard.reset();
        let source = if stdin {
            MakeSource::Stream {
                reader: Box::new(std::io::stdin()),
                name: PathBuf::from("stdin"),
            }
        } else {
            MakeSource::Path(&args.source)
        };
        match tessera_engine::make_from(source, &guard, dest.path(), &opts, out) {
            // stdin cannot be read twice: the race is reported instead.
            Err(e) if stdin && guard.raced() => {
                break Err(e).context(
                    "a prune of the store deleted a pack this make reuses while it ran; \
                     run it again",
                )
            }
            Err(_) if guard.raced() && attempt < 3 => continue,
            r => break r.map_err(anyhow::Error::from),
        }
    }
    .with_context(|| format!("making an image of {}", args.source.display()))?;
    args.store.publish_index(&dest)?;
    guard.end().context("ending make")?;
    let secs = started.elapsed().as_secs_f64();
    let verity = args
        .verity
        .as_deref()
        .map(|f| build_verity(&index, &args.source, f, &VerityOptions::default(), out))
        .transpose()
        .context("writing the dm-verity hash tree")?;
    if args.json {
        out.json(&Json {
            report: &report,
            verity: verity.as_ref(),
        })?;
    } else {
        let repaired = match report.repaired_chunks {
            0 => String::new(),
            n => format!(", {n} damaged replaced"),
        };
        out.line(format!(
            "{}: {} in {} chunks ({} unique, {} new{repaired}, {} zero), {} stored in {} new \
             packs ({} packs in all), {:.1} MB/s",
            args.index.display(),
            human_bytes(report.image_size),
            report.chunk_count,
            report.unique_chunks,
            report.new_chunks,
            report.zero_chunks,
            human_bytes(report.stored_bytes),
            report.new_packs,
            report.packs,
            report.image_size as f64 / secs.max(1e-9) / 1e6,
        ));
        out.line(format!("root hash {}", report.root_hash));
        if let Some(v) = &verity {
            out.line(format!("dm-verity root hash {}", v.verity_root_hash));
        }
    }
    Ok(ExitCode::SUCCESS)
}
