//! `tessera prune`: remove from a store what the kept indexes do not need.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use tessera_engine::store::prune::{prune, PruneOptions, DEFAULT_GRACE};

use crate::output::{human_bytes, Output};
use crate::store_args::StoreArgs;

/// Remove the packs and location files that no kept index needs, in two phases.
///
/// A chunk of a kept index is never deleted. A first prune condemns what is not needed:
/// packs holding no chunk of a kept index, and the location files of indexes not kept
/// (it writes STORE/trash/NAME markers holding the time; the files stay readable). A
/// later prune deletes what was condemned at least --grace ago and is still unneeded, and
/// takes back what a kept index needs again. So a sync or serve that started before a
/// prune, or a CDN still holding old location files, keeps working for the grace period:
/// choose it longer than your longest sync and your CDN's cache lifetime. Packs whose
/// live chunks fill less than half of them are repacked: the live chunks are copied into
/// new packs and the location files of kept indexes are rewritten (atomically) to point
/// there; signed indexes stay valid. Run prune regularly (e.g. daily) with every index
/// still in use.
///
/// A `make` into the same store may run at the same time, on another machine too: make
/// writes STORE/makes/ID while it runs, and prune deletes nothing then (a later prune
/// does); prune writes STORE/prunes/ID while it runs, and make waits for it before
/// publishing, then checks its packs (docs/STORES.md states the protocol). Run one prune
/// at a time. Local directories and s3:// stores (HTTP stores are read-only).
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    store: StoreArgs,
    /// Indexes (paths or URLs) whose chunks must stay; every other index loses its
    /// location data. At least one.
    #[arg(long, value_name = "INDEX", num_args = 1.., required = true)]
    keep: Vec<PathBuf>,
    /// How long a condemned file stays before a later prune deletes it: a number with s,
    /// m, h or d (seconds, minutes, hours, days); 0 deletes at the second prune.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
    grace: Duration,
    /// Print what would be condemned, repacked and deleted; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Parses `90`, `90s`, `30m`, `1h`, `7d`.
fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .with_context(|| format!("{s:?} is not a duration like 30m, 1h or 7d"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => anyhow::bail!("{s:?}: unknown unit {unit:?} (use s, m, h or d)"),
    };
    n.checked_mul(mult)
        .map(Duration::from_secs)
        .with_context(|| format!("{s:?} is too long"))
}

pub fn run(args: Args, out: &Output) -> anyhow::Result<ExitCode> {
    let store = args.store.open_for_write()?;
    let keep = args
        .keep
        .iter()
        .map(|spec| args.store.load_index(spec, "kept index"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let popts = PruneOptions {
        grace: args.grace,
        dry_run: args.dry_run,
        ..PruneOptions::default()
    };
    debug_assert_eq!(DEFAULT_GRACE, Duration::from_secs(3600));
    let report = prune(&*store, &keep, &popts)
        .with_context(|| format!("pruning store {}", args.store.shown()))?;
    if args.json {
        out.json(&report)?;
    } else {
        let would = if report.dry_run { "would be " } else { "" };
        out.line(format!(
            "{}: {} packs, {} live; {} packs {would}repacked into {}; {} packs and {} \
             location files {would}condemned; {} packs and {} location files {would}deleted \
             ({}); {} taken back",
            report.store,
            report.packs,
            report.live_packs,
            report.repacked_packs.len(),
            report.new_packs.len(),
            report.condemned_packs.len(),
            report.condemned_locations.len(),
            report.deleted_packs.len(),
            report.deleted_locations.len(),
            human_bytes(report.freed_bytes),
            report.rescued,
        ));
        if let Some(why) = &report.deferred {
            out.line(format!("deletion deferred: {why}"));
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86400)
        );
        assert!(parse_duration("1w").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
    }
}
