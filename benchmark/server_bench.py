"""Load test of the running app's REST API: concurrent clients, shared-prefix and unique prompts.

    python -m benchmark.server_bench --launch                 # start app.py on a free port, run, stop it
    python -m benchmark.server_bench --url http://127.0.0.1:7860 --clients 4 --requests 40

N client threads (one ``httpx.Client`` each) send a fixed, seeded mix of requests: most share one
long system prompt (prefix-cache hits after the first), the rest start with a unique line (misses).
The same mix runs with the prefix cache on and then off, so the two are compared in one run.
Reports p50/p95 of the server's wall TTFT and of the client-side latency, requests per second,
hit rate and errors; writes ``benchmark/results/<name>.{json,md}``; the JSON summary is the last
line. Loopback only: the app is a local demo, and this is load, so other hosts are refused.
Bounded in requests (``--requests`` per mode) and in time (``--max-seconds`` per mode).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import queue
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from benchmark.common import REPO_ROOT, fmt, handbook_text, machine_info, markdown_table, print_machine_info, question, write_results


@dataclass(frozen=True)
class LoadConfig:
    clients: int = 4  # concurrent client threads
    requests: int = 32  # per mode
    shared_fraction: float = 0.75  # share of requests on the common system prompt
    system_sections: int = 10  # handbook sections in the system prompt (about 40 tokens each)
    max_new_tokens: int = 16
    max_seconds: float = 300.0  # per mode: clients stop taking requests after this
    request_timeout_s: float = 180.0
    seed: int = 0


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    cfg = LoadConfig(
        clients=args.clients,
        requests=args.requests,
        shared_fraction=args.shared_fraction,
        max_new_tokens=args.max_new_tokens,
        max_seconds=args.max_seconds,
        system_sections=args.system_sections,
    )
    _check_bounds(cfg)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("on", "off") for m in modes):
        raise SystemExit("--modes is a comma-separated list of 'on' and 'off'")
    t_start = time.perf_counter()
    app = launch_app(args.app_args) if args.launch else _existing(args.url)
    with app as url:
        check_loopback(url)
        with httpx.Client(base_url=url, timeout=30, trust_env=False) as http:
            health = wait_ready(http, args.ready_timeout, app.alive)
        decode = (health.get("decode") or {}).get("description") or "transformers' step"
        info = machine_info(health.get("device"), {"model": health.get("model"), "weights": health.get("weights"), "decode_step": decode, "dtype": health.get("dtype"), "url": url, "launched": args.launch})
        print_machine_info(info)
        results: dict[str, Any] = {"name": args.name, "machine": info, "config": asdict(cfg), "modes": {}}
        for mode in modes:
            print(f"[{mode}] {cfg.requests} requests, {cfg.clients} clients, prefix cache {mode} (load {_loadavg()})", flush=True)
            results["modes"][mode] = run_load(url, cfg, prefix_cache=(mode == "on"))
            _print_mode(mode, results["modes"][mode])
    results["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    results["wall_s"] = time.perf_counter() - t_start
    markdown = render_markdown(results)
    print()
    print(markdown)
    summary = summary_of(results)
    paths = write_results(args.name, results | {"summary": summary}, markdown)
    print("\nwrote " + ", ".join(str(p) for p in paths))
    print(json.dumps(summary))
    errors = sum(m["errors"] for m in results["modes"].values())
    return 1 if errors else 0


# ---------------------------------------------------------------------- the app


def check_loopback(url: str) -> None:
    """Raise ``SystemExit`` unless ``url`` is http(s) on a loopback address (this is a load generator)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SystemExit(f"--url must be http://127.0.0.1:PORT or similar, got {url!r}")
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(parts.hostname, parts.port or 80, proto=socket.IPPROTO_TCP)}
    except socket.gaierror as exc:
        raise SystemExit(f"cannot resolve {parts.hostname!r}: {exc}") from None
    if not addresses or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise SystemExit(f"refusing {url}: server_bench only targets loopback addresses (127.0.0.1, ::1, localhost), and {parts.hostname} is {sorted(addresses)}")


class launch_app:
    """Start ``python app.py --host 127.0.0.1 --port <free>`` from the repository, stop it on exit.

    The app runs in its own process group, so stopping it also stops anything it started.
    Its output goes to ``benchmark/results/server_bench_app.log.tmp`` (ignored by git).
    """

    def __init__(self, extra_args: list[str]) -> None:
        self.extra_args = extra_args
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> str:
        port = _free_port()
        log_path = REPO_ROOT / "benchmark" / "results" / "server_bench_app.log.tmp"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(log_path, "w")
        command = [sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port), *self.extra_args]
        print(f"launching: {' '.join(command)} (log: {log_path})", flush=True)
        self.proc = subprocess.Popen(command, cwd=REPO_ROOT, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        return f"http://127.0.0.1:{port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
        self.log.close()
        print(f"stopped the app (exit code {self.proc.returncode})", flush=True)


class _existing:
    def __init__(self, url: str | None) -> None:
        if not url:
            raise SystemExit("pass --url http://127.0.0.1:PORT of a running app, or --launch to start one")
        self.url = url.rstrip("/")

    def __enter__(self) -> str:
        check_loopback(self.url)  # before the first request
        return self.url

    def alive(self) -> bool:
        return True

    def __exit__(self, *exc: object) -> None:
        pass


def wait_ready(http: httpx.Client, timeout_s: float, alive: Any = lambda: True) -> dict[str, Any]:
    """Poll ``GET /health`` until the model is loaded and the background compile of its decode step
    has ended (compiled or eager), as the other benchmarks do; return the health body.

    Measuring beside the compile would time a step that switches from eager to compiled midway,
    with the compile holding a core."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        if not alive():
            raise SystemExit(f"the app exited before it was ready; see benchmark/results/server_bench_app.log.tmp (last /health: {last})")
        try:
            response = http.get("/health")
            if response.status_code == 200:
                last = response.json()
                if last.get("ready") and (last.get("decode") or {}).get("state") != "compiling":
                    return last
                if last.get("error"):
                    raise SystemExit(f"the app failed to load its model: {last['error']}")
        except httpx.TransportError as exc:
            last = repr(exc)
        time.sleep(0.5)
    raise SystemExit(f"the app was not ready within {timeout_s:.0f} s (last /health: {last})")


# ---------------------------------------------------------------------- the load


def make_requests(cfg: LoadConfig, prefix_cache: bool) -> list[dict[str, Any]]:
    """The seeded request mix: the same prompts in the same order for every mode."""
    rng = random.Random(cfg.seed)
    shared_system = "You are the support assistant of Acme Robotics.\n\n" + handbook_text(cfg.system_sections)
    requests = []
    for i in range(cfg.requests):
        shared = rng.random() < cfg.shared_fraction
        # A unique first line makes every token after the chat template's opening differ.
        system = shared_system if shared else f"Case {rng.getrandbits(48):012x}: answer as the Acme support team.\n\n" + handbook_text(cfg.system_sections)
        body = {"prompt": question(i), "system_prompt": system, "max_new_tokens": cfg.max_new_tokens, "use_cache": True, "use_prefix_cache": prefix_cache, "temperature": 0.0}
        requests.append({"kind": "shared" if shared else "unique", "body": body})
    return requests


def run_load(url: str, cfg: LoadConfig, prefix_cache: bool) -> dict[str, Any]:
    """Clear the cache, send the mix from ``cfg.clients`` threads, and summarize what came back."""
    with httpx.Client(base_url=url, timeout=30, trust_env=False) as http:
        cleared = http.post("/cache/clear")
        clear_status = cleared.status_code
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for item in make_requests(cfg, prefix_cache):
        todo.put(item)
    records: list[dict[str, Any]] = []
    lock = threading.Lock()
    deadline = time.monotonic() + cfg.max_seconds

    def client() -> None:
        with httpx.Client(base_url=url, timeout=cfg.request_timeout_s, trust_env=False) as http:
            for item in _drain(todo, deadline):
                records_item = send(http, item)
                with lock:
                    records.append(records_item)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, name=f"client-{i}") for i in range(cfg.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    with httpx.Client(base_url=url, timeout=30, trust_env=False) as http:
        stats = http.get("/cache/stats").json()
    return summarize_load(records, elapsed, cfg.requests, stats, clear_status)


def send(http: httpx.Client, item: dict[str, Any]) -> dict[str, Any]:
    """One POST /generate; never raises (errors are counted, not fatal)."""
    t0 = time.perf_counter()
    record: dict[str, Any] = {"kind": item["kind"]}
    try:
        response = http.post("/generate", json=item["body"])
        record["client_ms"] = (time.perf_counter() - t0) * 1000
        record["status"] = response.status_code
        if response.status_code == 200:
            body = response.json()
            record |= {
                "cache_status": body["cache_status"],
                "wall_ttft_ms": body["timings"]["wall_ttft_ms"],
                "latency_ms": body["latency_ms"],
                "prompt_tokens": body["timings"]["prompt_tokens"],
                "reused_tokens": body["timings"]["prefix_tokens_saved"],
                "new_tokens": body["timings"]["new_tokens"],
            }
        else:
            record["error"] = response.text[:200]
    except httpx.HTTPError as exc:
        record |= {"client_ms": (time.perf_counter() - t0) * 1000, "status": None, "error": repr(exc)[:200]}
    return record


def summarize_load(records: list[dict[str, Any]], elapsed_s: float, planned: int, stats: dict[str, Any], clear_status: int) -> dict[str, Any]:
    ok = [r for r in records if r.get("status") == 200]
    out: dict[str, Any] = {
        "planned": planned,
        "sent": len(records),
        "completed": len(ok),
        "errors": len(records) - len(ok),
        "not_sent": planned - len(records),  # left when the time bound ran out
        "error_samples": sorted({str(r.get("status")) + ": " + r.get("error", "") for r in records if r.get("status") != 200})[:5],
        "elapsed_s": elapsed_s,
        "requests_per_sec": len(ok) / elapsed_s if elapsed_s > 0 else 0.0,
        "hit_rate": sum(r["cache_status"] in ("hit", "partial") for r in ok) / len(ok) if ok else 0.0,
        "reused_token_share": sum(r["reused_tokens"] for r in ok) / max(1, sum(r["prompt_tokens"] for r in ok)),
        "statuses": {s: sum(r["cache_status"] == s for r in ok) for s in sorted({r["cache_status"] for r in ok})},
        "server_cache_stats": stats,
        "cache_clear_status": clear_status,
        "by_kind": {},
    }
    for kind, group in (("all", ok), ("shared", [r for r in ok if r["kind"] == "shared"]), ("unique", [r for r in ok if r["kind"] == "unique"])):
        out["by_kind"][kind] = {
            "n": len(group),
            **{f"{metric}_{p}": percentile([r[metric] for r in group], q) for metric in ("wall_ttft_ms", "latency_ms", "client_ms") for p, q in (("p50", 50), ("p95", 95))},
        }
    return out


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


# ---------------------------------------------------------------------- reporting


def render_markdown(results: dict[str, Any]) -> str:
    m, cfg = results["machine"], results["config"]
    lines = [
        f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, torch {m.get('torch')}; app at {m['url']} ({'launched by the benchmark' if m['launched'] else 'already running'}), "
        f"model {m.get('model')} on {m.get('device')} ({m.get('weights') or m.get('dtype')}; decode step: {m.get('decode_step', 'not reported')}); load average {m['loadavg_start']} at start, {m.get('loadavg_end')} at end; {m['time_utc']}.",
        f"\n{cfg['clients']} concurrent clients, {cfg['requests']} requests per mode ({100 * cfg['shared_fraction']:.0f}% on one shared system prompt, "
        f"the rest unique), {cfg['max_new_tokens']} new tokens each. TTFT and latency are the server's own timings; client is the round trip, queueing included.\n",
    ]
    rows = []
    for mode, r in results["modes"].items():
        for kind in ("all", "shared", "unique"):
            k = r["by_kind"][kind]
            if not k["n"]:
                continue
            rows.append(
                (
                    f"prefix cache {mode}",
                    kind,
                    k["n"],
                    f"{fmt(k['wall_ttft_ms_p50'])} / {fmt(k['wall_ttft_ms_p95'])}",
                    f"{fmt(k['latency_ms_p50'])} / {fmt(k['latency_ms_p95'])}",
                    f"{fmt(k['client_ms_p50'])} / {fmt(k['client_ms_p95'])}",
                    f"{r['requests_per_sec']:.2f}" if kind == "all" else "",
                    f"{100 * r['hit_rate']:.0f}% ({100 * r['reused_token_share']:.0f}% of tokens)" if kind == "all" else "",
                    f"{r['errors']}" + (f" (+{r['not_sent']} not sent)" if r["not_sent"] else "") if kind == "all" else "",
                )
            )
    lines.append(markdown_table(["mode", "requests", "n", "wall TTFT p50 / p95 (ms)", "latency p50 / p95 (ms)", "client p50 / p95 (ms)", "req/s", "hit rate", "errors"], rows))
    return "\n".join(lines)


def summary_of(results: dict[str, Any]) -> dict[str, Any]:
    return {
        "bench": results["name"],
        "model": results["machine"].get("model"),
        "wall_s": round(results["wall_s"], 1),
        "loadavg": results["machine"].get("loadavg_end"),
        **{
            f"prefix_{mode}": {
                "rps": round(r["requests_per_sec"], 3),
                "ttft_p50_ms": _round(r["by_kind"]["all"]["wall_ttft_ms_p50"]),
                "ttft_p95_ms": _round(r["by_kind"]["all"]["wall_ttft_ms_p95"]),
                "hit_rate": round(r["hit_rate"], 3),
                "errors": r["errors"],
            }
            for mode, r in results["modes"].items()
        },
    }


def _print_mode(mode: str, r: dict[str, Any]) -> None:
    a = r["by_kind"]["all"]
    print(
        f"  {r['completed']}/{r['planned']} ok in {r['elapsed_s']:.1f} s ({r['requests_per_sec']:.2f} req/s), errors {r['errors']}, "
        f"hit rate {100 * r['hit_rate']:.0f}%, wall TTFT p50 {fmt(a['wall_ttft_ms_p50'])} ms p95 {fmt(a['wall_ttft_ms_p95'])} ms",
        flush=True,
    )
    for sample in r["error_samples"]:
        print(f"  error: {sample}", flush=True)


# ---------------------------------------------------------------------- helpers


def _drain(todo: queue.SimpleQueue, deadline: float) -> Iterator[dict[str, Any]]:
    while time.monotonic() < deadline:
        try:
            yield todo.get_nowait()
        except queue.Empty:
            return


def _check_bounds(cfg: LoadConfig) -> None:
    if not 1 <= cfg.clients <= 64:
        raise SystemExit("--clients must be between 1 and 64")
    if not 1 <= cfg.requests <= 2000:
        raise SystemExit("--requests must be between 1 and 2000")
    if not 0 <= cfg.shared_fraction <= 1:
        raise SystemExit("--shared-fraction must be between 0 and 1")
    if not 1 <= cfg.max_new_tokens <= 512:
        raise SystemExit("--max-new-tokens must be between 1 and 512 (the app's cap)")
    if not 0 < cfg.max_seconds <= 3600:
        raise SystemExit("--max-seconds must be in (0, 3600]")


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running app on loopback, e.g. http://127.0.0.1:7860")
    target.add_argument("--launch", action="store_true", help="start python app.py on a free loopback port and stop it afterwards")
    parser.add_argument("--app-args", nargs=argparse.REMAINDER, default=[], help="with --launch: extra arguments for app.py (put last)")
    parser.add_argument("--clients", type=int, default=LoadConfig.clients, help="concurrent clients (default 4)")
    parser.add_argument("--requests", type=int, default=LoadConfig.requests, help="requests per mode (default 32)")
    parser.add_argument("--shared-fraction", type=float, default=LoadConfig.shared_fraction, help="share of requests on the shared system prompt (default 0.75)")
    parser.add_argument("--system-sections", type=int, default=LoadConfig.system_sections, help="handbook sections in the system prompt, ~40 tokens each (default 10)")
    parser.add_argument("--max-new-tokens", type=int, default=LoadConfig.max_new_tokens, help="new tokens per request (default 16)")
    parser.add_argument("--max-seconds", type=float, default=LoadConfig.max_seconds, help="time bound per mode (default 300)")
    parser.add_argument("--modes", default="on,off", help="prefix cache modes to run, in order (default on,off)")
    parser.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for the model to load and its decode step to compile (default 600)")
    parser.add_argument("--name", default="server_bench", help="results file name (default server_bench)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
