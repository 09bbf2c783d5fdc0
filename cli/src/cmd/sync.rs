//! `tessera sync`: write an image into a file or block device, in place.

use std::io::{BufWriter, IsTerminal};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use tessera_engine::sync::{sync_stream, DEFAULT_SCRATCH_SIZE};
use tessera_engine::trust::{build_verity, load_index, VerityOptions, VerityReport};
use tessera_engine::{SeedSpec, SyncOptions, SyncReport, TrustPolicy};

use crate::output::{human_bytes, Output};
use crate::remembered;
use crate::store_args::{parse_size, StoreArgs};
use crate::trust_args::TrustArgs;

/// Write the image of INDEX into TARGET in place, then verify every chunk of it.
///
/// TARGET is a file (created if missing, grown if shorter than the image; zero chunks
/// become holes) or a block device, which must be at least as large as the image and not
/// mounted (see --force). Bytes past the image are left untouched.
/// Every chunk TARGET or a seed already holds is reused (chunks already in place are not
/// written at all); only the rest is fetched from the store. Everything read from TARGET,
/// a seed or the store is hashed before it is written.
///
/// A sync killed at any moment (including a power cut) is completed by running the same
/// command again: it resumes from its journal. Success is reported only after every chunk
/// of TARGET was hashed against the index.
///
/// TARGET `-` streams the image to stdout in order instead (for `ubiupdatevol`, flashers,
/// handler chains): seeds are still used, every chunk is hashed before it is written, and
/// the whole image's hash is checked at the end. A failure can come after part of the
/// image was written: the consumer must keep what it received only if tessera exits 0
/// (docs/INTEGRATION.md). The summary goes to stderr then.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The index of the image to write: a path or an http(s):// or s3:// URL. A casync
    /// .caibx is read too, with its casync store (.castr) as --store; its chunks are
    /// checked against its SHA-512/256 or SHA-256 ids (docs/CASYNC.md).
    index: PathBuf,
    /// File or block device to write, or `-` for stdout.
    target: PathBuf,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    in_place: InPlaceArgs,
    #[command(flatten)]
    trust: TrustArgs,
    /// After the sync, write the dm-verity hash tree of TARGET here (see `tessera verity`;
    /// the salt is the index's root hash).
    #[arg(long, value_name = "OUT")]
    verity_hash_file: Option<PathBuf>,
    /// Print the result as JSON (on stderr when TARGET is `-`).
    #[arg(long)]
    json: bool,
}

/// Seeds, planning and crash safety.
#[derive(clap::Args, Debug)]
#[command(next_help_heading = "Seeds and in-place updates")]
struct InPlaceArgs {
    /// A file or block device that may hold chunks of the image (e.g. the other A/B slot);
    /// it is scanned with the image's chunk sizes. Repeatable. TARGET is always a seed.
    #[arg(long, value_name = "PATH")]
    seed: Vec<PathBuf>,
    /// A seed whose index is known: it is not scanned, each chunk is still hashed when
    /// read. PATH may be TARGET itself (its current release). Repeatable.
    #[arg(long, value_name = "PATH=INDEX", value_parser = parse_seed_index)]
    seed_index: Vec<(PathBuf, PathBuf)>,
    /// Plan and print what would be done, change nothing: with the compressed bytes and
    /// requests the sync would download from the store (frames and the gaps coalesced
    /// range requests read through; HTTP headers not counted). See --json.
    #[arg(long)]
    dry_run: bool,
    /// Refuse, before TARGET is created or opened for writing and before any journal is
    /// written, when the sync would download more than SIZE compressed bytes from the
    /// store (K, M, G suffixes), as --dry-run counts them. The plan is made twice then
    /// (TARGET and seeds are scanned twice).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    max_download: Option<u64>,
    /// The resume journal [default: .TARGET.tessera-journal beside a file target; for a
    /// block device, under $TESSERA_STATE_DIR or ~/.local/state/tessera].
    #[arg(long, value_name = "PATH")]
    journal: Option<PathBuf>,
    /// Memory for breaking cycles of moves within TARGET (K, M, G suffixes); moves that
    /// do not fit are fetched from the store instead [default: a quarter of --max-memory,
    /// at most 16M]. More than a quarter of --max-memory is refused.
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    scratch_size: Option<u64>,
    /// Memory budget of the sync (K, M, G suffixes; at least 8M): bounds together the
    /// scan's buffers (half of it), the scratch (a quarter), the requests in flight and
    /// fetched chunks waiting (an eighth of it counted in compressed bytes, whatever
    /// --jobs says: requests beyond it wait), the chunks read ahead of the writes (an
    /// eighth) and, with TARGET `-`, the chunks kept for their repeats (a quarter). Peak
    /// memory is about this plus 8 MiB for the program, the index and the plan
    /// (docs/SYNC.md, "Memory"). A smaller budget makes more, smaller requests.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "64M")]
    max_memory: u64,
    /// Scan TARGET and every --seed even when tessera remembers what they hold. By
    /// default, a verified sync records the index TARGET then holds in the state
    /// directory ($TESSERA_STATE_DIR or ~/.local/state/tessera, in seeds/), and a later
    /// sync plans from that record instead of scanning TARGET (or the slot given as
    /// --seed), when the record still matches the device (path, device or inode, size,
    /// file modification time, and a sample of its chunks); every chunk is still hashed
    /// when read.
    #[arg(long)]
    rescan: bool,
    /// Write into a block device even while it is mounted or claimed by the kernel
    /// (device-mapper, RAID, swap). Without it such a device is refused: a mounted file
    /// system keeps writing its own blocks (at the latest its superblock at unmount) over
    /// the new image, and reads garbage while the image changes under it. Use it only if
    /// nothing will write to the device any more.
    #[arg(long)]
    force: bool,
}

impl InPlaceArgs {
    fn options(&self) -> anyhow::Result<SyncOptions> {
        tessera_engine::sync::memory::set_max_memory(self.max_memory).context("--max-memory")?;
        let scratch_size = match self.scratch_size {
            Some(s) => {
                tessera_engine::sync::memory::check_scratch(s).context("--scratch-size")?;
                s
            }
            None => DEFAULT_SCRATCH_SIZE.min(tessera_engine::sync::memory::max_scratch()),
        };
        let mut seeds: Vec<SeedSpec> = self
            .seed
            .iter()
            .map(|p| SeedSpec {
                path: p.clone(),
                index: None,
            })
            .collect();
        for (path, index) in &self.seed_index {
            // A tessera index or a casync .caibx.
            let (index, _) = load_index(index, None, &TrustPolicy::default())
                .with_context(|| format!("--seed-index for {}", path.display()))?;
            seeds.push(SeedSpec {
                path: path.clone(),
                index: Some(index),
            });
        }
        Ok(SyncOptions {
            seeds,
            journal: self.journal.clone(),
            dry_run: self.dry_run,
            scratch_size,
            force: self.force,
            max_download: self.max_download,
            ..SyncOptions::default()
        })
    }
}

/// Plans from the remembered indexes of TARGET and of each --seed without one given.
fn recall_seeds(opts: &mut SyncOptions, target: &Path, out: &Output) {
    let journal = opts
        .journal
        .clone()
        .unwrap_or_else(|| tessera_engine::sync::default_journal_path(target));
    let pending = journal.exists();
    let note = |m: String| out.note(m);
    let same = |a: &Path, b: &Path| match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    for seed in opts.seeds.iter_mut().filter(|s| s.index.is_none()) {
        seed.index = remembered::recall(&seed.path, pending, &note);
    }
    let target_known = opts
        .seeds
        .iter()
        .any(|s| s.index.is_some() && same(&s.path, target));
    if !target_known {
        if let Some(index) = remembered::recall(target, pending, &note) {
            opts.seeds.push(SeedSpec {
                path: target.to_path_buf(),
                index: Some(index),
            });
        }
    }
}

/// Parses `PATH=INDEX` (split at the first `=`).
fn parse_seed_index(s: &str) -> Result<(PathBuf, PathBuf), String> {
    match s.split_once('=') {
        Some((p, i)) if !p.is_empty() && !i.is_empty() => Ok((p.into(), i.into())),
        _ => Err(format!("expected PATH=INDEX, got {s:?}")),
    }
}

#[derive(serde::Serialize)]
struct Json<'a> {
    #[serde(flatten)]
    report: &'a SyncReport,
    #[serde(skip_serializing_if = "Option::is_none")]
    verity: Option<&'a VerityReport>,
}

pub fn run(args: Args, out: &Output) -> anyhow::Result<ExitCode> {
    if args.target.as_os_str() == "-" {
        return run_stream(args, out);
    }
    let index = args.trust.load(&args.store.fetch_index(&args.index)?)?;
    let store = args.store.chunks(args.store.open()?, &index)?;
    let mut opts = args.in_place.options()?;
    if !args.in_place.rescan {
        recall_seeds(&mut opts, &args.target, out);
    }
    let started = Instant::now();
    let report = tessera_engine::sync_with(&index, &args.target, &*store, &opts, out)
        .with_context(|| format!("syncing {}", args.target.display()))?;
    if !report.dry_run {
        if let Err(e) = remembered::remember(&args.target, &index) {
            out.note(format!(
                "warning: could not remember the index of {} (the next sync scans it): \
                 {e:#}",
                args.target.display()
            ));
        }
    }
    let verity = match &args.verity_hash_file {
        Some(f) if !report.dry_run => Some(
            build_verity(&index, &args.target, f, &VerityOptions::default(), out)
                .context("writing the dm-verity hash tree")?,
        ),
        _ => None,
    };
    if args.json {
        out.json(&Json {
            report: &report,
            verity: verity.as_ref(),
        })?;
        return Ok(ExitCode::SUCCESS);
    }
    let r = &report;
    let sources = format!(
        "{} in place, {} from seeds, {} moved, {} fetched in {} chunks ({} downloaded in {} \
         requests)",
        human_bytes(r.bytes_in_place),
        human_bytes(r.bytes_from_seeds),
        human_bytes(r.bytes_moved),
        human_bytes(r.bytes_fetched),
        r.chunks_fetched,
        human_bytes(r.bytes_downloaded),
        r.requests,
    );
    if r.dry_run {
        out.line(format!(
            "{}: would write {} of {} in {} phases: {sources}; nothing changed{}",
            args.target.display(),
            human_bytes(r.bytes_written),
            human_bytes(r.image_size),
            r.phases,
            if r.resumed {
                " (an interrupted sync would be resumed)"
            } else {
                ""
            },
        ));
    } else {
        out.line(format!(
            "{}: {} verified in {:.2}s, {} written: {sources}{}",
            args.target.display(),
            human_bytes(r.image_size),
            started.elapsed().as_secs_f64(),
            human_bytes(r.bytes_written),
            if r.resumed {
                "; resumed an interrupted sync"
            } else {
                ""
            },
        ));
    }
    if let Some(v) = &verity {
        out.line(format!("dm-verity root hash {}", v.verity_root_hash));
    }
    Ok(ExitCode::SUCCESS)
}

/// `sync INDEX -`: the image to stdout, in order.
fn run_stream(args: Args, out: &Output) -> anyhow::Result<ExitCode> {
    let p = &args.in_place;
    for (flag, given) in [
        ("--dry-run", p.dry_run),
        ("--max-download", p.max_download.is_some()),
        ("--journal", p.journal.is_some()),
        ("--scratch-size", p.scratch_size.is_some()),
        ("--force", p.force),
        ("--rescan", p.rescan),
        ("--verity-hash-file", args.verity_hash_file.is_some()),
    ] {
        anyhow::ensure!(
            !given,
            "{flag} does not apply to `sync INDEX -` (a stream to stdout: nothing to plan in \
             place, resume, remember or hash again)"
        );
    }
    let stdout = std::io::stdout();
    anyhow::ensure!(
        !stdout.is_terminal(),
        "refusing to write a binary image to a terminal: redirect stdout or pipe it"
    );
    let index = args.trust.load(&args.store.fetch_index(&args.index)?)?;
    let store = args.store.chunks(args.store.open()?, &index)?;
    let seeds = p.options()?.seeds;
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let started = Instant::now();
    let mut sink = BufWriter::with_capacity(1 << 20, stdout.lock());
    let report = sync_stream(&index, &mut sink, "stdout", &*store, &seeds, workers, out)
        .context("streaming the image to stdout")?;
    if args.json {
        out.finish_progress();
        eprintln!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    let r = &report;
    out.note(format!(
        "stdout: {} written and verified in {:.2}s: {} from seeds, {} zero, {} fetched in {} \
         chunks ({} downloaded in {} requests)",
        human_bytes(r.image_size),
        started.elapsed().as_secs_f64(),
        human_bytes(r.bytes_from_seeds),
        human_bytes(r.bytes_zero),
        human_bytes(r.bytes_fetched),
        r.chunks_fetched,
        human_bytes(r.bytes_downloaded),
        r.requests,
    ));
    Ok(ExitCode::SUCCESS)
}
