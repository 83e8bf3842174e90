//! The QUIC body decoders: a kind byte and a body, through `codec::decode`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(violation) = raftwire::fuzzing::run_body_decoder(data) {
        panic!("{violation}");
    }
});
