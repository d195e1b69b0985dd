#![no_main]
//! cargo fuzz run table_parse  (see bulkhead_storage::table::fuzz_parse)
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    bulkhead_storage::table::fuzz_parse(data);
});
