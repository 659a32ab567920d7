-- name: tally_query_latency
-- title: Tally query latency (mean)
-- unit: s
-- description: Mean time Tally took per SQL query (HTTP, Grafana, CLI), per bucket.
--
-- Input: Tally's own histogram `tally_query_duration_seconds`, scraped by the shipped
-- `ingest/tally_self.toml` job: the increase of its `_sum` divided by the increase of its
-- `_count`, both summed per bucket first; a bucket without queries has no value.
WITH samples AS (
    SELECT
        time,
        metric,
        value,
        lag(value) OVER (PARTITION BY series_id ORDER BY time) AS prev
    FROM metrics
    WHERE metric IN ('tally_query_duration_seconds_sum', 'tally_query_duration_seconds_count')
      AND time >= $__timeFrom - INTERVAL '1 hour'
      AND time < $__timeTo
),
increases AS (
    SELECT
        $__dateBin(time) AS time,
        metric,
        CASE WHEN prev IS NULL THEN 0.0 WHEN value < prev THEN value ELSE value - prev END AS n
    FROM samples
    WHERE $__timeFilter(time)
)
SELECT
    time,
    sum(n) FILTER (WHERE metric = 'tally_query_duration_seconds_sum')
        / NULLIF(sum(n) FILTER (WHERE metric = 'tally_query_duration_seconds_count'), 0) AS mean_seconds
FROM increases
GROUP BY time
ORDER BY time
