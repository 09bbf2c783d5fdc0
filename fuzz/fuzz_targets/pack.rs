//! Pack tables of contents, location files and the request planner: hostile bytes must
//! give an error, never a panic nor an allocation beyond what the input justifies; what
//! parses must satisfy the invariants readers rely on.
//!
//! Input: 1 byte choosing the mode, then:
//! - 0: a pack's tail as found, 4 bytes of frame-area length before it;
//! - 1: a table of contents whose checksum and framing are made right, so the record
//!   checks are reached (4 bytes of frame-area length, then the table);
//! - 2: a location file as found (2 bytes of distinct-chunk count, then the file);
//! - 3: a location file whose checksum and zstd frame are made right (2 bytes of count,
//!   4 bytes of pack count, then pack ids and records);
//! - 4: planner input (8 bytes each of max gap, max request and segment, then 16-byte
//!   wants).
#![no_main]

use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;
use tessera_engine::pack::{parse_toc, plan_requests, toc_tail_len, Locations, Want};

fn u16_at(d: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([d[at], d[at + 1]])
}

fn u32_at(d: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(d[at..at + 4].try_into().unwrap())
}

fn u64_at(d: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(d[at..at + 8].try_into().unwrap())
}

/// A table's zstd skippable frame and trailer, as a pack ends.
fn toc_tail(table: &[u8]) -> Vec<u8> {
    let toc_len = table.len() as u32 + 32;
    let mut t = Vec::new();
    t.extend_from_slice(&0x184D_2A5Eu32.to_le_bytes());
    t.extend_from_slice(&(toc_len + 8).to_le_bytes());
    t.extend_from_slice(table);
    t.extend_from_slice(blake3::hash(table).as_bytes());
    t.extend_from_slice(&toc_len.to_le_bytes());
    t.extend_from_slice(b"TPK1");
    t
}

fn check_toc(tail: &[u8], frames: u64) {
    let size = frames + tail.len() as u64;
    if tail.len() >= 8 {
        let _ = toc_tail_len(&tail[tail.len() - 8..], size, "fuzz");
    }
    if let Ok(toc) = parse_toc(tail, size, "fuzz") {
        let mut next = 0;
        let mut ids = HashSet::new();
        for e in &toc {
            assert_eq!(e.offset, next);
            assert!(e.clen > 0);
            next += u64::from(e.clen);
            assert!(ids.insert(e.id));
        }
        assert_eq!(next, frames);
    }
}

fn check_locations(file: &[u8], distinct: usize) {
    if let Ok(l) = Locations::parse(file, &[7; 32], distinct, "fuzz") {
        assert_eq!(l.records.len(), distinct);
        for r in &l.records {
            assert!((r.pack as usize) < l.packs.len());
            assert!(r.clen > 0 && r.offset.checked_add(u64::from(r.clen)).is_some());
        }
        let again = Locations::parse(&l.to_bytes(), &[7; 32], distinct, "fuzz").unwrap();
        assert_eq!(again, l);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 5 {
        0 if rest.len() >= 4 => check_toc(&rest[4..], u64::from(u32_at(rest, 0))),
        1 if rest.len() >= 4 => {
            let mut table = b"TPKTOC01".to_vec();
            let body = &rest[4..];
            table.extend_from_slice(&((body.len() / 48) as u32).to_le_bytes());
            table.extend_from_slice(body);
            check_toc(&toc_tail(&table), u64::from(u32_at(rest, 0)));
        }
        2 if rest.len() >= 2 => check_locations(&rest[2..], usize::from(u16_at(rest, 0))),
        3 if rest.len() >= 6 => {
            let distinct = usize::from(u16_at(rest, 0));
            let packs = (u32_at(rest, 2) % 64) as usize;
            let body = &rest[6..];
            let ids = body.len().min(packs * 32);
            let (ids, records) = body.split_at(ids - ids % 32);
            let mut head = b"TESSLOC\0".to_vec();
            head.extend_from_slice(&1u32.to_le_bytes());
            head.extend_from_slice(&0u32.to_le_bytes());
            head.extend_from_slice(&[7; 32]);
            head.extend_from_slice(&((ids.len() / 32) as u32).to_le_bytes());
            head.extend_from_slice(ids);
            head.extend_from_slice(&(distinct as u64).to_le_bytes());
            let mut hasher = blake3::Hasher::new();
            hasher.update(&head);
            hasher.update(records);
            let mut file = head;
            file.extend_from_slice(&zstd::bulk::compress(records, 1).unwrap());
            file.extend_from_slice(hasher.finalize().as_bytes());
            check_locations(&file, distinct);
        }
        4 if rest.len() >= 24 => {
            let (gap, request, segment) = (u64_at(rest, 0), u64_at(rest, 8), u64_at(rest, 16));
            let wants: Vec<Want> = rest[24..]
                .chunks_exact(16)
                .map(|w| Want {
                    pack: u32_at(w, 0) % 4,
                    offset: u64_at(w, 4),
                    clen: u32_at(w, 12),
                })
                .collect();
            let reqs = plan_requests(&wants, gap, request, segment);
            let mut covered = vec![0u32; wants.len()];
            for r in &reqs {
                for &i in &r.wants {
                    covered[i] += 1;
                    assert_eq!(wants[i].pack, r.pack);
                    assert!(wants[i].offset >= r.offset);
                }
            }
            assert!(covered.iter().all(|&c| c == 1));
        }
        _ => {}
    }
});
