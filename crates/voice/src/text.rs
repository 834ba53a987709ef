//! What a voice is given: a model's comment made speakable, then cut into sentences.
//!
//! Models write markdown, paste URLs and sometimes ramble; a voice would read `*` and
//! `https://…` aloud and a long answer would keep speaking while the picture moves on. So the
//! text loses its markup, its whitespace is collapsed, and it is cut at a sentence end before
//! [`MAX_CHARS`]. `"..."` (the commentator's "nothing to say") is silence: no sentences.

/// The longest text spoken for one comment (about 40 seconds of speech).
pub const MAX_CHARS: usize = 600;

/// Words that end in a period without ending the sentence.
const ABBREVIATIONS: &[&str] = &[
    "mr", "mrs", "ms", "dr", "st", "vs", "etc", "e.g", "i.e", "jr", "sr", "approx",
];

/// `text` cleaned ([`clean`]) and split into sentences, each with its end punctuation.
pub fn sentences(text: &str) -> Vec<String> {
    let text = clean(text);
    let mut out = Vec::new();
    let mut start = 0;
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let mut k = 0;
    while k < chars.len() {
        let c = chars[k].1;
        if !matches!(c, '.' | '!' | '?') {
            k += 1;
            continue;
        }
        // A run of end marks, then closing quotes or brackets, then a space or the end.
        let first = k;
        let mut j = k;
        while j + 1 < chars.len() && matches!(chars[j + 1].1, '.' | '!' | '?') {
            j += 1;
        }
        while j + 1 < chars.len() && matches!(chars[j + 1].1, '"' | '\'' | ')' | '”' | '’') {
            j += 1;
        }
        let end = chars[j].0 + chars[j].1.len_utf8();
        let next = chars.get(j + 1).map(|&(_, c)| c);
        let candidate = &text[start..end];
        k = j + 1;
        if next.is_some_and(|c| c != ' ') || (c == '.' && j == first && is_abbreviation(candidate))
        {
            continue;
        }
        push_sentence(&mut out, candidate);
        start = end;
    }
    push_sentence(&mut out, &text[start..]);
    out
}

fn push_sentence(out: &mut Vec<String>, s: &str) {
    let s = s.trim();
    if s.chars().any(|c| c.is_alphanumeric()) {
        out.push(s.to_string());
    }
}

fn is_abbreviation(sentence_so_far: &str) -> bool {
    let word = sentence_so_far
        .trim_end_matches('.')
        .rsplit(' ')
        .next()
        .unwrap_or("")
        .to_lowercase();
    ABBREVIATIONS.contains(&word.as_str())
}

/// Markup, URLs and HTML tags removed, ellipses made pauses, whitespace collapsed, and at
/// most [`MAX_CHARS`] long (cut at a sentence end where there is one). Empty when there is
/// nothing to say.
pub fn clean(text: &str) -> String {
    let mut words = Vec::new();
    let without_tags = strip_tags(&strip_link_targets(text));
    for word in without_tags.split_whitespace() {
        let lower = word.to_ascii_lowercase();
        let bare = lower.trim_start_matches(['(', '[', '<', '"', '\'']);
        if bare.starts_with("http://") || bare.starts_with("https://") || bare.starts_with("www.") {
            continue;
        }
        let word = strip_markup(word);
        if !word.is_empty() {
            words.push(word);
        }
    }
    let mut s = words.join(" ");
    // Ellipses are pauses; on their own (the commentator's skip) they are nothing.
    s = s.replace('…', "...");
    while s.contains("....") {
        s = s.replace("....", "...");
    }
    let s = s.replace(" ...", "...");
    let s = s.trim_start_matches(['.', ' ', ',']).to_string();
    let s = s.replace("...", ",");
    let s = s.replace(",,", ",").replace(", ,", ",");
    let s = s.trim_end_matches([',', ' ']).to_string();
    let s = s.replace(" ,", ",").replace(" .", ".");
    if !s.chars().any(|c| c.is_alphanumeric()) {
        return String::new();
    }
    bound(&s)
}

/// `[text](target)` → `[text]` (the brackets go with the other markup).
fn strip_link_targets(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("](") {
        out.push_str(&rest[..=i]);
        let after = &rest[i + 2..];
        match after.find(')') {
            Some(j) if !after[..j].contains(char::is_whitespace) => rest = &after[j + 1..],
            _ => rest = &rest[i + 1..],
        }
    }
    out.push_str(rest);
    out
}

/// Removes `<tag …>` and `</tag>` (a `<` followed by a letter or `/`, up to the next `>`).
fn strip_tags(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('<') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let tag_like = after
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '/' || c == '!');
        match after.find('>') {
            Some(j) if tag_like && !after[..j].contains('<') => {
                out.push(' ');
                rest = &after[j + 1..];
            }
            _ => {
                out.push('<');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// One word without markdown: `*`, backticks, `#`, `~`, link brackets, `_` used as emphasis
/// (inside a word it becomes a space: `snake_case` → `snake case`).
fn strip_markup(word: &str) -> String {
    let word = word.replace(['*', '`', '#', '~', '[', ']', '|'], "");
    let word = word.replace("()", "");
    let trimmed = word.trim_matches('_');
    let lead = word.len() - word.trim_start_matches('_').len();
    let mut out = String::with_capacity(word.len());
    if lead > 0 && trimmed.is_empty() {
        return String::new();
    }
    for c in trimmed.chars() {
        out.push(if c == '_' { ' ' } else { c });
    }
    // `_emphasis_.` leaves `emphasis_.`: drop underscores before trailing punctuation too.
    out.replace("_", "").trim().to_string()
}

/// At most [`MAX_CHARS`]: cut after the last sentence end that fits, else at the last space.
fn bound(s: &str) -> String {
    if s.len() <= MAX_CHARS {
        return s.to_string();
    }
    let mut cut = MAX_CHARS;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    let head = &s[..cut];
    if let Some(i) = head.rfind(['.', '!', '?']) {
        if i > MAX_CHARS / 3 {
            return head[..=i].to_string();
        }
    }
    match head.rfind(' ') {
        Some(i) => format!("{}.", head[..i].trim_end_matches([',', ';', ':'])),
        None => head.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skips_are_silent() {
        for s in [
            "...",
            " … ",
            "....",
            "",
            "  \n ",
            "**",
            "<b></b>",
            "https://x.y/z",
        ] {
            assert_eq!(clean(s), "", "{s:?}");
            assert!(sentences(s).is_empty(), "{s:?}");
        }
    }

    #[test]
    fn markup_goes() {
        assert_eq!(clean("A **big** _red_ `ball`."), "A big red ball.");
        assert_eq!(
            clean("# Goal!\n\n* the striker   scores"),
            "Goal! the striker scores"
        );
        assert_eq!(clean("See <b>this</b> <br/>now."), "See this now.");
        assert_eq!(clean("a < b and c > d"), "a < b and c > d");
        assert_eq!(
            clean("More at https://example.com/x?y=1 and (www.foo.org)."),
            "More at and"
        );
        assert_eq!(
            clean("The [rabbit](https://r.io) runs."),
            "The rabbit runs."
        );
        assert_eq!(clean("a snake_case name"), "a snake case name");
        assert_eq!(clean("Wait... what?"), "Wait, what?");
        assert_eq!(clean("... the bird flies."), "the bird flies.");
        assert_eq!(clean("The bird flies…"), "The bird flies");
    }

    #[test]
    fn long_text_is_cut_at_a_sentence_end() {
        let long = "The rabbit hops across the meadow. ".repeat(40);
        let s = clean(&long);
        assert!(s.len() <= MAX_CHARS, "{}", s.len());
        assert!(s.ends_with("meadow."), "{s}");
        let words = "word ".repeat(300);
        let s = clean(&words);
        assert!(s.len() <= MAX_CHARS + 1 && s.ends_with("word."), "{s}");
    }

    #[test]
    fn splits_sentences() {
        assert_eq!(
            sentences("A rabbit wakes up. It stretches!  Is that a bird? Yes"),
            [
                "A rabbit wakes up.",
                "It stretches!",
                "Is that a bird?",
                "Yes"
            ]
        );
        assert_eq!(
            sentences("Mr. Smith waves at Dr. Who. It costs 3.50 dollars."),
            ["Mr. Smith waves at Dr. Who.", "It costs 3.50 dollars."]
        );
        assert_eq!(sentences("Really?! Wow..."), ["Really?!", "Wow"]);
        assert_eq!(
            sentences("He said \"go.\" Then left."),
            ["He said \"go.\"", "Then left."]
        );
    }
}
