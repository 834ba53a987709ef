//! A camera's JPEG as the MJPEG passthrough reads it (size and Huffman tables): any bytes
//! give an answer or `None`, never a panic.
#![no_main]

use kibitz_media::fuzzing::jpeg_info;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((width, height, _)) = jpeg_info(data) {
        assert!(width > 0 && height > 0);
        assert!(data.starts_with(&[0xFF, 0xD8]));
    }
});
