//! The streams the command line asks for, checked together: every `--source` and every
//! table of the `--streams` file is resolved against the global flags, and every bad
//! setting of every stream is reported at once, each line naming its stream
//! (`stream 'door': capture_fps: …`), so a bad start-up is fixed in one go.

use kibitz_media::PUSHED;

use crate::spec::{StreamDefaults, StreamSettings, StreamSpec};
use crate::StreamId;

/// One stream as the command line gave it.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamInput {
    /// The id given (`--source door=…`, a streams-file table), if any.
    pub id: Option<String>,
    pub settings: StreamSettings,
}

impl StreamInput {
    /// `--source [ID=]SOURCE`: an id prefix is taken only when it is a valid id and what
    /// follows is not `//…` (so `rtsp://…` and `C:=x` stay sources).
    pub fn from_source_flag(value: &str) -> StreamInput {
        let (id, source) = match value.split_once('=') {
            Some((id, rest))
                if StreamId::new(id).is_ok() && !id.contains(':') && !rest.starts_with("//") =>
            {
                (Some(id.to_string()), rest.to_string())
            }
            _ => (None, value.to_string()),
        };
        StreamInput {
            id,
            settings: StreamSettings {
                source: Some(source),
                ..StreamSettings::default()
            },
        }
    }
}

/// Resolves every input; ids left out become `s<position>` (the first free one from the
/// stream's 1-based position on). Errors are one line each.
pub fn plan(
    inputs: &[StreamInput],
    defaults: &StreamDefaults,
) -> Result<Vec<StreamSpec>, Vec<String>> {
    let mut problems = Vec::new();
    let given: Vec<&str> = inputs.iter().filter_map(|i| i.id.as_deref()).collect();
    let mut taken: Vec<String> = Vec::new();
    let mut specs = Vec::new();
    for (position, input) in inputs.iter().enumerate() {
        let id = match &input.id {
            Some(id) => id.clone(),
            None => (position + 1..)
                .map(|n| format!("s{n}"))
                .find(|id| !given.contains(&id.as_str()) && !taken.contains(id))
                .expect("some id is free"),
        };
        if taken.contains(&id) {
            problems.push(format!(
                "stream '{id}' is given twice: stream ids must be unique"
            ));
            continue;
        }
        taken.push(id.clone());
        let settings = StreamSettings {
            id: Some(id.clone()),
            ..input.settings.clone()
        };
        if settings.source.as_deref().map(str::trim) == Some(PUSHED) {
            // A pushed stream needs a publisher in this process (a WebRTC ingest), which
            // only the API makes; from here it would wait for nobody.
            problems.push(format!(
                "stream '{id}': source: \"{PUSHED}\" streams are made through the API (POST \
                 /api/streams with {{\"source\": \"{PUSHED}\"}}) for a publisher; give a \
                 video source here (a file named {PUSHED}: ./{PUSHED})"
            ));
            continue;
        }
        match StreamSpec::resolve(&settings, None, defaults) {
            Ok(spec) => specs.push(spec),
            Err(e) => problems.extend(e.0.iter().map(|p| format!("stream '{id}': {p}"))),
        }
    }
    if problems.is_empty() {
        Ok(specs)
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_prefixes() {
        let door = StreamInput::from_source_flag("door=rtsp://cam/1");
        assert_eq!(door.id.as_deref(), Some("door"));
        assert_eq!(door.settings.source.as_deref(), Some("rtsp://cam/1"));
        for plain in [
            "rtsp://cam/1?a=b",
            "game.mp4",
            "http://x/y=z",
            "Weird Name=x",
        ] {
            let input = StreamInput::from_source_flag(plain);
            assert_eq!(input.id, None, "{plain}");
            assert_eq!(input.settings.source.as_deref(), Some(plain));
        }
    }

    #[test]
    fn ids_default_by_position_and_must_be_unique() {
        let d = StreamDefaults::default();
        let inputs: Vec<StreamInput> = ["a.mp4", "s1=b.mp4", "c.mp4"]
            .iter()
            .map(|s| StreamInput::from_source_flag(s))
            .collect();
        let ids: Vec<String> = plan(&inputs, &d)
            .unwrap()
            .iter()
            .map(|s| s.id.to_string())
            .collect();
        assert_eq!(ids, ["s2", "s1", "s3"]);

        let twice: Vec<StreamInput> = ["x=a.mp4", "x=b.mp4"]
            .iter()
            .map(|s| StreamInput::from_source_flag(s))
            .collect();
        assert!(plan(&twice, &d).unwrap_err()[0].contains("given twice"));
    }

    #[test]
    fn pushed_streams_come_from_the_api_only() {
        let d = StreamDefaults::default();
        let problems = plan(&[StreamInput::from_source_flag("cam=push")], &d).unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0]
                .starts_with("stream 'cam': source: \"push\" streams are made through the API"),
            "{problems:?}"
        );
        assert!(plan(&[StreamInput::from_source_flag("cam=./push")], &d).is_ok());
    }

    #[test]
    fn every_problem_of_every_stream_at_once() {
        let d = StreamDefaults::default();
        let mut bad = StreamInput::from_source_flag("door=rtsp://cam/1");
        bad.settings.capture_fps = Some(0.0);
        bad.settings.profile = Some("opera".into());
        let mut worse = StreamInput::from_source_flag("game.mp4");
        worse.settings.frame_stride = Some(0);
        let problems = plan(&[bad, worse], &d).unwrap_err();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].starts_with("stream 'door': profile"));
        assert!(problems[1].starts_with("stream 'door': capture_fps"));
        assert!(problems[2].starts_with("stream 's2': frame_stride"));
    }
}
