//! `tessera check`: read a store's packs back and verify every chunk.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use tessera_engine::store::check::check;

use crate::output::{human_bytes, Output};
use crate::store_args::StoreArgs;

/// Verify a store: every chunk of every pack, or of the given indexes.
///
/// Each pack read is verified whole: its name must be the BLAKE3 hash of its bytes, its
/// table of contents must be well formed, and every chunk's zstd frame must decompress to
/// the length the table gives and hash to the chunk's id. With INDEX arguments, only the
/// packs their location files (STORE/locations/ROOT.tloc) name are read, and each location
/// file must exist, parse, and point at a frame holding the right chunk. Without INDEX,
/// every pack of the store is read: the store must be listable (a directory or s3://); an
/// HTTP store cannot be listed, so checking one needs INDEX arguments.
///
/// Every problem is printed with the chunk id, the pack and the offset concerned. Exit
/// status 0: nothing wrong; 1: something is missing or corrupt (listed), or the check
/// could not run (an error says why).
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    store: StoreArgs,
    /// Indexes (paths or URLs) whose chunks and location files to check [default: every
    /// pack of the store].
    #[arg(value_name = "INDEX")]
    indexes: Vec<PathBuf>,
    /// Print the report as JSON (`ok` says whether the store is intact; `problems` lists
    /// each with its `kind`, `chunk`, `pack`, `offset`, `index` and `detail`).
    #[arg(long)]
    json: bool,
}

#[derive(serde::Serialize)]
struct Json<'a> {
    ok: bool,
    #[serde(flatten)]
    report: &'a tessera_engine::store::check::CheckReport,
}

pub fn run(args: Args, out: &Output) -> anyhow::Result<ExitCode> {
    let store = args.store.open_single("check")?;
    let indexes = args
        .indexes
        .iter()
        .map(|spec| args.store.load_index(spec, "index"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let report = check(&*store, &indexes)
        .with_context(|| format!("checking store {}", args.store.shown()))?;
    let ok = report.ok();
    if args.json {
        out.json(&Json {
            ok,
            report: &report,
        })?;
    } else {
        out.line(format!(
            "{}: {} packs, {} chunks, {} read: {}",
            report.store,
            report.packs,
            report.chunks,
            human_bytes(report.bytes_read),
            if ok {
                "OK".to_string()
            } else {
                format!("{} problems", report.problems.len())
            }
        ));
    }
    if !args.json {
        for p in &report.problems {
            eprintln!("tessera: {}", p.detail);
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
