//! `tessera sync`: write an image into a file or block device.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use tessera_engine::trust::{build_verity, VerityOptions, VerityReport};

use crate::output::{human_bytes, Output};
use crate::store_args::StoreArgs;
use crate::trust_args::TrustArgs;

/// Write the image of INDEX into TARGET, then verify every chunk of it.
///
/// TARGET is a file (created if missing; zero chunks become holes) or a block device.
/// It must be at least as large as the image; bytes past the image are left untouched.
/// Success is reported only after the whole target was read back and hashed.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The index of the image to write: a path or an http(s):// or s3:// URL.
    index: PathBuf,
    /// File or block device to write.
    target: PathBuf,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    trust: TrustArgs,
    /// After the sync, write the dm-verity hash tree of TARGET here (see `tessera verity`;
    /// the salt is the index's root hash).
    #[arg(long, value_name = "OUT")]
    verity_hash_file: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(serde::Serialize)]
struct Json<'a> {
    #[serde(flatten)]
    report: &'a tessera_engine::SyncReport,
    #[serde(skip_serializing_if = "Option::is_none")]
    verity: Option<&'a VerityReport>,
}

pub fn run(args: Args, out: &Output) -> anyhow::Result<ExitCode> {
    let index = args.trust.load_index(args.store.fetch_index(&args.index)?.path())?;
    let store = args.store.open()?;
    let started = Instant::now();
    let report = tessera_engine::sync(&index, &args.target, &store, out)
        .with_context(|| format!("syncing {}", args.target.display()))?;
    let verity = args
        .verity_hash_file
        .as_deref()
        .map(|f| build_verity(&index, &args.target, f, &VerityOptions::default(), out))
        .transpose()
        .context("writing the dm-verity hash tree")?;
    if args.json {
        out.json(&Json {
            report: &report,
            verity: verity.as_ref(),
        })?;
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
        if let Some(v) = &verity {
            out.line(format!("dm-verity root hash {}", v.verity_root_hash));
        }
    }
    Ok(ExitCode::SUCCESS)
}
