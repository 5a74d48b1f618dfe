#![no_main]
// See callgate::fuzzing::page_json for what the input is.
libfuzzer_sys::fuzz_target!(|data: &[u8]| callgate::fuzzing::page_json(data));
