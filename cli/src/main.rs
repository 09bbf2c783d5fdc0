//! `tessera`: make, sync, verify and serve content-defined chunked disk images.
//!
//! A thin front-end: each subcommand in `cmd/` turns its arguments into an engine call and
//! prints the result. Errors are printed with their whole cause chain; the exit code tells
//! an updater what kind of failure it was (see [`exit_code`] and docs/INTEGRATION.md).

mod cmd;
mod output;
mod remembered;
mod store_args;
mod trust_args;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser};

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
    max_term_width = 100,
    after_long_help = "Exit status: 0 success; 1 the target does not hold the image (or another \
                       failure); 2 usage; 3 retry later (network, store); 4 refused (untrusted \
                       index, corrupt data); 5 broken (local I/O); 6 invalid request. See \
                       docs/INTEGRATION.md."
)]
struct Cli {
    /// Print nothing but errors (and --json output).
    #[arg(short, long, global = true)]
    quiet: bool,
    /// How to show progress: `auto` draws a bar on stderr when it is a terminal, `json`
    /// writes one JSON event per line (phase, bytes, chunks, requests, ETA; the last one
    /// has phase `done`, see docs/PROGRESS.md) to stderr or --progress-fd, `none` shows
    /// nothing.
    #[arg(long, global = true, value_enum, value_name = "MODE", default_value_t = output::ProgressMode::Auto)]
    progress: output::ProgressMode,
    /// With --progress json: write the events to this open file descriptor (e.g. 3, opened
    /// by the caller with `3>FILE` or a pipe) instead of stderr.
    #[arg(long, global = true, value_name = "FD")]
    progress_fd: Option<u32>,
    #[command(subcommand)]
    command: cmd::Command,
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let name = matches.subcommand_name().unwrap_or("tessera").to_string();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let out = match output::Output::new(cli.quiet, cli.progress, cli.progress_fd, &name) {
        Ok(out) => out,
        Err(err) => {
            eprintln!("tessera: error: {err:#}");
            return ExitCode::from(EXIT_INVALID);
        }
    };
    match check_environment().and_then(|()| cmd::run(cli.command, &out)) {
        Ok(code) => {
            // 0 or a command's own verdict (verify: 1 when the target differs).
            let n = if code == ExitCode::SUCCESS { 0 } else { 1 };
            out.finish(n, None);
            code
        }
        Err(err) => {
            let code = exit_code(&err);
            out.finish(code, Some(format!("{err:#}")));
            eprintln!("tessera: error: {err:#}");
            ExitCode::from(code)
        }
    }
}

/// Exit status for a failure that should be retried later: the network or a remote store
/// failed (HTTP or S3 errors, timeouts), or the store lacks a chunk or file it should hold.
pub const EXIT_RETRY: u8 = 3;
/// Exit status for a refusal: the index is untrusted or malformed, or a store served bytes
/// that do not hash to what the index names. Retrying the same update will not help.
pub const EXIT_REFUSED: u8 = 4;
/// Exit status for a local I/O failure: the target, a seed, the journal or a local store
/// could not be read or written (a failing disk, a full file system, a permission).
pub const EXIT_BROKEN: u8 = 5;
/// Exit status for an impossible request: bad parameters, a target too small or mounted.
pub const EXIT_INVALID: u8 = 6;

/// Maps an error to its exit status by the kind of the first engine error in its chain:
/// 3 retry later, 4 refused, 5 broken (local I/O), 6 invalid input, and 1 for the rest (a
/// target that does not hold the image after all, or a failure of the CLI itself).
fn exit_code(err: &anyhow::Error) -> u8 {
    use tessera_engine::{Error, ErrorKind};
    let Some(e) = err.chain().find_map(|e| e.downcast_ref::<Error>()) else {
        return 1;
    };
    match e {
        Error::Io { .. } if e.is_remote() => EXIT_RETRY,
        Error::Io { .. } => EXIT_BROKEN,
        _ => match e.kind() {
            ErrorKind::MissingChunk => EXIT_RETRY,
            ErrorKind::Untrusted | ErrorKind::InvalidIndex | ErrorKind::CorruptChunk => {
                EXIT_REFUSED
            }
            ErrorKind::InvalidInput => EXIT_INVALID,
            _ => 1,
        },
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
