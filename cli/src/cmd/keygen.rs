//! `tessera keygen`: create a key pair for signing indexes.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::output::Output;

/// Create a minisign key pair for signing indexes.
///
/// The secret key is written unencrypted (mode 0600 whatever the umask), for automated
/// release pipelines; keep it off the devices. Each file is written whole and synced
/// before it appears under its name; a symbolic link at either path is refused. The public key goes to every device or
/// host, which then passes it as --trusted-key. Both files are standard minisign keys:
/// `minisign -S -s SEC` and `minisign -V -p PUB` accept them.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Where to write the secret key.
    #[arg(long, value_name = "SEC")]
    secret_key: PathBuf,
    /// Where to write the public key.
    #[arg(long, value_name = "PUB")]
    public_key: PathBuf,
    /// Replace existing key files.
    #[arg(long)]
    force: bool,
    /// Print the result as JSON (`key_id`, `public_key`).
    #[arg(long)]
    json: bool,
}

#[derive(serde::Serialize)]
struct Json {
    key_id: String,
    public_key: PathBuf,
    secret_key: PathBuf,
}

pub fn run(args: Args, out: &Output) -> anyhow::Result<ExitCode> {
    let id =
        tessera_engine::trust::generate_keypair(&args.secret_key, &args.public_key, args.force)?;
    if args.json {
        out.json(&Json {
            key_id: id.to_string(),
            public_key: args.public_key,
            secret_key: args.secret_key,
        })?;
    } else {
        out.line(format!(
            "key {id}: public key {}, secret key {} (unencrypted)",
            args.public_key.display(),
            args.secret_key.display()
        ));
    }
    Ok(ExitCode::SUCCESS)
}
