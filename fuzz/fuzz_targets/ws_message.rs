//! WebSocket text messages of one viewer session: each is a selection change (profile,
//! instruction) applied to the stream as the server applies it. Messages are separated by
//! NUL. Besides not panicking: every accepted change leaves a stream whose commentary loop
//! accepts its settings, with nothing but live fields changed.
#![no_main]

use kibitz_server::fuzzing::selection;
use kibitz_stream::{StreamDefaults, StreamId, StreamSettings, StreamSpec};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let defaults = StreamDefaults::default();
    let settings = StreamSettings {
        source: Some("rtsp://camera/1".into()),
        ..StreamSettings::default()
    };
    let first =
        StreamSpec::resolve(&settings, Some(StreamId::nth(1)), &defaults).expect("a plain stream");
    let mut spec = first.clone();
    for message in data.split(|&b| b == 0).take(64) {
        // A text message is UTF-8 (the WebSocket library checks that first).
        let Ok(text) = std::str::from_utf8(message) else {
            continue;
        };
        let Ok(change) = selection(text.as_bytes()) else {
            continue;
        };
        let Ok(next) = spec.patch(&change, &defaults) else {
            continue;
        };
        assert_eq!(next.commentator(&defaults).validate(), Ok(()), "{next:?}");
        assert_eq!(
            (
                &next.id,
                &next.source,
                next.frames_per_inference,
                &next.voice
            ),
            (
                &first.id,
                &first.source,
                first.frames_per_inference,
                &first.voice
            )
        );
        spec = next;
    }
});
