//! `tessera generate` (hidden): man pages and shell completions from the clap definitions,
//! for packagers (packaging/build-deb.sh).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::CommandFactory;
use clap_complete::Shell;

use crate::output::Output;

/// Write man pages or shell completions generated from tessera's own definitions.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// What to write: `man` (tessera.1 and tessera-COMMAND.1 for every command) or
    /// `completions` (tessera.bash, _tessera for zsh, tessera.fish).
    what: What,
    /// The directory to write into (created if missing).
    dir: PathBuf,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum What {
    Man,
    Completions,
}

pub fn run(args: Args, out: &Output) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let cmd = crate::Cli::command();
    match args.what {
        What::Man => clap_mangen::generate_to(cmd, &args.dir)
            .with_context(|| format!("writing man pages into {}", args.dir.display()))?,
        What::Completions => {
            for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
                let mut cmd = cmd.clone();
                clap_complete::generate_to(shell, &mut cmd, "tessera", &args.dir).with_context(
                    || format!("writing {shell} completions into {}", args.dir.display()),
                )?;
            }
        }
    }
    out.line(format!("wrote {:?} into {}", args.what, args.dir.display()));
    Ok(ExitCode::SUCCESS)
}
