#![no_main]
// See callgate::fuzzing::sip_message for what the input is.
libfuzzer_sys::fuzz_target!(|data: &[u8]| callgate::fuzzing::sip_message(data));
