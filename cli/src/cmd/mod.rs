//! One module per subcommand: arguments in, one engine call, result out.

mod attach;
mod check;
mod commit;
mod generate;
mod import;
mod info;
mod keygen;
mod make;
mod prune;
mod serve;
mod sign;
mod sync;
mod verify;
mod verity;

use std::process::ExitCode;

use clap::Subcommand;

use crate::output::Output;

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    Make(make::Args),
    Check(check::Args),
    Prune(prune::Args),
    Commit(commit::Args),
    Serve(serve::Args),
    Sync(sync::Args),
    Verify(verify::Args),
    Info(info::Args),
    Keygen(keygen::Args),
    Sign(sign::Args),
    Verity(verity::Args),
    Import(import::Args),
    Attach(attach::Args),
    Detach(attach::DetachArgs),
    #[command(hide = true)]
    Generate(generate::Args),
}

/// Runs a subcommand; `Ok` carries the exit code.
pub fn run(command: Command, out: &Output) -> anyhow::Result<ExitCode> {
    match command {
        Command::Make(args) => make::run(args, out),
        Command::Check(args) => check::run(args, out),
        Command::Prune(args) => prune::run(args, out),
        Command::Commit(args) => commit::run(args, out),
        Command::Serve(args) => serve::run(args, out),
        Command::Sync(args) => sync::run(args, out),
        Command::Verify(args) => verify::run(args, out),
        Command::Info(args) => info::run(args, out),
        Command::Keygen(args) => keygen::run(args, out),
        Command::Sign(args) => sign::run(args, out),
        Command::Verity(args) => verity::run(args, out),
        Command::Import(args) => import::run(args, out),
        Command::Attach(args) => attach::run(args, out),
        Command::Detach(args) => attach::run_detach(args, out),
        Command::Generate(args) => generate::run(args, out),
    }
}
