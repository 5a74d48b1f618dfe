#![no_main]
// See callgate::fuzzing::rtcp for what the input is.
libfuzzer_sys::fuzz_target!(|data: &[u8]| callgate::fuzzing::rtcp(data));
