-- name: api_latency_p95
-- title: API latency, 95th percentile
-- unit: s
-- description: 95th percentile of request duration per bucket, from a Prometheus histogram.
--
-- Input: `http_request_duration_seconds_bucket`, a Prometheus histogram (label `le`, the bucket's
-- upper bound, `+Inf` last). Per bucket: each series' reset-aware increase, summed per `le`
-- over every series; then Prometheus' `histogram_quantile(0.95, ...)` rule: the first bucket
-- whose cumulative count reaches 95 % of the total, interpolated linearly inside it (from 0
-- for the first bucket); a rank in the `+Inf` bucket answers the highest finite bound.
WITH samples AS (
    SELECT
        time,
        value,
        labels['le'] AS le,
        lag(value) OVER (PARTITION BY series_id ORDER BY time) AS prev
    FROM metrics
    WHERE metric = 'http_request_duration_seconds_bucket'
      AND time >= $__timeFrom - INTERVAL '1 hour'
      AND time < $__timeTo
),
counts AS (
    SELECT
        $__dateBin(time) AS time,
        le,
        sum(CASE WHEN prev IS NULL THEN 0.0 WHEN value < prev THEN value ELSE value - prev END) AS n
    FROM samples
    WHERE $__timeFilter(time) AND le IS NOT NULL
    GROUP BY 1, 2
),
bounds AS (
    SELECT
        time,
        CASE WHEN le = '+Inf' THEN NULL ELSE CAST(le AS DOUBLE) END AS upper,
        n,
        max(CASE WHEN le = '+Inf' THEN n END) OVER (PARTITION BY time) AS total
    FROM counts
),
steps AS (
    SELECT
        time, upper, n, total,
        lag(upper) OVER (PARTITION BY time ORDER BY upper ASC NULLS LAST) AS lower,
        lag(n) OVER (PARTITION BY time ORDER BY upper ASC NULLS LAST) AS lower_n
    FROM bounds
),
reached AS (
    SELECT
        *,
        row_number() OVER (PARTITION BY time ORDER BY upper ASC NULLS LAST) AS k
    FROM steps
    WHERE total > 0 AND n >= 0.95 * total
)
SELECT
    time,
    CASE
        WHEN upper IS NULL THEN lower
        WHEN n = coalesce(lower_n, 0.0) THEN upper
        ELSE coalesce(lower, 0.0) + (upper - coalesce(lower, 0.0))
            * (0.95 * total - coalesce(lower_n, 0.0)) / (n - coalesce(lower_n, 0.0))
    END AS p95_seconds
FROM reached
WHERE k = 1
ORDER BY time
