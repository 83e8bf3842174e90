//! The shipped `WireMessage` impls: `KvRequest`, `KvResponse`, `BasicNode`, `Json<T>`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(violation) = raftwire::fuzzing::run_wire_message(data) {
        panic!("{violation}");
    }
});
