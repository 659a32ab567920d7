-- name: api_requests_mom
-- title: API requests, month over month
-- unit: requests=short, previous_month=short, change=percentunit
-- description: Requests per calendar month (UTC), the month before, and the change between them.
--
-- Input: `http_requests_total` (any labels; every series is added up). A month's requests are
-- the reset-aware increases of its samples. Months start at the first of the month, 00:00
-- UTC; the range's first month is compared with the one before it, which is read too. A
-- month without traffic before it has no change (not infinite).
WITH samples AS (
    SELECT
        time,
        value,
        lag(value) OVER (PARTITION BY series_id ORDER BY time) AS prev
    FROM metrics
    WHERE metric = 'http_requests_total'
      AND time >= date_trunc('month', $__timeFrom) - INTERVAL '1 month' - INTERVAL '1 hour'
      AND time < $__timeTo
),
monthly AS (
    SELECT
        date_trunc('month', time) AS month,
        sum(CASE WHEN prev IS NULL THEN 0.0 WHEN value < prev THEN value ELSE value - prev END) AS requests
    FROM samples
    WHERE time >= date_trunc('month', $__timeFrom) - INTERVAL '1 month'
    GROUP BY 1
)
SELECT
    m.month AS time,
    m.requests,
    p.requests AS previous_month,
    (m.requests - p.requests) / NULLIF(p.requests, 0) AS change
FROM monthly m
LEFT JOIN monthly p ON p.month = m.month - INTERVAL '1 month'
WHERE m.month >= date_trunc('month', $__timeFrom)
ORDER BY time
