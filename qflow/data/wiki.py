"""Wikipedia XML dump -> plain text, exactly as docs/METHODS.md §13 "Calibration text, exactly".

    pages = wiki_pages(path_to_enwiki_bz2)   # 106 cleaned pages for gensim's bundled dump
    text = "\\n\\n".join(pages)

Every tool that calibrates on ``zoo:wiki-pages`` must see the same tokens, so
the rules below are part of the calibration set's identity: change one and
bump ``WIKI_CLEANER_VERSION`` (it goes into the text fingerprint).
"""

from __future__ import annotations

import bz2
import html
import re
import xml.etree.ElementTree as ET
from pathlib import Path

WIKI_CLEANER_VERSION = 1

# A <ref ...>...</ref> pair; "[^>/]" keeps a self-closing <ref name=x /> from
# swallowing the text up to the next </ref>.
_REF_PAIR = re.compile(r"<ref[^>/]*>.*?</ref>", re.IGNORECASE | re.DOTALL)
_TAG = re.compile(r"<[^>]{0,200}>")  # any other tag, at most 200 characters inside the brackets
_INNERMOST_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TEMPLATE_PASSES = 5
_DROP_PREFIXES = ("{{", "|", "[[Category", "<", "==", "}}", "{|", "!", "[[File:", "[[Image:", "#REDIRECT")
_PIPED_LINK = re.compile(r"\[\[([^\[\]|]*)\|([^\[\]]*)\]\]")  # [[a|b]] -> b
_PLAIN_LINK = re.compile(r"\[\[([^\[\]|]*)\]\]")  # [[a]] -> a
_EXTERNAL_LINK = re.compile(r"\[http[^\s\]]*\s([^\]]*)\]")  # [http://x text] -> text
_BLANKS = re.compile(r"[ \t]+")


def clean_wikitext(wikitext: str) -> str:
    """Plain text of one page's wiki markup ("" when nothing is left).

    >>> clean_wikitext("'''Foo''' is a [[bar|Bar]].{{cite}}<ref>x</ref>")
    'Foo is a Bar.'
    """
    text = _REF_PAIR.sub("", wikitext)
    text = _TAG.sub("", text)
    for _ in range(_TEMPLATE_PASSES):
        text, count = _INNERMOST_TEMPLATE.subn("", text)
        if not count:
            break
    lines = []
    for line in text.split("\n"):
        line = line.strip()
        if not line or line.startswith(_DROP_PREFIXES):
            continue
        line = _PIPED_LINK.sub(r"\2", line)
        line = _PLAIN_LINK.sub(r"\1", line)
        line = _EXTERNAL_LINK.sub(r"\1", line)
        line = line.replace("'''", "").replace("''", "")
        line = html.unescape(line).replace("\xa0", " ")
        line = _BLANKS.sub(" ", line)
        if line:
            lines.append(line)
    return "\n".join(lines)


def wiki_pages(path: Path) -> list[str]:
    """Cleaned article pages of a MediaWiki XML dump (.xml or .xml.bz2), in file order.

    Kept: namespace 0, no <redirect>, non-empty after cleaning.
    """
    path = Path(path)
    opener = bz2.open if path.suffix == ".bz2" else open
    pages = []
    with opener(path, "rb") as handle:
        for _, element in ET.iterparse(handle, events=("end",)):
            if _local(element.tag) != "page":
                continue
            children = {_local(child.tag): child for child in element}
            namespace = children.get("ns")
            if namespace is not None and (namespace.text or "").strip() == "0" and "redirect" not in children:
                text_element = next((e for e in element.iter() if _local(e.tag) == "text"), None)
                cleaned = clean_wikitext(text_element.text or "") if text_element is not None else ""
                if cleaned:
                    pages.append(cleaned)
            element.clear()
    return pages


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]
