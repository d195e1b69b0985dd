#!/usr/bin/env python3
"""Render the headline Bulkhead-vs-peer tables of docs/benchmarks.md as SVG charts.

Run by `make bench` after the tables are written (scripts/bench.sh). Standard library only.

For every `## ` section it takes the first table that compares Bulkhead with a peer:
  - a table with ratio columns (a header starting with "ratio", or of the form "A / B"),
    one bar per row and per ratio column whose denominator is a peer (a denominator naming
    one of Bulkhead's own variants, e.g. "XTS / plain", is left out);
  - or a table with one Bulkhead row and one peer row (e.g. the controller against bare TLS):
    one bar per numeric column, Bulkhead's cell divided by the peer's (same unit only).
Every plotted number comes from the table; a cell that is not a number ("n/a") is shown as
"not measured" without a bar. A table that cannot be parsed is skipped with a message on
stderr. Writes docs/charts/<section>.svg and one `![<section> chart](charts/<name>.svg)` line
right under each section heading (idempotent: re-running changes nothing).

  python3 scripts/bench_charts.py            # write charts and links
  python3 scripts/bench_charts.py --check    # parse only; exit 1 if no chart could be made
"""
import os
import re
import sys
from xml.sax.saxutils import escape

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "benchmarks.md")
CHART_DIR = os.path.join(ROOT, "docs", "charts")

NUM = r"[0-9][0-9,]*(?:\.[0-9]+)?"
LINK_RE = re.compile(r"^!\[[^\]]*\]\(charts/[^)]+\.svg\)\s*$")
HIGHER = re.compile(r"iops|mb/s|gbit/s|mbit/s|req/s|kpps|throughput|appends/s", re.I)
LOWER = re.compile(
    r"\b(ms|µs|us|s|MiB|GiB|KiB)\b|latency|\bp50\b|\bp99\b|pause|memory|\(ms\)", re.I
)


def warn(msg):
    print(f"bench_charts: {msg}", file=sys.stderr)


def slug(heading):
    base = heading.split(":")[0]
    base = re.sub(r"\(.*?\)", "", base)
    s = re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-")
    return s or "section"


def split_row(line):
    cells = line.strip().strip("|").split("|")
    return [c.strip() for c in cells]


def number(cell):
    """The number a cell starts with (percent → fraction), or None. Never guesses."""
    c = cell.replace("**", "").replace("`", "").strip()
    m = re.match(rf"^({NUM})\s*(%|×|x\b)?", c)
    if not m:
        return None
    try:
        v = float(m.group(1).replace(",", ""))
    except ValueError:
        return None
    if m.group(2) == "%":
        v /= 100.0
    return v


def number_unit(cell):
    c = cell.replace("**", "").strip()
    m = re.match(rf"^({NUM})\s*([A-Za-zµ/%]+)?", c)
    if not m:
        return None, None
    try:
        return float(m.group(1).replace(",", "")), (m.group(2) or "")
    except ValueError:
        return None, None


def sections(text):
    """(heading, start line index, lines of the section body)."""
    lines = text.split("\n")
    out = []
    cur = None
    for i, line in enumerate(lines):
        if line.startswith("## "):
            if cur:
                out.append(cur)
            cur = [line[3:].strip(), i, []]
        elif cur is not None:
            cur[2].append(line)
    if cur:
        out.append(cur)
    return out


def tables(body):
    """Each table as (header cells, rows of cells); malformed ones raise ValueError."""
    out = []
    i = 0
    while i < len(body):
        if body[i].lstrip().startswith("|"):
            block = []
            while i < len(body) and body[i].lstrip().startswith("|"):
                block.append(body[i])
                i += 1
            out.append(block)
        else:
            i += 1
    return out


def parse_table(block):
    if len(block) < 3:
        raise ValueError("fewer than 3 lines")
    header = split_row(block[0])
    sep = split_row(block[1])
    if len(sep) != len(header) or not all(re.fullmatch(r":?-+:?", c) for c in sep):
        raise ValueError("no separator row under the header")
    rows = []
    for line in block[2:]:
        cells = split_row(line)
        if len(cells) != len(header):
            raise ValueError(f"row with {len(cells)} cells under a {len(header)}-column header")
        rows.append(cells)
    return header, rows


def is_ratio_header(h):
    low = h.lower()
    return low.startswith("ratio") or " / " in h


def target_from(text):
    """A ratio target written as '≤ 0.5×' / '≥ 1.0' (in a target cell or a header)."""
    m = re.search(rf"([≤≥<>]=?)\s*({NUM})\s*×", text)
    if not m:
        m = re.search(rf"\(\s*([≤≥])\s*({NUM})\s*\)", text)
    if not m:
        return None
    return m.group(1), float(m.group(2).replace(",", "")), m.group(2)


def target_for_column(text, header):
    """A per-peer target in a target cell ('≤ 0.5× QEMU, ≤ 1.0× Firecracker'): the one naming the
    peer of a 'Bulkhead / <peer>' ratio column, or None."""
    if " / " not in header:
        return None
    peer = re.sub(r"\(.*?\)", "", header.split(" / ", 1)[1]).strip().split()
    if not peer:
        return None
    for m in re.finditer(rf"([≤≥<>]=?)\s*({NUM})\s*×\s*([A-Za-z][\w-]*)", text):
        if m.group(3).lower() == peer[0].lower():
            return m.group(1), float(m.group(2).replace(",", "")), m.group(2)
    return None


def direction(*texts):
    joined = " ".join(texts)
    if HIGHER.search(joined):
        return "higher"
    if LOWER.search(joined):
        return "lower"
    return None


def ratio_bars(header, rows):
    ratio_cols = [j for j, h in enumerate(header) if j > 0 and is_ratio_header(h)]
    if not ratio_cols:
        return None
    target_col = next((j for j, h in enumerate(header) if h.lower().startswith("target")), None)
    # Leading descriptive columns (workload, QD): those before the first value column.
    key_cols = [0]
    for j in range(1, len(header)):
        if len(header[j]) <= 3 and all(re.fullmatch(r"\d+", r[j]) for r in rows):
            key_cols.append(j)
        else:
            break
    value_cols = [j for j in range(len(header)) if j not in key_cols and j not in ratio_cols
                  and j != target_col]
    bars = []
    plotted = []
    for j in ratio_cols:
        h = header[j]
        hname = re.sub(r"\(.*?\)", "", h).strip()
        series = [(hname, None)]
        if " / " in h and not h.lower().startswith("ratio"):
            denom = re.sub(r"\(.*?\)", "", h.split(" / ", 1)[1]).strip().lower()
            if denom != "this":
                match = [header[k] for k in value_cols if header[k].lower().endswith(denom)]
                if match and re.search(r"bulkhead|card", match[0], re.I):
                    warn(f"  column '{h}' compares Bulkhead with itself: not plotted")
                    continue
        elif h.lower().startswith("ratio") and " / " in h:
            parts = [p.strip() for p in re.sub(r"^ratio\s*", "", h, flags=re.I).split(" / ")]
            if len(parts) == 2 and not re.search(r"bulkhead|qemu|peer", h, re.I):
                series = [(parts[0], 0), (parts[1], 1)]
        hdr_target = target_from(h)
        plotted.append(h)
        for r in rows:
            metric = " · ".join(r[k] for k in key_cols if r[k])
            metric = metric.replace("**", "").replace("`", "")
            if h.lower().endswith("/ this (throughput)") or denom_is_row(h):
                if re.search(r"bulkhead", r[0], re.I):
                    continue
            for name, part in series:
                cell = r[j]
                if part is not None:
                    pieces = cell.split(" / ")
                    if len(pieces) != 2:
                        warn(f"  cell '{cell}' is not 'a / b': skipped")
                        continue
                    cell = pieces[part]
                v = number(cell)
                label = metric if len(series) == 1 and len(ratio_cols) == 1 else f"{metric} — {name}"
                tgt = hdr_target
                tgt_text = None
                if target_col is not None:
                    tgt = target_for_column(r[target_col], h) or target_from(r[target_col]) or tgt
                    if tgt is None and r[target_col]:
                        tgt_text = r[target_col]
                vals = " ".join(r[k] for k in value_cols)
                d = direction(h if part is None else name, vals, metric)
                bars.append(dict(label=label, value=v, raw=cell.replace("**", ""), target=tgt,
                                 target_text=tgt_text, direction=d))
    if bars:
        shown = "; ".join(f"'{n}'" for n in plotted)
        bars.insert(0, dict(note=f"ratio column(s) plotted: {shown}"))
    return bars


def denom_is_row(h):
    return bool(re.search(r"/\s*this\b", h))


def row_bars(header, rows):
    """One Bulkhead row and one peer row: Bulkhead / peer per numeric column."""
    if len(rows) != 2:
        return None
    bh = [r for r in rows if re.search(r"bulkhead", r[0], re.I)]
    if len(bh) != 1:
        return None
    b = bh[0]
    p = rows[1] if rows[0] is b else rows[0]
    bars = []
    for j in range(1, len(header)):
        bv, bu = number_unit(b[j])
        pv, pu = number_unit(p[j])
        if bv is None or pv is None or bu != pu:
            continue
        if pv == 0:
            warn(f"  column '{header[j]}': peer value is 0, no ratio")
            continue
        ratio = bv / pv
        bars.append(dict(label=header[j], value=ratio,
                         raw=f"{ratio:.2f} ({b[j]} / {p[j]})", target=None, target_text=None,
                         direction=direction(header[j], b[j])))
    if bars:
        bars.insert(0, dict(note=f"ratio = {b[0]} / {p[0]}, computed from the table's two rows"))
    return bars or None


def section_meta(body, doc_date, heading_cmd=None):
    # The headline table's own text: the section up to its first `###` subsection.
    head = []
    for line in body:
        if line.startswith("### "):
            break
        head.append(line)
    text = "\n".join(head)
    m = re.search(r"(\d{4}-\d{2}-\d{2}(?:T\d{2}:\d{2}Z| \d{2}:\d{2} UTC)?)", text)
    date = m.group(1) if m else (f"{doc_date} (document header)" if doc_date else "not stated")
    cmd = None
    for line in head:
        if line.startswith("Command:"):
            cmd = line[len("Command:"):].split(";")[0].replace("`", "").strip()
            break
    spans = re.findall(r"`([^`]+)`", text)
    for pattern in (r"scripts/|cargo bench", r"make bench"):
        if cmd:
            break
        cmd = next((sp for sp in spans if re.search(pattern, sp)), None)
    if not cmd and heading_cmd:
        cmd = heading_cmd
    if cmd:
        cmd = cmd.split(". ")[0]
        if len(cmd) > 100 and " (" in cmd:
            cmd = cmd.split(" (")[0]
    return date, cmd


def chart_for(heading, body, doc_date):
    for block in tables(body):
        try:
            header, rows = parse_table(block)
        except ValueError as e:
            warn(f"{heading}: table skipped ({e})")
            continue
        if not rows:
            continue
        try:
            bars = ratio_bars(header, rows)
            if bars is None:
                bars = row_bars(header, rows)
        except (ValueError, IndexError) as e:
            warn(f"{heading}: table skipped ({e})")
            continue
        if not bars:
            continue
        plotted = [b for b in bars if "note" not in b and b["value"] is not None]
        if not plotted:
            warn(f"{heading}: comparison table has no numeric ratio: skipped")
            continue
        hm = re.search(r"\((scripts/[^)\s]+)\)", heading)
        date, cmd = section_meta(body, doc_date, hm.group(1) if hm else None)
        return svg(heading, bars, date, cmd)
    return None


def fmt(v):
    return f"{v:.2f}×"


def svg(title, bars, date, cmd):
    note = next((b["note"] for b in bars if "note" in b), None)
    bars = [b for b in bars if "note" not in b]
    W, label_w, bar_w, row_h = 860, 330, 330, 34
    top = 78 + (16 if note else 0)
    H = top + row_h * len(bars) + 58
    vmax = max([1.0] + [b["value"] for b in bars if b["value"] is not None]
               + [b["target"][1] for b in bars if b["target"]])
    scale = bar_w / (vmax * 1.08)
    x0 = label_w + 10
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
        f'viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">',
        f'<rect width="{W}" height="{H}" fill="#ffffff"/>',
        f'<text x="10" y="22" font-size="15" font-weight="bold">{escape(title)}</text>',
        f'<text x="10" y="42" fill="#444">Bulkhead / peer, from docs/benchmarks.md; '
        f'measured {escape(date)}</text>',
    ]
    if cmd:
        out.append(f'<text x="10" y="58" fill="#444">command: {escape(cmd[:110])}</text>')
    if note:
        out.append(f'<text x="10" y="74" fill="#444">{escape(note)}</text>')
    for i, b in enumerate(bars):
        y = top + i * row_h
        d = b["direction"]
        dnote = {"lower": "lower is better", "higher": "higher is better"}.get(
            d, "direction not stated")
        label = b["label"] if len(b["label"]) <= 48 else b["label"][:47] + "…"
        out.append(f'<text x="10" y="{y + 13}">{escape(label)}</text>')
        out.append(f'<text x="10" y="{y + 26}" font-size="10" fill="#666">{dnote}</text>')
        v = b["value"]
        if v is None:
            out.append(f'<text x="{x0 + 4}" y="{y + 18}" fill="#888">not measured '
                       f'({escape(b["raw"][:40])})</text>')
            continue
        if d is None or v == 1.0:
            color = "#8c8c8c"
        else:
            better = v < 1.0 if d == "lower" else v > 1.0
            color = "#2e8b57" if better else "#d2691e"
        w = max(1.0, v * scale)
        out.append(f'<rect x="{x0}" y="{y + 4}" width="{w:.1f}" height="20" fill="{color}"/>')
        shown = b["raw"].strip()
        mnum = re.match(NUM, shown)
        if mnum and not shown[mnum.end():].lstrip().startswith("×"):
            shown = shown[: mnum.end()] + "×" + shown[mnum.end():]
        out.append(f'<text x="{x0 + w + 6:.1f}" y="{y + 18}">{escape(shown[:40])}</text>')
        if b["target"]:
            op, t, ttext = b["target"]
            tx = x0 + t * scale
            out.append(f'<line x1="{tx:.1f}" y1="{y + 1}" x2="{tx:.1f}" y2="{y + 27}" '
                       f'stroke="#1f4e9e" stroke-width="2" stroke-dasharray="3,2"/>')
            out.append(f'<text x="{tx + 3:.1f}" y="{y + 33}" font-size="9" fill="#1f4e9e">'
                       f'target {escape(op)} {escape(ttext)}×</text>')
        elif b.get("target_text"):
            out.append(f'<text x="{W - 10}" y="{y + 30}" font-size="9" fill="#1f4e9e" '
                       f'text-anchor="end">target {escape(b["target_text"][:40])}</text>')
    one = x0 + scale
    out.append(f'<line x1="{one:.1f}" y1="{top - 4}" x2="{one:.1f}" '
               f'y2="{top + row_h * len(bars)}" stroke="#000" stroke-width="1.5"/>')
    out.append(f'<text x="{one:.1f}" y="{top + row_h * len(bars) + 14}" text-anchor="middle">'
               f'1.0× (parity)</text>')
    ly = H - 14
    out.append(f'<rect x="10" y="{ly - 10}" width="12" height="12" fill="#2e8b57"/>'
               f'<text x="27" y="{ly}">Bulkhead better than the peer</text>')
    out.append(f'<rect x="230" y="{ly - 10}" width="12" height="12" fill="#d2691e"/>'
               f'<text x="247" y="{ly}">Bulkhead worse</text>')
    out.append(f'<line x1="370" y1="{ly - 4}" x2="390" y2="{ly - 4}" stroke="#1f4e9e" '
               f'stroke-width="2" stroke-dasharray="3,2"/><text x="395" y="{ly}">target '
               f'stated in the table</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def relink(text, charts):
    """Put `![... chart](charts/x.svg)` right under each charted heading; drop stale ones."""
    lines = text.split("\n")
    out = []
    i = 0
    while i < len(lines):
        line = lines[i]
        out.append(line)
        i += 1
        if not line.startswith("## "):
            continue
        heading = line[3:].strip()
        # Skip an existing chart link (with its blank line) directly under the heading.
        j = i
        while j < len(lines) and lines[j] == "":
            j += 1
        if j < len(lines) and LINK_RE.match(lines[j]):
            i = j + 1
        if heading in charts:
            out.append("")
            out.append(f"![{heading} chart](charts/{charts[heading]}.svg)")
    return "\n".join(out)


def main():
    check = "--check" in sys.argv[1:]
    try:
        with open(DOC, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        warn(f"cannot read docs/benchmarks.md: {e}")
        return 1
    m = re.search(r"Written by `make bench` on (\S+?)\.", text)
    doc_date = m.group(1) if m else None
    charts = {}
    rendered = {}
    for heading, _, body in sections(text):
        try:
            s = chart_for(heading, body, doc_date)
        except Exception as e:  # never crash on one section
            warn(f"{heading}: skipped ({type(e).__name__}: {e})")
            s = None
        if s is None:
            if any(ln.lstrip().startswith("|") for ln in body):
                warn(f"{heading}: no Bulkhead-vs-peer table: no chart")
            continue
        name = slug(heading)
        while name in rendered:
            name += "-2"
        charts[heading] = name
        rendered[name] = s
    if not charts:
        warn("no chart could be made")
        return 1
    if check:
        print(f"bench_charts: {len(charts)} charts parse: {', '.join(sorted(rendered))}")
        return 0
    os.makedirs(CHART_DIR, exist_ok=True)
    for name, s in rendered.items():
        path = os.path.join(CHART_DIR, name + ".svg")
        old = None
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                old = f.read()
        if old != s:
            with open(path, "w", encoding="utf-8") as f:
                f.write(s)
    for old_name in os.listdir(CHART_DIR):  # charts of sections that no longer chart
        if old_name.endswith(".svg") and old_name[:-4] not in rendered:
            os.remove(os.path.join(CHART_DIR, old_name))
    new = relink(text, charts)
    if new != text:
        with open(DOC, "w", encoding="utf-8") as f:
            f.write(new)
    print(f"bench_charts: wrote {len(charts)} charts in docs/charts/: "
          f"{', '.join(sorted(rendered))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
