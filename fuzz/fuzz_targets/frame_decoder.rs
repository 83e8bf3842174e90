//! The QUIC frame decoder: cuts frames out of a byte stream fed in arbitrary pieces.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(violation) = raftwire::fuzzing::run_frame_decoder(data) {
        panic!("{violation}");
    }
});
