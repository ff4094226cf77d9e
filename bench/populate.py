#!/usr/bin/env python3
"""Fills a tollgate server through its API for the memory scenario (stdlib only).

    populate.py BASE_URL ADMIN_TOKEN ACCOUNTS TASKS [CONCURRENCY]

Creates ACCOUNTS accounts with POST /admin/accounts, then TASKS tasks with
POST /v1/images/generations spread round-robin over those accounts (so every account has a key
looked up and a rate limiter in use), from CONCURRENCY threads on keep-alive connections.
Any answer other than 201/202 stops the run. Prints one JSON line with the counts and timings.
"""

import http.client
import json
import sys
import threading
import time
import urllib.parse


def worker(base, jobs, lock, state, make_request, expect, keep):
    url = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    while True:
        with lock:
            if state["error"] or state["next"] >= jobs:
                break
            i = state["next"]
            state["next"] += 1
        path, headers, body = make_request(i)
        status, data = None, b""
        for _ in range(2):
            try:
                conn.request("POST", path, body=body, headers=headers)
                resp = conn.getresponse()
                status, data = resp.status, resp.read()
                break
            except (http.client.HTTPException, OSError) as e:
                # One reconnect on a dropped keep-alive connection, then give up.
                status, data = None, repr(e).encode()
                conn.close()
                conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        if status != expect:
            with lock:
                state["error"] = f"{path}: HTTP {status}: {data[:300]!r}"
            break
        with lock:
            if keep:
                state["results"][i] = data
            state["done"] += 1
            if state["done"] % max(1, jobs // 10) == 0:
                print(f"  {state['done']}/{jobs}", file=sys.stderr, flush=True)
    conn.close()


def run(base, jobs, concurrency, make_request, expect, keep=False):
    lock = threading.Lock()
    state = {"next": 0, "done": 0, "error": None, "results": [None] * jobs if keep else None}
    threads = [
        threading.Thread(target=worker, args=(base, jobs, lock, state, make_request, expect, keep))
        for _ in range(min(concurrency, jobs))
    ]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if state["error"]:
        sys.exit(f"populate: {state['error']}")
    return state["results"], time.monotonic() - started


def main():
    if len(sys.argv) < 5:
        sys.exit(__doc__)
    base, admin, accounts, tasks = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    concurrency = int(sys.argv[5]) if len(sys.argv) > 5 else 16

    def account_request(i):
        body = json.dumps({
            "name": f"mem-{i}",
            "credits": 1000,
            "rate_limit": {"requests_per_minute": 600000, "burst": 1000},
        })
        return "/admin/accounts", {"Authorization": f"Bearer {admin}",
                                   "Content-Type": "application/json"}, body

    print(f"creating {accounts} accounts", file=sys.stderr, flush=True)
    created, accounts_secs = run(base, accounts, concurrency, account_request, 201, keep=True)
    keys = [json.loads(data)["api_key"] for data in created]

    body = json.dumps({"prompt": "a lighthouse at dusk, memory scenario", "size": "256x256"})

    def task_request(i):
        return "/v1/images/generations", {"Authorization": f"Bearer {keys[i % len(keys)]}",
                                          "Content-Type": "application/json"}, body

    print(f"creating {tasks} tasks", file=sys.stderr, flush=True)
    _, tasks_secs = run(base, tasks, concurrency, task_request, 202)
    print(json.dumps({"accounts": accounts, "tasks": tasks,
                      "accounts_secs": round(accounts_secs, 2), "tasks_secs": round(tasks_secs, 2)}))


if __name__ == "__main__":
    main()
