//! An OpenAI-compatible server's answer body (server-sent events carrying JSON chunks), as
//! the `openai` engine reads it. Besides not panicking, what it shows must not depend on
//! how the body is cut into reads, nor on how the text is cut into chunks.
#![no_main]

use kibitz_engine::openai::fuzzing::{chunk_contents, sse_events, strip_think};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte says where reads end.
    let Some((&step, body)) = data.split_first() else {
        return;
    };
    let step = usize::from(step % 16) + 1;
    let reads: Vec<&[u8]> = body.chunks(step).collect();
    let whole = sse_events(&[body]);
    assert_eq!(whole, sse_events(&reads), "events depend on the reads");

    if let Ok(text) = std::str::from_utf8(body) {
        let pieces = char_pieces(text, step);
        assert_eq!(
            strip_think(&[text]),
            strip_think(&pieces),
            "shown text depends on the pieces: {pieces:?}"
        );
    }

    let Ok(events) = whole else { return };
    let mut contents = Vec::new();
    for data in &events {
        match chunk_contents(data) {
            Ok((pieces, done)) => {
                contents.extend(pieces);
                if done {
                    break;
                }
            }
            Err(_) => return,
        }
    }
    let pieces: Vec<&str> = contents.iter().map(String::as_str).collect();
    assert_eq!(
        strip_think(&[&contents.concat()]),
        strip_think(&pieces),
        "shown text depends on the chunks: {pieces:?}"
    );
});

/// `text` cut about every `step` bytes, on character boundaries.
fn char_pieces(text: &str, step: usize) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut start = 0;
    while start < text.len() {
        let mut end = (start + step).min(text.len());
        while !text.is_char_boundary(end) {
            end += 1;
        }
        pieces.push(&text[start..end]);
        start = end;
    }
    pieces
}
