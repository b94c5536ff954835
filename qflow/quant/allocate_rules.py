"""The constraint grammar of ``allocate-bits`` (parsed at config time, resolved against the layers at run time).

One constraint per string::

    re:.*v_proj >= 4                 # layers whose name matches the regex (re.search): bits >= 4
    blocks[0,-1] >= 4                # layers of decoder blocks 0 and the last one
    all group_size <= 64             # every layer; the attribute is bits (default) or group_size
    re:mlp\\.down_proj bits == 8
    distinct_group_sizes <= 2        # at most two group sizes in the whole plan
    distinct_bits <= 3

Operators: ``>=``, ``<=``, ``==``. A layer rule removes the options that break
it from the layers it selects; a distinct rule caps how many values of the
attribute the plan may use.

Example::

    rule = parse_rule("blocks[0,-1] >= 4")
    rule.selects("model.layers.0.mlp.up_proj", n_blocks=2)   # True
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

_OPS = {">=": operator.ge, "<=": operator.le, "==": operator.eq}
_ATTRS = {"bits": "bits", "group_size": "group_size", "group_sizes": "group_size"}
_LAYER = re.compile(r"^\s*(?P<sel>re:\S+|blocks\[[^\]]*\]|all)\s+(?:(?P<attr>bits|group_size)\s*)?"
                    r"(?P<op>>=|<=|==)\s*(?P<value>-?\d+)\s*$")
_DISTINCT = re.compile(r"^\s*distinct_(?P<attr>bits|group_sizes)\s*<=\s*(?P<value>\d+)\s*$")
_BLOCK = re.compile(r"\.layers\.(\d+)\.")
GRAMMAR = ("'re:REGEX [bits|group_size] OP N', 'blocks[i,j,...] [bits|group_size] OP N', "
           "'all [bits|group_size] OP N' (OP one of >=, <=, ==; negative block indices count from the end) "
           "or 'distinct_bits <= N' / 'distinct_group_sizes <= N'")


@dataclass(frozen=True)
class LayerRule:
    text: str
    selector: str          # "re", "blocks" or "all"
    pattern: str | None
    blocks: tuple[int, ...]
    attr: str              # "bits" or "group_size"
    op: str
    value: int

    def selects(self, layer: str, n_blocks: int) -> bool:
        if self.selector == "all":
            return True
        if self.selector == "re":
            return re.search(self.pattern, layer) is not None
        m = _BLOCK.search(layer + ".")
        return m is not None and int(m.group(1)) in {b % n_blocks for b in self.blocks}

    def allows(self, option) -> bool:
        return _OPS[self.op](getattr(option, self.attr), self.value)

    def bad_blocks(self, n_blocks: int) -> list[int]:
        return [b for b in self.blocks if not -n_blocks <= b < n_blocks]


@dataclass(frozen=True)
class DistinctRule:
    text: str
    attr: str              # "bits" or "group_size"
    max_count: int


def parse_rule(text: str) -> LayerRule | DistinctRule:
    """A constraint string as a rule; ValueError naming the grammar when it does not parse."""
    m = _DISTINCT.match(text)
    if m:
        if int(m["value"]) < 1:
            raise ValueError(f"constraint {text!r}: the count must be at least 1")
        return DistinctRule(text, _ATTRS[m["attr"]], int(m["value"]))
    m = _LAYER.match(text)
    if not m:
        raise ValueError(f"constraint {text!r} does not parse; expected {GRAMMAR}")
    sel, pattern, blocks = m["sel"], None, ()
    if sel.startswith("re:"):
        pattern = sel[3:]
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"constraint {text!r}: regex {pattern!r} does not compile ({exc})") from None
        sel = "re"
    elif sel.startswith("blocks"):
        inner = sel[len("blocks["):-1]
        try:
            blocks = tuple(int(b) for b in inner.split(","))
        except ValueError:
            raise ValueError(f"constraint {text!r}: block indices must be integers separated by commas, "
                             f"e.g. blocks[0,-1]") from None
        sel = "blocks"
    return LayerRule(text, sel, pattern, blocks, m["attr"] or "bits", m["op"], int(m["value"]))
