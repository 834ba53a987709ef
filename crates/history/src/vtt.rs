//! Comments as a WebVTT file: one cue per comment, on a timeline that starts at the range.
//! [`webvtt`] is the writer itself, shared with `kibitz annotate` (which depends on this
//! crate; the history depends on nothing of kibitz's, so there is no circle).
//!
//! A cue starts when its comment was written and ends when the next one starts or after a
//! readable time, whichever is first. Comments written in the same millisecond are moved along
//! by the one before, so cues never overlap and each lasts at least a millisecond.

use std::fmt::Write;

/// Reading time: 1 s plus 60 ms a character, at most 8 s.
pub(crate) fn readable_ms(text: &str) -> i64 {
    let chars = text.chars().count().min(1000) as i64;
    (1000 + 60 * chars).min(8000)
}

/// One comment: its id (the cue's identifier), wall time, and text.
pub(crate) struct Line {
    pub id: i64,
    pub wall_ms: i64,
    pub text: String,
}

/// The WebVTT file for `lines` (in time order), cue times counted from `origin_ms`, or from
/// the first line without it. Blank comments get no cue.
pub(crate) fn render(origin_ms: Option<i64>, lines: &[Line]) -> String {
    let lines: Vec<&Line> = lines
        .iter()
        .filter(|line| !escape(&line.text).is_empty())
        .collect();
    let Some(first) = lines.first() else {
        return webvtt([]);
    };
    let origin = origin_ms.unwrap_or(first.wall_ms);
    let mut free_from = 0;
    let mut cues = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        let start = (line.wall_ms - origin).max(free_from);
        let mut end = start + readable_ms(&line.text);
        if let Some(next) = lines.get(i + 1) {
            end = end.min(next.wall_ms - origin);
        }
        let end = end.max(start + 1);
        free_from = end;
        cues.push(WebVttCue {
            id: line.id,
            start_ms: start,
            end_ms: end,
            text: &line.text,
        });
    }
    webvtt(cues)
}

/// One cue of a WebVTT file: its identifier, when it shows on the file's timeline (ms),
/// and its text as written (escaped by [`webvtt`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WebVttCue<'a> {
    pub id: i64,
    pub start_ms: i64,
    pub end_ms: i64,
    pub text: &'a str,
}

/// The one WebVTT writer, for the history's export and `kibitz annotate`: the header, then
/// each cue as identifier, `start --> end` and its text, text escaped so that it cannot end
/// the cue or the file early (`&`, `<`, `>` as entities, no blank line). A cue with no text left is skipped. The caller
/// places the cues (in order, not overlapping).
pub fn webvtt<'a>(cues: impl IntoIterator<Item = WebVttCue<'a>>) -> String {
    let mut out = String::from("WEBVTT\n");
    for cue in cues {
        let text = escape(cue.text);
        if text.is_empty() {
            continue;
        }
        let _ = write!(
            out,
            "\n{}\n{} --> {}\n{}\n",
            cue.id,
            timestamp(cue.start_ms),
            timestamp(cue.end_ms),
            text
        );
    }
    out
}

/// `HH:MM:SS.mmm`; hours grow past two digits if they must.
pub(crate) fn timestamp(ms: i64) -> String {
    let ms = ms.max(0);
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    )
}

/// Cue text: `&`, `<` and `>` as entities (so no `-->` and no tags), line breaks kept but
/// never a blank line, which would end the cue.
pub(crate) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if !out.is_empty() {
            out.push('\n');
        }
        for c in line.chars() {
            match c {
                '&' => out.push_str("&amp;"),
                '<' => out.push_str("&lt;"),
                '>' => out.push_str("&gt;"),
                '\r' | '\u{0}' => {}
                c => out.push(c),
            }
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A cue as read back by [`parse`].
    #[derive(Debug)]
    pub(crate) struct Cue {
        pub id: String,
        pub start_ms: i64,
        pub end_ms: i64,
        pub text: String,
    }

    /// A strict reader of what [`render`] writes: the header, then blocks of identifier,
    /// timing line and text, separated by one blank line; times in order and not overlapping.
    pub(crate) fn parse(vtt: &str) -> Vec<Cue> {
        let body = vtt.strip_prefix("WEBVTT\n").expect("header");
        let mut cues: Vec<Cue> = Vec::new();
        for block in body.split("\n\n").filter(|b| !b.trim().is_empty()) {
            let mut lines = block.trim_start_matches('\n').lines();
            let id = lines.next().expect("identifier").to_owned();
            assert!(!id.contains("-->"), "identifier {id:?}");
            let timing = lines.next().expect("timing line");
            let (start, end) = timing.split_once(" --> ").expect("arrow");
            let (start_ms, end_ms) = (parse_timestamp(start), parse_timestamp(end));
            assert!(end_ms > start_ms, "{timing}");
            if let Some(prev) = cues.last() {
                assert!(start_ms >= prev.end_ms, "overlap at {timing}");
            }
            let text: Vec<&str> = lines.collect();
            assert!(!text.is_empty(), "cue {id} has no text");
            for line in &text {
                assert!(!line.contains("-->") && !line.contains('<'), "{line:?}");
                assert!(!line.trim().is_empty(), "blank line in cue {id}");
            }
            cues.push(Cue {
                id,
                start_ms,
                end_ms,
                text: text.join("\n"),
            });
        }
        cues
    }

    fn parse_timestamp(text: &str) -> i64 {
        let (hms, ms) = text.split_once('.').expect("millis");
        let parts: Vec<i64> = hms.split(':').map(|p| p.parse().expect(text)).collect();
        assert_eq!(parts.len(), 3, "{text}");
        assert!(ms.len() == 3 && parts[1] < 60 && parts[2] < 60, "{text}");
        ((parts[0] * 60 + parts[1]) * 60 + parts[2]) * 1000 + ms.parse::<i64>().unwrap()
    }

    fn line(id: i64, wall_ms: i64, text: &str) -> Line {
        Line {
            id,
            wall_ms,
            text: text.into(),
        }
    }

    #[test]
    fn cues_end_at_the_next_or_when_read() {
        let lines = [
            line(1, 10_000, "short"),
            line(2, 11_000, "a long one that takes a while to read through"),
            line(3, 30_000, "x".repeat(500).as_str()),
            line(4, 30_000, "same ms"),
            line(5, 30_000, "same ms again"),
            line(6, 3_700_000, "an hour on"),
        ];
        let vtt = render(Some(5_000), &lines);
        let cues = parse(&vtt);
        let times: Vec<(i64, i64)> = cues.iter().map(|c| (c.start_ms, c.end_ms)).collect();
        assert_eq!(
            times,
            [
                (5_000, 6_000),
                (6_000, 6_000 + 1000 + 60 * 45),
                (25_000, 25_001),
                (25_001, 25_002),
                (25_002, 25_002 + 1000 + 60 * 13),
                (3_695_000, 3_695_000 + 1000 + 60 * 10),
            ]
        );
        assert_eq!(cues[5].id, "6");
        assert!(vtt.contains("\n01:01:35.000 --> 01:01:36.600\n"), "{vtt}");
        assert_eq!(
            render(None, &lines[..1]).lines().nth(3),
            Some("00:00:00.000 --> 00:00:01.300")
        );
        assert_eq!(render(None, &[]), "WEBVTT\n");
    }

    #[test]
    fn text_cannot_break_the_file() {
        let lines = [
            line(1, 0, "a --> b <b>bold</b> & co"),
            line(2, 1, "one\n\n\ntwo\r\n"),
            line(3, 2, "\n \n"),
            line(4, 3, "WEBVTT\n\n00:00:00.000 --> 00:00:01.000\nfake"),
        ];
        let cues = parse(&render(None, &lines));
        let ids: Vec<&str> = cues.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["1", "2", "4"]);
        assert_eq!(cues[0].text, "a --&gt; b &lt;b&gt;bold&lt;/b&gt; &amp; co");
        assert_eq!(cues[1].text, "one\ntwo");
        assert_eq!(
            cues[2].text,
            "WEBVTT\n00:00:00.000 --&gt; 00:00:01.000\nfake"
        );
    }
}
