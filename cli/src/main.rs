//! `tessera`: make, sync, verify and serve content-defined chunked disk images.
//!
//! A thin front-end: each subcommand in `cmd/` turns its arguments into an engine call and
//! prints the result. Errors are printed with their whole cause chain; the exit code is 1
//! for failures, 2 for usage errors (clap's own).

mod cmd;
mod output;
mod remembered;
mod store_args;
mod trust_args;

use std::process::ExitCode;

use clap::Parser;

/// Ships disk images as content-defined, compressed, verified chunks.
///
/// An image (file or block device) is cut into chunks named by their BLAKE3 hash and
/// stored as static zstd files; a small index lists them. `sync` rebuilds the image into a
/// file or block device, `verify` checks one, `info` describes an index.
#[derive(Parser, Debug)]
#[command(
    name = "tessera",
    version,
    propagate_version = true,
    max_term_width = 100
)]
struct Cli {
    /// Print nothing but errors (and --json output).
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: cmd::Command,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let out = output::Output::new(cli.quiet);
    match check_environment().and_then(|()| cmd::run(cli.command, &out)) {
        Ok(code) => code,
        Err(err) => {
            out.finish_progress();
            eprintln!("tessera: error: {err:#}");
            ExitCode::from(1)
        }
    }
}

/// Environment knobs the engine reads are checked here, so a typo is an error rather than
/// silently ignored: `TESSERA_MAX_GAP` (bytes a coalesced range request may read through
/// between wanted chunks; for measurements, see `benches/chunk-sweep.sh`).
fn check_environment() -> anyhow::Result<()> {
    if let Some(v) = std::env::var_os("TESSERA_MAX_GAP") {
        let v = v.to_string_lossy();
        tessera_engine::parse_size(&v)
            .map_err(|e| anyhow::anyhow!("TESSERA_MAX_GAP={v:?}: {e}"))?;
    }
    Ok(())
}
