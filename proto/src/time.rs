//! Wall-clock time and durations as every Starling binary reads and writes them: the
//! one place that reads the system clock as unix milliseconds, and the one parser for
//! durations given on command lines and in environment variables.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Unix time in milliseconds (0 before 1970, saturating far in the future).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// [`unix_ms`] as the signed integer databases store.
pub fn unix_ms_i64() -> i64 {
    i64::try_from(unix_ms()).unwrap_or(i64::MAX)
}

/// Unix time in whole seconds.
pub fn unix_secs() -> u64 {
    unix_ms() / 1000
}

/// The largest duration [`parse_duration`] accepts (about 31 years).
pub const MAX_PARSED_DURATION: Duration = Duration::from_secs(1_000_000_000);

/// Parses a duration such as `1500ms`, `20s`, `2.5m`, `36h`, `7d` or a bare number of
/// seconds (`90`). Units: `ms`, `s`/`sec`/`secs`, `m`/`min`, `h`, `d`. For clap's
/// `value_parser`: the error is a sentence for the user.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (examples: 1500ms, 20s, 2m, 36h, 7d)"))?;
    let secs = match unit.trim() {
        "" | "s" | "sec" | "secs" => n,
        "ms" => n / 1000.0,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86_400.0,
        other => {
            return Err(format!(
                "{s:?}: unknown duration unit {other:?} (use ms, s, m, h or d)"
            ));
        }
    };
    if !secs.is_finite() || !(0.0..=MAX_PARSED_DURATION.as_secs_f64()).contains(&secs) {
        return Err(format!("duration {s:?} out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// [`parse_duration`], refusing zero.
pub fn parse_nonzero_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        Duration::ZERO => Err(format!("{:?}: the duration must not be zero", s.trim())),
        d => Ok(d),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_every_unit() {
        assert_eq!(
            parse_duration("1500ms").unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(parse_duration(" 20s ").unwrap(), Duration::from_secs(20));
        assert_eq!(parse_duration("20 secs").unwrap(), Duration::from_secs(20));
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("2.5m").unwrap(), Duration::from_secs(150));
        assert_eq!(
            parse_duration("36h").unwrap(),
            Duration::from_secs(36 * 3600)
        );
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86_400)
        );
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
    }

    #[test]
    fn bad_durations_are_refused_with_a_sentence() {
        for bad in [
            "",
            "s",
            "1y",
            "-1s",
            "1e400",
            "nan",
            "1.2.3s",
            "99999999999d",
        ] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.contains("duration"), "{bad:?}: {e}");
        }
        assert!(parse_nonzero_duration("0s").is_err());
        assert_eq!(
            parse_nonzero_duration("1ms").unwrap(),
            Duration::from_millis(1)
        );
    }

    #[test]
    fn the_clock_reads_unix_time() {
        // 2020-09-13 onwards, and the three readings agree.
        assert!(unix_ms() > 1_600_000_000_000);
        assert!(unix_ms_i64() > 1_600_000_000_000);
        assert!(unix_secs() > 1_600_000_000);
    }
}
