"""Rewrite README.md's config key tables from the field metadata, so the README never drifts from the code.

Run after adding or changing a key in src/tunelab/config.py: `python scripts/readme_keys.py`.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tunelab.config import keys_markdown  # noqa: E402

START, END = "<!-- keys:start -->\n", "<!-- keys:end -->"


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(head + START + keys_markdown() + END + tail, encoding="utf-8")
    print(f"{readme}: config key tables rewritten")


if __name__ == "__main__":
    main()
