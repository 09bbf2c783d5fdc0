//! `tessera info`: describe an index.

use std::path::PathBuf;
use std::process::ExitCode;

use serde::Serialize;
use tessera_engine::index::hex;
use tessera_engine::{ChunkerParams, Index};

use crate::output::{human_bytes, Output};

/// Describe an index: image size, chunking, hashes.
///
/// The root hash is the BLAKE3 of the index file: pin it to trust every byte of the image.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The index file.
    index: PathBuf,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Info {
    format_version: u32,
    image_size: u64,
    chunk_count: u64,
    unique_chunks: u64,
    zero_chunks: u64,
    chunker: ChunkerParams,
    image_hash: String,
    root_hash: String,
}

pub fn run(args: Args, out: &Output) -> anyhow::Result<ExitCode> {
    let index = Index::load(&args.index)?;
    let mut ids: Vec<_> = index
        .chunks()
        .iter()
        .filter(|c| !c.zero)
        .map(|c| c.id)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let info = Info {
        format_version: index.version(),
        image_size: index.image_size(),
        chunk_count: index.chunks().len() as u64,
        unique_chunks: ids.len() as u64,
        zero_chunks: index.chunks().iter().filter(|c| c.zero).count() as u64,
        chunker: index.params(),
        image_hash: hex(&index.image_hash()),
        root_hash: hex(&index.root_hash()),
    };
    if args.json {
        out.json(&info)?;
    } else {
        out.line(format!("index          {}", args.index.display()));
        out.line(format!("format         v{}", info.format_version));
        out.line(format!(
            "image size     {} ({} bytes)",
            human_bytes(info.image_size),
            info.image_size
        ));
        out.line(format!(
            "chunks         {} ({} unique, {} zero)",
            info.chunk_count, info.unique_chunks, info.zero_chunks
        ));
        out.line(format!(
            "chunker        FastCDC 2020, min {} avg {} max {}",
            info.chunker.min, info.chunker.avg, info.chunker.max
        ));
        if index.image_hash() == [0; 32] {
            // An index written by `commit`, or a casync one: no image hash recorded.
            out.line("image hash     not recorded");
        } else {
            out.line(format!("image hash     {}", info.image_hash));
        }
        out.line(format!("root hash      {}", info.root_hash));
    }
    Ok(ExitCode::SUCCESS)
}
