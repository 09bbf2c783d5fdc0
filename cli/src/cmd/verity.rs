//! `tessera verity`: write the dm-verity hash tree of an image.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use tessera_engine::trust::{build_verity, parse_hex, VerityOptions};

use crate::output::Output;
use crate::trust_args::TrustArgs;

/// Write a dm-verity hash tree for the image of INDEX held by TARGET.
///
/// The tree is standard dm-verity (format 1, SHA-256, 4096-byte blocks, with superblock),
/// byte-identical to `veritysetup format` for the same data, salt and UUID, so the kernel
/// can keep checking the partition at every read: `veritysetup open TARGET NAME HASHFILE
/// ROOT`. Every chunk of TARGET is checked against the index while it is read: the tree
/// only ever describes the published image. Prints the dm-verity root hash alone on the
/// last line (even with --quiet, for scripts).
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The index of the image.
    index: PathBuf,
    /// File or block device holding the image.
    target: PathBuf,
    /// Where to write the hash tree: a file (replaced atomically; a symbolic link is
    /// refused) or a block device (also named through a link, such as /dev/mapper/NAME).
    #[arg(long, value_name = "OUT")]
    hash_file: PathBuf,
    /// Salt in hex, at most 256 bytes [default: the index's root hash, so the same
    /// image always gives the same tree].
    #[arg(long, value_name = "HEX")]
    salt: Option<String>,
    #[command(flatten)]
    trust: TrustArgs,
    /// Print the result as JSON (`verity_root_hash`, `salt`, `uuid`, `data_blocks`...).
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args, out: &Output) -> anyhow::Result<ExitCode> {
    let index = args.trust.load_index(&args.index)?;
    let salt = args
        .salt
        .as_deref()
        .map(|s| parse_hex(s, "--salt"))
        .transpose()?;
    let options = VerityOptions { salt, uuid: None };
    let report = build_verity(&index, &args.target, &args.hash_file, &options, out)
        .with_context(|| format!("building the dm-verity tree of {}", args.target.display()))?;
    if args.json {
        out.json(&report)?;
    } else {
        out.line(format!(
            "{}: dm-verity tree of {} blocks, salt {}",
            report.hash_file.display(),
            report.data_blocks,
            report.salt
        ));
        println!("{}", report.verity_root_hash);
    }
    Ok(ExitCode::SUCCESS)
}
