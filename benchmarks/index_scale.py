"""Index choice at scale: finegrain's recall-targeted index vs exact Flat vs autofaiss, one run.

Synthetic L2-normalised sets (issue 6), 1,000 held-out queries (same distribution, not in the
database), k = 10, recall@10 against exact search:
- "hard": isotropic Gaussian clusters, noise 1.8x the centre's norm: neighbours are barely closer
  than strangers, and no approximate index beats exact search at recall 0.95.
- "realistic": clusters in a 32-d latent space (noise 0.5), mapped linearly to 256-d plus 0.1
  isotropic noise: low intrinsic dimension, as CNN embeddings have.
- "sop": a 120,000 x 1536 realistic set shaped like Stanford Online Products (build time,
  memory, queries/s).

autofaiss is not a finegrain dependency (it pins numpy<2 and faiss-cpu); install it beside the
project for this benchmark only, without its pins:
    .venv/bin/pip install --target .cache/bench-autofaiss --no-deps autofaiss==2.18.0 \
        embedding-reader fire termcolor fsspec 'pandas<3' 'pyarrow<30' pytz
If it cannot be imported, the row shows what autofaiss picks at this size instead: HNSW32 with
faiss's default efSearch (16).

    .venv/bin/python benchmarks/index_scale.py                      # full: 1M x 256 (tens of minutes)
    .venv/bin/python benchmarks/index_scale.py --n 100000 --sop-n 20000   # quick
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from finegrain.index.select import build_tuned_index, neighbour_recall, parse_memory  # noqa: E402

K, SINGLE_QUERIES, BLOCK = 10, 100, 65536


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def hard_set(count: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    """Unit-norm centres plus isotropic noise of norm 1.8, then L2-normalised."""
    rng = np.random.default_rng(seed)
    centres = _normalise(rng.standard_normal((clusters, dim), dtype=np.float32))
    labels = rng.integers(0, clusters, count)
    out = np.empty((count, dim), np.float32)
    for start in range(0, count, BLOCK):
        block = centres[labels[start:start + BLOCK]]
        block += (1.8 / np.sqrt(dim)) * rng.standard_normal(block.shape, dtype=np.float32)
        out[start:start + BLOCK] = _normalise(block)
    return out


def realistic_set(count: int, dim: int, clusters: int, seed: int, latent: int = 32) -> np.ndarray:
    """Clusters in a `latent`-d space (noise 0.5 of the centre norm), a random linear map to `dim`,
    then isotropic noise of norm 0.1 relative to the mapped vector, L2-normalised."""
    rng = np.random.default_rng(seed)
    centres = _normalise(rng.standard_normal((clusters, latent), dtype=np.float32))
    mapping = rng.standard_normal((latent, dim), dtype=np.float32) / np.sqrt(latent)
    labels = rng.integers(0, clusters, count)
    out = np.empty((count, dim), np.float32)
    for start in range(0, count, BLOCK):
        z = centres[labels[start:start + BLOCK]]
        z += (0.5 / np.sqrt(latent)) * rng.standard_normal(z.shape, dtype=np.float32)
        x = _normalise(z @ mapping)
        x += (0.1 / np.sqrt(dim)) * rng.standard_normal(x.shape, dtype=np.float32)
        out[start:start + BLOCK] = _normalise(x)
    return out


def index_bytes(index: faiss.Index) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        faiss.write_index(index, f"{tmp}/i.faiss")
        return os.path.getsize(f"{tmp}/i.faiss")


def measure(index: faiss.Index, queries: np.ndarray, truth: np.ndarray) -> dict:
    start = time.perf_counter()
    _, ids = index.search(queries, K)
    batched = 1000 * (time.perf_counter() - start) / len(queries)
    start = time.perf_counter()
    for row in queries[:SINGLE_QUERIES]:
        index.search(row[None], K)
    single = 1000 * (time.perf_counter() - start) / min(SINGLE_QUERIES, len(queries))
    return {"recall@10": round(neighbour_recall(ids, truth, K), 4), "ms_per_query_batched": round(batched, 4),
            "ms_per_query_single": round(single, 4), "queries_per_s_batched": round(1000 / batched, 1)}


def run_exact(db: np.ndarray, queries: np.ndarray) -> tuple[dict, np.ndarray]:
    start = time.perf_counter()
    index = faiss.IndexFlatIP(db.shape[1])
    index.add(db)
    build = time.perf_counter() - start
    _, truth = index.search(queries, K)
    row = {"method": "exact Flat", "index": "Flat", "build_s": round(build, 1), "index_bytes": 4 * db.size,
           **measure(index, queries, truth)}
    return row, truth


def run_ours(db: np.ndarray, queries: np.ndarray, truth: np.ndarray, max_memory: int, target: float) -> dict:
    start = time.perf_counter()
    index, report = build_tuned_index(db, max_memory=max_memory, recall_target=target, recall_k=K)
    build = time.perf_counter() - start
    return {"method": "finegrain auto", "index": f"{report.key} {report.parameters}".strip(),
            "build_s": round(build, 1), "index_bytes": index_bytes(index), **measure(index, queries, truth),
            "tuning_recall@10": round(report.recall, 4), "fallback": report.fallback,
            "tried": [f"{p.parameters}: {p.recall:.3f} @ {p.latency_ms:.3f} ms" for p in report.points]}


def run_autofaiss(db: np.ndarray, queries: np.ndarray, truth: np.ndarray, budget: str, memory: str) -> dict:
    try:
        from autofaiss import build_index
    except ImportError as error:
        start = time.perf_counter()
        index = faiss.index_factory(db.shape[1], "HNSW32", faiss.METRIC_INNER_PRODUCT)
        index.add(db)
        return {"method": f"HNSW32, efSearch 16 (what autofaiss picks; autofaiss not importable: {error})",
                "index": "HNSW32 efSearch=16", "build_s": round(time.perf_counter() - start, 1),
                "index_bytes": index_bytes(index), **measure(index, queries, truth)}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        index, info = build_index(db, save_on_disk=False, metric_type="ip", max_index_memory_usage=budget,
                                  current_memory_available=memory,
                                  temporary_indices_folder=tmp, verbose=logging.WARNING)
    build = time.perf_counter() - start
    return {"method": "autofaiss 2.18 (defaults)", "index": f"{info['index_key']} {info['index_param']}",
            "build_s": round(build, 1), "index_bytes": index_bytes(index), **measure(index, queries, truth)}


def run_set(name: str, db: np.ndarray, queries: np.ndarray, args: argparse.Namespace,
            with_autofaiss: bool) -> list[dict]:
    print(f"== {name}: {db.shape[0]} x {db.shape[1]}, {len(queries)} queries", flush=True)
    exact, truth = run_exact(db, queries)
    rows = [exact]
    print(json.dumps(exact), flush=True)
    rows.append(run_ours(db, queries, truth, parse_memory(args.max_memory), args.recall_target))
    print(json.dumps(rows[-1]), flush=True)
    if with_autofaiss:
        rows.append(run_autofaiss(db, queries, truth, args.max_memory, args.autofaiss_memory))
        print(json.dumps(rows[-1]), flush=True)
    for row in rows:
        row.update(set=name, n=db.shape[0], dim=db.shape[1], speedup_vs_exact_batched=round(
            exact["ms_per_query_batched"] / row["ms_per_query_batched"], 1), speedup_vs_exact_single=round(
            exact["ms_per_query_single"] / row["ms_per_query_single"], 1))
    return rows


def markdown(rows: list[dict]) -> str:
    head = ("| set | method | index | recall@10 | ms/query batched | ms/query single | x exact (batched / single) "
            "| build s | index MiB |\n|---|---|---|---|---|---|---|---|---|\n")
    return head + "\n".join(
        f"| {r['set']} {r['n']}x{r['dim']} | {r['method']} | {r['index']} | {r['recall@10']:.3f} | "
        f"{r['ms_per_query_batched']:.3f} | {r['ms_per_query_single']:.3f} | {r['speedup_vs_exact_batched']} / "
        f"{r['speedup_vs_exact_single']} | {r['build_s']} | {r['index_bytes'] / 2**20:.0f} |" for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="database size of hard/realistic")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--clusters", type=int, default=20_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--sop-n", type=int, default=120_000)
    parser.add_argument("--sop-dim", type=int, default=1536)
    parser.add_argument("--sets", default="realistic,hard,sop")
    parser.add_argument("--max-memory", default="4G", help="index memory budget of both finegrain and autofaiss")
    parser.add_argument("--recall-target", type=float, default=0.95)
    parser.add_argument("--autofaiss-path", default=str(Path(__file__).resolve().parents[1] / ".cache/bench-autofaiss"))
    parser.add_argument("--autofaiss-memory", default="16G",
                        help="autofaiss current_memory_available (RAM it may use while building)")
    parser.add_argument("--no-autofaiss", action="store_true")
    parser.add_argument("--out", default="runs/index_scale_results.json")
    args = parser.parse_args()
    if Path(args.autofaiss_path).is_dir():
        sys.path.append(args.autofaiss_path)
    started = time.perf_counter()
    rows = []
    for name in args.sets.split(","):
        if name == "sop":
            data = realistic_set(args.sop_n + args.queries, args.sop_dim, args.sop_n // 10, seed=3, latent=64)
            rows += run_set(name, data[:args.sop_n], data[args.sop_n:], args, with_autofaiss=False)
        else:
            make = {"hard": hard_set, "realistic": realistic_set}[name]
            data = make(args.n + args.queries, args.dim, args.clusters, seed=1 if name == "hard" else 2)
            rows += run_set(name, data[:args.n], data[args.n:], args, with_autofaiss=not args.no_autofaiss)
        del data
    summary = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
               "faiss": faiss.__version__, "threads": faiss.omp_get_max_threads(), "cpus": os.cpu_count(),
               "total_s": round(time.perf_counter() - started, 1),
               "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(markdown(rows))
    print(f"total {summary['total_s']} s, peak RSS {summary['peak_rss_gib']} GiB, wrote {args.out}")


if __name__ == "__main__":
    main()
