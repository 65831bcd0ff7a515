"""Writing a benchmark script's results: <prefix>.json and <prefix>.md."""

from __future__ import annotations

import json


def write_results(prefix: str | None, data: dict, markdown: str) -> None:
    """Write both files when a prefix is given; always print the markdown."""
    if prefix:
        with open(prefix + ".json", "w") as f:
            json.dump(data, f, indent=1)
        with open(prefix + ".md", "w") as f:
            f.write(markdown)
    print(markdown)


def write_markdown_beside(json_path: str, summarize) -> None:
    """``summarize(json_path)`` written to the .md beside the JSON, and printed
    (the benchmark files' command line: python bench/test_bench_X.py RESULT.json)."""
    import os

    md = summarize(json_path)
    with open(os.path.splitext(json_path)[0] + ".md", "w") as f:
        f.write(md)
    print(md)
