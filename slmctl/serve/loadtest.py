"""Load test of an OpenAI-compatible server: `python -m slmctl.serve.loadtest URL`.

For each concurrency level, that many clients stream completions back to back for `--duration`
seconds (each asks for `--max-tokens` tokens with `ignore_eos`, so every request costs the same);
reported per level: requests, failed requests, incomplete streams (no [DONE], or fewer tokens
than asked for), aggregate generated tokens/s, first-token latency p50/p95 and time per output
token p50, and the speed-up of aggregate tokens/s over one client. Requests still running when the
time is up are finished and counted; the rate divides by the wall time until the last one ends.

    python -m slmctl.serve.loadtest http://127.0.0.1:8000 --clients 1,8,32 --duration 30 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import httpx


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def one_request(http: httpx.Client, model: str, prompt: str, max_tokens: int) -> dict:
    """Stream one completion; what it took and whether it arrived whole."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first = None
    chunks = tokens = 0
    done = False
    try:
        with http.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                return {"ok": False, "status": response.status_code, "error": response.read().decode(errors="replace")[:200]}
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[len("data: "):]
                if payload == "[DONE]":
                    done = True
                    break
                event = json.loads(payload)
                if "error" in event:
                    return {"ok": False, "status": 200, "error": event["error"].get("message", "")[:200]}
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                elif event["choices"] and event["choices"][0].get("text"):
                    chunks += 1
                    if first is None:
                        first = time.perf_counter() - started
    except httpx.HTTPError as e:
        return {"ok": False, "status": None, "error": f"{type(e).__name__}: {e}"[:200]}
    seconds = time.perf_counter() - started
    complete = done and tokens == max_tokens  # (a stream of tokens that decode to no text has no first-token time)
    return {"ok": True, "complete": complete, "tokens": tokens, "first_token_s": first, "seconds": seconds,
            "per_token_s": (seconds - first) / max(tokens - 1, 1) if first is not None else None}


def run_level(url: str, model: str, clients: int, duration: float, max_tokens: int, prompt: str) -> dict:
    """`clients` threads, each sending requests back to back until `duration` has passed."""
    results: list[dict] = []
    lock = threading.Lock()
    started = time.perf_counter()

    def client(index: int) -> None:
        with httpx.Client(base_url=url, timeout=max(60.0, 10 * duration)) as http:
            n = 0
            while time.perf_counter() - started < duration:
                result = one_request(http, model, f"{prompt} ({index}.{n})", max_tokens)
                n += 1
                with lock:
                    results.append(result)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ok = [r for r in results if r["ok"]]
    firsts = [r["first_token_s"] for r in ok if r["first_token_s"] is not None]
    per_token = [r["per_token_s"] for r in ok if r["per_token_s"] is not None]
    tokens = sum(r["tokens"] for r in ok)
    return {"clients": clients, "requests": len(results), "failed": len(results) - len(ok),
            "incomplete": sum(not r["complete"] for r in ok), "generated_tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 2),
            "first_token_p50_ms": _ms(percentile(firsts, 50)), "first_token_p95_ms": _ms(percentile(firsts, 95)),
            "per_token_p50_ms": _ms(percentile(per_token, 50)),
            "errors": sorted({r["error"] for r in results if not r["ok"]})[:5]}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slmctl.serve.loadtest", description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="the server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--clients", default="1,8", help="comma-separated concurrency levels (default 1,8)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per level (default 30)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per request (default 64)")
    parser.add_argument("--prompt", default="Where does the teacher who owns a red car live?")
    parser.add_argument("--model", default=None, help="the model name (default: the server's only model)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    try:
        levels = [int(c) for c in args.clients.split(",")]
        if not levels or min(levels) < 1:
            raise ValueError
    except ValueError:
        parser.error(f"--clients takes comma-separated positive integers, got {args.clients!r}")
    url = args.url.rstrip("/").removesuffix("/v1")
    try:
        model = args.model or httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
        print(f"error: cannot list the models of {url}: {e}", file=sys.stderr)
        return 2
    rows = []
    for clients in levels:
        row = run_level(url, model, clients, args.duration, args.max_tokens, args.prompt)
        rows.append(row)
        print(f"{clients:>3} clients: {row['requests']} requests ({row['failed']} failed, {row['incomplete']} incomplete), "
              f"{row['tokens_per_s']:.1f} tok/s, first token p50 {row['first_token_p50_ms']} ms / p95 "
              f"{row['first_token_p95_ms']} ms, {row['per_token_p50_ms']} ms per token", flush=True)
    base = next((r["tokens_per_s"] for r in rows if r["clients"] == 1), None)
    for row in rows:
        row["speedup_vs_1_client"] = round(row["tokens_per_s"] / base, 2) if base else None
    if base:
        print("aggregate tokens/s vs one client: " + ", ".join(f"{r['clients']}: {r['speedup_vs_1_client']}x" for r in rows))
    report = {"url": url, "model": model, "duration_s": args.duration, "max_tokens": args.max_tokens, "levels": rows}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return 0 if all(r["failed"] == 0 and r["incomplete"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
