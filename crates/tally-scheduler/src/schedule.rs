//! When a job runs: a cron expression (5 or 6 fields, in a time zone) or a fixed period
//! aligned to the Unix epoch, and the data interval each tick stands for.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;
use tally_ingest::IntervalRule;

#[derive(Debug, Clone)]
pub enum Schedule {
    Cron {
        cron: Box<Cron>,
        tz: Tz,
        text: String,
    },
    Every {
        micros: i64,
        text: String,
    },
}

impl Schedule {
    pub fn cron(expr: &str, tz: &str) -> Result<Self, String> {
        let tz: Tz = tz.parse().map_err(|_| {
            format!("unknown time zone '{tz}' (use an IANA name such as Europe/Paris)")
        })?;
        let fields = expr.split_whitespace().count();
        if !(5..=6).contains(&fields) {
            return Err(format!(
                "cron expression '{expr}' must have 5 or 6 fields, not {fields}"
            ));
        }
        let cron: Cron = expr
            .parse()
            .map_err(|e| format!("invalid cron expression '{expr}': {e}"))?;
        Ok(Self::Cron {
            cron: Box::new(cron),
            tz,
            text: format!("{expr} ({tz})"),
        })
    }

    pub fn every(period: Duration, text: &str) -> Result<Self, String> {
        if period < Duration::from_secs(1) {
            return Err(format!("every = \"{text}\" is shorter than one second"));
        }
        Ok(Self::Every {
            micros: i64::try_from(period.as_micros()).map_err(|_| "period too long".to_string())?,
            text: format!("every {text}"),
        })
    }

    pub fn describe(&self) -> &str {
        match self {
            Self::Cron { text, .. } | Self::Every { text, .. } => text,
        }
    }

    fn at(tz: &Tz, t: i64) -> Option<DateTime<Tz>> {
        Utc.timestamp_micros(t)
            .single()
            .map(|u| u.with_timezone(tz))
    }

    /// The first tick strictly after `t`.
    pub fn next_after(&self, t: i64) -> Option<i64> {
        match self {
            Self::Every { micros, .. } => Some((t.div_euclid(*micros) + 1) * micros),
            Self::Cron { cron, tz, .. } => cron
                .find_next_occurrence(&Self::at(tz, t)?, false)
                .ok()
                .map(|d| d.timestamp_micros()),
        }
    }

    /// The last tick at or before `t`.
    pub fn last_at_or_before(&self, t: i64) -> Option<i64> {
        match self {
            Self::Every { micros, .. } => Some(t.div_euclid(*micros) * micros),
            Self::Cron { cron, tz, .. } => cron
                .find_previous_occurrence(&Self::at(tz, t)?, true)
                .ok()
                .map(|d| d.timestamp_micros()),
        }
    }

    /// The data interval `[start, end)` the run at `tick` covers.
    pub fn interval(&self, tick: i64, rule: IntervalRule) -> Option<(i64, i64)> {
        match rule {
            IntervalRule::Past => Some((self.last_at_or_before(tick - 1)?, tick)),
            IntervalRule::Present => Some((tick, self.next_after(tick)?)),
        }
    }

    /// The intervals whose ticks fall in `[from, to)`, oldest first, at most `limit`.
    pub fn intervals_between(
        &self,
        from: i64,
        to: i64,
        rule: IntervalRule,
        limit: usize,
    ) -> Vec<(i64, i64)> {
        let mut out = Vec::new();
        let mut tick = match self.last_at_or_before(from) {
            Some(t) if t == from => Some(t),
            _ => self.next_after(from),
        };
        while let Some(t) = tick {
            if t >= to || out.len() >= limit {
                break;
            }
            if let Some(iv) = self.interval(t, rule) {
                out.push(iv);
            }
            tick = self.next_after(t);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000_000;
    const T0: i64 = 1_704_067_200_000_000; // 2024-01-01T00:00:00Z, a Monday

    #[test]
    fn every_is_aligned_to_the_epoch() {
        let s = Schedule::every(Duration::from_secs(900), "15m").unwrap();
        assert_eq!(s.next_after(T0), Some(T0 + 15 * MIN));
        assert_eq!(s.next_after(T0 + 1), Some(T0 + 15 * MIN));
        assert_eq!(s.last_at_or_before(T0 + 14 * MIN), Some(T0));
        assert_eq!(
            s.interval(T0, IntervalRule::Past),
            Some((T0 - 15 * MIN, T0))
        );
        assert_eq!(
            s.interval(T0, IntervalRule::Present),
            Some((T0, T0 + 15 * MIN))
        );
        assert_eq!(
            s.intervals_between(T0, T0 + 45 * MIN, IntervalRule::Past, 10),
            vec![
                (T0 - 15 * MIN, T0),
                (T0, T0 + 15 * MIN),
                (T0 + 15 * MIN, T0 + 30 * MIN)
            ]
        );
        assert!(Schedule::every(Duration::from_millis(10), "10ms").is_err());
    }

    #[test]
    fn cron_five_and_six_fields_with_zones() {
        let hourly = Schedule::cron("5 * * * *", "UTC").unwrap();
        assert_eq!(hourly.next_after(T0), Some(T0 + 5 * MIN));
        assert_eq!(hourly.last_at_or_before(T0), Some(T0 - 55 * MIN));
        let secs = Schedule::cron("*/30 * * * * *", "UTC").unwrap();
        assert_eq!(secs.next_after(T0), Some(T0 + 30_000_000));
        // 09:00 in Paris is 08:00 UTC in January.
        let paris = Schedule::cron("0 9 * * *", "Europe/Paris").unwrap();
        assert_eq!(paris.next_after(T0), Some(T0 + 8 * 60 * MIN));
        assert_eq!(
            paris.interval(T0 + 8 * 60 * MIN, IntervalRule::Past),
            Some((T0 + 8 * 60 * MIN - 24 * 60 * MIN, T0 + 8 * 60 * MIN))
        );
        assert!(
            Schedule::cron("0 9 * *", "UTC")
                .unwrap_err()
                .contains("5 or 6 fields")
        );
        assert!(Schedule::cron("0 25 * * *", "UTC").is_err());
        assert!(
            Schedule::cron("0 9 * * *", "Mars/Olympus")
                .unwrap_err()
                .contains("time zone")
        );
    }
}
