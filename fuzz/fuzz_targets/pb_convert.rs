//! The protobuf messages and their `*_from_pb` conversions to openraft types.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(violation) = raftwire::fuzzing::run_pb_convert(data) {
        panic!("{violation}");
    }
});
