//! `espeak-ng` as a child process: the default voice, and the phonemizer for piper voices.
//!
//! Why a process and not the library: espeak-ng is GPL-3, and kibitz is MIT; running the
//! Debian program keeps the two apart. It costs a process start per sentence (~10 ms here),
//! small beside speaking it. Why espeak phonemizes for piper: Piper voices were trained on
//! `piper-phonemize`'s output, which is espeak-ng's IPA clause by clause with the clause's
//! punctuation put back; [`phonemize`] rebuilds exactly that (checked in the tests).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::{Pcm, Voice, VoiceError, VoiceInfo, VoiceOptions};

/// espeak-ng's own default speed.
pub(crate) const DEFAULT_WPM: u32 = 175;

/// The `espeak-ng` program as a voice.
#[derive(Debug, Clone)]
pub struct Espeak {
    program: PathBuf,
    voice: String,
    language: String,
    wpm: u32,
    /// What the program answers in (22050 Hz for its own voices, 16 kHz for mbrola ones).
    sample_rate: u32,
}

impl Espeak {
    /// Checks the program runs and the voice exists by speaking one word.
    pub fn new(options: &VoiceOptions) -> Result<Espeak, VoiceError> {
        let voice = options
            .espeak_voice
            .clone()
            .unwrap_or_else(|| options.language.clone());
        let mut espeak = Espeak {
            program: options.espeak_program.clone(),
            voice,
            language: options.language.clone(),
            wpm: options.rate_wpm.clamp(80, 450),
            sample_rate: 22050,
        };
        espeak.sample_rate = espeak.synthesize("ok")?.sample_rate;
        Ok(espeak)
    }
}

impl Voice for Espeak {
    fn info(&self) -> VoiceInfo {
        VoiceInfo {
            engine: "espeak",
            name: self.voice.clone(),
            language: self.language.clone(),
            sample_rate: self.sample_rate,
        }
    }

    fn synthesize(&self, sentence: &str) -> Result<Pcm, VoiceError> {
        let wpm = self.wpm.to_string();
        let wav = run(
            &self.program,
            &["--stdout", "-v", &self.voice, "-s", &wpm],
            sentence,
        )?;
        crate::read_wav(&wav)
    }
}

/// Runs `program args` with `input` on stdin (never as an argument: a text starting with `-`
/// would be an option) and returns its stdout.
fn run(program: &Path, args: &[&str], input: &str) -> Result<Vec<u8>, VoiceError> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| VoiceError::ProgramMissing {
            program: program.display().to_string(),
            source,
        })?;
    // A sentence is far below a pipe's buffer, so writing it all before reading is safe.
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes())?;
        stdin.write_all(b"\n")?;
    }
    let out = child.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    // espeak-ng exits 0 even for an unknown voice; its complaint is on stderr.
    if !out.status.success() || stderr.contains("Failed") || stderr.contains("rror") {
        let why = stderr.trim();
        return Err(VoiceError::Espeak(if why.is_empty() {
            format!("exited with {}", out.status)
        } else {
            why.to_string()
        }));
    }
    Ok(out.stdout)
}

/// Piper's phonemes for `text` (one of [`crate::text::sentences`]), sentence by sentence as
/// `piper-phonemize` gives them: espeak-ng's IPA for each clause, followed by the clause's
/// `.` `?` `!`, or `,` `:` `;` and a space. A new sentence starts after `.` `?` `!`.
pub fn phonemize(program: &Path, voice: &str, text: &str) -> Result<Vec<String>, VoiceError> {
    let mut sentences = Vec::new();
    let mut current = String::new();
    for (clause, mark) in clauses(text) {
        let out = run(program, &["-q", "--ipa", "-v", voice], clause)?;
        let ipa = String::from_utf8_lossy(&out);
        let ipa = ipa.split_whitespace().collect::<Vec<_>>().join(" ");
        current.push_str(&ipa);
        match mark {
            Some(c @ ('.' | '?' | '!')) => {
                current.push(c);
                sentences.push(std::mem::take(&mut current));
            }
            Some(c) => {
                current.push(c);
                current.push(' ');
            }
            None => {}
        }
    }
    if !current.is_empty() {
        sentences.push(current);
    }
    Ok(sentences)
}

/// `text` cut after each clause mark (`. , ? ! : ;`) that a space or the end follows (closing
/// quotes and brackets may come between), with the mark espeak reports for it: the first of a
/// run (`?!` is a question).
fn clauses(text: &str) -> Vec<(&str, Option<char>)> {
    let mut out = Vec::new();
    let mut start = 0;
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let mut k = 0;
    while k < chars.len() {
        let (_, c) = chars[k];
        if !matches!(c, '.' | ',' | '?' | '!' | ':' | ';') {
            k += 1;
            continue;
        }
        let mut j = k;
        while j + 1 < chars.len() && matches!(chars[j + 1].1, '.' | ',' | '?' | '!' | ':' | ';') {
            j += 1;
        }
        while j + 1 < chars.len() && matches!(chars[j + 1].1, '"' | '\'' | ')' | '”' | '’') {
            j += 1;
        }
        let end = chars[j].0 + chars[j].1.len_utf8();
        let next = chars.get(j + 1).map(|&(_, c)| c);
        if next.is_none_or(char::is_whitespace) {
            let clause = &text[start..end];
            if clause.chars().any(char::is_alphanumeric) {
                out.push((clause, Some(c)));
            }
            start = end;
        }
        k = j + 1;
    }
    let rest = &text[start..];
    if rest.chars().any(char::is_alphanumeric) {
        out.push((rest, None));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clause_marks() {
        assert_eq!(
            clauses("Hello, world! It costs 3.50: \"wow?!\" Yes"),
            [
                ("Hello,", Some(',')),
                (" world!", Some('!')),
                (" It costs 3.50:", Some(':')),
                (" \"wow?!\"", Some('?')),
                (" Yes", None)
            ]
        );
    }
}
