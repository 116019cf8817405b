"""Soak test of `slmctl serve`: many clients, for a long time, behaving as clients do.

`python -m slmctl.serve.soak URL --pid PID` (or `--self-serve`, which makes a tiny random model,
serves it in a child process on a free port and stops it with SIGTERM at the end) runs `--clients`
threads for `--duration` seconds. Each picks its next request at random (seeded): a streamed
completion, a plain one, a stream it abandons after the first chunk, a stream it reads slowly, a
bad request (a field of the wrong type, an unknown field, malformed JSON) and an oversized body.
Reported: requests by kind, statuses by kind, unexpected answers (any 5xx; a bad request not
answered 4xx; an oversized one neither 413 nor closed unread (status null: the server refused it
before the client had sent it all); a good one not answered 200 or 429), p50 / p99 latency of the
good ones, the
server's resident memory at start, after warm-up (a tenth of the duration) and at the end, and
`/health` once the clients stopped (active 0, waiting 0: no slot lost).

    make soak    # 32 clients, 5 minutes, against --self-serve
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from slmctl.serve.loadtest import percentile

KINDS = ("stream", "plain", "abandon", "slow", "bad", "oversized")
WEIGHTS = (30, 30, 10, 10, 15, 5)
BAD_BODIES = (b'{"model": "m", "prompt": "hi", "max_tokens": "5"}', b'{"model": "m", "prompt": "hi", "temprature": 1}',
              b'{"model": "m", "prompt": ', b'{"model": "m", "prompt": ""}', b'{"model": "m", "prompt": "\\ud800"}')


def resident_mb(pid: int) -> float | None:
    """The process's resident set size (Linux /proc), or None where it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def one(http: httpx.Client, kind: str, model: str, prompt: str, max_tokens: int, rng: random.Random) -> dict:
    """One request of `kind`: {kind, status, seconds, expected}."""
    started = time.perf_counter()
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    status = None
    try:
        if kind in ("stream", "abandon", "slow"):
            with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
                status = response.status_code
                for n, _ in enumerate(response.iter_lines()):
                    if kind == "abandon" and n >= 1:
                        break  # the client goes away mid-stream
                    if kind == "slow":
                        time.sleep(rng.uniform(0.0, 0.05))
        elif kind == "plain":
            status = http.post("/v1/completions", json=body).status_code
        elif kind == "bad":
            status = http.post("/v1/completions", content=rng.choice(BAD_BODIES).replace(b'"m"', json.dumps(model).encode()),
                               headers={"Content-Type": "application/json"}).status_code
        else:  # oversized: past any text model's body limit
            status = http.post("/v1/completions", content=b'{"model": "m", "prompt": "' + b"x" * (3 << 20) + b'"}',
                               headers={"Content-Type": "application/json"}).status_code
    except httpx.HTTPError:
        status = None  # the connection broke (an abandoned stream is not this: it is closed by the client)
    seconds = time.perf_counter() - started
    if kind == "oversized":  # 413, or the connection closed on it while the client was still sending the rest
        expected = status is None or status == 413
    elif kind == "bad":
        expected = status is not None and 400 <= status < 500
    else:
        expected = status in (200, 429)
    return {"kind": kind, "status": status, "seconds": seconds, "expected": expected}


def soak(url: str, pid: int | None, clients: int, duration: float, max_tokens: int, seed: int = 0) -> dict:
    url = url.rstrip("/").removesuffix("/v1")
    model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
    results: list[dict] = []
    lock = threading.Lock()
    memory = {"start": resident_mb(pid) if pid else None}
    started = time.perf_counter()

    def client(index: int) -> None:
        rng = random.Random(f"{seed}:{index}")
        with httpx.Client(base_url=url, timeout=120) as http:
            n = 0
            while time.perf_counter() - started < duration:
                kind = rng.choices(KINDS, WEIGHTS)[0]
                result = one(http, kind, model, f"Where does person {index}.{n} live?", max_tokens, rng)
                n += 1
                with lock:
                    results.append(result)

    def warm_up() -> None:
        time.sleep(duration / 10)
        memory["warm"] = resident_mb(pid) if pid else None

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    threads.append(threading.Thread(target=warm_up, daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    memory["end"] = resident_mb(pid) if pid else None
    health = {}
    for _ in range(50):  # the server finishes what abandoned streams left, then reports
        health = httpx.get(f"{url}/health", timeout=10).json()
        if health.get("active") == 0 and health.get("waiting") == 0:
            break
        time.sleep(0.1)
    good = [r["seconds"] for r in results if r["kind"] in ("stream", "plain") and r["status"] == 200]
    by_kind: dict[str, dict] = {}
    for r in results:
        counts = by_kind.setdefault(r["kind"], {})
        counts[str(r["status"])] = counts.get(str(r["status"]), 0) + 1
    growth = None
    if memory.get("warm") and memory.get("end"):
        growth = round(memory["end"] / memory["warm"] - 1, 4)
    return {"url": url, "clients": clients, "duration_s": duration, "wall_s": round(wall, 1), "requests": len(results),
            "statuses_by_kind": by_kind, "unexpected": sum(not r["expected"] for r in results),
            "server_errors": sum(1 for r in results if r["status"] is not None and r["status"] >= 500),
            "latency_p50_s": _round(percentile(good, 50)), "latency_p99_s": _round(percentile(good, 99)),
            "rss_mb": {k: _round(v) for k, v in memory.items()}, "rss_growth_after_warm_up": growth, "health": health}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def passed(report: dict, max_growth: float = 0.10) -> bool:
    """No unexpected answer, no 5xx, no slot lost, and memory growth after warm-up under `max_growth`."""
    growth = report["rss_growth_after_warm_up"]
    return (report["unexpected"] == 0 and report["server_errors"] == 0 and report["health"].get("status") == "ok"
            and report["health"].get("active") == 0 and report["health"].get("waiting") == 0
            and (growth is None or growth < max_growth))


def self_served(directory: Path, port_file_timeout: float = 120) -> tuple[subprocess.Popen, str]:
    """A tiny random model served by `slmctl serve` in a child process: (process, url)."""
    from slmctl.data.synthetic import SyntheticWorld
    from slmctl.data.tokenizer import train_bpe
    from slmctl.model import build_model
    from slmctl.model.config import vocab_size_for
    from slmctl.model.store import save_model

    tokenizer = train_bpe(SyntheticWorld(seed=0, n_people=200).texts("train", 300), vocab_size=400)
    model = build_model("tiny", seed=0, vocab_size=vocab_size_for(len(tokenizer)), **tokenizer.special_ids).eval()
    save_model(model, directory / "model", tokenizer)
    runs = directory / "runs"
    process = subprocess.Popen([sys.executable, "-m", "slmctl", "serve", str(directory / "model"), "--port", "0",
                                "max_batch=16", "max_queue=256", "max_tokens_cap=64", "--runs-dir", str(runs)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + port_file_timeout
    while time.time() < deadline:
        found = list(runs.glob("serve/*/server.json"))
        if found:
            return process, json.loads(found[0].read_text())["url"]
        if process.poll() is not None:
            raise RuntimeError(f"slmctl serve exited: {process.stderr.read()[-2000:]}")
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("slmctl serve did not start")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slmctl.serve.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("url", nargs="?", help="the server, e.g. http://127.0.0.1:8000 (or --self-serve)")
    parser.add_argument("--pid", type=int, default=None, help="the server's process id (its memory is reported)")
    parser.add_argument("--self-serve", action="store_true", help="serve a tiny random model in a child process")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=300.0, help="seconds (default 300)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--json", default=None, help="also write the report here")
    args = parser.parse_args(argv)
    if bool(args.url) == args.self_serve:
        parser.error("give the server's URL or --self-serve")
    process = None
    with tempfile.TemporaryDirectory(prefix="slmctl-soak-") as work:
        if args.self_serve:
            process, url = self_served(Path(work))
            pid = process.pid
        else:
            url, pid = args.url, args.pid
        try:
            report = soak(url, pid, args.clients, args.duration, args.max_tokens)
        finally:
            if process is not None:
                process.send_signal(signal.SIGTERM)
                report_exit = process.wait(timeout=120)
        if process is not None:
            report["server_exit"] = report_exit
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    ok = passed(report) and report.get("server_exit", 0) == 0
    print(f"soak {'passed' if ok else 'FAILED'}: {report['requests']} requests, {report['unexpected']} unexpected, "
          f"{report['server_errors']} 5xx, p50 {report['latency_p50_s']} s / p99 {report['latency_p99_s']} s, RSS "
          f"{report['rss_mb']} MB (growth after warm-up {report['rss_growth_after_warm_up']}), health {report['health']}",
          file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
