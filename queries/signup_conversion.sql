-- name: signup_conversion
-- title: Signup conversion, daily
-- unit: signups=short, sessions=short, conversion=percentunit
-- description: New accounts per Google Analytics session, per UTC day.
--
-- Inputs, by metric name (the PostgreSQL and GA4 job kinds that will write them are planned;
-- anything that writes these names, such as a push or a JSON import, feeds the KPI today):
--   app_signups_total  counter of accounts created, e.g. a PostgreSQL job sampling
--                      `SELECT count(*) FROM accounts`; a day's signups are its reset-aware
--                      increase over the day (the sample before the day is read too).
--   ga4_sessions       sessions per sample: the GA4 job writes one sample per day and
--                      property with that day's sessions, stamped at 00:00 UTC; all samples
--                      of a day are added.
-- Numerator and denominator are summed per day, then divided: a day with no sessions has no
-- conversion (NULL), not an error or infinity.
WITH signup_samples AS (
    SELECT
        time,
        value,
        lag(value) OVER (PARTITION BY series_id ORDER BY time) AS prev
    FROM metrics
    WHERE metric = 'app_signups_total'
      AND time >= date_trunc('day', $__timeFrom) - INTERVAL '1 day'
      AND time < $__timeTo
),
signups AS (
    SELECT
        date_trunc('day', time) AS day,
        sum(CASE WHEN prev IS NULL THEN 0.0 WHEN value < prev THEN value ELSE value - prev END) AS signups
    FROM signup_samples
    WHERE time >= date_trunc('day', $__timeFrom)
    GROUP BY 1
),
sessions AS (
    SELECT
        date_trunc('day', time) AS day,
        sum(value) AS sessions
    FROM metrics
    WHERE metric = 'ga4_sessions'
      AND time >= date_trunc('day', $__timeFrom)
      AND time < $__timeTo
    GROUP BY 1
)
SELECT
    coalesce(s.day, g.day) AS time,
    coalesce(s.signups, 0.0) AS signups,
    coalesce(g.sessions, 0.0) AS sessions,
    coalesce(s.signups, 0.0) / NULLIF(g.sessions, 0) AS conversion
FROM signups s
FULL OUTER JOIN sessions g ON s.day = g.day
ORDER BY time
