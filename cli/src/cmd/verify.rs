//! `tessera verify`: check that a target holds exactly an image.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::output::Output;
use crate::trust_args::TrustArgs;

/// Check that TARGET holds exactly the image of INDEX.
///
/// Every chunk of the target is hashed and compared with the index. Exit status 0 means
/// the first image-size bytes of TARGET are the image; 1 means they are not (or it could
/// not be read). Bytes past the image's end are ignored.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The index file: a tessera index or a casync .caibx (docs/CASYNC.md).
    index: PathBuf,
    /// File or block device to check, or `-` to read the image from stdin (read once, in
    /// order, up to the image's size).
    target: PathBuf,
    #[command(flatten)]
    trust: TrustArgs,
    /// Print the result as JSON (`ok` says whether it matched).
    #[arg(long)]
    json: bool,
}

#[derive(serde::Serialize)]
struct Json<'a> {
    ok: bool,
    #[serde(flatten)]
    report: &'a tessera_engine::VerifyReport,
}

pub fn run(args: Args, out: &Output) -> anyhow::Result<ExitCode> {
    let index = args.trust.load_index(&args.index)?;
    anyhow::ensure!(
        !(args.target.as_os_str() == "-" && std::io::stdin().is_terminal()),
        "`verify INDEX -` reads the image from stdin, which is a terminal: pipe it in"
    );
    let report = if args.target.as_os_str() == "-" {
        tessera_engine::verify_stream(&index, &mut std::io::stdin(), "stdin", out)?
    } else {
        tessera_engine::verify(&index, &args.target, out)?
    };
    let shown = if args.target.as_os_str() == "-" {
        PathBuf::from("stdin")
    } else {
        args.target.clone()
    };
    let ok = report.ok();
    if args.json {
        out.json(&Json {
            ok,
            report: &report,
        })?;
    } else if ok {
        out.line(format!(
            "{}: OK, {} chunks match {}",
            shown.display(),
            report.chunk_count,
            args.index.display()
        ));
    }
    match report.check(&shown) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(mismatch) => {
            eprintln!("tessera: {mismatch} of {}", args.index.display());
            Ok(ExitCode::from(1))
        }
    }
}
