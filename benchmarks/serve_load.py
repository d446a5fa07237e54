"""`finegrain serve` under load: throughput and latency at 1, 4 and 16 concurrent clients, with
dynamic batching on and off in the same run, and the server's resident memory over a long run.

Both servers are started as a user starts them (`finegrain serve`, 127.0.0.1 only) on one index
of the shipped demo photos, built here with a random embedder of the chosen size (the numbers
measure the service, not the model's accuracy). Clients are threads with one keep-alive
connection each, sending prebuilt multipart bodies of demo test photos (not in the index), so
the client side costs little next to the server on the same cores. Each level runs a bounded
number of requests (and stops early at a time bound); every non-200 answer counts as an error.

    .venv/bin/python benchmarks/serve_load.py                         # 600 requests a level, RSS at 1k/10k
    .venv/bin/python benchmarks/serve_load.py --requests 200 --rss 300,1000   # quick
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import finegrain  # noqa: E402
from finegrain.data import demo_root  # noqa: E402
from finegrain.index.build import build_index  # noqa: E402
from finegrain.preprocessing import Preprocessing  # noqa: E402

BOUNDARY = "finegrain-load-boundary"


def multipart(photo: Path, k: int) -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"k\"\r\n\r\n{k}\r\n"
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + photo.read_bytes() + f"\r\n--{BOUNDARY}--\r\n".encode()


def build(root: Path, width: int, size: int) -> Path:
    torch.manual_seed(0)
    model = finegrain.create_embedder("assemble_resnet50", base_width=width, embedding_size=128)
    model.preprocessing = Preprocessing(model.preprocessing.mean, model.preprocessing.std, size, size, size)
    weights = finegrain.save_model(model, root / "embedder.safetensors")
    build_index(demo_root() / "train", root / "index", weights=weights, progress=False)
    return root / "index"


class ServerProcess:
    def __init__(self, index: Path, log: Path, *extra: str) -> None:
        self.log = log
        with open(log, "wb") as sink:
            self.process = subprocess.Popen([sys.executable, "-m", "finegrain", "serve", "--index", str(index),
                                             "--port", "0", "--reload-interval", "0", *extra],
                                            stdout=sink, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not (found := re.search(r"Uvicorn running on http://127\.0\.0\.1:([0-9]+)", log.read_text())):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        self.port = int(found.group(1))
        self.memory = psutil.Process(self.process.pid)

    def rss_mib(self) -> float:
        return self.memory.memory_info().rss / 2**20

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def load(port: int, bodies: list[bytes], clients: int, requests: int, seconds: float) -> dict:
    """`requests` searches spread over `clients` threads (or fewer, when `seconds` run out)."""
    latencies: list[float] = []
    errors: list[str] = []
    lock, counter = threading.Lock(), iter(range(requests))
    deadline = time.monotonic() + seconds

    def client(offset: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
        while time.monotonic() < deadline:
            with lock:
                number = next(counter, None)
            if number is None:
                break
            body = bodies[(number + offset) % len(bodies)]
            start = time.perf_counter()
            try:
                connection.request("POST", "/v1/search", body=body, headers=headers)
                response = connection.getresponse()
                payload = response.read()
                ok = response.status == 200 and b'"neighbours"' in payload
            except (OSError, http.client.HTTPException) as error:
                ok, payload = False, repr(error).encode()
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            elapsed = time.perf_counter() - start
            with lock:
                latencies.append(elapsed) if ok else errors.append(payload[:200].decode(errors="replace"))
        connection.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    ordered = sorted(latencies)

    def percentile(q: float) -> float:
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

    return {"clients": clients, "requests": len(latencies) + len(errors), "errors": len(errors),
            "error_examples": errors[:3], "seconds": round(wall, 2),
            "throughput": round(len(latencies) / wall, 1), "p50_ms": round(percentile(0.50), 1),
            "p95_ms": round(percentile(0.95), 1), "p99_ms": round(percentile(0.99), 1),
            "mean_ms": round(1000 * statistics.fmean(latencies), 1) if latencies else None}


def info(port: int) -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("GET", "/v1/info")
    return json.loads(connection.getresponse().read())


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        return re.search(r"model name\s*:\s*(.+)", text).group(1).strip()
    except (OSError, AttributeError):
        return platform.processor() or "unknown"


def markdown(results: dict) -> str:
    """The table for benchmarks/RESULTS.md."""
    lines = ["| batching | clients | requests | errors | req/s | p50 ms | p95 ms | p99 ms | mean batch |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, rows in results["levels"].items():
        before = {"batches": 0, "jobs": 0}
        for row in rows:
            batches = row["batching"]["batches"] - before["batches"]
            jobs = row["batching"]["jobs"] - before["jobs"]
            before = row["batching"]
            lines.append(f"| {name.split()[-1]} | {row['clients']} | {row['requests']} | {row['errors']} | "
                         f"{row['throughput']} | {row['p50_ms']} | {row['p95_ms']} | {row['p99_ms']} | "
                         f"{jobs / max(batches, 1):.2f} |")
    off, on = (results["levels"].get(name) for name in ("batching off", "batching on"))
    if off and on:
        lines.append("")
        lines.append("speed-up with batching: " + ", ".join(
            f"{a['clients']} clients {b['throughput'] / a['throughput']:.2f}x" for a, b in zip(off, on)))
    if len(results["rss"]) > 1:
        first, last = results["rss"][0], results["rss"][-1]
        lines.append("")
        lines.append(f"RSS growth from {first['requests']:,} to {last['requests']:,} requests: "
                     f"{100 * (last['rss_mib'] / first['rss_mib'] - 1):+.1f}%")
    if results["rss"]:
        lines.append("")
        lines.append("RSS: " + ", ".join(f"{r['rss_mib']} MiB after {r['requests']:,} requests"
                                         for r in results["rss"]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,4,16", help="concurrency levels")
    parser.add_argument("--requests", type=int, default=600, help="requests per level")
    parser.add_argument("--seconds", type=float, default=180, help="time bound per level")
    parser.add_argument("--rss", default="1000,10000", help="request counts at which to read the server's RSS")
    parser.add_argument("--width", type=int, default=16, help="base width of the random assemble_resnet50 embedder")
    parser.add_argument("--size", type=int, default=64, help="input size of the embedder")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="the server's --threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path("runs/serve_load.json"))
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    marks = [int(c) for c in args.rss.split(",")]
    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    try:
        index = build(work, args.width, args.size)
        bodies = [multipart(p, args.k) for p in sorted((demo_root() / "test").glob("*/*.jpg"))]
        results: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_model(),
                         "cores": os.cpu_count(), "load_average_at_start": os.getloadavg(),
                         "server_threads": args.threads or torch.get_num_threads(),
                         "model": f"assemble_resnet50 width {args.width} at {args.size}px, 128-d",
                         "index_size": None, "requests_per_level": args.requests, "levels": {}, "rss": []}
        for name, extra in (("batching off", ["--max-batch", "1"]),
                            ("batching on", ["--max-batch", str(args.max_batch), "--max-wait-ms",
                                             str(args.max_wait_ms)])):
            thread_option = ["--threads", str(args.threads)] if args.threads else []
            server = ServerProcess(index, work / f"{name.replace(' ', '-')}.log", *extra, *thread_option)
            try:
                load(server.port, bodies, 4, 40, args.seconds)  # warm-up: first calls allocate and compile
                rows = []
                for clients in levels:
                    row = load(server.port, bodies, clients, args.requests, args.seconds)
                    row["batching"] = info(server.port)["batching"]["search"]
                    rows.append(row)
                    print(f"{name:13s} {clients:3d} clients: {row['throughput']:7.1f} req/s  p50 {row['p50_ms']:7.1f} "
                          f"p95 {row['p95_ms']:7.1f} p99 {row['p99_ms']:7.1f} ms  errors {row['errors']}  "
                          f"mean batch so far {row['batching']['mean_batch']}", flush=True)
                results["levels"][name] = rows
                results["index_size"] = info(server.port)["index"]["size"]
            finally:
                server.stop()
        # Memory: a fresh server with batching on, 16 clients, RSS read after exactly `marks` requests.
        server = ServerProcess(index, work / "memory.log", "--max-batch", str(args.max_batch), "--max-wait-ms",
                               str(args.max_wait_ms), *thread_option)
        try:
            done = 0
            for mark in marks:
                row = load(server.port, bodies, 16, mark - done, 3600)
                done += row["requests"]
                rss = round(server.rss_mib(), 1)
                results["rss"].append({"requests": done, "rss_mib": rss, "errors": row["errors"]})
                print(f"after {done} requests: RSS {rss} MiB, errors {row['errors']}", flush=True)
        finally:
            server.stop()
        results["load_average_at_end"] = os.getloadavg()  # other work on the machine shows here
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        print(markdown(results))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
