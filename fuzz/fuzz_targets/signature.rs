//! Signatures and keys: a minisign signature (and the trusted comment inside it) checked
//! against a fixed signed index must be refused with an error unless genuine, never
//! panic; public key text must parse or be refused.
//!
//! The seed corpus holds real signatures of `fixtures/signed.tidx` by the key
//! `fixtures/signed.pub` (made by `tessera sign` and by the `minisign` tool, pre-hashed
//! and legacy), so mutations start from inputs that verify.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_engine::trust::signature::parse_trusted_comment;
use tessera_engine::trust::{check_index_bytes, TrustPolicy, TrustedKey};

const INDEX: &[u8] = include_bytes!("../fixtures/signed.tidx");
const PUBLIC_KEY: &str = include_str!("../fixtures/signed.pub");

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let key = TrustedKey::parse(PUBLIC_KEY, "fixtures/signed.pub").expect("fixture key");
    let policy = TrustPolicy {
        trusted_keys: vec![key],
        min_version: Some(1),
        ..TrustPolicy::default()
    };
    if let Ok((_, report)) =
        check_index_bytes(INDEX, "fuzz", Some((&text, "fuzz.minisig")), &policy)
    {
        assert!(report.version().is_some_and(|v| v >= 1));
    }
    let _ = parse_trusted_comment(&text);
    let _ = TrustedKey::parse(&text, "fuzz");
    // A key given as text is one base64 key or an error, never anything read elsewhere.
    if let Ok(key) = TrustedKey::from_base64(&text) {
        assert!(!text.trim().contains(char::is_whitespace));
        let _ = key.id();
    }
});
