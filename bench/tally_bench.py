#!/usr/bin/env python3
"""Replays the shared anchor workload against a release `tally serve` and prints Tally's
figures next to the reference systems' (from ANCHORS-MEASURED.md, same machine kind).

Phases:
  ingest   the 11.52 M samples, time-major, 2,000 samples per request (one scrape round of
           every series), 4 connections: by default the shared rw_sps1.bin remote_write bodies
           sent to POST /api/v1/write exactly as the VictoriaMetrics anchor received them
           (--protocol import sends the same rounds as JSON to /api/v1/import instead);
           samples/s, server CPU-s per million samples, request latency
  storage  bytes per sample of the metrics table after the final flush
  query    Q1-Q3 of the anchors in Tally SQL over HTTP (Arrow IPC out), median of 10 after
           1 warm-up, with the anchors' cross-checks (row counts, means)
  grafana  Q2 and Q3 as Grafana panels would ask them (POST /grafana/query, data frames,
           no SQL written): Q2 as the `rate` aggregation grouped by status in 60 s buckets,
           Q3 as `last` of one series in 15 s buckets; same cross-checks
"""
import argparse
import http.client
import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time

import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc
import pyarrow.parquet as pq

ANCHORS = {
    "ingest": [
        ("VictoriaMetrics 1.79 remote_write, 2,000 samples/req, 4 conns", "0.96 - 1.52 M/s", "1.16 - 1.31"),
        ("Prometheus 2.42 promtool OpenMetrics import", "0.067 M/s", "15.1"),
    ],
    "storage": [
        ("VictoriaMetrics 1.79 after force_merge", "0.834"),
        ("Prometheus 2.42 TSDB after compaction", "4.33"),
        ("Parquet long, pyarrow defaults + zstd-3", "3.37"),
        ("Parquet long, ts DELTA_BINARY_PACKED, value PLAIN, zstd-3", "2.06"),
    ],
    "query": [
        ("VictoriaMetrics 1.79 (PromQL)", "77 - 100", "53 - 77", "2.1 - 3.1"),
        ("Prometheus 2.42 (PromQL)", "544", "501", "2.0"),
        ("DataFusion-python 55 on Parquet (long)", "710 - 997", "783 - 1130", "35 - 60"),
        ("DuckDB 2.0 on Parquet (long)", "537 - 808", "554 - 766", "13 - 16"),
    ],
}
EXPECT = {"q1": (28_800, 0.125950), "q2": (4_320, 970.405), "q3": (5_760, 13_057_840_854.76)}

T0 = "2024-01-01T00:00:00Z"
T1 = "2024-01-02T00:00:00Z"
RANGE = f"time >= TIMESTAMP '{T0}' AND time < TIMESTAMP '{T1}'"
MS = "(CAST(time AS BIGINT) / 1000)"
RATE = f"(max(value) - min(value)) / nullif((max({MS}) - min({MS})) / 1000.0, 0)"
BUCKET = f"({MS} / 60000) * 60000"
QUERIES = {
    "q1": f"WITH b AS (SELECT series_id, labels['instance'] AS instance, {BUCKET} AS bucket, {RATE} AS r "
          f"FROM metrics WHERE metric = 'node_cpu_seconds_total' AND {RANGE} GROUP BY 1, 2, 3) "
          f"SELECT instance, bucket, avg(r) AS v FROM b GROUP BY 1, 2 ORDER BY 1, 2",
    "q2": f"WITH b AS (SELECT series_id, labels['status'] AS status, {BUCKET} AS bucket, {RATE} AS r "
          f"FROM metrics WHERE metric = 'http_requests_total' AND {RANGE} GROUP BY 1, 2, 3) "
          f"SELECT status, bucket, sum(r) AS v FROM b GROUP BY 1, 2 ORDER BY 1, 2",
    "q3": f"SELECT time, value FROM metrics WHERE metric = 'node_memory_MemAvailable_bytes' "
          f"AND labels['instance'] = 'host-03:9100' AND labels['job'] = 'node' AND {RANGE} ORDER BY time",
}


def start_tally(binary, data, flush_rows):
    # The scheduler is off so the shipped self-scrape adds no rows to the count.
    env = dict(os.environ, RUST_LOG="warn", TALLY__WAL__FLUSH_ROWS=str(flush_rows),
               TALLY__SCHEDULER__ENABLED="false",
               TALLY__QUERY__MAX_ROWS="20000000", TALLY__SERVER__MAX_BODY="64MiB")
    p = subprocess.Popen([binary, "serve", "--data", data, "--listen", "127.0.0.1:0"],
                         stdout=subprocess.PIPE, text=True, env=env)
    line = p.stdout.readline()
    if not line.startswith("tally listening on http://"):
        p.kill()
        sys.exit(f"tally did not start: {line!r}")
    host, port = line.strip().rsplit("/", 1)[1].split(":")
    threading.Thread(target=lambda: [None for _ in p.stdout], daemon=True).start()
    return p, host, int(port)


def request(conn, method, path, body=None, headers=None):
    conn.request(method, path, body=body, headers=headers or {})
    r = conn.getresponse()
    data = r.read()
    if r.status >= 300:
        raise RuntimeError(f"{method} {path}: {r.status} {data[:300]!r}")
    return data


def bodies(parquet_path):
    """One JSON body per scrape round (all series at one timestamp slot), time-major."""
    t = pq.read_table(parquet_path)
    t = t.sort_by([("ts", "ascending")])
    ts = pc.cast(t["ts"], pa.int64()).to_numpy()
    metric = t["metric"].to_pylist()
    labels = t["labels"].to_pylist()
    value = t["value"].to_numpy()
    parsed = {}
    n = len(ts)
    step = 2000
    for start in range(0, n, step):
        items = []
        for i in range(start, min(start + step, n)):
            lab = labels[i]
            d = parsed.get(lab)
            if d is None:
                d = dict(kv.split("=", 1) for kv in lab.split(",")) if lab else {}
                parsed[lab] = d
            items.append({"name": metric[i], "value": float(value[i]), "labels": d, "time": int(ts[i])})
        yield json.dumps(items, separators=(",", ":")).encode(), len(items)


def rw_bodies(path):
    """The shared stream: repeated [u32 LE length][snappy block WriteRequest]."""
    with open(path, "rb") as f:
        while True:
            h = f.read(4)
            if not h:
                return
            n = int.from_bytes(h, "little")
            yield f.read(n), 2000


RW_HEADERS = {"content-type": "application/x-protobuf", "content-encoding": "snappy",
              "x-prometheus-remote-write-version": "0.1.0"}


def ingest(host, port, source, conc, proc, protocol):
    q = queue.Queue(maxsize=conc * 4)
    lat = []
    sent = [0]
    lock = threading.Lock()

    def worker():
        conn = http.client.HTTPConnection(host, port)
        while True:
            item = q.get()
            if item is None:
                return
            body, n = item
            t = time.perf_counter()
            if protocol == "remote_write":
                request(conn, "POST", "/api/v1/write", body, RW_HEADERS)
            else:
                request(conn, "POST", "/api/v1/import?job=bench", body, {"content-type": "application/json"})
            with lock:
                lat.append(time.perf_counter() - t)
                sent[0] += n

    threads = [threading.Thread(target=worker) for _ in range(conc)]
    cpu0 = proc.cpu_times()
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for b in (rw_bodies(source) if protocol == "remote_write" else bodies(source)):
        q.put(b)
    for _ in threads:
        q.put(None)
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    cpu1 = proc.cpu_times()
    cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    lat.sort()
    return {"samples": sent[0], "wall_s": wall, "samples_per_s": sent[0] / wall,
            "server_cpu_s_per_M": cpu / (sent[0] / 1e6),
            "p50_ms": lat[len(lat) // 2] * 1e3, "p99_ms": lat[int(len(lat) * 0.99)] * 1e3}


def query(host, port, sql, runs):
    conn = http.client.HTTPConnection(host, port)
    path = "/api/v1/sql?format=arrow"

    def once():
        data = request(conn, "POST", path, sql.encode(), {"content-type": "text/plain"})
        return pa.ipc.open_stream(data).read_all()

    tbl = once()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        tbl = once()
        times.append((time.perf_counter() - t) * 1e3)
    col = tbl.column(tbl.num_columns - 1)
    return statistics.median(times), tbl.num_rows, pc.mean(col).as_py()


GRAFANA = {
    "q2": {"target": "http_requests_total", "payload": {"aggregation": "rate", "group_by": ["status"]},
           "intervalMs": 60_000, "maxDataPoints": 1441},
    "q3": {"target": "node_memory_MemAvailable_bytes",
           "payload": {"aggregation": "last", "instance": "host-03:9100", "job": "node"},
           "intervalMs": 15_000, "maxDataPoints": 5761},
}


def grafana_query(host, port, spec, runs):
    """Median ms of one Grafana panel query; (points, mean of every value) for the checks."""
    conn = http.client.HTTPConnection(host, port)
    body = json.dumps({
        "range": {"from": T0, "to": T1}, "intervalMs": spec["intervalMs"],
        "maxDataPoints": spec["maxDataPoints"],
        "targets": [{"refId": "A", "target": spec["target"], "payload": spec["payload"]}],
    }).encode()

    def once():
        return request(conn, "POST", "/grafana/query", body, {"content-type": "application/json"})

    once()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        data = once()
        times.append((time.perf_counter() - t) * 1e3)
    frames = json.loads(data)
    values = [v for f in frames for v in f["data"]["values"][1] if v is not None]
    return statistics.median(times), len(values), statistics.fmean(values) if values else None


def du(path):
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--workload", required=True, help="folder with metrics_long.parquet")
    ap.add_argument("--run", required=True, help="scratch folder for Tally's data")
    ap.add_argument("--conc", type=int, default=4)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--flush-rows", type=int, default=1_000_000)
    ap.add_argument("--protocol", choices=["remote_write", "import"], default="remote_write")
    a = ap.parse_args()
    source = os.path.join(a.workload, "rw_sps1.bin" if a.protocol == "remote_write" else "metrics_long.parquet")

    data = os.path.join(a.run, "data")
    subprocess.run(["rm", "-rf", data], check=True)
    p, host, port = start_tally(a.binary, data, a.flush_rows)
    proc = psutil.Process(p.pid)
    try:
        ing = ingest(host, port, source, a.conc, proc, a.protocol)
        rss = proc.memory_info().rss
        # An orderly stop flushes everything to Delta; then measure the table as stored.
        p.terminate()
        p.wait(timeout=120)
        table_bytes = du(os.path.join(data, "metrics"))
        files = sum(1 for r, _, fs in os.walk(os.path.join(data, "metrics")) for f in fs if f.endswith(".parquet"))
        p, host, port = start_tally(a.binary, data, a.flush_rows)
        conn = http.client.HTTPConnection(host, port)
        total = json.loads(request(conn, "POST", "/api/v1/sql", b"SELECT count(*) AS n FROM metrics"))[0]["n"]
        results = {k: query(host, port, q, a.runs) for k, q in QUERIES.items()}
        panels = {k: grafana_query(host, port, spec, a.runs) for k, spec in GRAFANA.items()}
    finally:
        p.terminate()
        p.wait(timeout=120)

    path = "/api/v1/write (remote_write)" if a.protocol == "remote_write" else "/api/v1/import (JSON)"
    print(f"\n== ingest: POST {path}, 2,000 samples/request, {a.conc} connections ==")
    print(f"{'Tally (this run, ' + a.protocol + ')':<64}{ing['samples_per_s'] / 1e6:.3f} M samples/s, "
          f"{ing['server_cpu_s_per_M']:.2f} server CPU-s per M samples, p50 {ing['p50_ms']:.1f} ms, "
          f"p99 {ing['p99_ms']:.1f} ms, {ing['samples']:,} samples in {ing['wall_s']:.1f} s, RSS {rss / 2**20:.0f} MiB")
    for name, sps, cpu in ANCHORS["ingest"]:
        print(f"{name:<64}{sps}, {cpu} CPU-s per M samples")
    print(f"\n== storage: bytes per sample ==")
    print(f"Tally metrics table (Delta, {files} files, flush_rows {a.flush_rows:,})  "
          f"{table_bytes / max(total, 1):.3f} B/sample ({table_bytes:,} bytes, {total:,} rows)")
    for name, b in ANCHORS["storage"]:
        print(f"{name:<58}{b}")
    print(f"\n== queries: median of {a.runs} ms (Q1 avg cpu rate by instance, Q2 sum request rate by status, Q3 one raw series) ==")
    print(f"{'Tally SQL over HTTP (Arrow IPC out)':<44}" + "  ".join(f"{k.upper()} {results[k][0]:.0f}" for k in QUERIES))
    for name, q1, q2, q3 in ANCHORS["query"]:
        print(f"{name:<44}Q1 {q1}  Q2 {q2}  Q3 {q3}")
    print(f"\n== Grafana panels: median of {a.runs} ms, POST /grafana/query (JSON data frames) ==")
    print(f"{'Tally /grafana/query':<44}" + "  ".join(f"{k.upper()} {panels[k][0]:.0f}" for k in GRAFANA))
    for name, _, q2, q3 in ANCHORS["query"][:2]:
        print(f"{name:<44}Q2 {q2}  Q3 {q3}")
    print("\ncross-checks (rows, mean of last column; expected from the anchors):")
    ok = total == 11_520_000
    print(f"  count(*) {total:,} (expected 11,520,000)")
    for k, (ms, rows, mean) in results.items():
        er, em = EXPECT[k]
        good = rows == er and mean is not None and abs(mean - em) / abs(em) < 1e-3
        ok &= good
        print(f"  {k}: {rows:,} rows, mean {mean:.6g} (expected {er:,}, {em:.6g}) {'ok' if good else 'MISMATCH'}")
    for k, (ms, points, mean) in panels.items():
        er, em = EXPECT[k]
        # Bucketed rates (deltas divided by the time they span, reset-aware) are not the
        # anchors' max-min per bucket: Q2's mean may differ slightly; Q3 is raw and exact.
        tol = 1e-2 if k == "q2" else 1e-9
        good = points == er and mean is not None and abs(mean - em) / abs(em) < tol
        ok &= good
        print(f"  grafana {k}: {points:,} points, mean {mean:.6g} (expected {er:,}, {em:.6g}) {'ok' if good else 'MISMATCH'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
