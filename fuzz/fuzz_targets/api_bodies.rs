//! Request bodies of the HTTP API, parsed as the handlers parse them and then checked by
//! the owner of each value: stream settings (`POST /api/streams`, then a `PATCH` on the
//! stream it made), a selection (`POST …/instruction`), an alert rule, a question. The first
//! byte picks the route; a NUL separates the `POST` body from the `PATCH` body. Besides not
//! panicking: whatever is accepted runs, and a `PATCH` changes only live fields.
#![no_main]

use kibitz_stream::{check_rule, StreamDefaults, StreamId, StreamSettings, StreamSpec};
use libfuzzer_sys::fuzz_target;

use kibitz_server::fuzzing::{alert_rule, question, selection, stream_settings};

fuzz_target!(|data: &[u8]| {
    let Some((&route, body)) = data.split_first() else {
        return;
    };
    let defaults = StreamDefaults::default();
    match route % 4 {
        0 => {
            let (add, change) = match body.iter().position(|&b| b == 0) {
                Some(at) => (&body[..at], Some(&body[at + 1..])),
                None => (body, None),
            };
            let Ok(settings) = stream_settings(add) else {
                return;
            };
            let Ok(spec) = StreamSpec::resolve(&settings, Some(StreamId::nth(1)), &defaults) else {
                return;
            };
            runs(&spec, &defaults);
            if let Some(Ok(change)) = change.map(stream_settings) {
                patched(&spec, &change, &defaults);
            }
        }
        1 => {
            if let Ok(change) = selection(body) {
                patched(&base(&defaults), &change, &defaults);
            }
        }
        2 => {
            if let Ok(Ok(rule)) = alert_rule(body).map(|r| check_rule(&r)) {
                // The rule's cooldown becomes a Duration when it is asked.
                let _ = std::time::Duration::from_secs_f64(rule.cooldown);
            }
        }
        _ => {
            let _ = question(body);
        }
    }
});

fn base(defaults: &StreamDefaults) -> StreamSpec {
    let settings = StreamSettings {
        source: Some("rtsp://camera/1".into()),
        ..StreamSettings::default()
    };
    StreamSpec::resolve(&settings, Some(StreamId::nth(1)), defaults).expect("a plain stream")
}

/// A spec that passed runs a commentary loop and comes back from its own settings.
fn runs(spec: &StreamSpec, defaults: &StreamDefaults) {
    assert_eq!(spec.commentator(defaults).validate(), Ok(()), "{spec:?}");
    let again = StreamSpec::resolve(&spec.settings(), None, defaults);
    assert_eq!(again.as_ref(), Ok(spec));
}

/// A change that passed touches only live fields and leaves a spec that runs.
fn patched(spec: &StreamSpec, change: &StreamSettings, defaults: &StreamDefaults) {
    let Ok(next) = spec.patch(change, defaults) else {
        return;
    };
    runs(&next, defaults);
    let fixed = |s: &StreamSpec| {
        (
            s.id.clone(),
            s.source.clone(),
            s.capture_fps,
            s.frames_per_inference,
            s.frame_stride,
            s.stream_delay_init,
            s.stream_delay_ema_alpha,
            s.scene_change_threshold,
            s.language.clone(),
            s.alerts.clone(),
        )
    };
    assert_eq!(
        fixed(&next),
        fixed(spec),
        "a PATCH changed a field that is not live"
    );
}
