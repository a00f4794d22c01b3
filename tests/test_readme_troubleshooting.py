"""The README's Troubleshooting table quotes messages the pack really gives (issue 13: "the README's
troubleshooting agrees with the messages").

Every "quoted" message in the table's first column must match a string the pack's code can produce: the
string literals of ``nodes/``, ``warping/`` and ``attention/``, read with ``ast`` (adjacent literals are one
string; an f-string's placeholders match anything), where "…" (or ``<input>``) in the README matches anything.
A node's "MaX4Zero <Node>: " prefix is added at run time by NodeInputError and may be left in the quote.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Quotes of messages that come from ComfyUI or torch, not from the pack.
FOREIGN = {
    "Exception when validating inner node",  # ComfyUI's words around a node's queue-time (validate_inputs) error
    "Exception when validating node",  # the same for an output node
    "Validation failed",  # frontend 1.49's title for it
    "expected input[…, 4, …] to have 3 channels",  # torch's convolution error in a core node
}
ANY = "\x00"


def _templates() -> list[str]:
    out = []
    for folder in ("nodes", "warping", "tensors", "registration", "attention"):
        for path in sorted((ROOT / folder).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.JoinedStr):
                    out.append("".join(v.value if isinstance(v, ast.Constant) else ANY for v in node.values))
                elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                    out.append(node.value)
    return out


def _quotes() -> list[str]:
    """The quoted messages of the README's short table and of docs/troubleshooting.md's full one."""
    out = []
    for path, head in ((ROOT / "README.md", "## Troubleshooting"), (ROOT / "docs" / "troubleshooting.md",
                                                                     "# Troubleshooting")):
        text = path.read_text(encoding="utf-8")
        table = text.split(head, 1)[1].split("\n## ", 1)[0]
        firsts = [line.split("|")[1] for line in table.splitlines() if line.startswith("|") and line.count("|") >= 3]
        out += [q for cell in firsts[2:] for q in re.findall(r'"([^"]+)"', cell)]
    return out


def _pattern(quote: str) -> re.Pattern:
    pieces = re.split(r"…|<input>", quote)
    return re.compile(".*".join(re.escape(p) for p in pieces), re.S)


def _found(quote: str, templates: list[str]) -> bool:
    candidates = [quote]
    m = re.match(r"MaX4Zero [^:]+: (.*)", quote, re.S)
    if m:
        candidates.append(m.group(1))
    for q in candidates:
        pat = _pattern(q)
        if any(pat.search(t.replace(ANY, "…")) or pat.search(t.replace(ANY, "")) for t in templates):
            return True
    return False


def test_every_quoted_message_in_troubleshooting_is_one_the_pack_gives():
    templates = _templates()
    quotes = [q for q in _quotes() if q not in FOREIGN]
    assert len(quotes) >= 15, quotes
    missing = [q for q in quotes if not _found(q, templates)]
    assert not missing, f"README Troubleshooting quotes messages the code does not give: {missing}"


def test_the_check_would_notice_a_stale_quote():
    templates = _templates()
    assert _found("protect_mask covers the whole target_mask: nothing is left to repaint", templates)
    assert not _found("protect_mask covers the whole target_mask: nothing to paint", templates)
    assert not _found("lower the threshold or use mode='all'", [t for t in templates if "mode='all'" not in t])
