"""How often lookahead changes an answer: every question of the four single-call sets planned by the shipped model
with `model.lookahead` 4 (the default) and 0, the calls compared. A multi-token pass of the dynamic INT8 file can
round differently from single steps, and the draft length adapts to this machine's measured pass costs and to how
often drafts were kept, so where two tokens nearly tie the same question can be answered either way in another
process (every answer still goes through the guard and the dry-run).

    python3 tests/bench/lookahead_agreement.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from edge_agent import ops  # noqa: E402
from edge_agent.config import ModelConfig  # noqa: E402
from edge_agent.glm.engine import Engine  # noqa: E402

SETS = ["handwritten.jsonl", "handwritten_b.jsonl", "handwritten_c.jsonl", "heldout.jsonl"]


def main() -> int:
    rows = [json.loads(line) for s in SETS for line in (ROOT / "models" / "eval" / s).read_text().splitlines()
            if line.strip()]
    answers = {}
    for lookahead in (4, 0):
        engine = Engine(ModelConfig(providers=["cpu"], lookahead=lookahead), ops.TOOLSET)
        engine.load()
        try:
            answers[lookahead] = [json.dumps(engine.plan(r["text"]).call, sort_keys=True) for r in rows]
        finally:
            engine.close()
    differ = [(r["text"], a, b) for r, a, b in zip(rows, answers[4], answers[0]) if a != b]
    print(f"{len(rows)} questions; {len(differ)} answers differ between lookahead 4 and 0")
    for text, a, b in differ:
        print(f"  {text!r}: {a} | {b}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
