//! Times and steps as `starling-admin` reads and prints them: `--from`/`--to` as RFC 3339
//! (`2025-05-01T12:00:00Z`, any offset, optional fraction) or relative to now (`now`,
//! `-1h`, `now-90m`, `+5m`); `--step` as a duration that is a whole number of minutes
//! (the audience roll-ups are per minute); unix milliseconds printed as RFC 3339 UTC.
//! Hand-written (proleptic Gregorian calendar, no leap seconds) so the CLI needs no date
//! crate.

/// A point in time as given on the command line, resolved against "now" when used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    /// Unix milliseconds.
    At(i64),
    /// Now plus this many milliseconds (negative: in the past).
    FromNow(i64),
}

impl When {
    /// Unix milliseconds, with `now_ms` for relative forms.
    pub fn resolve(self, now_ms: i64) -> i64 {
        match self {
            When::At(ms) => ms,
            When::FromNow(d) => now_ms.saturating_add(d),
        }
    }
}

const EXAMPLES: &str =
    "examples: 2025-05-01T12:00:00Z, 2025-05-01T14:00:00+02:00, now, -1h, now-90m, +5m";

/// Parses `--from`/`--to` (for clap's `value_parser`: the error is a sentence).
pub fn parse_when(s: &str) -> Result<When, String> {
    let t = s.trim();
    let rel = t.strip_prefix("now").unwrap_or(t).trim_start();
    if t == "now" {
        return Ok(When::FromNow(0));
    }
    if let Some((sign, rest)) = rel
        .strip_prefix('-')
        .map(|r| (-1i64, r))
        .or_else(|| rel.strip_prefix('+').map(|r| (1, r)))
    {
        let d = starling_proto::time::parse_duration(rest)
            .map_err(|e| format!("{t:?}: {e} ({EXAMPLES})"))?;
        let ms = i64::try_from(d.as_millis()).map_err(|_| format!("{t:?} is out of range"))?;
        return Ok(When::FromNow(sign * ms));
    }
    parse_rfc3339(t)
        .map(When::At)
        .ok_or_else(|| format!("{t:?} is not an RFC 3339 time nor relative to now ({EXAMPLES})"))
}

/// Parses `--step`: a positive whole number of minutes, returned in seconds.
pub fn parse_step(s: &str) -> Result<u32, String> {
    let d = starling_proto::time::parse_duration(s)?;
    let ms = d.as_millis();
    if ms == 0 || ms % 60_000 != 0 {
        return Err(format!(
            "step {:?} is not a positive multiple of 60 s: the roll-ups are per minute \
             (examples: 60s, 5m, 1h, 1d)",
            s.trim()
        ));
    }
    u32::try_from(ms / 1000).map_err(|_| format!("step {:?} is too large", s.trim()))
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date of a day count since 1970-01-01 (`civil_from_days`).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)` (`T` may be `t` or a space, `Z` may be
/// `z`) as unix milliseconds; `None` when malformed or out of range.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let num = |from: usize, len: usize| -> Option<i64> {
        let part = b.get(from..from + len)?;
        if !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(part).ok()?.parse().ok()
    };
    let sep = |i: usize, c: &[u8]| b.get(i).is_some_and(|x| c.contains(x));
    if !(sep(4, b"-") && sep(7, b"-") && sep(10, b"Tt ") && sep(13, b":") && sep(16, b":")) {
        return None;
    }
    let (y, mo, d) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    let (h, mi, sec) = (num(11, 2)?, num(14, 2)?, num(17, 2)?);
    if !(1..=12).contains(&mo) || d < 1 || d > days_in_month(y, mo) || h > 23 || mi > 59 {
        return None;
    }
    // 60: a leap second, read as the next second.
    if sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut frac_ms = 0i64;
    if sep(i, b".") {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return None;
        }
        let digits = &s[start..i.min(start + 3)];
        frac_ms = format!("{digits:0<3}").parse().ok()?;
    }
    let offset_min = match b.get(i..)? {
        b"Z" | b"z" => 0,
        [sign @ (b'+' | b'-'), ..] if b.len() == i + 6 && sep(i + 3, b":") => {
            let (oh, om) = (num(i + 1, 2)?, num(i + 4, 2)?);
            if oh > 23 || om > 59 {
                return None;
            }
            let m = oh * 60 + om;
            if *sign == b'-' { -m } else { m }
        }
        _ => return None,
    };
    let days = days_from_civil(y, mo, d);
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset_min * 60;
    Some(secs * 1000 + frac_ms)
}

/// Unix milliseconds as RFC 3339 UTC to the second (`2025-05-01T12:00:00Z`).
pub fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn rfc3339_round_trips_and_honours_offsets() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339("2025-05-01T12:00:00Z"),
            Some(1_746_100_800_000)
        );
        assert_eq!(
            parse_rfc3339("2025-05-01T14:00:00+02:00"),
            Some(1_746_100_800_000)
        );
        assert_eq!(
            parse_rfc3339("2025-05-01 06:30:00.25-05:30"),
            Some(1_746_100_800_250)
        );
        assert_eq!(
            parse_rfc3339("2024-02-29t23:59:59.123456z"),
            Some(1_709_251_199_123)
        );
        for ms in [0, 951_782_400_000, 1_746_100_800_000, 4_102_444_800_000] {
            assert_eq!(parse_rfc3339(&rfc3339(ms)), Some(ms), "{}", rfc3339(ms));
        }
        assert_eq!(rfc3339(1_746_100_800_999), "2025-05-01T12:00:00Z");
        for bad in [
            "",
            "2025-05-01",
            "2025-05-01T12:00:00",
            "2025-13-01T00:00:00Z",
            "2025-02-29T00:00:00Z",
            "2025-05-01T24:00:00Z",
            "2025-05-01T12:00:00+2:00",
            "2025-05-01T12:00:00.Z",
            "2025-05-01T12:00:00Zjunk",
            "2025-05-01T12:00:00+02:00x",
            "yesterday",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn relative_times_and_steps() {
        let now = 1_746_100_800_000;
        assert_eq!(parse_when("now").unwrap().resolve(now), now);
        assert_eq!(parse_when("-1h").unwrap().resolve(now), now - 3_600_000);
        assert_eq!(parse_when("now-90m").unwrap().resolve(now), now - 5_400_000);
        assert_eq!(parse_when("now + 5m").unwrap().resolve(now), now + 300_000);
        assert_eq!(
            parse_when("2025-05-01T11:00:00Z").unwrap().resolve(now),
            now - 3_600_000
        );
        for bad in ["1h", "-1y", "now-", "then"] {
            assert!(parse_when(bad).unwrap_err().contains("examples"), "{bad:?}");
        }
        assert_eq!(parse_step("60s"), Ok(60));
        assert_eq!(parse_step("5m"), Ok(300));
        assert_eq!(parse_step("1h"), Ok(3600));
        assert_eq!(parse_step("120"), Ok(120));
        for bad in ["90s", "0", "1.5m", "500ms"] {
            assert!(
                parse_step(bad).unwrap_err().contains("multiple of 60"),
                "{bad:?}"
            );
        }
        assert!(parse_step("fortnight").is_err());
    }
}
