//! `tessera sync`: write an image into a file or block device.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use tessera_engine::{Index, LocalStore};

use crate::output::{human_bytes, Output};

/// Write the image of INDEX into TARGET, then verify every chunk of it.
///
/// TARGET is a file (created if missing; zero chunks become holes) or a block device.
/// It must be at least as large as the image; bytes past the image are left untouched.
/// Success is reported only after the whole target was read back and hashed.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The index of the image to write.
    index: PathBuf,
    /// File or block device to write.
    target: PathBuf,
    /// Chunk store directory.
    #[arg(long, value_name = "DIR")]
    store: PathBuf,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args, out: &Output) -> anyhow::Result<ExitCode> {
    let index = Index::load(&args.index)?;
    let store = LocalStore::open(&args.store, false)?;
    let started = Instant::now();
    let report = tessera_engine::sync(&index, &args.target, &store, out)
        .with_context(|| format!("syncing {}", args.target.display()))?;
    if args.json {
        out.json(&report)?;
    } else {
        out.line(format!(
            "{}: {} written and verified in {:.2}s ({} fetched in {} chunks, {} downloaded)",
            args.target.display(),
            human_bytes(report.image_size),
            started.elapsed().as_secs_f64(),
            human_bytes(report.bytes_fetched),
            report.chunks_fetched,
            human_bytes(report.bytes_downloaded),
        ));
    }
    Ok(ExitCode::SUCCESS)
}
