//! `tessera sign`: sign an index.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use tessera_engine::trust::{sign_index_file, signature_path, SigningKey};

use crate::output::Output;

/// Environment variable holding the password of a password-protected secret key.
const PASSWORD_ENV: &str = "TESSERA_SECRET_KEY_PASSWORD";

/// Sign an index, writing a minisign signature (INDEX.minisig by default).
///
/// The signature's trusted comment carries the index's root hash and, with --version,
/// the image version that `--min-version` checks to refuse rollbacks. `minisign -V -p PUB
/// -m INDEX` verifies the result. Keys from `tessera keygen` (or `minisign -G -W`) are
/// unencrypted; for a password-protected minisign key, put the password in the
/// TESSERA_SECRET_KEY_PASSWORD environment variable.
#[derive(clap::Args, Debug)]
// `--version` is the image version here, not tessera's.
#[command(disable_version_flag = true)]
pub struct Args {
    /// The index to sign (it is checked to be a valid index first).
    index: PathBuf,
    /// The secret key.
    #[arg(long, value_name = "SEC")]
    secret_key: PathBuf,
    /// The image version to sign into the trusted comment (a whole number that grows
    /// with every release).
    #[arg(long, value_name = "N")]
    version: Option<u64>,
    /// Where to write the signature [default: INDEX.minisig].
    #[arg(long, value_name = "FILE")]
    signature: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args, out: &Output) -> anyhow::Result<ExitCode> {
    let password = std::env::var(PASSWORD_ENV).ok();
    let key = SigningKey::load(&args.secret_key, password)
        .with_context(|| format!("(a password-protected key needs {PASSWORD_ENV})"))?;
    let sig = args
        .signature
        .unwrap_or_else(|| signature_path(&args.index));
    let report = sign_index_file(&args.index, &key, args.version, &sig)
        .with_context(|| format!("signing {}", args.index.display()))?;
    if args.json {
        out.json(&report)?;
    } else {
        out.line(format!(
            "{}: signed by key {}, trusted comment: {}",
            report.signature.display(),
            report.key_id,
            report.trusted_comment.replace('\t', " ")
        ));
    }
    Ok(ExitCode::SUCCESS)
}
