//! Kind `scrape`: read a Prometheus exposition endpoint (text 0.0.4 or OpenMetrics) once.
//!
//! Samples are stamped with the scrape time, clamped into the run's interval; samples that
//! carry their own timestamp (e.g. `/federate`) keep it, and those outside the interval are
//! counted as rejected, so re-running an interval can never spill into its neighbours.

use std::collections::BTreeMap;

use serde::Deserialize;
use tally_model::time::MICROS_PER_MILLI;
use tally_model::{Sample, SampleBatchBuilder};

use crate::exposition::{self, Format};
use crate::kinds::{Error, Output, RunContext};

#[cfg(test)]
mod tests {
    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            super::redact("https://user:pw@host:9100/metrics?token=s3cret"),
            "https://host:9100/metrics?redacted"
        );
        assert_eq!(
            super::redact("http://127.0.0.1:9/metrics"),
            "http://127.0.0.1:9/metrics"
        );
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScrapeConfig {
    pub url: String,
    /// Extra request headers (e.g. an API key).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub bearer_token: Option<String>,
    /// Labels added to every sample (they do not override the target's own).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Read at most this much of a response; larger bodies fail the run rather than the process.
const MAX_BODY: usize = 64 << 20;
const LOG_LIMIT: usize = 5;

/// The URL without credentials or query string, for errors and logs: a secret a user put
/// there must not reach the run history.
pub(crate) fn redact(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            if u.query().is_some() {
                u.set_query(Some("redacted"));
            }
            u.to_string()
        }
        Err(_) => "(invalid URL)".into(),
    }
}

/// An error with its causes ("error sending request: connection refused").
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

pub async fn run(c: &ScrapeConfig, ctx: &RunContext) -> Result<Output, Error> {
    let shown = redact(&c.url);
    let http_err = |e: reqwest::Error| Error::Http {
        url: shown.clone(),
        message: chain(&e.without_url()),
    };
    let mut req = ctx
        .http
        .get(&c.url)
        .header("accept", Format::ACCEPT)
        .timeout(ctx.timeout);
    for (k, v) in &c.headers {
        req = req.header(k, v);
    }
    if let Some(t) = &c.bearer_token {
        req = req.bearer_auth(t);
    }
    let resp = tokio_util::future::FutureExt::with_cancellation_token(req.send(), &ctx.cancel)
        .await
        .ok_or(Error::Cancelled)?
        .map_err(http_err)?;
    let status = resp.status();
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("text/plain")
        .to_string();
    if let Some(len) = resp.content_length()
        && len as usize > MAX_BODY
    {
        return Err(Error::Decode {
            url: shown.clone(),
            message: format!("body of {len} bytes exceeds {MAX_BODY}"),
        });
    }
    let bytes = resp.bytes().await.map_err(http_err)?;
    if !status.is_success() {
        return Err(Error::Status {
            url: shown.clone(),
            status: status.as_u16(),
            body: String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).into_owned(),
        });
    }
    let text = std::str::from_utf8(&bytes).map_err(|e| Error::Decode {
        url: shown.clone(),
        message: format!("not UTF-8: {e}"),
    })?;
    let parsed =
        exposition::parse(text, Format::from_content_type(&content_type)).map_err(|e| {
            Error::Decode {
                url: shown.clone(),
                message: e.to_string(),
            }
        })?;

    let stamp = ctx.now.clamp(ctx.start, ctx.end - 1);
    let mut out = Output::default();
    let mut builder = SampleBatchBuilder::with_capacity(parsed.samples.len());
    for s in parsed.samples {
        let time = match s.timestamp_ms {
            Some(ms) => ms.saturating_mul(MICROS_PER_MILLI),
            None => stamp,
        };
        if time < ctx.start || time >= ctx.end {
            out.rejected += 1;
            if out.log.len() < LOG_LIMIT {
                out.log.push(format!(
                    "sample {} at {} lies outside the run's interval; not stored",
                    s.name,
                    tally_model::time::format_rfc3339(time)
                ));
            }
            continue;
        }
        let mut labels: BTreeMap<String, String> = c.labels.clone();
        // Empty label values mean "no label" in Prometheus.
        labels.extend(s.labels.into_iter().filter(|(_, v)| !v.is_empty()));
        builder.push(Sample {
            time,
            metric: s.name,
            labels,
            value: s.value,
            source: ctx.job.clone(),
        });
    }
    out.add_samples(builder, &shown)?;
    out.log.push(format!(
        "scraped {} ({}): {} samples, {} rejected",
        shown, content_type, out.rows, out.rejected
    ));
    Ok(out)
}
