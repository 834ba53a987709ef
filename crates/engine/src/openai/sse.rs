//! Reading an OpenAI-style chat completion stream: server-sent events carrying JSON chunks.
//!
//! Servers differ in small ways (CRLF line ends, `: keep-alive` comments, an event split
//! over many TCP reads, several events in one read, a `reasoning_content` field, a
//! `<think>` block a template put in anyway), so the parser is byte-based and forgiving
//! about framing, but strict about the JSON: a chunk that does not parse is an error, never
//! silently skipped text.

use serde::Deserialize;

/// A line longer than this without a newline means the peer is not speaking SSE.
const MAX_LINE: usize = 8 << 20;

/// Splits a byte stream into the `data` of each event.
#[derive(Debug, Default)]
pub(crate) struct SseParser {
    line: Vec<u8>,
    data: Option<String>,
}

impl SseParser {
    /// Feeds bytes as they arrive; returns the data of every event completed by them.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<String>, String> {
        let mut events = Vec::new();
        let mut rest = bytes;
        while let Some(end) = rest.iter().position(|&b| b == b'\n') {
            self.line.extend_from_slice(&rest[..end]);
            rest = &rest[end + 1..];
            let mut line = std::mem::take(&mut self.line);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let line =
                String::from_utf8(line).map_err(|_| "a stream line is not UTF-8".to_string())?;
            if let Some(data) = self.line_done(&line) {
                events.push(data);
            }
        }
        self.line.extend_from_slice(rest);
        if self.line.len() > MAX_LINE {
            return Err(format!("a stream line is longer than {MAX_LINE} bytes"));
        }
        Ok(events)
    }

    /// The stream ended: an event not yet closed by a blank line still counts.
    pub fn finish(&mut self) -> Option<String> {
        if !self.line.is_empty() {
            let line = String::from_utf8_lossy(&std::mem::take(&mut self.line)).into_owned();
            let line = line.trim_end_matches('\r').to_string();
            if let Some(data) = self.line_done(&line) {
                return Some(data);
            }
        }
        self.data.take()
    }

    fn line_done(&mut self, line: &str) -> Option<String> {
        if line.is_empty() {
            return self.data.take();
        }
        if line.starts_with(':') {
            return None; // comment / keep-alive
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        if field == "data" {
            match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            }
        }
        // `event`, `id`, `retry`: nothing for us.
        None
    }
}

/// One `chat.completion.chunk`, keeping only what kibitz uses. Unknown fields (and
/// `reasoning_content`) are ignored.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Chunk {
    #[serde(default)]
    pub choices: Vec<Choice>,
    pub usage: Option<Usage>,
    /// llama-server's own timing report.
    pub timings: Option<Timings>,
    /// Some servers (vLLM) report a failure inside the stream.
    pub error: Option<serde_json::Value>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct Choice {
    #[serde(default)]
    pub delta: Delta,
    pub finish_reason: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct Delta {
    pub content: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
pub(crate) struct Usage {
    pub prompt_tokens: Option<u32>,
    pub completion_tokens: Option<u32>,
    pub prompt_tokens_details: Option<PromptDetails>,
}

#[derive(Debug, Default, Clone, Deserialize)]
pub(crate) struct PromptDetails {
    pub cached_tokens: Option<u32>,
}

#[derive(Debug, Default, Clone, Deserialize)]
pub(crate) struct Timings {
    pub cache_n: Option<f64>,
    pub prompt_ms: Option<f64>,
    pub predicted_n: Option<f64>,
    pub predicted_ms: Option<f64>,
    pub predicted_per_second: Option<f64>,
}

/// What one event's data means.
#[derive(Debug)]
pub(crate) enum Event {
    Chunk(Chunk),
    Done,
}

/// Parses one event's data. `Err` carries a message fit for the user.
pub(crate) fn parse_event(data: &str) -> Result<Vec<Event>, String> {
    let trimmed = data.trim();
    if trimmed == "[DONE]" {
        return Ok(vec![Event::Done]);
    }
    if trimmed.is_empty() {
        return Ok(Vec::new());
    }
    match serde_json::from_str::<Chunk>(trimmed) {
        Ok(chunk) => Ok(vec![Event::Chunk(chunk)]),
        // A server that ends events with one newline instead of two makes one event out of
        // several `data:` lines; each line is then a chunk of its own.
        Err(_) if trimmed.contains('\n') => trimmed
            .lines()
            .map(parse_event)
            .collect::<Result<Vec<_>, _>>()
            .map(|v| v.into_iter().flatten().collect()),
        Err(e) => Err(format!(
            "malformed stream chunk ({e}): {}",
            excerpt(trimmed, 120)
        )),
    }
}

/// At most `max` characters of `s`, marked when cut.
pub(crate) fn excerpt(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// Removes `<think>…</think>` blocks from text that arrives in pieces, tags split across
/// pieces included. kibitz asks for no thinking; this catches servers that ignore it.
#[derive(Debug, Default)]
pub(crate) struct ThinkFilter {
    inside: bool,
    /// Text held back because it may be the start of a tag.
    pending: String,
    /// Right after a block the model puts blank lines; they are dropped.
    trim_start: bool,
}

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

impl ThinkFilter {
    /// Takes the next piece; returns the text to show now (possibly empty).
    pub fn push(&mut self, piece: &str) -> String {
        self.pending.push_str(piece);
        let mut out = String::new();
        loop {
            // What ends the present state first: inside a block its close; outside, an
            // opening tag or a stray close (the template opened the block in the prompt),
            // whichever comes first, so the text between is treated alike however it was cut.
            let found = if self.inside {
                self.pending.find(CLOSE).map(|at| (at, CLOSE))
            } else {
                [OPEN, CLOSE]
                    .into_iter()
                    .filter_map(|tag| self.pending.find(tag).map(|at| (at, tag)))
                    .min_by_key(|&(at, _)| at)
            };
            if let Some((at, found)) = found {
                let before = self.pending[..at].to_string();
                self.pending.drain(..at + found.len());
                if !self.inside {
                    // Before a stray close the text is already out, so only the tag goes.
                    self.emit(&mut out, &before);
                }
                if found == OPEN || self.inside {
                    self.inside = !self.inside;
                    self.trim_start = !self.inside;
                }
                continue;
            }
            let tag = if self.inside { CLOSE } else { OPEN };
            // Keep back a tail that could still grow into a tag.
            let keep = [tag, CLOSE]
                .iter()
                .map(|t| partial_tag_suffix(&self.pending, t))
                .max()
                .unwrap_or(0);
            let cut = self.pending.len() - keep;
            let text: String = self.pending.drain(..cut).collect();
            if !self.inside {
                self.emit(&mut out, &text);
            }
            break;
        }
        out
    }

    fn emit(&mut self, out: &mut String, text: &str) {
        if self.trim_start {
            let text = text.trim_start();
            if !text.is_empty() {
                self.trim_start = false;
            }
            out.push_str(text);
        } else {
            out.push_str(text);
        }
    }

    /// The stream ended: whatever was held back is text after all (unless inside a block).
    pub fn finish(&mut self) -> String {
        let rest = std::mem::take(&mut self.pending);
        let mut out = String::new();
        if !self.inside {
            self.emit(&mut out, &rest);
        }
        out
    }
}

/// Length of the longest end of `s` that is a proper start of `tag`.
fn partial_tag_suffix(s: &str, tag: &str) -> usize {
    (1..tag.len())
        .rev()
        .find(|&n| {
            s.len() >= n && s.is_char_boundary(s.len() - n) && tag.starts_with(&s[s.len() - n..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(parser: &mut SseParser, parts: &[&[u8]]) -> Vec<String> {
        parts.iter().flat_map(|p| parser.push(p).unwrap()).collect()
    }

    #[test]
    fn events_split_anywhere_and_crlf_and_comments() {
        let stream = b": keep-alive\r\n\r\ndata: {\"a\":1}\r\n\r\ndata:{\"b\":2}\n\nevent: x\nid: 3\ndata: [DONE]\n\n";
        // Every split point gives the same events.
        for cut in 0..stream.len() {
            let mut parser = SseParser::default();
            let events = feed(&mut parser, &[&stream[..cut], &stream[cut..]]);
            assert_eq!(events, ["{\"a\":1}", "{\"b\":2}", "[DONE]"], "cut at {cut}");
            assert_eq!(parser.finish(), None);
        }
        // One byte at a time, a multi-byte character split too.
        let text = "data: {\"c\":\"é\"}\n\n".as_bytes();
        let mut parser = SseParser::default();
        let parts: Vec<&[u8]> = text.chunks(1).collect();
        assert_eq!(feed(&mut parser, &parts), ["{\"c\":\"é\"}"]);
    }

    #[test]
    fn an_unterminated_last_event_still_counts() {
        let mut parser = SseParser::default();
        assert!(parser.push(b"data: [DONE]").unwrap().is_empty());
        assert_eq!(parser.finish().as_deref(), Some("[DONE]"));
    }

    #[test]
    fn chunks_parse_content_usage_and_ignore_reasoning() {
        let events = parse_event(
            r#"{"choices":[{"index":0,"delta":{"reasoning_content":"hmm","content":"Hi"},"finish_reason":null}],"usage":null}"#,
        )
        .unwrap();
        let Event::Chunk(chunk) = &events[0] else {
            panic!()
        };
        assert_eq!(chunk.choices[0].delta.content.as_deref(), Some("Hi"));
        let events =
            parse_event(r#"{"choices":[],"usage":{"prompt_tokens":120,"completion_tokens":7}}"#)
                .unwrap();
        let Event::Chunk(chunk) = &events[0] else {
            panic!()
        };
        assert_eq!(chunk.usage.as_ref().unwrap().prompt_tokens, Some(120));
        assert!(matches!(parse_event(" [DONE] ").unwrap()[0], Event::Done));
    }

    #[test]
    fn data_lines_without_blank_lines_between_still_parse() {
        let events = parse_event("{\"choices\":[]}\n[DONE]").unwrap();
        assert!(matches!(events[..], [Event::Chunk(_), Event::Done]));
    }

    #[test]
    fn malformed_chunks_are_errors_that_show_the_data() {
        let e = parse_event("{\"choices\": [oops").unwrap_err();
        assert!(e.contains("malformed") && e.contains("oops"), "{e}");
        let e = parse_event("{\"choices\": 5}").unwrap_err();
        assert!(e.contains("malformed"), "{e}");
    }

    fn filter_all(pieces: &[&str]) -> String {
        let mut f = ThinkFilter::default();
        let mut out: String = pieces.iter().map(|p| f.push(p)).collect();
        out.push_str(&f.finish());
        out
    }

    #[test]
    fn think_blocks_are_removed_even_split_across_pieces() {
        assert_eq!(
            filter_all(&["<think>\nsome ", "thoughts</think>\n\nA dog", " runs."]),
            "A dog runs."
        );
        assert_eq!(
            filter_all(&["<th", "ink>x</th", "ink>", "\n", "\nHello"]),
            "Hello"
        );
        assert_eq!(filter_all(&["A <", "b> c"]), "A <b> c");
        assert_eq!(filter_all(&["plain text <"]), "plain text <");
        assert_eq!(
            filter_all(&["reasoning only</think>\n\nAnswer"]),
            "reasoning only\n\nAnswer"
        );
        assert_eq!(filter_all(&[" X<think>y</think>\n\nZ"]), " XZ");
        assert_eq!(filter_all(&["<think>never closed"]), "");
        assert_eq!(filter_all(&["a", " ball", " rolls"]), "a ball rolls");
    }

    /// Found writing `fuzz/fuzz_targets/openai_sse.rs`, whose check is that the text shown
    /// does not depend on how it is cut: the text before a tag was taken by a byte count used as a
    /// character count (a letter of two bytes let `<` of the tag through), and a stray close
    /// before an opening tag in the same piece was shown with the text around it.
    #[test]
    fn fuzz_think_filter_does_not_depend_on_the_cut() {
        for (pieces, shown) in [
            (&["é<think>x</think>y"][..], "éy"),
            (&["é", "<think>x</think>y"][..], "éy"),
            (&["東京<think>x</think>"][..], "東京"),
            (&["a</think>b<think>c</think>d"][..], "abd"),
            (&["a</think>b", "<think>c</think>d"][..], "abd"),
        ] {
            assert_eq!(filter_all(pieces), shown, "{pieces:?}");
        }
    }

    #[test]
    fn text_is_not_held_back_longer_than_a_possible_tag() {
        let mut f = ThinkFilter::default();
        assert_eq!(f.push("Hello"), "Hello");
        assert_eq!(f.push(" wor<t"), " wor");
        assert_eq!(f.push("x"), "<tx");
    }
}
