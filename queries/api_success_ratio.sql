-- name: api_success_ratio
-- title: API success ratio
-- unit: percentunit
-- description: Share of API requests answered without a 5xx, per bucket.
--
-- Input: `http_requests_total`, the usual Prometheus counter of an HTTP service, with the
-- status code in label `code` (or `status`); from remote_write, a `prometheus` job or a scrape.
-- Each series' increase is reset-aware (a drop means the process restarted from zero), is
-- attributed to the bucket of the later sample, and needs the sample before the range: the
-- scan reaches one hour back. Numerator and denominator are summed per bucket over every
-- series, then divided; a bucket without requests has no value (not 100 %).
WITH samples AS (
    SELECT
        time,
        value,
        coalesce(labels['code'], labels['status'], '') AS code,
        lag(value) OVER (PARTITION BY series_id ORDER BY time) AS prev
    FROM metrics
    WHERE metric = 'http_requests_total'
      AND time >= $__timeFrom - INTERVAL '1 hour'
      AND time < $__timeTo
),
increases AS (
    SELECT
        $__dateBin(time) AS time,
        code,
        CASE WHEN prev IS NULL THEN 0.0 WHEN value < prev THEN value ELSE value - prev END AS n
    FROM samples
    WHERE $__timeFilter(time)
)
SELECT
    time,
    sum(n) FILTER (WHERE code NOT LIKE '5%') / NULLIF(sum(n), 0) AS success_ratio
FROM increases
GROUP BY time
ORDER BY time
