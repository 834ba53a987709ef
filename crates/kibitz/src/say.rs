//! `kibitz say "TEXT" -o out.wav`: one text through a voice, to hear it and to time it
//! (time to first audio, real-time factor) before trusting it with live commentary.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use kibitz_voice::{OggOpusWriter, Pcm, Resampler, VoiceOptions, VoiceSpec};

use crate::flags::{SayArgs, VoiceArgs};

/// The voice settings the flags give.
pub fn options(args: &VoiceArgs) -> anyhow::Result<VoiceOptions> {
    if !(args.voice_timeout.is_finite() && args.voice_timeout > 0.0) {
        bail!(
            "--voice-timeout must be a positive number of seconds, not {}",
            args.voice_timeout
        );
    }
    Ok(VoiceOptions {
        language: args.language.clone(),
        espeak_program: args.espeak_program.clone(),
        espeak_voice: args.espeak_voice.clone(),
        rate_wpm: args.voice_rate,
        openai_model: args.voice_model.clone(),
        openai_voice: args.voice_name.clone(),
        timeout: Duration::from_secs_f64(args.voice_timeout),
    })
}

pub async fn run(args: SayArgs) -> anyhow::Result<ExitCode> {
    let spec = args.voice.voice.clone();
    if spec == VoiceSpec::Off {
        bail!("--voice off says nothing\nhint: pick espeak, piper:PATH or openai:URL");
    }
    let options = options(&args.voice)?;
    let started = Instant::now();
    let voice = tokio::task::spawn_blocking(move || kibitz_voice::build(&spec, &options))
        .await??
        .context("no voice")?;
    let loaded = started.elapsed();
    let info = voice.info();

    let started = Instant::now();
    let mut utterance = kibitz_voice::speak(voice, &args.text);
    let mut first_audio = None;
    let mut working = Duration::ZERO;
    let mut pcm = Pcm::default();
    while let Some(clip) = utterance.next().await {
        let clip = clip?;
        first_audio.get_or_insert(started.elapsed());
        working += clip.took;
        // A server may answer sentences at different rates; keep the first one's.
        if pcm.sample_rate != 0 && clip.pcm.sample_rate != pcm.sample_rate {
            pcm.append(&Resampler::convert(&clip.pcm, pcm.sample_rate));
        } else {
            pcm.append(&clip.pcm);
        }
    }
    let Some(first_audio) = first_audio else {
        bail!("nothing to say: the text is empty once markup, URLs and \"...\" are removed");
    };
    write(&args.output, &pcm)?;
    let spoken = pcm.duration();
    eprintln!(
        "[{} {} {}] {:.2} s of speech at {} Hz to {}: first audio after {} ms, real-time factor {:.3} (voice loaded in {} ms)",
        info.engine,
        info.name,
        info.language,
        spoken.as_secs_f64(),
        pcm.sample_rate,
        args.output.display(),
        first_audio.as_millis(),
        working.as_secs_f64() / spoken.as_secs_f64().max(1e-6),
        loaded.as_millis(),
    );
    Ok(ExitCode::SUCCESS)
}

/// `.ogg`/`.opus`: Ogg/Opus at 48 kHz; anything else: a 16-bit mono WAV.
fn write(path: &std::path::Path, pcm: &Pcm) -> anyhow::Result<()> {
    let ogg = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("ogg") || e.eq_ignore_ascii_case("opus"));
    let file = std::fs::File::create(path)
        .with_context(|| format!("cannot write '{}'", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    if ogg {
        use std::io::Write;
        let mut writer = OggOpusWriter::new(1)?;
        out.write_all(&writer.push(pcm)?)?;
        out.write_all(&writer.finish()?)?;
        out.flush()?;
    } else {
        kibitz_voice::write_wav(pcm, out)?;
    }
    Ok(())
}
