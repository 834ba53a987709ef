//! Prompt profiles: what the model is told to be, and how one cycle's question is worded.
//!
//! The system prompt depends only on the profile and the style, so an engine can keep its
//! evaluated prefix between cycles, and streams with the same profile can share it. It
//! holds everything that does not change between cycles: the rules, the answer format, the
//! language, and how a turn is laid out (frames labelled with their time, then the last
//! comment). A cycle's own text is then only what changes: the previous comment, the
//! viewer's instruction, and a short cue ([`Profile::cue`], ~15 tokens without the comment).
//! [`Profile::user_prompt`] is the older, long wording (frame count and span, the answer
//! rule again), kept so a benchmark can measure what the short one saves.
//! The model answers exactly "..." when nothing changed; [`is_skip`] recognises that.

use serde::Serialize;

use crate::config::ConfigError;

pub const DEFAULT_PROFILE: &str = "default";

/// One way of commenting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Profile {
    pub name: &'static str,
    /// One line for a profile picker.
    pub description: &'static str,
    /// What this profile pays attention to, appended to the common rules.
    #[serde(skip)]
    pub focus: &'static str,
}

const RULES: &str = "\
You are a live commentator watching a video as it happens. Each turn you are shown the last \
few seconds as a short series of frames in time order: the first is the oldest, the last is \
what is on screen right now. Each frame is labelled with its time on the video in seconds. \
After the frames comes your last comment, if there is one, and sometimes what the viewer asks \
you to watch for.
Rules:
- Answer with one or two short sentences, 25 words at most, in the present tense.
- Talk about what is new or changing; never repeat something you already said.
- Speak about the scene itself; do not mention frames, images, pictures or the camera.
- Do not guess at what you cannot see.
- If nothing meaningful has changed since your last comment, answer exactly: ...";

const PROFILES: &[Profile] = &[
    Profile {
        name: "default",
        description: "General live commentary on whatever matters most",
        focus: "Pick what a viewer would care about most: people and what they do, objects \
                that move or appear, and how the scene changes.",
    },
    Profile {
        name: "sports",
        description: "Play-by-play like a sports broadcaster",
        focus: "Call it like a sports broadcast: follow the ball or the action, the players' \
                moves, attacks, chances, fouls and scores. Be lively but accurate; never \
                invent names, numbers or scores you cannot read.",
    },
    Profile {
        name: "security",
        description: "Calm, factual reports of people, vehicles and unusual activity",
        focus: "Report like a security monitor: people or vehicles arriving or leaving, \
                objects left behind or taken, doors opening, unusual movement. Stay calm and \
                factual; do not speculate about who anyone is or what they intend.",
    },
    Profile {
        name: "nature",
        description: "Documentary-style narration of animals, plants and weather",
        focus: "Narrate like a nature documentary: the animals and plants you can see, what \
                they are doing, and changes in weather, light or water. Use a calm, curious \
                tone.",
    },
    Profile {
        name: "descriptive",
        description: "Plain audio description for someone who cannot see the screen",
        focus: "Describe the scene for a listener who cannot see it: who is where, what they \
                do, notable colours, and any text that appears on screen. Use plain, concrete \
                words.",
    },
];

/// The built-in profiles.
pub struct Profiles;

impl Profiles {
    /// Profile names in display order.
    pub fn names() -> Vec<&'static str> {
        PROFILES.iter().map(|p| p.name).collect()
    }

    pub fn all() -> &'static [Profile] {
        PROFILES
    }

    /// Looks a profile up by name (case-insensitive, surrounding spaces ignored).
    pub fn get(name: &str) -> Result<&'static Profile, ConfigError> {
        let wanted = name.trim();
        PROFILES
            .iter()
            .find(|p| p.name.eq_ignore_ascii_case(wanted))
            .ok_or_else(|| ConfigError::UnknownProfile {
                name: name.to_string(),
                known: Profiles::names().join(", "),
            })
    }
}

/// How the answers are given: in which language, and whether they will be spoken.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Style {
    pub language: Language,
    /// A voice speaks the answers: ask for sentences that sound right aloud.
    pub spoken: bool,
}

/// A language by its code (`en`, `de`, `pt-BR`, …): what `--language` takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Language(String);

/// Names the model knows better than codes, for the languages people ask for most.
const LANGUAGE_NAMES: &[(&str, &str)] = &[
    ("ar", "Arabic"),
    ("cs", "Czech"),
    ("da", "Danish"),
    ("de", "German"),
    ("el", "Greek"),
    ("en", "English"),
    ("es", "Spanish"),
    ("fi", "Finnish"),
    ("fr", "French"),
    ("he", "Hebrew"),
    ("hi", "Hindi"),
    ("hu", "Hungarian"),
    ("id", "Indonesian"),
    ("it", "Italian"),
    ("ja", "Japanese"),
    ("ko", "Korean"),
    ("nl", "Dutch"),
    ("no", "Norwegian"),
    ("pl", "Polish"),
    ("pt", "Portuguese"),
    ("ro", "Romanian"),
    ("ru", "Russian"),
    ("sv", "Swedish"),
    ("th", "Thai"),
    ("tr", "Turkish"),
    ("uk", "Ukrainian"),
    ("vi", "Vietnamese"),
    ("zh", "Chinese"),
];

impl Default for Language {
    fn default() -> Self {
        Language("en".into())
    }
}

impl Language {
    /// A BCP 47-like code: 2 or 3 letters, then optional `-` parts (`en`, `pt-BR`).
    pub fn parse(code: &str) -> Result<Language, ConfigError> {
        let code = code.trim();
        let mut parts = code.split(['-', '_']);
        let primary = parts.next().unwrap_or_default();
        let ok = (2..=3).contains(&primary.len())
            && primary.bytes().all(|b| b.is_ascii_alphabetic())
            && parts.all(|p| {
                (1..=8).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_alphanumeric())
            });
        if ok {
            Ok(Language(code.replace('_', "-")))
        } else {
            Err(ConfigError::BadLanguage(code.chars().take(40).collect()))
        }
    }

    pub fn code(&self) -> &str {
        &self.0
    }

    /// The primary subtag, lower case (`pt` of `pt-BR`).
    pub fn primary(&self) -> String {
        self.0
            .split('-')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase()
    }

    /// The language's English name where known, else its code.
    pub fn name(&self) -> String {
        let primary = self.primary();
        LANGUAGE_NAMES
            .iter()
            .find(|(code, _)| *code == primary)
            .map(|(_, name)| name.to_string())
            .unwrap_or_else(|| format!("the language with code '{}'", self.0))
    }
}

impl Profile {
    /// The system prompt in English, for reading.
    pub fn system_prompt(&self) -> String {
        self.system_prompt_in(&Style::default())
    }

    /// The system prompt for answers in `style`'s language, to be read or spoken.
    pub fn system_prompt_in(&self, style: &Style) -> String {
        let mut prompt = format!("{RULES}\n{}", self.focus);
        if style.spoken {
            prompt.push_str(
                "\nYour words are spoken aloud as the picture plays: use short, plain \
                 sentences that sound natural when heard, no lists, symbols or abbreviations.",
            );
        }
        if style.language.primary() != "en" {
            prompt.push_str(&format!(
                "\nAnswer in {}. Answer exactly ... (three dots) when nothing changed, in any language.",
                style.language.name()
            ));
        }
        prompt
    }

    /// The user text of a viewer's question about the frames: answered plainly, not as
    /// commentary, with what was said lately for context.
    pub fn question_prompt(
        &self,
        frames: usize,
        span: f64,
        recent: &[String],
        question: &str,
    ) -> String {
        let mut text =
            format!("Here are {frames} frames, oldest first, covering the last {span:.1} seconds.");
        if !recent.is_empty() {
            text.push_str("\nWhat you said about the video lately, oldest first:");
            for comment in recent {
                text.push_str(&format!("\n- {comment}"));
            }
        }
        text.push_str(&format!(
            "\nA viewer asks you directly: {}\nAnswer the question itself in one to three \
             short sentences, from what you can see; say so plainly if you cannot tell.",
            question.trim()
        ));
        text
    }

    /// The user text of one cycle, short: the previous comment, the viewer's instruction and
    /// a cue. The rest (what the frames are, the answer rules) is in the system prompt.
    pub fn cue(&self, last_comment: Option<&str>, instruction: &str) -> String {
        let mut text = String::new();
        if let Some(last) = last_comment {
            text.push_str(&format!("Your last comment was: \"{last}\".\n"));
        }
        let instruction = instruction.trim();
        if !instruction.is_empty() {
            text.push_str(&format!("The viewer asks: {instruction}\n"));
        }
        text.push_str("What is new now?");
        text
    }

    /// The user text of one cycle in the long wording (before [`Profile::cue`]). `span` is
    /// how many seconds the frames cover.
    pub fn user_prompt(
        &self,
        frames: usize,
        span: f64,
        last_comment: Option<&str>,
        instruction: &str,
    ) -> String {
        let mut text =
            format!("Here are {frames} frames, oldest first, covering the last {span:.1} seconds.");
        if let Some(last) = last_comment {
            text.push_str(&format!(
                "\nYour last comment was: \"{last}\". Do not repeat it; say only what is new."
            ));
        }
        let instruction = instruction.trim();
        if !instruction.is_empty() {
            text.push_str(&format!("\nThe viewer asks: {instruction}"));
        }
        text.push_str(
            "\nWhat is happening now? If nothing meaningful changed, answer exactly: ...",
        );
        text
    }
}

/// Whether an answer means "nothing changed": empty, or only dots (an ellipsis character
/// counts), possibly quoted. Such answers are not shown and not spoken.
pub fn is_skip(answer: &str) -> bool {
    answer
        .chars()
        .all(|c| c.is_whitespace() || matches!(c, '.' | '…' | '"' | '\'' | '`'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn language_and_voice_shape_the_prompt() {
        let profile = Profiles::get("sports").unwrap();
        assert_eq!(
            profile.system_prompt_in(&Style::default()),
            profile.system_prompt()
        );
        let german = Style {
            language: Language::parse("de").unwrap(),
            spoken: true,
        };
        let prompt = profile.system_prompt_in(&german);
        assert!(prompt.contains("Answer in German."), "{prompt}");
        assert!(prompt.contains("spoken aloud"), "{prompt}");
        assert_eq!(Language::parse("pt_BR").unwrap().code(), "pt-BR");
        assert_eq!(Language::parse("pt-BR").unwrap().name(), "Portuguese");
        assert!(Language::parse("xx").unwrap().name().contains("'xx'"));
        for bad in ["", "e", "english!", "en-", "1234"] {
            assert!(Language::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn five_profiles_by_name() {
        assert_eq!(
            Profiles::names(),
            ["default", "sports", "security", "nature", "descriptive"]
        );
        for name in Profiles::names() {
            let profile = Profiles::get(name).unwrap();
            assert_eq!(profile.name, name);
            let system = profile.system_prompt();
            assert!(system.contains("answer exactly: ..."), "{name}: {system}");
            assert!(system.contains("25 words"), "{name}");
            assert!(system.ends_with(profile.focus), "{name}");
        }
    }

    #[test]
    fn focus_differs_per_profile() {
        let mut prompts: Vec<String> = Profiles::all().iter().map(Profile::system_prompt).collect();
        prompts.dedup();
        assert_eq!(prompts.len(), Profiles::all().len());
    }

    #[test]
    fn lookup_ignores_case_and_rejects_unknown() {
        assert_eq!(Profiles::get(" Sports ").unwrap().name, "sports");
        let err = Profiles::get("opera").unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown profile 'opera': choose one of default, sports, security, nature, descriptive"
        );
    }

    #[test]
    fn user_prompt_carries_last_comment_and_instruction() {
        let profile = Profiles::get("default").unwrap();
        let plain = profile.user_prompt(4, 3.0, None, "  ");
        assert!(
            plain.starts_with("Here are 4 frames, oldest first, covering the last 3.0 seconds.")
        );
        assert!(!plain.contains("last comment"));
        assert!(!plain.contains("viewer asks"));
        let full = profile.user_prompt(4, 3.0, Some("A dog runs."), "watch the dog");
        assert!(
            full.contains("Your last comment was: \"A dog runs.\". Do not repeat it"),
            "{full}"
        );
        assert!(full.contains("The viewer asks: watch the dog"), "{full}");
    }

    #[test]
    fn the_cue_carries_only_what_changes() {
        let profile = Profiles::get("default").unwrap();
        assert_eq!(profile.cue(None, " "), "What is new now?");
        let full = profile.cue(Some("A dog runs."), "watch the dog");
        assert!(
            full.starts_with("Your last comment was: \"A dog runs.\".\n"),
            "{full}"
        );
        assert!(full.contains("The viewer asks: watch the dog\n"), "{full}");
        assert!(full.ends_with("What is new now?"));
        // What the long wording repeats every cycle is in the system prompt once.
        let long = profile.user_prompt(4, 3.0, Some("A dog runs."), "watch the dog");
        assert!(
            full.len() * 2 < long.len(),
            "{} vs {}",
            full.len(),
            long.len()
        );
        let system = profile.system_prompt();
        assert!(system.contains("labelled with its time"), "{system}");
        assert!(system.contains("answer exactly: ..."), "{system}");
    }

    #[test]
    fn skip_answers() {
        for answer in ["...", "", "  ", " ...\n", "…", "\"...\"", "....", "."] {
            assert!(is_skip(answer), "{answer:?}");
        }
        for answer in ["A dog runs.", "... a dog appears", "No."] {
            assert!(!is_skip(answer), "{answer:?}");
        }
    }
}
