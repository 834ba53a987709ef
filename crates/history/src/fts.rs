//! User text into an FTS5 query that cannot be a syntax error.
//!
//! Why not pass the text through: FTS5 reads `"`, `*`, `^`, `:`, `(`, `-`, `+`, `NEAR`,
//! `AND`, `OR` and `NOT` as syntax, so "what's up -- NEAR(" would be an error or a different
//! question. Words are cut out the way the `unicode61` tokenizer cuts them (letters and
//! digits), each becomes a quoted phrase, and phrases side by side all must match.

/// Words beyond this are ignored: enough for any question, and bounded work for 10 kB of text.
const MAX_WORDS: usize = 16;
const MAX_WORD_CHARS: usize = 64;

/// The FTS5 query for `text`, or `None` when it has no word to search for. The last word is a
/// prefix (`"lea"*` finds "leaves") unless the text ends after it, with a space say.
pub fn match_expr(text: &str) -> Option<String> {
    let mut all = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty());
    let words: Vec<&str> = all.by_ref().take(MAX_WORDS).collect();
    let last_is_partial = text.ends_with(char::is_alphanumeric) && all.next().is_none();
    let mut expr = String::new();
    for (i, word) in words.iter().enumerate() {
        if i > 0 {
            expr.push(' ');
        }
        expr.push('"');
        expr.extend(word.chars().take(MAX_WORD_CHARS));
        expr.push('"');
        if i + 1 == words.len() && last_is_partial {
            expr.push('*');
        }
    }
    (!expr.is_empty()).then_some(expr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_become_phrases() {
        assert_eq!(match_expr("van leav").as_deref(), Some(r#""van" "leav"*"#));
        assert_eq!(
            match_expr("van leaves ").as_deref(),
            Some(r#""van" "leaves""#)
        );
        assert_eq!(
            match_expr(r#"NEAR("a" OR -b*)"#).as_deref(),
            Some(r#""NEAR" "a" "OR" "b""#)
        );
        assert_eq!(
            match_expr("Ünïcödé 東京").as_deref(),
            Some(r#""Ünïcödé" "東京"*"#)
        );
        assert_eq!(match_expr(""), None);
        assert_eq!(match_expr(r#" "*^:()-+ "#), None);
        assert_eq!(match_expr("🦊"), None);
    }

    #[test]
    fn long_text_is_bounded() {
        let text = "word ".repeat(2000);
        let expr = match_expr(&text).unwrap();
        assert_eq!(expr.matches('"').count(), 2 * MAX_WORDS);
        assert!(!expr.contains('*'));
        let one = "x".repeat(10_000);
        assert_eq!(match_expr(&one).unwrap().len(), MAX_WORD_CHARS + 3);
    }
}
