"""Fill the tables of a Markdown report from the `mmdd table` commands printed under them:

    python experiments/render_tables.py experiments/methods_comparison.md           # rewrite every generated table
    python experiments/render_tables.py experiments/methods_comparison.md --check   # exit 1 where one is stale

A generated table sits between two markers, and the ```bash block right after the end marker is what made it:

    <!-- mmdd table output (experiments/render_tables.py) -->
    ...what the commands print...
    <!-- end of mmdd table output -->

    ```bash
    R=experiments/methods_comparison_runs/tuned
    mmdd table $R/dm $R/mdm --spread sets --versus "mdm (teacher.init=shared)" dm
    ```

The block may set variables (`NAME=value`, `NAME="a value"`; used as `$NAME`, `"$NAME"` or `${NAME}`) and run `mmdd table` commands (continued
lines with `\\`, `#` comments); nothing else, so a report's tables come from its records and from nothing a reader
cannot rerun. Each command runs in this process from the current directory (run it from the repository root, where the
paths of the commands are), and the table is what it prints, commands in order, separated by a blank line. The file
is rewritten atomically, only where a table changed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

BEGIN = "<!-- mmdd table output (experiments/render_tables.py) -->"
END = "<!-- end of mmdd table output -->"
ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$")  # as shlex leaves it: quotes removed
SHELL_OPERATORS = {"&&", "||", ";", "|", "&", ">", ">>", "<", "2>"}
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


class ReportError(Exception):
    """A report whose generated tables cannot be rendered: the message names the file, the line and what to do."""


@dataclass
class Region:
    """One generated table: the lines between its markers (begin, end: indices of the marker lines) and the
    commands of the bash block after it (each an argv for `mmdd table`)."""

    begin: int
    end: int
    commands: list[list[str]]


def commands_of(block: list[str], where: str) -> list[list[str]]:
    """The `mmdd table` argvs of a bash block's lines (variables expanded; continuations joined; comments dropped)."""
    joined, pending = [], ""
    for line in block:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    if pending:
        joined.append(pending)
    variables: dict[str, str] = {}
    commands = []
    for line in joined:
        words = shlex.split(line, comments=True)
        if not words:
            continue
        if any(w in SHELL_OPERATORS or "$(" in w or "`" in w for w in words):
            raise ReportError(f"{where}: `{line.strip()}` is shell syntax (pipes, redirections, several commands on a "
                              "line, substitutions); write one `mmdd table` command per line")
        if len(words) == 1 and (m := ASSIGNMENT.match(words[0])):
            variables[m.group(1)] = m.group(2)
            continue
        expanded = []
        for word in words:
            missing = [v for v in (a or b for a, b in VARIABLE.findall(word)) if v not in variables]
            if missing:
                raise ReportError(f"{where}: ${missing[0]} is not set in this block; set it there (NAME=value)")
            expanded.append(VARIABLE.sub(lambda m: variables[m.group(1) or m.group(2)], word))
        if expanded[:2] != ["mmdd", "table"]:
            raise ReportError(f"{where}: only `mmdd table` commands and NAME=value lines make a table, not "
                              f"`{' '.join(words[:3])}`; move other commands out of the block")
        commands.append(expanded[2:])
    if not commands:
        raise ReportError(f"{where}: the bash block after the table has no `mmdd table` command")
    return commands


def regions(lines: list[str], path: Path) -> list[Region]:
    found, i = [], 0
    while i < len(lines):
        if lines[i].strip() != BEGIN:
            i += 1
            continue
        begin = i
        end = next((j for j in range(begin + 1, len(lines)) if lines[j].strip() in (END, BEGIN)), None)
        if end is None or lines[end].strip() != END:
            raise ReportError(f"{path}:{begin + 1}: a table's begin marker has no `{END}` after it; add one")
        fence = end + 1
        while fence < len(lines) and not lines[fence].strip():
            fence += 1
        if fence >= len(lines) or lines[fence].strip() != "```bash":
            raise ReportError(f"{path}:{end + 1}: a generated table must be followed by the ```bash block of the "
                              "`mmdd table` commands that make it")
        close = next((j for j in range(fence + 1, len(lines)) if lines[j].strip() == "```"), None)
        if close is None:
            raise ReportError(f"{path}:{fence + 1}: the ```bash block is not closed")
        found.append(Region(begin, end, commands_of(lines[fence + 1:close], f"{path}:{fence + 1}")))
        i = close + 1
    return found


def run_table(argv: list[str], where: str) -> str:
    """What `mmdd table ARGV` prints (stdout); its errors, with the report's line, as a ReportError."""
    from mmdd.commands import table

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = table(argv)
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code
    if code:
        raise ReportError(f"{where}: `mmdd table {shlex.join(argv)}` failed ({code}): {err.getvalue().strip()}")
    return out.getvalue().rstrip("\n")


def render(path: Path) -> tuple[str, list[int]]:
    """The report with every generated table redone, and the (1-based) lines of the tables that changed."""
    lines = path.read_text().splitlines()
    changed, result, last = [], [], 0
    for region in regions(lines, path):
        where = f"{path}:{region.begin + 1}"
        text = "\n\n".join(run_table(argv, where) for argv in region.commands)
        old = lines[region.begin + 1:region.end]
        new = text.splitlines()
        if old != new:
            changed.append(region.begin + 1)
        result += lines[last:region.begin + 1] + new
        last = region.end
    result += lines[last:]
    return "\n".join(result) + "\n", changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", type=Path, help="the Markdown file (e.g. experiments/methods_comparison.md)")
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table differs from what its "
                    "commands print now")
    args = ap.parse_args(argv)
    try:
        text, changed = render(args.report)
    except (ReportError, OSError) as exc:
        print(f"render_tables: error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        for line in changed:
            print(f"render_tables: {args.report}:{line}: stale; rerun without --check", file=sys.stderr)
        return 1 if changed else 0
    if changed:
        from mmdd.utils.io import atomic_write_text

        atomic_write_text(args.report, text)
    print(f"render_tables: {len(changed)} table(s) rewritten in {args.report}" if changed else
          f"render_tables: every table of {args.report} is current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
