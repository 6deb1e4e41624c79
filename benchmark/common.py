"""What both benchmarks share: machine info, repeated timing with median/min/max, tables, results files.

Knows nothing about the engine's request flow or the HTTP API; ``prefix_bench`` and
``server_bench`` build their workloads on top of these helpers. Every figure a benchmark prints
comes from :func:`summarize` over measurements taken in the same run.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent

# A fictional handbook, cycled with section numbers to make system prompts and RAG documents of
# any length. Content only matters for realism: attention cost depends on token count alone.
HANDBOOK = [
    "Acme Robotics builds warehouse robots that move shelves, scan inventory and pack orders. "
    "Every robot reports its battery level, position and current task to the fleet manager once per second.",
    "Support engineers answer customer tickets within four business hours. A ticket is escalated to the "
    "on-call robotics engineer when a robot has stopped for more than ten minutes or has collided with an obstacle.",
    "The fleet manager assigns tasks by distance and battery level: a robot below twenty percent charge is sent "
    "to the nearest free charging dock and receives no new task until it reaches eighty percent.",
    "Firmware updates roll out in three waves. The first wave covers five percent of robots at one site, the "
    "second covers one full site, and the third covers every site once error rates have stayed flat for a week.",
    "Customers can rent robots monthly or buy them outright. Rented robots include maintenance, spare parts and "
    "firmware updates; purchased robots include two years of maintenance and can be extended yearly.",
    "Safety comes first: a robot stops within half a meter when its lidar sees a person, and it resumes only when "
    "the path has been clear for three seconds. Emergency stop buttons sit on all four sides of every robot.",
    "Passwords for the customer portal must be at least twelve characters long. Users reset them from the login "
    "page; the reset link expires after thirty minutes and can be used only once.",
    "Invoices are sent on the first business day of each month and are due within thirty days. Late payments "
    "incur a fee of one and a half percent per month, and accounts ninety days overdue are suspended.",
    "Each warehouse site has a site lead who approves layout changes. New shelving layouts are simulated overnight "
    "before robots are allowed to drive them, and a layout that lowers throughput by more than five percent is rejected.",
    "Data from the robots is kept for ninety days, then aggregated into daily statistics and deleted. Customers can "
    "export their raw data at any time from the portal as CSV or Parquet files.",
]

QUESTIONS = [
    "How quickly must support answer a ticket?",
    "When is a robot sent to a charging dock?",
    "How are firmware updates rolled out?",
    "What is included when renting a robot?",
    "What happens when the lidar sees a person?",
    "How long must a portal password be?",
    "When are invoices due, and what is the late fee?",
    "Who approves a new shelving layout?",
    "How long is robot data kept?",
    "Can customers export their raw data?",
    "What does a robot report to the fleet manager?",
    "When is a ticket escalated to on-call?",
    "How long does a password reset link last?",
    "What happens to accounts ninety days overdue?",
    "Where are the emergency stop buttons?",
    "How many waves does a firmware rollout have?",
    "Which file formats can data be exported in?",
    "How long is maintenance included for purchased robots?",
    "What is rejected after the overnight simulation?",
    "At what charge does a robot take new tasks again?",
]


def handbook_text(num_sections: int) -> str:
    """``num_sections`` numbered paragraphs of the handbook, cycling through it."""
    return "\n\n".join(f"Section {i + 1}. {HANDBOOK[i % len(HANDBOOK)]}" for i in range(num_sections))


def text_of_tokens(tokenizer, num_tokens: int) -> str:
    """Handbook text that tokenizes to ``num_tokens`` tokens (on its own, without a chat template)."""
    ids: list[int] = []
    sections = 8
    while len(ids) < num_tokens + 8:
        sections *= 2
        ids = tokenizer(handbook_text(sections), add_special_tokens=False).input_ids
    text = tokenizer.decode(ids[:num_tokens])
    return text


def question(i: int) -> str:
    """The i-th distinct question: the list first, then numbered variants, so any count is distinct."""
    if i < len(QUESTIONS):
        return QUESTIONS[i]
    return f"In section {i}, {QUESTIONS[i % len(QUESTIONS)][0].lower()}{QUESTIONS[i % len(QUESTIONS)][1:]}"


# ---------------------------------------------------------------------- measuring


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Median, min and max of repeated measurements (and the raw values, for the JSON)."""
    values = [float(v) for v in values]
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0, "values": []}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values), "values": values}


def sync(device) -> None:
    """Wait for queued GPU work, so a timer around it measures the work and not its launch."""
    if getattr(device, "type", str(device)).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device) -> tuple[float, Any]:
    """Run ``fn`` once; return (milliseconds, its result), CUDA-synchronised at both ends."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return (time.perf_counter() - t0) * 1000, out


def machine_info(device: Any = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the numbers were measured on: CPU, threads, versions, device, load average, commit."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),  # left as the app runs it; see benchmark/README.md
        "git_commit": _git_commit(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device is not None:
        info["device"] = str(device)
    info.update(extra or {})
    return info


def settled_decode_step(*engines: Any) -> str:
    """Wait until each engine's background compile has ended (compiled, or eager with the reason) and
    say which decode step runs: no measurement shares the CPU with the compiler (a cold compile takes
    about two minutes of one core), and none sees the step change from eager to compiled midway."""
    for engine in engines:
        engine.compiler.wait()
    return engines[0].compiler.describe()


def print_machine_info(info: dict[str, Any]) -> None:
    keys = ["cpu", "cpu_count", "torch_threads", "omp_wait_policy", "gpu", "device", "dtype", "model", "weights", "decode_step", "torch", "transformers", "python", "loadavg_start", "git_commit", "time_utc"]
    print("machine: " + " | ".join(f"{k}={info[k]}" for k in keys if k in info), flush=True)


# ---------------------------------------------------------------------- reporting


def fmt(value: Any, digits: int = 1) -> str:
    """A number for a table cell: '-' for missing, thousands separators, small values with more digits."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != 0 and abs(value) < 1:
            return f"{value:.3f}"
        return f"{value:,.{digits}f}"
    return str(value)


def fmt_stat(stat: dict[str, Any] | None, digits: int = 1) -> str:
    """``median (min-max)`` of a :func:`summarize` result."""
    if not stat or stat.get("median") is None:
        return "-"
    if stat["n"] == 1:
        return fmt(stat["median"], digits)
    return f"{fmt(stat['median'], digits)} ({fmt(stat['min'], digits)}–{fmt(stat['max'], digits)})"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in row) + " |")
    return "\n".join(lines)


def write_results(name: str, results: dict[str, Any], markdown: str, figure: Any = None, out_dir: Path = RESULTS_DIR) -> list[Path]:
    """Write ``<name>.json``, ``<name>.md`` and (with a plotly figure) ``<name>.html`` and maybe ``.png``.

    Files are written to a temporary name and renamed, so an interrupted run leaves the previous
    results intact. The PNG needs kaleido, which may not work offline; it is skipped if it fails.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def write(path: Path, text: str) -> None:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        written.append(path)

    write(out_dir / f"{name}.json", json.dumps(results, indent=1, default=_json_default) + "\n")
    write(out_dir / f"{name}.md", markdown + "\n")
    if figure is not None:
        write(out_dir / f"{name}.html", figure.to_html(include_plotlyjs="cdn", full_html=True))
        png = out_dir / f"{name}.png"
        if write_png(figure, png):
            written.append(png)
    return written


def write_png(figure: Any, path: Path, width: int = 1400, height: int = 1550) -> bool:
    """A PNG of a plotly figure: kaleido if installed, else a headless Chromium screenshot; optional.

    Offline, kaleido cannot download its browser, and the CDN copy of plotly.js is unreachable, so
    the Chromium path renders a temporary HTML file with plotly.js inlined.
    """
    try:
        import kaleido  # noqa: F401

        figure.write_image(str(path), width=width, height=height)
        return True
    except ImportError:
        pass
    except Exception as exc:  # kaleido present but unable to start its browser
        print(f"(kaleido failed: {type(exc).__name__}: {str(exc)[:120]})", file=sys.stderr)
    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if browser is None:
        print("(no PNG: neither kaleido nor Chromium is installed; the HTML chart has everything)", file=sys.stderr)
        return False
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "figure.html"
        page.write_text(figure.to_html(include_plotlyjs=True, full_html=True))
        shot = Path(tmp) / "figure.png"
        command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--screenshot={shot}", f"--window-size={width},{height}", page.as_uri()]
        try:
            subprocess.run(command, capture_output=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as exc:
            print(f"(no PNG: Chromium failed: {exc})", file=sys.stderr)
            return False
        if not shot.exists():
            print("(no PNG: Chromium wrote no screenshot)", file=sys.stderr)
            return False
        shutil.copyfile(shot, path)
    return True


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
