//! Job files: one TOML file per job under the jobs folder.
//!
//! Common keys (`name`, `schedule` or `every`, `timezone`, `timeout`, `retries`,
//! `retry_backoff`, `catchup`, `enabled`, `after`, `pool`) belong to the scheduler; `kind` and
//! the rest belong to the kind. `${VAR}` in the kind's settings is resolved at run time, so a
//! secret is never stored in memory longer than a run needs it; a job whose variables are not
//! set is listed as not runnable, and the others keep working.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tally_ingest::{IntervalRule, KindConfig};
use tally_model::config::expand_str;

use crate::schedule::Schedule;

#[derive(Debug, Clone)]
pub struct JobSpec {
    pub name: String,
    pub file: PathBuf,
    pub kind: String,
    pub schedule: Schedule,
    pub rule: IntervalRule,
    pub timeout: Duration,
    pub retries: u32,
    pub retry_backoff: Duration,
    /// At most this many missed intervals are caught up after downtime.
    pub catchup: u32,
    pub enabled: bool,
    pub after: Vec<String>,
    pub pool: String,
    /// How long after its interval ends a run starts, for sources that take time to hold
    /// all of an interval's data (Prometheus' scrape and rule lag, say).
    pub delay: Duration,
    /// The kind's settings as written, `${VAR}` unresolved.
    settings: toml::Table,
}

/// A problem with one job file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobProblem {
    pub file: PathBuf,
    pub message: String,
}

impl std::fmt::Display for JobProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.file.display(), self.message)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Common {
    name: Option<String>,
    schedule: Option<String>,
    every: Option<String>,
    timezone: Option<String>,
    timeout: Option<String>,
    retries: Option<u32>,
    retry_backoff: Option<String>,
    catchup: Option<u32>,
    enabled: Option<bool>,
    after: Option<Vec<String>>,
    pool: Option<String>,
    delay: Option<String>,
}

const COMMON_KEYS: [&str; 12] = [
    "name",
    "schedule",
    "every",
    "timezone",
    "timeout",
    "retries",
    "retry_backoff",
    "catchup",
    "enabled",
    "after",
    "pool",
    "delay",
];

fn duration(field: &str, v: Option<&str>, default: Duration) -> Result<Duration, String> {
    match v {
        None => Ok(default),
        Some(s) => humantime::parse_duration(s)
            .map_err(|e| format!("{field} = \"{s}\" is not a duration like \"30s\": {e}")),
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// Every `${VAR}` named in the settings.
fn variables(v: &toml::Value, out: &mut BTreeSet<String>) {
    match v {
        toml::Value::String(s) => {
            let mut rest = s.as_str();
            while let Some(i) = rest.find("${") {
                if i > 0 && rest[..i].ends_with('$') {
                    rest = &rest[i + 2..];
                    continue;
                }
                let tail = &rest[i + 2..];
                let Some(end) = tail.find('}') else { break };
                out.insert(tail[..end].to_string());
                rest = &tail[end + 1..];
            }
        }
        toml::Value::Array(a) => a.iter().for_each(|x| variables(x, out)),
        toml::Value::Table(t) => t.values().for_each(|x| variables(x, out)),
        _ => {}
    }
}

fn expand(v: &mut toml::Value, vars: &BTreeMap<String, String>) -> Result<(), String> {
    match v {
        toml::Value::String(s) => {
            *s = expand_str(s, vars).map_err(|name| format!("${{{name}}} is not set"))?;
        }
        toml::Value::Array(a) => {
            for x in a {
                expand(x, vars)?;
            }
        }
        toml::Value::Table(t) => {
            for (_, x) in t.iter_mut() {
                expand(x, vars)?;
            }
        }
        _ => {}
    }
    Ok(())
}

impl JobSpec {
    pub fn from_toml(text: &str, file: &Path) -> Result<Self, String> {
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| format!("not valid TOML: {}", e.message()))?;
        let mut common = toml::Table::new();
        for key in COMMON_KEYS {
            if let Some(v) = table.remove(key) {
                common.insert(key.to_string(), v);
            }
        }
        let c =
            Common::deserialize(toml::Value::Table(common)).map_err(|e| e.message().to_string())?;
        let stem = file
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_string();
        let name = c.name.unwrap_or(stem);
        if !valid_name(&name) {
            return Err(format!(
                "job name '{name}' must be letters, digits, '_', '-' or '.'"
            ));
        }
        // Settings are checked with `${VAR}` left in place: the shape must be right even
        // when a secret is missing.
        let kind = KindConfig::deserialize(toml::Value::Table(table.clone()))
            .map_err(|e| e.message().to_string())?;
        kind.validate()?;
        let tz = c.timezone.as_deref().unwrap_or("UTC");
        let schedule = match (c.schedule.as_deref(), c.every.as_deref()) {
            (Some(expr), None) => Schedule::cron(expr, tz)?,
            (None, Some(every)) => {
                if c.timezone.is_some() {
                    return Err("timezone applies to cron schedules, not to every".into());
                }
                Schedule::every(duration("every", Some(every), Duration::ZERO)?, every)?
            }
            (Some(_), Some(_)) => return Err("set schedule or every, not both".into()),
            (None, None) => {
                return Err("no schedule: set schedule = \"*/5 * * * *\" or every = \"5m\"".into());
            }
        };
        let after = c.after.unwrap_or_default();
        if after.iter().any(|a| a == &name) {
            return Err("a job cannot run after itself".into());
        }
        Ok(Self {
            kind: kind.name().to_string(),
            rule: kind.interval_rule(),
            name,
            file: file.to_path_buf(),
            schedule,
            timeout: duration("timeout", c.timeout.as_deref(), Duration::from_secs(60))?,
            retries: c.retries.unwrap_or(2),
            retry_backoff: duration(
                "retry_backoff",
                c.retry_backoff.as_deref(),
                Duration::from_secs(10),
            )?,
            catchup: c.catchup.unwrap_or(10),
            enabled: c.enabled.unwrap_or(true),
            after,
            pool: c.pool.unwrap_or_else(|| "default".into()),
            delay: duration("delay", c.delay.as_deref(), Duration::ZERO)?,
            settings: table,
        })
    }

    fn delay_micros(&self) -> i64 {
        i64::try_from(self.delay.as_micros()).unwrap_or(i64::MAX)
    }

    /// The schedule's clock: the tick whose interval is due at `now` is the last one at or
    /// before `now - delay`.
    pub fn schedule_time(&self, now: i64) -> i64 {
        now.saturating_sub(self.delay_micros())
    }

    /// When the next run after `now` starts.
    pub fn next_start_after(&self, now: i64) -> Option<i64> {
        self.schedule
            .next_after(self.schedule_time(now))
            .map(|t| t.saturating_add(self.delay_micros()))
    }

    /// Variables the job needs that `vars` lacks; a job with any is not runnable.
    pub fn missing_variables(&self, vars: &BTreeMap<String, String>) -> Vec<String> {
        let mut names = BTreeSet::new();
        variables(&toml::Value::Table(self.settings.clone()), &mut names);
        names
            .into_iter()
            .filter(|n| !vars.contains_key(n))
            .collect()
    }

    /// The kind with every `${VAR}` resolved, for one run.
    pub fn resolve(&self, vars: &BTreeMap<String, String>) -> Result<KindConfig, String> {
        let mut v = toml::Value::Table(self.settings.clone());
        expand(&mut v, vars)?;
        KindConfig::deserialize(v).map_err(|e| e.message().to_string())
    }
}

/// Loads every `*.toml` in `dir`. A broken file is reported and skipped; the rest load.
pub fn load_dir(dir: &Path) -> (Vec<JobSpec>, Vec<JobProblem>) {
    let mut jobs: Vec<JobSpec> = Vec::new();
    let mut problems = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (jobs, problems),
        Err(e) => {
            problems.push(JobProblem {
                file: dir.to_path_buf(),
                message: format!("cannot read the jobs folder: {e}"),
            });
            return (jobs, problems);
        }
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    for file in files {
        let loaded = std::fs::read_to_string(&file)
            .map_err(|e| e.to_string())
            .and_then(|text| JobSpec::from_toml(&text, &file));
        match loaded {
            Ok(job) if jobs.iter().any(|j| j.name == job.name) => problems.push(JobProblem {
                file,
                message: format!("another file already defines job '{}'", job.name),
            }),
            Ok(job) => jobs.push(job),
            Err(message) => problems.push(JobProblem { file, message }),
        }
    }
    let names: BTreeSet<String> = jobs.iter().map(|j| j.name.clone()).collect();
    for j in &jobs {
        for dep in &j.after {
            if !names.contains(dep) {
                problems.push(JobProblem {
                    file: j.file.clone(),
                    message: format!("after names unknown job '{dep}'"),
                });
            }
        }
    }
    (jobs, problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(text: &str) -> Result<JobSpec, String> {
        JobSpec::from_toml(text, Path::new("ingest/self_scrape.toml"))
    }

    #[test]
    fn parses_common_and_kind_settings() {
        let j = job(
            "kind = \"scrape\"\nurl = \"http://x/metrics\"\nevery = \"15s\"\nretries = 1\nafter = [\"a\"]\npool = \"slow\"\n",
        )
        .unwrap();
        assert_eq!(j.name, "self_scrape");
        assert_eq!(j.kind, "scrape");
        assert_eq!(j.retries, 1);
        assert_eq!(j.pool, "slow");
        assert_eq!(j.timeout, Duration::from_secs(60));
        assert_eq!(j.schedule.describe(), "every 15s");
    }

    #[test]
    fn secrets_resolve_at_run_time() {
        let j = job("kind = \"scrape\"\nurl = \"http://x/metrics\"\nbearer_token = \"${TOKEN}\"\nschedule = \"*/5 * * * *\"\n").unwrap();
        let none = BTreeMap::new();
        assert_eq!(j.missing_variables(&none), vec!["TOKEN".to_string()]);
        assert!(
            j.resolve(&none)
                .unwrap_err()
                .contains("${TOKEN} is not set")
        );
        let vars = BTreeMap::from([("TOKEN".to_string(), "s3cret".to_string())]);
        assert!(j.missing_variables(&vars).is_empty());
        let Ok(KindConfig::Scrape(c)) = j.resolve(&vars) else {
            panic!("a scrape job resolves to its settings");
        };
        assert_eq!(c.bearer_token.as_deref(), Some("s3cret"));
    }

    #[test]
    fn problems_are_clear() {
        for (text, needle) in [
            ("kind = \"scrape\"\nurl = \"u\"\n", "no schedule"),
            (
                "kind = \"scrape\"\nurl = \"u\"\nevery = \"1m\"\nschedule = \"* * * * *\"\n",
                "not both",
            ),
            ("kind = \"ftp\"\nevery = \"1m\"\n", "unknown variant"),
            ("kind = \"scrape\"\nevery = \"1m\"\n", "missing field `url`"),
            (
                "kind = \"scrape\"\nurl = \"u\"\nevery = \"1m\"\ncolour = 1\n",
                "unknown field `colour`",
            ),
            (
                "kind = \"scrape\"\nurl = \"u\"\nevery = \"soon\"\n",
                "duration",
            ),
            (
                "kind = \"scrape\"\nurl = \"u\"\nschedule = \"61 * * * *\"\n",
                "invalid cron",
            ),
            (
                "kind = \"scrape\"\nurl = \"u\"\nevery = \"1m\"\nname = \"a b\"\n",
                "job name",
            ),
            (
                "kind = \"scrape\"\nurl = \"u\"\nevery = \"1m\"\nretries = \"x\"\n",
                "invalid type",
            ),
        ] {
            let e = job(text).unwrap_err();
            assert!(e.contains(needle), "{text:?}: {e}");
        }
    }
}
