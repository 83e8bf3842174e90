//! Certificate parsing: `inspect_certificate`, node ids from DER and DNS names, PEM loading.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(violation) = raftwire::fuzzing::run_certificates(data) {
        panic!("{violation}");
    }
});
