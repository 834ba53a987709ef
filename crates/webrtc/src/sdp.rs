//! What an offer must hold before a session is made from it, checked on the SDP text so
//! that a client learns what is wrong in words (`400` with the reason) rather than from an
//! answer that carries nothing, and so that the rules are one function each, testable
//! without a peer.

use str0m::change::SdpOffer;

use crate::WebRtcError;

/// The media sections of an offer, as far as kibitz cares.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Sections {
    /// A `m=video` section offering H.264.
    pub h264: bool,
    /// A `m=video` section at all.
    pub video: bool,
    /// A `m=audio` section offering Opus.
    pub opus: bool,
    /// A `m=application` section (a data channel).
    pub data: bool,
}

/// Parses `text` as an SDP offer and reads its sections; a malformed offer is refused
/// with str0m's reason.
pub(crate) fn parse(text: &str) -> Result<(SdpOffer, Sections), WebRtcError> {
    if text.trim().is_empty() {
        return Err(WebRtcError::BadOffer(
            "the body is empty; send the SDP offer as `application/sdp`".into(),
        ));
    }
    let offer = SdpOffer::from_sdp_string(text)
        .map_err(|e| WebRtcError::BadOffer(format!("the offer is not valid SDP: {e}")))?;
    Ok((offer, sections(text)))
}

/// Which sections the text has (the rtpmap lines of each `m=` section).
fn sections(text: &str) -> Sections {
    let mut found = Sections::default();
    let mut kind = "";
    for line in text.lines().map(str::trim) {
        if let Some(media) = line.strip_prefix("m=") {
            kind = media.split_whitespace().next().unwrap_or("");
            match kind {
                "video" => found.video = true,
                "application" => found.data = true,
                _ => {}
            }
        } else if let Some(map) = line.strip_prefix("a=rtpmap:") {
            let codec = map
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.split('/').next())
                .unwrap_or("")
                .to_ascii_lowercase();
            match (kind, codec.as_str()) {
                ("video", "h264") => found.h264 = true,
                ("audio", "opus") => found.opus = true,
                _ => {}
            }
        }
    }
    found
}

/// A viewer's offer (WHEP) must take H.264 video or Opus audio; a video section without
/// H.264 is refused rather than answered with a picture the client cannot decode.
pub(crate) fn check_viewer(sections: &Sections) -> Result<(), WebRtcError> {
    if sections.video && !sections.h264 {
        return Err(WebRtcError::BadOffer(
            "the offer's video has no H.264; kibitz sends H.264 (constrained baseline, packetization-mode 1)".into(),
        ));
    }
    if !sections.h264 && !sections.opus {
        return Err(WebRtcError::BadOffer(
            "the offer has no usable m-line: kibitz sends H.264 video and Opus audio".into(),
        ));
    }
    Ok(())
}

/// A publisher's offer (WHIP) must send H.264 video: that is what kibitz decodes.
pub(crate) fn check_publisher(sections: &Sections) -> Result<(), WebRtcError> {
    if !sections.video {
        return Err(WebRtcError::BadOffer(
            "the offer has no video m-line; a publisher sends H.264 video".into(),
        ));
    }
    if !sections.h264 {
        return Err(WebRtcError::BadOffer(
            "the offer's video has no H.264, the one codec kibitz decodes".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &str = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n";

    #[test]
    fn reads_the_sections_an_offer_has() {
        let text = format!(
            "{HEAD}m=video 9 UDP/TLS/RTP/SAVPF 96 102\r\na=rtpmap:96 VP8/90000\r\na=rtpmap:102 H264/90000\r\n\
             m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus/48000/2\r\n\
             m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n"
        );
        assert_eq!(
            sections(&text),
            Sections {
                h264: true,
                video: true,
                opus: true,
                data: true
            }
        );
    }

    #[test]
    fn video_without_h264_is_refused_with_the_reason() {
        let vp8 = Sections {
            video: true,
            opus: true,
            ..Sections::default()
        };
        let err = check_viewer(&vp8).unwrap_err().to_string();
        assert!(err.contains("no H.264"), "{err}");
        let err = check_publisher(&vp8).unwrap_err().to_string();
        assert!(err.contains("no H.264"), "{err}");
    }

    #[test]
    fn an_offer_of_only_data_has_no_usable_line() {
        let data = Sections {
            data: true,
            ..Sections::default()
        };
        let err = check_viewer(&data).unwrap_err().to_string();
        assert!(err.contains("no usable m-line"), "{err}");
        assert!(check_publisher(&data).is_err());
    }

    #[test]
    fn audio_alone_is_enough_to_view() {
        let audio = Sections {
            opus: true,
            ..Sections::default()
        };
        assert!(check_viewer(&audio).is_ok());
    }

    #[test]
    fn garbage_and_empty_bodies_are_refused() {
        assert!(matches!(parse(""), Err(WebRtcError::BadOffer(_))));
        assert!(matches!(
            parse("hello, this is not SDP"),
            Err(WebRtcError::BadOffer(_))
        ));
    }
}
