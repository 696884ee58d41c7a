"""The HTTP side of `bench_serving`: ``step3-jax serve`` as a subprocess (the demo model) and
streaming httpx clients. Kept apart so the engine mode never imports httpx."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time


def rss_mb(pid: int) -> float | None:
    """Resident set size of ``pid`` (Linux /proc), MiB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def server_metrics(url: str) -> dict:
    import httpx

    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        name, _, val = line.partition(" ")
        if name in (
            "step3_engine_compilations",
            "step3_xla_compilations",
            "step3_running_requests",
        ):
            out[name] = float(val)
    return out


def start_server(a) -> dict:
    import httpx

    cmd = [
        sys.executable, "-m", "step3_jax.cli", "serve", "--port", str(a.port),
        "--max-batch", str(a.max_batch), "--max-len", str(a.max_len),
        "--page-size", str(a.page_size), "--prefill-chunk", str(a.prefill_chunk),
        "--max-queue", "100000", "--log-level", "warning",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=sys.stderr, stderr=sys.stderr)
    url = f"http://127.0.0.1:{a.port}"
    t0 = time.time()
    while time.time() - t0 < 600:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(1)
    metrics = server_metrics(url)
    return {"proc": proc, "url": url, "start_s": round(time.time() - t0, 1),
            "rss_mb_start": rss_mb(proc.pid), "metrics_start": metrics}  # fmt: skip


def stop_server(server: dict) -> dict:
    proc = server.pop("proc")
    info = {k: v for k, v in server.items() if k != "url"}
    info["rss_mb_end"] = rss_mb(proc.pid)
    info["metrics_end"] = server_metrics(server["url"])
    proc.send_signal(signal.SIGTERM)  # graceful shutdown
    try:
        info["exit_code"] = proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        info["exit_code"] = "killed"
    return info


async def _one(client, url, prompt, n) -> dict:
    rec = {"ok": False, "complete": False, "n_out": 0, "ttft": None, "tpot": None}
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0.8, "top_p": 0.95,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    t0 = time.perf_counter()
    first = last = finish = usage = None
    done = False
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                rec["error"] = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return rec
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                obj, now = json.loads(line[6:]), time.perf_counter()
                if obj["choices"]:
                    first = first or now
                    last = now
                    finish = obj["choices"][0]["finish_reason"] or finish
                usage = obj.get("usage") or usage
    except Exception as e:  # noqa: BLE001 - counted as an error of this request
        rec["error"] = repr(e)
        return rec
    n_out = usage["completion_tokens"] if usage else 0
    rec.update(ok=True, n_out=n_out, complete=done and finish == "length" and n_out == n)
    rec["ttft"] = None if first is None else first - t0
    rec["tpot"] = (last - first) / (n_out - 1) if n_out > 1 else None
    return rec


async def _level(url, duration, gen, rng, rate, clients) -> tuple[list, float, float]:
    import httpx

    limits = httpx.Limits(max_connections=(clients or 256) + 16)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        t0 = time.perf_counter()
        stop = t0 + duration
        if rate:
            tasks, t = [], t0
            while (t := t + rng.exponential(1.0 / rate)) < stop:
                await asyncio.sleep(max(0.0, t - time.perf_counter()))
                tasks.append(asyncio.ensure_future(_one(client, url, *next(gen))))
            records = await asyncio.gather(*tasks)
        else:

            async def loop():
                out = []
                while time.perf_counter() < stop:
                    out.append(await _one(client, url, *next(gen)))
                return out

            records = [r for rs in await asyncio.gather(*(loop() for _ in range(clients)))
                       for r in rs]  # fmt: skip
        return records, t0, time.perf_counter()


def http_level(server, duration, gen, rng, rate=None, clients=None):
    """One load level against the server: ``(records, t0, t1, extra row fields)``."""
    records, t0, t1 = asyncio.run(_level(server["url"], duration, gen, rng, rate, clients))
    extra = {
        "error_examples": [r["error"] for r in records if "error" in r][:3],
        "server_rss_mb": rss_mb(server["proc"].pid),
        "server_metrics": server_metrics(server["url"]),
    }
    return records, t0, t1, extra


__all__ = ["http_level", "rss_mb", "start_server", "stop_server"]
