"""The datatrove steps curation adds to datatrove's own: records in and out, an offline language filter and
n-gram decontamination against the spec's benchmarks. Every step sees a record as one datatrove Document whose
text is what the model trains on and whose metadata carries the record itself, so the curated corpus is the
validated one, less what a filter removed."""
from __future__ import annotations

import json
import re
from pathlib import Path

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.utils.text import TextNormConfig, ngrams, simplify_text
from datatrove.utils.word_tokenizers import WordTokenizer

from ruyi_core.data.schema import canonical

_WORD = re.compile(r"\w+", re.UNICODE)
_SENTENCE = re.compile(r"[^.!?\n]+[.!?\n]*")


def record_text(rec: dict, kind: str) -> str:
    """The text a record trains on: pretrain text, every chat turn, or an RL prompt with its answer."""
    if kind == "pretrain":
        return rec["text"]
    if kind == "sft":
        return "\n".join(m["content"] for m in rec["messages"])
    return f"{rec['prompt']}\n{rec['answer']}"


class Words(WordTokenizer):
    """Words as runs of letters and digits. datatrove's English tokenizer is spaCy's, a large dependency for what
    MinHash shingles, Gopher's word counts and decontamination n-grams need; one tokenizer for every step also
    keeps the decontamination index and the filter in agreement."""

    def word_tokenize(self, text: str) -> list[str]:
        return _WORD.findall(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return [s for s in _SENTENCE.findall(text) if s.strip()]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in _SENTENCE.finditer(text) if m.group().strip()]


class RecordReader(PipelineStep):
    """Rank r reads shard r: a validated corpus's files, streamed as its records."""

    name = "records"
    type = "📖 - READER"

    def __init__(self, shards: list[list[str]], kind: str):
        super().__init__()
        self.shards, self.kind = shards, kind

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        from ruyi_core.data.reader import BadRecords, iter_records

        for rec, file, line in iter_records(self.shards[rank], self.kind, BadRecords()):
            self.stat_update("documents")
            yield Document(text=record_text(rec, self.kind), id=f"{Path(file).name}:{line}",
                           metadata={"record": canonical(rec)})


class ShardWriter(PipelineStep):
    """Writes rank r's documents to `folder`/r.jsonl, also when none is left: the next step's rank r must read
    rank r's documents in the same order (datatrove's dedup filters remove by position), which its own writer and
    reader, skipping empty files, do not promise. `records`: write the records themselves (the curated corpus)."""

    name = "shard writer"
    type = "💽 - WRITER"

    def __init__(self, folder: Path, records: bool = False):
        super().__init__()
        self.folder, self.records = folder, records

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f"{rank:05d}.jsonl", "w", encoding="utf-8") as f:
            for doc in data:
                line = doc.metadata["record"] if self.records else json.dumps(
                    {"text": doc.text, "id": doc.id, "metadata": doc.metadata}, ensure_ascii=False)
                f.write(line + "\n")
                yield doc


class ShardReader(PipelineStep):
    """Reads what ShardWriter wrote for this rank."""

    name = "shard reader"
    type = "📖 - READER"

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = folder

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        with open(self.folder / f"{rank:05d}.jsonl", encoding="utf-8") as f:
            for line in f:
                d = json.loads(line)
                yield Document(text=d["text"], id=d["id"], metadata=d["metadata"])


class LanguageID(BaseFilter):
    """Drops a record that language ID (py3langid, whose model ships inside the package: nothing is downloaded)
    confidently places outside `languages`. A text the identifier is unsure of is kept: on a few words its
    guess is noise ("What is 12 plus 7?" scores 0.37 English)."""

    name = "language"

    def __init__(self, languages: list[str], min_score: float, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.languages, self.min_score = set(languages), min_score
        self._identifier = None

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if self._identifier is None:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier

            self._identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        lang, score = self._identifier.classify(doc.text)
        doc.metadata["language"], doc.metadata["language_score"] = lang, round(float(score), 3)
        if lang not in self.languages and score >= self.min_score:
            return False, f"language {lang}"
        return True


class DecontaminationIndex:
    """The n-grams of every reference item (benchmark or held-out record), by length. An item of at least `n`
    words contributes its n-grams; a shorter one (a short question with its answer) contributes itself whole, when
    it has at least `min_words`: its exact words in a training text are a leak however short it is."""

    def __init__(self, n: int, min_words: int = 4):
        self.n, self.min_words = n, min_words
        # numbers kept: two arithmetic items that differ only in their numbers are different items
        self.norm, self.tokenizer = TextNormConfig(norm_numbers=False), Words()
        # n-grams as text: the index lives in one process, so Python's own string hashing serves
        self.by_length: dict[int, dict[str, str]] = {}

    def words(self, text: str) -> list[str]:
        return self.tokenizer.word_tokenize(simplify_text(text, self.norm))

    def add(self, reference: str, text: str) -> None:
        words = self.words(text)
        if len(words) < self.min_words:
            return
        length = min(self.n, len(words))
        table = self.by_length.setdefault(length, {})
        for gram in ngrams(words, length):
            table.setdefault(" ".join(gram), reference)

    def match(self, text: str) -> tuple[str, str] | None:
        """The first reference whose n-gram the text contains, with that n-gram's text."""
        words = self.words(text)
        for length, table in self.by_length.items():
            for gram in ngrams(words, length):
                ref = table.get(" ".join(gram))
                if ref is not None:
                    return ref, " ".join(gram)
        return None


class Decontaminate(BaseFilter):
    """Drops a training record that contains an n-gram of a benchmark or held-out item."""

    name = "decontamination"

    def __init__(self, index: DecontaminationIndex, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.index = index

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        hit = self.index.match(doc.text)
        if hit is None:
            return True
        doc.metadata["contaminated_by"], doc.metadata["ngram"] = hit
        return False, f"overlaps {hit[0]}"
