"""Render a fedsd Grafana dashboard to PNG from a real Prometheus, without Grafana.

    python bench/render_dashboard.py --prometheus http://127.0.0.1:9090 \\
        --start 1795340000 --end 1795340300 --out docs/training-health.png

Each panel of the dashboard JSON (default docker/grafana/dashboards/training-health.json)
becomes a subplot at its Grafana grid position; each target's PromQL is run through
``/api/v1/query_range`` (Grafana variables expanded as
fedsd.observability.dashboards.expand does) and drawn with its legend format. Stat panels
show their last value. Needs matplotlib
(``pip install -e ".[plots]"``).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedsd.observability.dashboards import expand  # noqa: E402

DEFAULT_DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "training-health.json"


def query_range(url: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    """The ``matrix`` result of one range query."""
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{url}/api/v1/query_range?{params}", timeout=60) as resp:
        body = json.loads(resp.read())
    if body.get("status") != "success":
        raise RuntimeError(f"{expr}: {body}")
    return body["data"]["result"]


def legend(fmt: str, labels: dict[str, str]) -> str:
    """Grafana's ``{{label}}`` legend format."""
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt)
    return text.strip() or json.dumps(labels)


def fetch(dashboard: dict, url: str, start: float, end: float, step: float, run: str) -> list:
    """``[(panel, [(legend, [(t, value), ...]), ...]), ...]`` for every panel."""
    out = []
    for panel in dashboard["panels"]:
        series = []
        for target in panel["targets"]:
            expr = expand(target["expr"], run=run)
            for s in query_range(url, expr, start, end, step):
                points = [(float(t), float(v)) for t, v in s["values"]]
                series.append((legend(target.get("legendFormat", ""), s["metric"]), points))
        out.append((panel, series))
    return out


def _human(value: float, unit: str) -> str:
    if unit == "bytes":
        for suffix in ("B", "KB", "MB", "GB", "TB"):
            if abs(value) < 1000:
                return f"{value:.3g} {suffix}"
            value /= 1000
        return f"{value:.3g} PB"
    if unit == "s":
        return f"{value:.3g} s"
    return f"{value:.4g}"


def render(panels: list, title: str, out: Path, start: float, dpi: int = 80) -> None:
    """Draw the panels on Grafana's 24-column grid and write a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p, _ in panels)
    width, height = 18.0, rows * 0.45 + 0.6  # inches; 0.6 for the title
    fig = plt.figure(figsize=(width, height))
    # Grafana's grid in figure coordinates, with room for titles, ticks and labels
    pad_left, pad_right = 0.7 / width, 0.2 / width
    pad_top, pad_bottom = 0.4 / height, 0.55 / height
    unit_h = (1 - 0.6 / height) / rows
    for panel, series in panels:
        pos = panel["gridPos"]
        left = pos["x"] / 24 + pad_left
        top = 1 - 0.6 / height - pos["y"] * unit_h
        rect = (
            left,
            top - pos["h"] * unit_h + pad_bottom,
            pos["w"] / 24 - pad_left - pad_right,
            pos["h"] * unit_h - pad_top - pad_bottom,
        )
        ax = fig.add_axes(rect)
        ax.set_title(panel["title"], fontsize=10, loc="left")
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
        if panel["type"] == "stat":
            ax.axis("off")
            lines = []
            for name, points in series:
                last = [v for _, v in points if not math.isnan(v)]
                if last:
                    lines.append(f"{_human(last[-1], unit)}  {name}")
            ax.text(0.02, 0.5, "\n".join(lines[:4]) or "no data", fontsize=12, va="center")
            continue
        stepped = (
            panel.get("fieldConfig", {})
            .get("defaults", {})
            .get("custom", {})
            .get("lineInterpolation")
            == "stepAfter"
        )
        for name, points in series:
            xs = [(t - start) / 60 for t, _ in points]
            ys = [v for _, v in points]
            if stepped:
                ax.step(xs, ys, where="post", label=name, linewidth=1.4)
            else:
                ax.plot(xs, ys, label=name, linewidth=1.4)
        if not series:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("minutes", fontsize=8)
        ax.tick_params(labelsize=8)
        if unit == "bytes":
            ax.yaxis.set_major_formatter(lambda v, _: _human(v, "bytes"))
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=13, x=0.01, y=1 - 0.15 / height, ha="left")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prometheus", required=True, help="e.g. http://127.0.0.1:9090")
    parser.add_argument("--dashboard", default=str(DEFAULT_DASHBOARD))
    parser.add_argument("--start", type=float, default=None, help="unix seconds")
    parser.add_argument("--end", type=float, default=None, help="unix seconds (default now)")
    parser.add_argument("--last", type=float, default=900, help="seconds, without --start")
    parser.add_argument("--step", type=float, default=2.0, help="seconds between points")
    parser.add_argument("--run", default=".*", help="the dashboard's $run (a regex)")
    parser.add_argument("--dpi", type=int, default=80)
    parser.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args(argv)
    end = args.end if args.end is not None else time.time()
    start = args.start if args.start is not None else end - args.last
    dashboard = json.loads(Path(args.dashboard).read_text())
    panels = fetch(dashboard, args.prometheus.rstrip("/"), start, end, args.step, args.run)
    empty = [p["title"] for p, series in panels if not series]
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(start))
    render(panels, f"{dashboard['title']}  (from {stamp})", Path(args.out), start, args.dpi)
    print(json.dumps({"out": args.out, "panels": len(panels), "without_data": empty}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
