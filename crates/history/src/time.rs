//! Times as users type them in a URL: RFC 3339 or unix seconds.
//!
//! Why no date crate: RFC 3339's date-time is a fixed layout (section 5.6) and turning a civil
//! date into days is one formula (Howard Hinnant's `days_from_civil`); the whole job is smaller
//! than the feature flags of `time` or `chrono`, and it is tested below against known instants.

use crate::error::{clip, HistoryError};

/// Parses RFC 3339 (`2026-11-30T18:00:00Z`, `2026-11-30t18:00:00.250+01:00`, a space for the
/// `T`), a bare date (`2026-11-30`, midnight UTC), or unix seconds (`1796061600`,
/// `1796061600.25`) into unix milliseconds. Fractions finer than a millisecond are cut.
pub fn parse_time(text: &str) -> Result<i64, HistoryError> {
    let trimmed = text.trim();
    let parsed = if trimmed.starts_with(|c: char| c.is_ascii_digit())
        && trimmed.bytes().all(|b| b.is_ascii_digit() || b == b'.')
    {
        unix_seconds(trimmed)
    } else {
        rfc3339(trimmed)
    };
    parsed.ok_or_else(|| HistoryError::BadTime(clip(text)))
}

/// Formats unix milliseconds as RFC 3339 in UTC with milliseconds: `2026-11-30T18:00:00.000Z`.
pub fn format_time(ms: i64) -> String {
    let days = ms.div_euclid(86_400_000);
    let in_day = ms.rem_euclid(86_400_000);
    let (y, m, d) = civil_from_days(days);
    let (h, rest) = (in_day / 3_600_000, in_day % 3_600_000);
    let (min, rest) = (rest / 60_000, rest % 60_000);
    let (s, milli) = (rest / 1000, rest % 1000);
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{s:02}.{milli:03}Z")
}

fn unix_seconds(text: &str) -> Option<i64> {
    let (int, frac) = text.split_once('.').unwrap_or((text, ""));
    // Eleven digits reach the year 5138; more is milliseconds by mistake, or nonsense.
    if int.is_empty() || int.len() > 11 || frac.contains('.') {
        return None;
    }
    Some(int.parse::<i64>().ok()? * 1000 + millis(frac.as_bytes()))
}

/// `"25"` → 250: the first three digits of a fraction of a second.
fn millis(digits: &[u8]) -> i64 {
    (0..3)
        .map(|i| digits.get(i).map_or(0, |d| i64::from(d - b'0')))
        .fold(0, |ms, d| ms * 10 + d)
}

fn rfc3339(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    let num = |from: usize, to: usize| -> Option<i64> {
        let part = b.get(from..to)?;
        if !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(part).ok()?.parse().ok()
    };
    if b.get(4) != Some(&b'-') || b.get(7) != Some(&b'-') {
        return None;
    }
    let (year, month, day) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    let days = days_from_civil(year, month, day);
    if b.len() == 10 {
        return Some(days * 86_400_000);
    }
    if !matches!(b[10], b'T' | b't' | b' ') || b.get(13) != Some(&b':') || b.get(16) != Some(&b':')
    {
        return None;
    }
    let (hour, minute, second) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
    // 60 is a leap second: it reads as the first instant of the next minute.
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut i = 19;
    let mut ms = 0;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        i = start;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return None;
        }
        ms = millis(&b[start..i]);
    }
    let offset_s = match *b.get(i)? {
        b'Z' | b'z' if b.len() == i + 1 => 0,
        sign @ (b'+' | b'-') if b.len() == i + 6 && b[i + 3] == b':' => {
            let (oh, om) = (num(i + 1, i + 3)?, num(i + 4, i + 6)?);
            if oh > 23 || om > 59 {
                return None;
            }
            let offset = oh * 3600 + om * 60;
            if sign == b'+' {
                offset
            } else {
                -offset
            }
        }
        _ => return None,
    };
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset_s;
    Some(seconds * 1000 + ms)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_instants() {
        // `date -u -d 2026-11-30T18:00:00Z +%s` = 1796061600
        let cases = [
            ("1970-01-01T00:00:00Z", 0),
            ("2026-11-30T18:00:00Z", 1_796_061_600_000),
            ("2026-11-30t18:00:00z", 1_796_061_600_000),
            ("2026-11-30 18:00:00Z", 1_796_061_600_000),
            ("2026-11-30T19:00:00+01:00", 1_796_061_600_000),
            ("2026-11-30T12:30:00-05:30", 1_796_061_600_000),
            ("2026-11-30T18:00:00.25Z", 1_796_061_600_250),
            ("2026-11-30T18:00:00.123456789Z", 1_796_061_600_123),
            ("2026-11-30", 1_795_996_800_000),
            ("2024-02-29T00:00:00Z", 1_709_164_800_000),
            ("2000-03-01T00:00:00Z", 951_868_800_000),
            ("1969-12-31T23:59:59Z", -1000),
            ("2016-12-31T23:59:60Z", 1_483_228_800_000),
            ("1796061600", 1_796_061_600_000),
            ("1796061600.5", 1_796_061_600_500),
            (" 1796061600 ", 1_796_061_600_000),
            ("0", 0),
        ];
        for (text, want) in cases {
            assert_eq!(parse_time(text).unwrap(), want, "{text}");
        }
    }

    #[test]
    fn rejects_what_is_not_a_time() {
        let bad = [
            "",
            "now",
            "2026-13-01T00:00:00Z",
            "2026-02-29T00:00:00Z",
            "2026-11-31",
            "2026-11-30T24:00:00Z",
            "2026-11-30T18:00:00",
            "2026-11-30T18:00Z",
            "2026-11-30T18:00:00.Z",
            "2026-11-30T18:00:00+0100",
            "2026-11-30T18:00:00+01:00x",
            "2026-11-30T18:00:00ZZ",
            "1796061600000",
            "1.2.3",
            "-5",
            "+1796061600",
            "２０２６-11-30",
            "1796061600\u{0}",
        ];
        for text in bad {
            let err = parse_time(text).unwrap_err();
            assert!(err.is_bad_input(), "{text}: {err}");
        }
    }

    #[test]
    fn format_roundtrips() {
        for ms in [
            0,
            -1,
            1_796_061_600_250,
            951_868_800_000,
            1_709_164_800_000 - 1,
            253_402_300_799_999,
        ] {
            let text = format_time(ms);
            assert_eq!(parse_time(&text).unwrap(), ms, "{text}");
        }
        assert_eq!(format_time(1_796_061_600_250), "2026-11-30T18:00:00.250Z");
    }
}
