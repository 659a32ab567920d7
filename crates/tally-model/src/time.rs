//! Time helpers: Tally stores microseconds since the Unix epoch, UTC.

use chrono::{DateTime, NaiveDate, TimeZone, Utc};

pub const MICROS_PER_MILLI: i64 = 1_000;
pub const MICROS_PER_SEC: i64 = 1_000_000;
pub const MICROS_PER_DAY: i64 = 86_400 * MICROS_PER_SEC;

/// Days since the Unix epoch, the Arrow `Date32` value of the day holding `micros`.
pub fn day_of(micros: i64) -> i32 {
    // div_euclid so that times before 1970 land in the right (earlier) day.
    i32::try_from(micros.div_euclid(MICROS_PER_DAY)).unwrap_or(i32::MAX)
}

pub fn now_micros() -> i64 {
    Utc::now().timestamp_micros()
}

pub fn to_datetime(micros: i64) -> Option<DateTime<Utc>> {
    Utc.timestamp_micros(micros).single()
}

/// RFC 3339 with a `Z` suffix and only as many sub-second digits as needed.
pub fn format_rfc3339(micros: i64) -> String {
    match to_datetime(micros) {
        Some(t) => t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
        None => format!("{micros}us"),
    }
}

/// Parses an RFC 3339 timestamp (any offset) into microseconds UTC.
pub fn parse_rfc3339(s: &str) -> Result<i64, String> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc).timestamp_micros())
        .map_err(|e| format!("'{s}' is not an RFC 3339 timestamp: {e}"))
}

pub fn date_string(day: i32) -> String {
    NaiveDate::from_num_days_from_ce_opt(day + 719_163)
        .map(|d| d.format("%Y-%m-%d").to_string())
        .unwrap_or_else(|| day.to_string())
}

/// Latest instant Tally accepts: year 9999, well inside i64 microseconds and chrono.
pub const MAX_MICROS: i64 = 253_402_300_799 * MICROS_PER_SEC;
/// Earliest instant Tally accepts: 1970-01-01. Metrics from before the epoch are refused so a
/// seconds-vs-milliseconds mix-up surfaces as an error instead of landing in 1970.
pub const MIN_MICROS: i64 = 0;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_and_dates() {
        assert_eq!(day_of(0), 0);
        assert_eq!(day_of(MICROS_PER_DAY - 1), 0);
        assert_eq!(day_of(MICROS_PER_DAY), 1);
        assert_eq!(day_of(-1), -1);
        assert_eq!(date_string(0), "1970-01-01");
        assert_eq!(date_string(19_723), "2024-01-01");
    }

    #[test]
    fn rfc3339_round_trip() {
        let t = parse_rfc3339("2024-01-01T01:00:00+01:00").unwrap();
        assert_eq!(t, 1_704_067_200 * MICROS_PER_SEC);
        assert_eq!(format_rfc3339(t), "2024-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(t + 1_500), "2024-01-01T00:00:00.001500Z");
        assert!(parse_rfc3339("yesterday").is_err());
    }
}
