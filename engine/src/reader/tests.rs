use std::path::Path;
use std::sync::Arc;

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::pack::{parse_toc, toc_tail_len};
use crate::store::{pack_path, PackFetcher, StoreRead};
use crate::{make, ErrorKind, LocalStore, MakeOptions, NoProgress};

/// 3 MiB of random bytes with 1 MiB of zeros in the middle.
fn image() -> Vec<u8> {
    let mut data = vec![0u8; 3 << 20];
    ChaCha8Rng::seed_from_u64(7).fill_bytes(&mut data);
    data[(1 << 20)..(2 << 20)].fill(0);
    data
}

struct Fixture {
    _dir: tempfile::TempDir,
    data: Vec<u8>,
    index: Index,
    store: LocalStore,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let data = image();
    let img = dir.path().join("img");
    std::fs::write(&img, &data).unwrap();
    let store = LocalStore::open(dir.path().join("store"), true).unwrap();
    let (index, _) = make(
        &img,
        &store,
        &dir.path().join("img.tidx"),
        &MakeOptions::default(),
        &NoProgress,
    )
    .unwrap();
    Fixture {
        _dir: dir,
        data,
        index,
        store,
    }
}

fn reader(f: &Fixture, options: ReaderOptions) -> ImageReader {
    let store = Arc::new(f.store.clone());
    let chunks = PackFetcher::open(store, &f.index).unwrap();
    ImageReader::new(f.index.clone(), Arc::new(chunks), options)
}

/// Flips a byte in the middle of the frame of chunk `id` in its pack.
fn damage_frame(store: &LocalStore, id: &crate::ChunkId) {
    for pack in store.list_packs().unwrap() {
        let path = store.path_of(&pack_path(&pack));
        let mut bytes = std::fs::read(&path).unwrap();
        let size = bytes.len() as u64;
        let tail = toc_tail_len(&bytes[bytes.len() - 8..], size, "p").unwrap();
        let toc = parse_toc(&bytes[(size - tail) as usize..], size, "p").unwrap();
        if let Some(e) = toc.iter().find(|e| e.id == *id) {
            bytes[(e.offset + u64::from(e.clen) / 2) as usize] ^= 0x55;
            std::fs::write(&path, bytes).unwrap();
            return;
        }
    }
    panic!("chunk {id} is in no pack");
}

#[test]
fn random_reads_match_the_image() {
    let f = fixture();
    let r = reader(&f, ReaderOptions::default());
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for _ in 0..200 {
        let off = rng.gen_range(0..f.data.len() as u64);
        let len = rng.gen_range(1..=(f.data.len() as u64 - off).min(300_000)) as usize;
        let mut buf = vec![0xAA; len];
        r.read_at(off, &mut buf).unwrap();
        assert!(
            buf == f.data[off as usize..off as usize + len],
            "read {len} at {off}"
        );
    }
    let mut buf = [0u8; 2];
    let err = r.read_at(f.data.len() as u64 - 1, &mut buf).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert!(r.read_at(u64::MAX, &mut buf).is_err());
}

#[test]
fn zero_chunks_need_no_store_and_show_as_runs() {
    let f = fixture();
    let r = reader(
        &f,
        ReaderOptions {
            prefetch_threads: 0,
            ..Default::default()
        },
    );
    let runs = r.runs(0, f.data.len() as u64).unwrap();
    assert_eq!(runs.iter().map(|x| x.len).sum::<u64>(), f.data.len() as u64);
    let zero: u64 = runs.iter().filter(|x| x.zero).map(|x| x.len).sum();
    assert!(zero >= 512 << 10, "zero runs {runs:?}");
    // The middle of the zero region is read without touching the store.
    let mut buf = vec![1u8; 64 << 10];
    r.read_at(3 << 19, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    assert_eq!(r.stats().fetches, 0);
}

#[test]
fn corrupt_chunk_fails_only_its_range_and_names_its_id() {
    let f = fixture();
    let victim = f
        .index
        .chunks()
        .iter()
        .find(|c| !c.zero && c.offset > 0)
        .copied()
        .unwrap();
    damage_frame(&f.store, &victim.id);
    let r = reader(
        &f,
        ReaderOptions {
            prefetch_threads: 0,
            ..Default::default()
        },
    );
    let mut buf = vec![0u8; 100];
    let err = r.read_at(victim.offset + 5, &mut buf).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::CorruptChunk);
    assert!(err.to_string().contains(&victim.id.to_string()), "{err}");
    // Not cached: the next read fails again.
    assert!(r.read_at(victim.offset, &mut buf).is_err());
    let mut before = vec![0u8; victim.offset as usize];
    r.read_at(0, &mut before).unwrap();
    assert!(before == f.data[..victim.offset as usize]);
}

#[test]
fn cache_stays_within_its_size_and_serves_repeats() {
    let f = fixture();
    let limit = 512 << 10;
    let r = reader(
        &f,
        ReaderOptions {
            cache_bytes: limit,
            prefetch_threads: 0,
            ..Default::default()
        },
    );
    let mut buf = vec![0u8; f.data.len()];
    r.read_at(0, &mut buf).unwrap();
    assert!(buf == f.data);
    let s = r.stats();
    assert!(s.cached_bytes <= limit, "{s:?}");
    let fetched = s.fetches;
    let mut small = vec![0u8; 1000];
    r.read_at(f.data.len() as u64 - 1000, &mut small).unwrap();
    r.read_at(f.data.len() as u64 - 1000, &mut small).unwrap();
    assert_eq!(r.stats().fetches, fetched, "the tail is still cached");
}

#[test]
fn read_ahead_and_prefetch_fill_the_cache() {
    let f = fixture();
    let r = reader(&f, ReaderOptions::default());
    let mut buf = vec![0u8; 4096];
    r.read_at(0, &mut buf).unwrap();
    r.read_at(4096, &mut buf).unwrap();
    r.prefetch(2 << 20, 1 << 20).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while r.stats().fetches < 10 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let before = r.stats();
    let mut tail = vec![0u8; 1 << 20];
    r.read_at(2 << 20, &mut tail).unwrap();
    assert!(tail == f.data[2 << 20..]);
    assert!(before.fetches >= 10, "{before:?}");
}

#[test]
fn overlay_merges_writes_and_survives_reopen() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ovl");
    let r = reader(&f, ReaderOptions::default());
    let mut expect = f.data.clone();
    {
        let o = Overlay::open(&path, &f.index).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for _ in 0..50 {
            let off = rng.gen_range(0..expect.len() as u64 - 20_000);
            let len = rng.gen_range(1..20_000usize);
            let fill: u8 = rng.gen();
            if rng.gen_bool(0.2) {
                o.zero(&r, off, len as u64, false).unwrap();
                expect[off as usize..off as usize + len].fill(0);
            } else {
                o.write_at(&r, off, &vec![fill; len], false).unwrap();
                expect[off as usize..off as usize + len].fill(fill);
            }
        }
        let last = expect.len() as u64 - 10;
        o.write_at(&r, last, &[9; 10], true).unwrap();
        expect[last as usize..].fill(9);
        o.flush().unwrap();
        let mut buf = vec![0u8; expect.len()];
        o.read_at(&r, 0, &mut buf).unwrap();
        assert!(buf == expect);
    }
    let o = Overlay::open(&path, &f.index).unwrap();
    let mut buf = vec![0u8; expect.len()];
    o.read_at(&r, 0, &mut buf).unwrap();
    assert!(buf == expect, "overlay contents lost on reopen");
    // The image itself is untouched.
    r.read_at(0, &mut buf).unwrap();
    assert!(buf == f.data);
}

#[test]
fn overlay_refuses_another_index_and_garbage() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ovl");
    Overlay::open(&path, &f.index).unwrap();
    let other = Index::new(
        f.index.params(),
        [0; 32],
        vec![(crate::ChunkId::of(b"x"), 1)],
    )
    .unwrap();
    let err = Overlay::open(&path, &other).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    let junk = dir.path().join("junk");
    std::fs::write(&junk, vec![7u8; 8 << 20]).unwrap();
    let err = Overlay::open(&junk, &f.index).unwrap_err().to_string();
    assert!(err.contains("bad magic"), "{err}");
    assert!(Overlay::open(Path::new("/nonexistent/dir/ovl"), &f.index).is_err());
}

#[test]
fn overlay_keeps_flushed_writes_when_later_ones_are_lost() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ovl");
    let r = reader(&f, ReaderOptions::default());
    {
        let o = Overlay::open(&path, &f.index).unwrap();
        o.write_at(&r, 5000, &[1; 10_000], false).unwrap();
        o.flush().unwrap();
        // Never flushed: the process "dies" here (no Drop flushes the overlay).
        o.write_at(&r, 100_000, &[2; 10_000], false).unwrap();
    }
    let o = Overlay::open(&path, &f.index).unwrap();
    let mut buf = vec![0u8; 10_000];
    o.read_at(&r, 5000, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 1), "flushed write lost");
    // The unflushed write is either entirely there or entirely absent, block by block.
    o.read_at(&r, 100_000, &mut buf).unwrap();
    let image = &f.data[100_000..110_000];
    for (k, block) in buf.chunks(1000).enumerate() {
        let old = &image[k * 1000..(k + 1) * 1000];
        assert!(
            block.iter().all(|&b| b == 2) || block == old,
            "garbage at block {k}"
        );
    }
}
