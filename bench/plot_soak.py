#!/usr/bin/env python3
"""bench/plot_soak.py SOAK.CSV > SOAK.SVG — RSS and open fds over time from the samples of
`switchyard-bench soak --samples`, one line per process, as a small SVG (standard library only).
"""
import csv
import sys

W, H, PAD_L, PAD_R, PAD_T, PAD_B = 720, 220, 70, 150, 28, 34
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


def read(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    names = sorted({k.rsplit("_", 2)[0] for k in rows[0] if k.endswith("_rss_kib")}) if rows else []
    return rows, names


def series(rows, column, scale=1.0):
    pts = []
    for r in rows:
        if r.get(column):
            pts.append((float(r["at_s"]) / 60.0, float(r[column]) * scale))
    return pts


def panel(y0, title, unit, lines):
    """One chart at vertical offset y0; lines: [(label, [(minute, value)])]."""
    xs = [p[0] for _, pts in lines for p in pts] or [0, 1]
    ys = [p[1] for _, pts in lines for p in pts] or [0, 1]
    x_max = max(xs) or 1
    y_max = max(ys) * 1.1 or 1
    pw, ph = W - PAD_L - PAD_R, H - PAD_T - PAD_B

    def px(x):
        return PAD_L + pw * x / x_max

    def py(y):
        return y0 + PAD_T + ph * (1 - y / y_max)

    out = [f'<text x="{PAD_L}" y="{y0 + 18}" font-weight="bold">{title}</text>']
    out.append(f'<rect x="{PAD_L}" y="{y0 + PAD_T}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
    for i in range(5):
        v = y_max * i / 4
        out.append(f'<text x="{PAD_L - 6}" y="{py(v) + 4:.1f}" text-anchor="end">{v:.0f}</text>')
        out.append(f'<line x1="{PAD_L}" x2="{PAD_L + pw}" y1="{py(v):.1f}" y2="{py(v):.1f}" stroke="#eee"/>')
    for i in range(7):
        m = x_max * i / 6
        out.append(f'<text x="{px(m):.1f}" y="{y0 + H - 16}" text-anchor="middle">{m:.0f}</text>')
    out.append(f'<text x="{PAD_L + pw / 2}" y="{y0 + H - 2}" text-anchor="middle">minutes</text>')
    out.append(
        f'<text x="14" y="{y0 + PAD_T + ph / 2}" transform="rotate(-90 14 {y0 + PAD_T + ph / 2})" '
        f'text-anchor="middle">{unit}</text>'
    )
    for i, (label, pts) in enumerate(lines):
        colour = COLOURS[i % len(COLOURS)]
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        ly = y0 + PAD_T + 14 + 16 * i
        out.append(f'<line x1="{W - PAD_R + 10}" x2="{W - PAD_R + 30}" y1="{ly - 4}" y2="{ly - 4}" stroke="{colour}" stroke-width="2"/>')
        out.append(f'<text x="{W - PAD_R + 36}" y="{ly}">{label}</text>')
    return out


def main():
    rows, names = read(sys.argv[1])
    label = {n: ("redis" if n.startswith("other") else n) for n in names}
    nodes = [n for n in names if not n.startswith("other")]
    others = [n for n in names if n.startswith("other")]
    node_rss = [(label[n], series(rows, f"{n}_rss_kib", 1 / 1024)) for n in nodes]
    other_rss = [(label[n], series(rows, f"{n}_rss_kib", 1 / 1024)) for n in others]
    fds = [(label[n], series(rows, f"{n}_fds")) for n in nodes]
    charts = [("Resident memory of the nodes", "MiB", node_rss), ("Open file descriptors of the nodes", "fds", fds)]
    if other_rss:
        charts.append(("Resident memory of Redis", "MiB", other_rss))
    body = []
    for i, (title, unit, lines) in enumerate(charts):
        body += panel(i * H, title, unit, lines)
    print(f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{len(charts) * H}" font-family="sans-serif" font-size="11">')
    print('<rect width="100%" height="100%" fill="white"/>')
    print("\n".join(body))
    print("</svg>")


if __name__ == "__main__":
    main()
