//! NBD wire decoding: option headers and request headers from arbitrary bytes decode,
//! ask for more bytes, or are refused as invalid; never panic. A decoded request
//! encodes back to the bytes it came from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_nbd::wire::{decode_option_header, decode_request, encode_request, Decoded};

fuzz_target!(|data: &[u8]| {
    if let Ok(Decoded::Done(_, used)) = decode_option_header(data) {
        assert!(used <= data.len());
    }
    match decode_request(data) {
        Ok(Decoded::Done(req, used)) => {
            assert!(used <= data.len());
            assert_eq!(&encode_request(&req)[..], &data[..used]);
        }
        Ok(Decoded::Incomplete(need)) => assert!(need > data.len()),
        Err(_) => {}
    }
});
