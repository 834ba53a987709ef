//! A GGUF file's header, as kibitz reads it before llama.cpp sees the file (a downloaded or
//! user-given model): any bytes give a header or one error, never a panic or a huge
//! allocation.
#![no_main]

use kibitz_models::gguf::read_header_bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(info) = read_header_bytes(data) {
        assert!(info.needed_bytes >= 24, "a header is at least 24 bytes");
        assert!(info.metadata.len() as u64 <= 1 << 24);
    }
});
