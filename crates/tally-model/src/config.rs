//! The typed configuration tree.
//!
//! Layers, later wins: written defaults, the TOML file, environment variables
//! (`TALLY__SECTION__KEY=value`, the value parsed as TOML when it parses, else taken as a
//! string), then CLI flags (applied by the binary). `${VAR}` inside a string value is replaced
//! by that environment variable. [`Config::load`] reports every problem at once.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::size::ByteSize;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8181";
pub const ENV_PREFIX: &str = "TALLY__";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub storage: StorageConfig,
    pub server: ServerConfig,
    pub auth: AuthConfig,
    pub query: QueryConfig,
    pub wal: WalConfig,
    pub scheduler: SchedulerConfig,
    pub grafana: GrafanaConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Where tables live: a local path, `file://`, `s3://`, `gs://`, `az://` or `memory://`.
    pub url: String,
    /// object_store options for cloud URLs (`aws_region`, `google_service_account`, ...).
    pub options: BTreeMap<String, String>,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            url: "./data".into(),
            options: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: String,
    /// Largest request body accepted; larger ones get 413.
    pub max_body: ByteSize,
    /// How long in-flight requests may take to finish at shutdown.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN.into(),
            max_body: ByteSize::mib(16),
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

/// Bearer tokens. With every list empty, no request needs a token; with any token configured,
/// every data endpoint needs one. Admin tokens are accepted wherever read or write ones are.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    pub read_tokens: Vec<String>,
    pub write_tokens: Vec<String>,
    pub admin_tokens: Vec<String>,
}

impl AuthConfig {
    pub fn enabled(&self) -> bool {
        !(self.read_tokens.is_empty()
            && self.write_tokens.is_empty()
            && self.admin_tokens.is_empty())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueryConfig {
    /// Wall-clock limit for one query, planning and streaming included.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Memory one query may hold for sorts, joins and aggregations.
    pub memory_limit: ByteSize,
    /// Rows one query may return; a larger result is an error, never a silent cut.
    pub max_rows: u64,
    /// Folder of KPI files (`*.sql`, one KPI each), shown as views `kpi.<name>` and in Grafana.
    pub kpi_dir: PathBuf,
}

impl Default for QueryConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            memory_limit: ByteSize(1 << 30),
            max_rows: 1_000_000,
            kpi_dir: PathBuf::from("queries"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WalConfig {
    /// Local directory of the write-ahead log. Default: `<storage path>/_wal` for local storage,
    /// `./tally-wal` for object stores (a WAL needs a local disk to fsync on).
    pub dir: Option<PathBuf>,
    /// Buffered rows are flushed to Delta at least this often.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// ... or as soon as this many rows are buffered.
    pub flush_rows: usize,
}

impl Default for WalConfig {
    fn default() -> Self {
        Self {
            dir: None,
            flush_interval: Duration::from_secs(10),
            flush_rows: 200_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerConfig {
    /// Run scheduled jobs in `tally serve`.
    pub enabled: bool,
    /// Folder of job files (`*.toml`, one job each).
    pub jobs_dir: PathBuf,
    /// Run history older than this is deleted.
    #[serde(with = "humantime_serde")]
    pub runs_retention: Duration,
    /// Webhook URLs (Slack or Teams incoming webhooks) told about runs that failed for good.
    pub webhooks: Vec<String>,
    /// Concurrency limit per pool name; jobs name their pool (`default` unless set).
    pub pools: BTreeMap<String, usize>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            jobs_dir: PathBuf::from("ingest"),
            runs_retention: Duration::from_secs(30 * 86_400),
            webhooks: Vec::new(),
            pools: BTreeMap::from([("default".to_string(), 4)]),
        }
    }
}

impl SchedulerConfig {
    /// Concurrency of a pool; unknown pools get 1 so a typo cannot flood a source.
    pub fn pool_size(&self, pool: &str) -> usize {
        self.pools.get(pool).copied().unwrap_or(1).max(1)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrafanaConfig {
    /// Path under which the Grafana JSON datasource API is served; the datasource URL is
    /// `http://HOST:PORT<prefix>`.
    pub prefix: String,
}

impl Default for GrafanaConfig {
    fn default() -> Self {
        Self {
            prefix: "/grafana".into(),
        }
    }
}

/// One thing wrong with a configuration: where, and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub field: String,
    pub message: String,
}

/// Every problem found in one configuration, so a user fixes them in one pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub origin: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "{}: {n} problem{}",
            self.origin,
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            if p.field.is_empty() {
                write!(f, "\n  {}", p.message)?;
            } else {
                write!(f, "\n  {}: {}", p.field, p.message)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Loads defaults, then `file` (if any), then `TALLY__*` variables from `env`, and validates.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let origin = file
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "configuration".into());
        let text = match file {
            Some(p) => std::fs::read_to_string(p).map_err(|e| ConfigError {
                origin: origin.clone(),
                problems: vec![Problem {
                    field: String::new(),
                    message: format!("cannot read file: {e}"),
                }],
            })?,
            None => String::new(),
        };
        Self::from_toml_str(&text, &origin, env)
    }

    pub fn from_toml_str(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let env: BTreeMap<String, String> = env.into_iter().collect();
        let mut problems = Vec::new();
        let mut table: toml::Table = match text.parse() {
            Ok(t) => t,
            Err(e) => {
                return Err(ConfigError {
                    origin: origin.into(),
                    problems: vec![Problem {
                        field: String::new(),
                        message: format!("not valid TOML: {}", e.to_string().trim()),
                    }],
                });
            }
        };
        apply_env_overrides(&mut table, &env, &mut problems);
        expand_env_vars(&mut table, "", &env, &mut problems);

        let mut config = Config::default();
        for (key, value) in table {
            let field = key.clone();
            match key.as_str() {
                "storage" => section(value, &field, &mut problems, &mut config.storage),
                "server" => section(value, &field, &mut problems, &mut config.server),
                "auth" => section(value, &field, &mut problems, &mut config.auth),
                "query" => section(value, &field, &mut problems, &mut config.query),
                "wal" => section(value, &field, &mut problems, &mut config.wal),
                "scheduler" => section(value, &field, &mut problems, &mut config.scheduler),
                "grafana" => section(value, &field, &mut problems, &mut config.grafana),
                _ => problems.push(Problem {
                    field,
                    message: "unknown section (expected storage, server, auth, query, wal, \
                              scheduler or grafana)"
                        .into(),
                }),
            }
        }
        problems.extend(config.validate());
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError {
                origin: origin.into(),
                problems,
            })
        }
    }

    /// Checks the values that parse but make no sense.
    pub fn validate(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut bad = |field: &str, message: String| {
            out.push(Problem {
                field: field.into(),
                message,
            })
        };
        if self.storage.url.trim().is_empty() {
            bad("storage.url", "must not be empty".into());
        }
        if let Err(e) = self.server.listen.parse::<SocketAddr>() {
            bad(
                "server.listen",
                format!("'{}' is not HOST:PORT: {e}", self.server.listen),
            );
        }
        if self.server.max_body.0 < 1024 {
            bad("server.max_body", "must be at least 1KiB".into());
        }
        if self.query.timeout.is_zero() {
            bad("query.timeout", "must be greater than zero".into());
        }
        if self.query.memory_limit.0 < 1 << 20 {
            bad("query.memory_limit", "must be at least 1MiB".into());
        }
        if self.query.max_rows == 0 {
            bad("query.max_rows", "must be greater than zero".into());
        }
        if self.wal.flush_interval.is_zero() {
            bad("wal.flush_interval", "must be greater than zero".into());
        }
        if self.wal.flush_rows == 0 {
            bad("wal.flush_rows", "must be greater than zero".into());
        }
        if self.scheduler.pools.values().any(|n| *n == 0) {
            bad("scheduler.pools", "pool sizes must be at least 1".into());
        }
        if self
            .scheduler
            .webhooks
            .iter()
            .any(|w| !(w.starts_with("http://") || w.starts_with("https://")))
        {
            bad(
                "scheduler.webhooks",
                "webhooks must be http:// or https:// URLs".into(),
            );
        }
        let prefix = &self.grafana.prefix;
        // The root would put Grafana's POST /metrics on top of Tally's own GET /metrics and
        // the Pushgateway paths.
        if !prefix.starts_with('/')
            || prefix.len() < 2
            || prefix.ends_with('/')
            || prefix.contains("//")
            || prefix.contains(['{', '}', '*', '?', '#'])
        {
            bad(
                "grafana.prefix",
                format!("'{prefix}' must be a path like /grafana (not the root, no trailing /)"),
            );
        }
        for (name, tokens) in [
            ("auth.read_tokens", &self.auth.read_tokens),
            ("auth.write_tokens", &self.auth.write_tokens),
            ("auth.admin_tokens", &self.auth.admin_tokens),
        ] {
            if tokens.iter().any(|t| t.trim().is_empty()) {
                bad(name, "tokens must not be empty strings".into());
            }
        }
        out
    }
}

fn section<T: DeserializeOwned>(
    value: toml::Value,
    field: &str,
    problems: &mut Vec<Problem>,
    out: &mut T,
) {
    // Deserialize key by key against a default, so one bad key does not hide the next one.
    let toml::Value::Table(table) = value else {
        problems.push(Problem {
            field: field.into(),
            message: "must be a table ([section])".into(),
        });
        return;
    };
    let mut good = toml::Table::new();
    for (k, v) in table {
        let mut single = toml::Table::new();
        single.insert(k.clone(), v.clone());
        match T::deserialize(toml::Value::Table(single)) {
            Ok(_) => {
                good.insert(k, v);
            }
            Err(e) => problems.push(Problem {
                field: format!("{field}.{k}"),
                message: clean_serde_message(&e.to_string()),
            }),
        }
    }
    match T::deserialize(toml::Value::Table(good)) {
        Ok(v) => *out = v,
        Err(e) => problems.push(Problem {
            field: field.into(),
            message: clean_serde_message(&e.to_string()),
        }),
    }
}

fn clean_serde_message(msg: &str) -> String {
    msg.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

fn apply_env_overrides(
    table: &mut toml::Table,
    env: &BTreeMap<String, String>,
    problems: &mut Vec<Problem>,
) {
    for (key, raw) in env {
        let Some(path) = key.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let parts: Vec<String> = path.split("__").map(|p| p.to_ascii_lowercase()).collect();
        if parts.len() < 2 || parts.iter().any(String::is_empty) {
            problems.push(Problem {
                field: key.clone(),
                message: "expected TALLY__SECTION__KEY".into(),
            });
            continue;
        }
        // `["a","b"]`, `30`, `true` parse as TOML; anything else is a plain string.
        let value = format!("v = {raw}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw.clone()));
        if let Err(message) = insert_path(table, &parts, value) {
            problems.push(Problem {
                field: key.clone(),
                message,
            });
        }
    }
}

fn insert_path(
    table: &mut toml::Table,
    parts: &[String],
    value: toml::Value,
) -> Result<(), String> {
    match parts {
        [] => Ok(()),
        [last] => {
            table.insert(last.clone(), value);
            Ok(())
        }
        [first, rest @ ..] => match table
            .entry(first.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        {
            toml::Value::Table(t) => insert_path(t, rest, value),
            _ => Err(format!("'{first}' is not a section")),
        },
    }
}

fn expand_env_vars(
    table: &mut toml::Table,
    prefix: &str,
    env: &BTreeMap<String, String>,
    problems: &mut Vec<Problem>,
) {
    for (k, v) in table.iter_mut() {
        let field = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        expand_value(v, &field, env, problems);
    }
}

fn expand_value(
    v: &mut toml::Value,
    field: &str,
    env: &BTreeMap<String, String>,
    problems: &mut Vec<Problem>,
) {
    match v {
        toml::Value::String(s) => match expand_str(s, env) {
            Ok(expanded) => *s = expanded,
            Err(var) => problems.push(Problem {
                field: field.into(),
                message: format!("environment variable {var} is not set"),
            }),
        },
        toml::Value::Array(items) => {
            for item in items {
                expand_value(item, field, env, problems);
            }
        }
        toml::Value::Table(t) => expand_env_vars(t, field, env, problems),
        _ => {}
    }
}

/// Replaces each `${NAME}` with the variable's value; `$${` stays a literal `${`.
pub fn expand_str(s: &str, env: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i..];
        if let Some(tail) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = tail;
        } else if let Some(tail) = after.strip_prefix("${") {
            let Some(end) = tail.find('}') else {
                out.push_str(after);
                rest = "";
                break;
            };
            let name = &tail[..end];
            match env.get(name) {
                Some(val) => out.push_str(val),
                None => return Err(name.to_string()),
            }
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_load_from_nothing() {
        let c = Config::from_toml_str("", "x", env(&[])).unwrap();
        assert_eq!(c, Config::default());
        assert!(c.validate().is_empty());
    }

    #[test]
    fn env_overrides_file() {
        let c = Config::from_toml_str(
            "[server]\nlisten = \"127.0.0.1:1\"\n",
            "x",
            env(&[
                ("TALLY__SERVER__LISTEN", "127.0.0.1:2"),
                ("TALLY__AUTH__READ_TOKENS", "[\"r1\", \"r2\"]"),
                ("TALLY__QUERY__MAX_ROWS", "5"),
                ("UNRELATED", "1"),
            ]),
        )
        .unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:2");
        assert_eq!(c.auth.read_tokens, vec!["r1", "r2"]);
        assert_eq!(c.query.max_rows, 5);
    }

    #[test]
    fn reports_every_problem_at_once() {
        let text = r#"
[server]
listen = "nowhere"
max_body = "12 parsecs"
colour = "blue"

[query]
timeout = "0s"
max_rows = "many"

[auth]
read_tokens = ["${MISSING_TOKEN}"]

[bogus]
"#;
        let err = Config::from_toml_str(text, "tally.toml", env(&[])).unwrap_err();
        let fields: Vec<&str> = err.problems.iter().map(|p| p.field.as_str()).collect();
        for expected in [
            "server.listen",
            "server.max_body",
            "server.colour",
            "query.timeout",
            "query.max_rows",
            "auth.read_tokens",
            "bogus",
        ] {
            assert!(fields.contains(&expected), "{expected} missing in {err}");
        }
        assert!(err.to_string().starts_with("tally.toml: "));
    }

    #[test]
    fn grafana_prefix_is_a_path_below_the_root() {
        for good in ["/grafana", "/g/json"] {
            let text = format!("[grafana]\nprefix = \"{good}\"\n");
            let c = Config::from_toml_str(&text, "x", env(&[])).unwrap();
            assert_eq!(c.grafana.prefix, good);
        }
        for bad in ["", "/", "grafana", "/grafana/", "/a//b", "/{x}"] {
            let text = format!("[grafana]\nprefix = \"{bad}\"\n");
            let err = Config::from_toml_str(&text, "x", env(&[])).unwrap_err();
            assert_eq!(err.problems[0].field, "grafana.prefix", "{bad}: {err}");
        }
    }

    #[test]
    fn expands_variables() {
        let vars: BTreeMap<String, String> = [("A".to_string(), "1".to_string())].into();
        assert_eq!(expand_str("x${A}y", &vars).unwrap(), "x1y");
        assert_eq!(expand_str("$${A}", &vars).unwrap(), "${A}");
        assert_eq!(expand_str("cost $5", &vars).unwrap(), "cost $5");
        assert_eq!(expand_str("${B}", &vars).unwrap_err(), "B");
    }
}
