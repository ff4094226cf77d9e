#!/usr/bin/env python3
"""Turns the raw figures of one bench/run into the table, the results file and the chart.

    report.py WORK_DIR OUT_DIR STAMP

Reads WORK_DIR/results.jsonl (one JSON object per measurement, written by bench/run) and
WORK_DIR/machine.json; prints the markdown table; writes OUT_DIR/STAMP.md, OUT_DIR/latest.md and
OUT_DIR/latest.svg. Every figure is the median over the runs; every ratio is tollgate / reference,
both taken from the same run of the harness; in the scale-out section (server "cluster": three
instances on PostgreSQL + Redis), the reference is the single instance of the same run, and for the
paid write also pgbench. Standard library only.
"""

import json
import statistics
import sys
from html import escape
from pathlib import Path

# The HTTP scenarios, their references and their targets (from issue 6).
HTTP = [
    # key, title, reference, min ratio of req/s, max p99 in ms (None: no latency target)
    ("429", "1. 429 path", "nginx `limit_req`", 1.0, 5.0),
    ("read", "2. Authenticated read", "nginx static 200", 0.6, 5.0),
    ("401", "3. 401 path", "nginx `return 401`", 1.0, 5.0),
    ("write", "4. Paid write (durable)", "pgbench `-N` TPS", 1.0, None),
]
AMPLIFICATION_MAX = 1.2
RSS_MAX_MB = 100.0
# What each scenario must answer: a run that answered otherwise measured the wrong path.
EXPECT_REFUSED = {"429", "401"}
CLUSTER_TITLE = "PostgreSQL + Redis, three instances"
# The scale-out targets (issue 22): req/s of three instances over one instance of the same run,
# and for the paid write over pgbench `-N`.
CLUSTER_TARGETS = {"429": 0.5, "read": 0.5, "401": 0.8}
CLUSTER_WRITE_VS_PGBENCH = 1.0


def sensitivity_note(rows, machine):
    """The note on the floor's probe in scenario 3, or None when the run has no probe.

    The probe and the floor are compared round by round (each round runs every server once, in
    turn), and the median of those paired figures is taken: the machine's speed drifts by more
    between rounds than within one."""
    def by_run(server):
        return {r["run"]: r for r in rows
                if r["scenario"] == "401" and r.get("server") == server and "rps" in r}
    floor, probe = by_run("floor"), by_run("probe")
    rounds = sorted(set(floor) & set(probe))
    if not rounds:
        return None
    fall = med([1 - probe[n]["rps"] / floor[n]["rps"] for n in rounds])
    added = med([probe[n]["server_cpu_us_per_req"] - floor[n]["server_cpu_us_per_req"] for n in rounds
                 if "server_cpu_us_per_req" in probe[n] and "server_cpu_us_per_req" in floor[n]])
    spin_us = float(machine.get("sensitivity_ns", 1000)) / 1000
    note = (f"3. 401 path: sensitivity — the floor with {spin_us:g} µs more work per request (the probe) "
            f"answered {fall:.1%} fewer req/s than the floor (median over {len(rounds)} rounds, each pair "
            f"from the same round)")
    if added is not None:
        note += f", its server CPU per request {added:+.2f} µs"
    t_rps, _, _ = stats(rows, "401", "tollgate")
    r_rps, _, _ = stats(rows, "401", "reference")
    if fall >= 0.05 and t_rps and r_rps:
        per_us = fall / spin_us
        gap = 1 - t_rps / r_rps
        note += (f"; so 1 µs of server work per request costs ~{per_us:.0%} of req/s here, and tollgate's "
                 f"{-gap:+.1%} against nginx `return 401` stands for ~{gap / per_us:+.2f} µs of server work per "
                 f"request against nginx's (negative: less)")
    else:
        note += ("; that is within this machine's run-to-run noise, so in this run req/s hardly follows "
                 "server work and the 401 ratio cannot separate two servers of about the same cost")
    return note


def load(work):
    rows = [json.loads(line) for line in (work / "results.jsonl").read_text().splitlines() if line.strip()]
    machine = json.loads((work / "machine.json").read_text())
    return rows, machine


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value, digits=0):
    if value is None:
        return "—"
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def verdict(ok):
    if ok is None:
        return "—"
    return "met" if ok else "**MISSED**"


def run_problems(row):
    """What is wrong with one measurement, if anything (wrong status, socket errors)."""
    problems = []
    if row.get("tool") == "wrk":
        sock = sum(row.get(k, 0) for k in ("connect_errors", "read_errors", "write_errors", "timeouts"))
        if sock:
            problems.append(f"{sock} socket errors/timeouts")
        if row["scenario"] in EXPECT_REFUSED:
            # The 429 account regains one request a minute; allow those few admissions.
            if row["requests"] - row["non2xx"] > 2:
                problems.append(f"{row['requests'] - row['non2xx']} requests were not refused")
        elif row["non2xx"]:
            problems.append(f"{row['non2xx']} non-2xx answers")
    return problems


def summarize(rows, machine):
    """Medians per scenario and server, the table rows, and the data for the chart."""
    table, chart, notes = [], [], []
    for row in rows:
        for problem in run_problems(row):
            notes.append(f"scenario {row['scenario']}, {row['server']}, run {row['run']}: {problem}")

    for key, title, reference, min_ratio, p99_max in HTTP:
        tg = [r for r in rows if r["scenario"] == key and r["server"] == "tollgate"]
        ref = [r for r in rows if r["scenario"] == key and r["server"] == "reference"]
        if not tg and not ref:
            continue
        t_rps, r_rps = med([r["rps"] for r in tg]), med([r["rps"] for r in ref])
        t50, r50 = med([r["p50_us"] / 1000 for r in tg]), med([r["p50_us"] / 1000 for r in ref])
        t99, r99 = med([r["p99_us"] / 1000 for r in tg]), med([r["p99_us"] / 1000 for r in ref])
        rps_ratio = ratio(t_rps, r_rps)
        rps_ok = None if rps_ratio is None else rps_ratio >= min_ratio
        target = f"≥ {min_ratio:.1f}×"
        if key == "write":
            durable = [r for r in rows if r["scenario"] == "write-durable"]
            if durable:
                d = durable[-1]
                lost = d["accepted"] - d["tasks_in_db"]
                syncs = d["sync_calls_measured"]
                durable_ok = lost <= 0 and d["journal_mode"] == "wal"
                per_task = f"{syncs / d['accepted']:.2f} per accepted task" if d["accepted"] else "—"
                notes.append(
                    f"paid write: {d['accepted']:,} tasks answered 202 and {d['tasks_in_db']:,} tasks are in the "
                    f"database after shutdown (journal_mode={d['journal_mode']}); fsync/fdatasync calls counted "
                    f"during the runs: " + (f"{syncs:,} ({per_task})" if syncs else "not measured (no perf)")
                    + ("" if durable_ok else " — **accepted tasks are missing**"))
                notes.append(f"pgbench: {d['pg_clients']} clients, 1 thread, scale 1, PostgreSQL not pinned; {d['pg_settings']}")
                target += ", every 202 durable"
                rps_ok = durable_ok if rps_ok is None else rps_ok and durable_ok
        table.append([title, "req/s", fmt(t_rps), f"{reference}: {fmt(r_rps)}", fmt(rps_ratio, 2) + "×" if rps_ratio else "—", target, verdict(rps_ok)])
        table.append(["", "p50 ms", fmt(t50, 2), fmt(r50, 2), fmt(ratio(t50, r50), 2) + "×" if ratio(t50, r50) else "—", "", ""])
        p99_ok = None if p99_max is None or t99 is None else t99 <= p99_max
        table.append(["", "p99 ms", fmt(t99, 2), fmt(r99, 2), fmt(ratio(t99, r99), 2) + "×" if ratio(t99, r99) else "—",
                      f"≤ {p99_max:g} ms" if p99_max else "", verdict(p99_ok) if p99_max else ""])
        if key != "write":
            # The server CPU's time per request (lower is better): what each server spends, whichever
            # side of the loopback (server or wrk) set the pace. No target; the req/s target stands.
            t_cpu = med([r.get("server_cpu_us_per_req") for r in tg])
            r_cpu = med([r.get("server_cpu_us_per_req") for r in ref])
            if t_cpu is not None and r_cpu is not None:
                table.append(["", "server CPU µs/req", fmt(t_cpu, 2), fmt(r_cpu, 2), times(t_cpu, r_cpu), "", ""])
                t_busy, r_busy = med([r.get("load_cpu_busy") for r in tg]), med([r.get("load_cpu_busy") for r in ref])
                s_busy, rs_busy = med([r.get("server_cpu_busy") for r in tg]), med([r.get("server_cpu_busy") for r in ref])
                notes.append(f"{title}: CPUs busy (median) — with tollgate: server {s_busy:.0%}, load {t_busy:.0%}; "
                             f"with {reference}: server {rs_busy:.0%}, load {r_busy:.0%}")
                kept = [r for r in tg + ref if "server_cpu_steal" in r]
                if kept:
                    worst = max(max(r["server_cpu_steal"], r["load_cpu_steal"]) for r in kept)
                    repeated = sum(1 for r in kept if r.get("attempts", 1) > 1)
                    notes.append(f"{title}: CPU stolen by the hypervisor in the runs kept (tollgate and {reference}): "
                                 f"at most {worst:.1%}; {repeated} of {len(kept)} runs were repeated for steal")
        chart.append({"title": f"{title} — req/s (higher is better)", "tollgate": t_rps, "reference": r_rps,
                      "reference_name": reference.replace("`", ""), "unit": "req/s",
                      "label": f"{fmt(rps_ratio, 2)}× (target ≥ {min_ratio:.1f}×)" if rps_ratio else "",
                      "ok": rps_ok})

    # The floor (bare hyper answering tollgate's own bytes): how much of the gap to nginx is the
    # HTTP stack's rather than tollgate's.
    for key, title, reference, _, _ in HTTP:
        f_rps, _, f99 = stats(rows, key, "floor")
        t_rps, _, _ = stats(rows, key, "tollgate")
        r_rps, _, _ = stats(rows, key, "reference")
        if f_rps:
            f_cpu = med([r.get("server_cpu_us_per_req") for r in rows
                         if r["scenario"] == key and r.get("server") == "floor"])
            cpu = f", {fmt(f_cpu, 2)} µs of server CPU per request" if f_cpu is not None else ""
            notes.append(f"{title}: bare hyper answering the same bytes (the floor) {fmt(f_rps)} req/s = "
                         f"{times(f_rps, r_rps)} {reference}{cpu}; tollgate reaches {times(t_rps, f_rps)} of the floor")

    sensitivity = sensitivity_note(rows, machine)
    if sensitivity:
        notes.append(sensitivity)

    amp = [r for r in rows if r["scenario"] == "amp"]
    if amp:
        sdk, naive = med([r["sdk_budget"] for r in amp]), med([r["naive"] for r in amp])
        ok = sdk <= AMPLIFICATION_MAX
        table.append(["5. Client amplification (all 503)", "requests per call", fmt(sdk, 2) + " (SDK, budget)",
                      f"seed's naive loop: {fmt(naive, 2)}", fmt(ratio(sdk, naive), 2) + "×",
                      f"≤ {AMPLIFICATION_MAX}", verdict(ok)])
        no_budget = med([r.get("sdk_no_budget") for r in amp])
        if no_budget is not None:
            notes.append(f"amplification: SDK without a budget {no_budget:.2f} requests per call")
        chart.append({"title": "5. Client amplification — requests per call during an outage (lower is better)",
                      "tollgate": sdk, "reference": naive, "reference_name": "seed's naive loop",
                      "tollgate_name": "tollgate SDK, budget", "unit": "req/call", "digits": 2,
                      "label": f"{fmt(ratio(sdk, naive), 2)}× (target ≤ {AMPLIFICATION_MAX} req/call)", "ok": ok})

    for key, what in (("http-rss", "scenarios 1–3"), ("write-rss", "the paid write")):
        for r in rows:
            if r["scenario"] == key:
                notes.append(f"RSS of tollgate after {what}: {r['rss_kb'] / 1024:.1f} MB")

    mem = [r for r in rows if r["scenario"] == "mem"]
    if mem:
        m = mem[-1]
        rss = m["rss_kb"] / 1024
        ok = rss <= RSS_MAX_MB
        table.append([f"6. Memory: {m['accounts']:,} accounts, {m['tasks']:,} tasks", "RSS MB", fmt(rss, 1),
                      f"fresh server: {fmt(m['baseline_rss_kb'] / 1024, 1)}", "—", f"≤ {RSS_MAX_MB:g} MB", verdict(ok)])
        notes.append(
            f"memory: peak RSS (VmHWM) {m['hwm_kb'] / 1024:.1f} MB; accounts created in {m['accounts_secs']} s, "
            f"tasks in {m['tasks_secs']} s ({m['tasks'] / max(m['tasks_secs'], 1e-9):,.0f}/s); database {m['db_mb']:.1f} MB")
        chart.append({"title": f"6. RSS after {m['accounts']:,} accounts and {m['tasks']:,} tasks (lower is better)",
                      "tollgate": rss, "reference": RSS_MAX_MB, "reference_name": "target",
                      "unit": "MB", "digits": 1, "label": f"target ≤ {RSS_MAX_MB:g} MB", "ok": ok})
    cluster(rows, table, chart, notes)
    return table, chart, notes


def stats(rows, key, server):
    """Medians of req/s, p50 ms and p99 ms of one scenario and server (None where there are no runs)."""
    runs = [r for r in rows if r["scenario"] == key and r.get("server") == server and "rps" in r]
    return (med([r["rps"] for r in runs]), med([r["p50_us"] / 1000 for r in runs]),
            med([r["p99_us"] / 1000 for r in runs]))


def times(a, b):
    r = ratio(a, b)
    return fmt(r, 2) + "×" if r else "—"


def cluster(rows, table, chart, notes):
    """The scale-out section: three instances against the single instance of the same run (and, for
    the paid write, pgbench), judged on CLUSTER_TARGETS, the paid write also on its durability."""
    if not any(r.get("server") == "cluster" for r in rows):
        return
    table.append([f"**{CLUSTER_TITLE}**", "", "three instances", "reference: one instance (SQLite), this run",
                  "three / one", "", ""])
    chart.append({"heading": f"{CLUSTER_TITLE}, nginx in front, all on the same CPU as one instance"})
    for key, title, _reference, _min_ratio, _p99_max in HTTP:
        c_rps, c50, c99 = stats(rows, key, "cluster")
        if c_rps is None:
            continue
        t_rps, t50, t99 = stats(rows, key, "tollgate")
        target, ok = "", None
        if key in CLUSTER_TARGETS:
            r = ratio(c_rps, t_rps)
            target = f"≥ {CLUSTER_TARGETS[key]}×"
            ok = r is not None and r >= CLUSTER_TARGETS[key]
        if key == "write":
            durable = [r for r in rows if r["scenario"] == "cluster-write-durable"]
            if durable:
                d = durable[-1]
                ok = d["accepted"] <= d["tasks_in_db"]
                target = "every 202 durable"
                notes.append(
                    f"{CLUSTER_TITLE}, paid write: {d['accepted']:,} tasks answered 202 and {d['tasks_in_db']:,} "
                    f"tasks were added to PostgreSQL during the runs ({d['pg_settings']})"
                    + ("" if ok else " — **accepted tasks are missing**"))
        table.append([title, "req/s", fmt(c_rps), f"one instance: {fmt(t_rps)}", times(c_rps, t_rps), target,
                      verdict(ok) if target else ""])
        bars = [("three instances", c_rps, "#2b6cb0"), ("one instance", t_rps, "#a0aec0")]
        label = f"{times(c_rps, t_rps)} one instance"
        if key == "write":
            r_rps = stats(rows, key, "reference")[0]
            r = ratio(c_rps, r_rps)
            vs_pgbench = r is not None and r >= CLUSTER_WRITE_VS_PGBENCH
            table.append(["", "req/s", fmt(c_rps), f"pgbench `-N` TPS: {fmt(r_rps)}", times(c_rps, r_rps),
                          f"≥ {CLUSTER_WRITE_VS_PGBENCH}×", verdict(vs_pgbench)])
            bars.append(("pgbench -N TPS", r_rps, "#cbd5e0"))
            label += f", {times(c_rps, r_rps)} pgbench"
            if target:
                label += f"; {target}"
        table.append(["", "p50 ms", fmt(c50, 2), fmt(t50, 2), times(c50, t50), "", ""])
        table.append(["", "p99 ms", fmt(c99, 2), fmt(t99, 2), times(c99, t99), "", ""])
        runs = [r for r in rows if r["scenario"] == key and r.get("server") == "cluster" and "rps" in r]
        single = [r for r in rows if r["scenario"] == key and r.get("server") == "tollgate" and "rps" in r]
        c_cpu = med([r.get("server_cpu_us_per_req") for r in runs])
        t_cpu = med([r.get("server_cpu_us_per_req") for r in single])
        table.append(["", "server CPU µs/req (instances + nginx)", fmt(c_cpu, 1), fmt(t_cpu, 1),
                      times(c_cpu, t_cpu), "", ""])
        pg_cpu = med([r.get("pg_cpu_us_per_req") for r in runs])
        redis_cpu = med([r.get("redis_cpu_us_per_req") for r in runs])
        if pg_cpu is not None:
            total = (c_cpu or 0) + pg_cpu + (redis_cpu or 0)
            table.append(["", "PostgreSQL CPU µs/req", fmt(pg_cpu, 1), "", "", "", ""])
            table.append(["", "Redis CPU µs/req", fmt(redis_cpu, 1), "", "", "", ""])
            table.append(["", "all processes' CPU µs/req", fmt(total, 1), fmt(t_cpu, 1), times(total, t_cpu), "", ""])
            table.append(["", "PostgreSQL transactions/req", fmt(med([r.get("pg_xacts_per_req") for r in runs]), 3),
                          "", "", "", ""])
        chart.append({"title": f"{title} — req/s (higher is better)", "bars": bars, "unit": "req/s",
                      "label": label, "ok": ok})
    for r in rows:
        if r["scenario"] == "cluster-rss":
            phase = r["phase"].replace("1-3", "1–3")
            notes.append(f"{CLUSTER_TITLE}: RSS of the instances after {phase}: "
                         + ", ".join(f"{kb / 1024:.1f}" for kb in r["rss_kb"]) + " MB")
    order = []
    if any(r.get("server") == "cluster" and r["scenario"] != "write" for r in rows):
        order.append("scenarios 1–3 take turns with the single instance and nginx")
    if any(r.get("server") == "cluster" and r["scenario"] == "write" for r in rows):
        order.append("the paid write runs after the single instance and pgbench")
    notes.append(f"{CLUSTER_TITLE}: PostgreSQL and Redis are not pinned (they may use both CPUs); " + ", ".join(order))


def markdown_table(table):
    head = ["scenario", "metric", "tollgate", "reference", "ratio", "target", "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in table]
    return "\n".join(lines)


def per_run_table(rows):
    lines = ["| scenario | server | run | req/s | p50 ms | p99 ms | requests | non-2xx | server CPU µs/req | CPUs busy (server / load) | stolen by the hypervisor (server / load) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "rps" in r:
            cpu, busy, steal = "", "", ""
            if "server_cpu_us_per_req" in r:
                cpu = f"{r['server_cpu_us_per_req']:.2f}"
                busy = f"{r['server_cpu_busy']:.0%} / {r['load_cpu_busy']:.0%}"
            if "server_cpu_steal" in r:
                steal = f"{r['server_cpu_steal']:.1%} / {r['load_cpu_steal']:.1%}"
                if r.get("attempts", 1) > 1:
                    steal += f" (least of {r['attempts']} attempts)"
            lines.append(f"| {r['scenario']} | {r['server']} | {r['run']} | {r['rps']:,.0f} | {r['p50_us'] / 1000:.2f} | "
                         f"{r['p99_us'] / 1000:.2f} | {r.get('requests', 0):,} | {r.get('non2xx', '—')} | {cpu} | {busy} | {steal} |")
        elif r["scenario"] == "amp":
            lines.append(f"| amp | SDK budget / naive | {r['run']} | {r['sdk_budget']:.2f} / {r['naive']:.2f} req/call | | | | | | | |")
    return "\n".join(lines)


def svg_chart(chart, machine):
    width, left, bar_w, bar_h = 960, 180, 620, 18
    y = 56
    parts = []
    for group in chart:
        if "heading" in group:
            y += 6
            parts.append(f'<text x="16" y="{y}" class="section">{escape(group["heading"])}</text>')
            y += 26
            continue
        bars = group.get("bars") or [(group.get("tollgate_name", "tollgate"), group["tollgate"], "#2b6cb0"),
                                     (group["reference_name"], group["reference"], "#a0aec0")]
        scale = max(value or 0 for _, value, _ in bars) or 1
        digits = group.get("digits", 0)
        if group["ok"] is None:
            colour, label = "#4a5568", group["label"]
        else:
            colour = "#2f855a" if group["ok"] else "#c53030"
            label = f'{group["label"]} — {"met" if group["ok"] else "missed"}'
        parts.append(f'<text x="16" y="{y}" class="title">{escape(group["title"])}</text>')
        parts.append(f'<text x="{width - 16}" y="{y}" class="ratio" text-anchor="end" fill="{colour}">'
                     f'{escape(label)}</text>')
        y += 10
        for name, value, colour in bars:
            w = 0 if value is None else max(1, round(bar_w * value / scale))
            parts.append(f'<text x="{left - 8}" y="{y + 13}" class="name" text-anchor="end">{escape(name)}</text>')
            parts.append(f'<rect x="{left}" y="{y}" width="{w}" height="{bar_h}" fill="{colour}"/>')
            parts.append(f'<text x="{left + w + 6}" y="{y + 13}" class="value">{escape(fmt(value, digits))} {escape(group["unit"])}</text>')
            y += bar_h + 4
        y += 22
    height = y + 24
    subtitle = (f'{machine["cpu_model"]}, {machine["nproc"]} cores; server pinned to CPU {machine["server_cpu"]}, '
                f'load to CPU {machine["load_cpu"]}; median of {machine["runs"]} runs of {machine["duration"]}; {machine["stamp"]}')
    return f'''<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="Helvetica, Arial, sans-serif">
<style>
  .h {{ font-size: 18px; font-weight: bold; fill: #1a202c; }}
  .sub {{ font-size: 11px; fill: #4a5568; }}
  .title {{ font-size: 13px; font-weight: bold; fill: #2d3748; }}
  .section {{ font-size: 15px; font-weight: bold; fill: #1a202c; }}
  .name {{ font-size: 12px; fill: #2d3748; }}
  .value {{ font-size: 12px; fill: #1a202c; }}
  .ratio {{ font-size: 12px; font-weight: bold; }}
</style>
<rect width="100%" height="100%" fill="#ffffff"/>
<text x="16" y="24" class="h">tollgate beside its references</text>
<text x="16" y="40" class="sub">{escape(subtitle)}</text>
{chr(10).join(parts)}
</svg>
'''


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    work, out, stamp = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    rows, machine = load(work)
    machine["stamp"] = stamp
    table, chart, notes = summarize(rows, machine)
    md_table = markdown_table(table)
    print(md_table)
    if notes:
        print()
        for note in notes:
            print(f"- {note}")

    cluster_note = ""
    if any(r.get("server") == "cluster" for r in rows):
        cluster_note = (f";\nin the section “{CLUSTER_TITLE}” it is three instances / one instance "
                        "(and / pgbench for the paid write)")
    machine_lines = "\n".join(f"- **{k}**: {v}" for k, v in machine.items())
    doc = f"""# tollgate benchmark, {stamp}

Produced by `bench/run` (see `bench/README.md`). Each figure is the median of {machine['runs']} runs;
each ratio is tollgate / reference from the same run of the harness{cluster_note}.

{md_table}

{chr(10).join(f"- {n}" for n in notes)}

![tollgate beside its references](latest.svg)

## Machine and settings

{machine_lines}

## Every run

{per_run_table(rows)}
"""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stamp}.md").write_text(doc.replace("(latest.svg)", f"({stamp}.svg)"))
    (out / f"{stamp}.svg").write_text(svg_chart(chart, machine))
    (out / "latest.md").write_text(doc)
    (out / "latest.svg").write_text(svg_chart(chart, machine))


if __name__ == "__main__":
    main()
