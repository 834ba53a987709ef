//! The `--streams` TOML file, as `kibitz serve` reads it: parsed, planned and resolved
//! against the defaults. Besides not panicking: every stream that passes runs a commentary
//! loop that accepts its settings, and comes back the same from its own settings (what the
//! state file keeps) and through JSON.
#![no_main]

use kibitz_stream::topology::{plan, StreamInput};
use kibitz_stream::{parse_streams_file, StreamDefaults, StreamSettings, StreamSpec};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(streams) = parse_streams_file(text) else {
        return;
    };
    let inputs: Vec<StreamInput> = streams
        .into_iter()
        .map(|(id, settings)| StreamInput {
            id: Some(id),
            settings,
        })
        .collect();
    let defaults = StreamDefaults::default();
    let Ok(specs) = plan(&inputs, &defaults) else {
        return;
    };
    for spec in specs {
        assert_eq!(spec.commentator(&defaults).validate(), Ok(()), "{spec:?}");
        let settings = spec.settings();
        let again = StreamSpec::resolve(&settings, None, &defaults);
        assert_eq!(
            again.as_ref(),
            Ok(&spec),
            "a spec's own settings resolve to it"
        );
        let json = serde_json::to_string(&settings).expect("settings serialize");
        let back: StreamSettings = serde_json::from_str(&json).expect("settings parse back");
        assert_eq!(back, settings, "{json}");
        let _ = spec.source_shown();
    }
});
