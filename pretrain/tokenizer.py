"""Sentencepiece tokenizers: training (`pretrain tokenizer train`) and loading.

A tokenizer is a folder holding `tokenizer.model`, `tokenizer.vocab` (id, piece with control
characters JSON-escaped, score per line) and `card.json` (vocab size, special ids, sha256 of the model). The trainer settings are
the ones that keep ids identical when the model is exported to Hugging Face (byte fallback, no
normalisation, whitespace kept as is, no dummy prefix)."""

import io
import json
import re
import shutil
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import sentencepiece as spm

from pretrain.data.documents import DocumentStats, describe, iter_documents, resolve_inputs
from pretrain.data.shards import file_sha256
from pretrain.errors import UserError
from pretrain.outputs import fresh

MODEL_FILE, VOCAB_FILE, CARD_FILE = "tokenizer.model", "tokenizer.vocab", "card.json"
TOKENIZER_FILES = (MODEL_FILE, VOCAB_FILE, CARD_FILE)
SPECIAL_IDS = {"unk": 0, "bos": 1, "eos": 2, "pad": 3}
SPECIAL_PIECES = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}
# sentencepiece drops training sentences above this many bytes: documents are cut at line breaks.
_CHUNK_BYTES = 8192


class TokenizerError(UserError, ValueError):
    """A tokenizer folder is missing, incomplete or does not match its card."""


def _chunks(documents: Iterator[str], max_chars: int) -> Iterator[str]:
    """Documents cut into pieces of at most _CHUNK_BYTES at line breaks, up to max_chars in all."""
    seen = 0
    for text in documents:
        piece = ""
        for line in text.splitlines(keepends=True):
            if piece and len((piece + line).encode()) > _CHUNK_BYTES:
                yield piece
                piece = ""
            piece += line[: _CHUNK_BYTES // 4] if len(line.encode()) > _CHUNK_BYTES else line
        if piece:
            yield piece
        seen += len(text)
        if max_chars and seen >= max_chars:
            return


def train_tokenizer(inputs: list[str | Path], vocab_size: int, out: Path, model_type: str = "bpe",
                    text_field: str = "text", max_chars: int = 0, user_symbols: tuple[str, ...] = (),
                    threads: int = 2) -> dict:
    """Train a sentencepiece model on the documents of `inputs` into the new folder `out`; returns
    the card."""
    paths = resolve_inputs(inputs)
    if model_type not in ("bpe", "unigram"):
        raise TokenizerError(f"--model-type {model_type} is not supported: choose bpe or unigram")
    _check_specials(user_symbols)
    out = Path(out)
    if (out / CARD_FILE).exists():
        raise TokenizerError(f"{out} already holds a tokenizer ({CARD_FILE}): choose another --out or delete it first")
    with fresh(out, "tokenizer train") as output:
        output.claim(*TOKENIZER_FILES)
        stats = DocumentStats()
        model = io.BytesIO()
        try:
            _train_sentencepiece(paths, stats, model, vocab_size, model_type, text_field, max_chars, user_symbols,
                                 threads)
        except RuntimeError as error:
            raise _explain(error, vocab_size, paths) from None
        (out / MODEL_FILE).write_bytes(model.getvalue())
        processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
        return _describe(out, {
            "model_type": model_type,
            "special_ids": {**SPECIAL_IDS, **{s: processor.piece_to_id(s) for s in user_symbols}},
            "special_pieces": {**SPECIAL_PIECES, **{s: s for s in user_symbols}},
            "inputs": [str(p) for p in paths],
            "documents": stats.documents,
            "characters": stats.characters,
            "empty_documents_skipped": stats.empty_skipped,
            "invalid_utf8_replaced": stats.invalid_utf8_replaced,
        })


def copy_tokenizer(source: Path, target: Path) -> None:
    """The files of tokenizer folder `source` into `target` (a copy beside shards or checkpoints)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(source / name, target / name)


def _check_specials(user_symbols: tuple[str, ...]) -> None:
    """What sentencepiece would refuse with an internal error, said in terms of --special."""
    reserved = set(SPECIAL_PIECES.values())
    for symbol in user_symbols:
        if not symbol or symbol.isspace():
            raise TokenizerError(f"--special {symbol!r}: a special token needs at least one visible character")
        if symbol in reserved:
            raise TokenizerError(f"--special {symbol} is one of the built-in specials ({' '.join(sorted(reserved))}); "
                                 "leave it out")
        if user_symbols.count(symbol) > 1:
            raise TokenizerError(f"--special {symbol} is given twice: give each special token once")


def _explain(error: RuntimeError, vocab_size: int, paths: list[Path]) -> TokenizerError:
    """A sentencepiece training failure as the setting to change and a value that works."""
    message = str(error)
    if match := re.search(r"smaller than required_chars\. \d+ vs (\d+)", message):
        return TokenizerError(f"--vocab-size {vocab_size} is too small for this corpus: every distinct character, "
                              f"the 256 byte-fallback pieces and the special tokens need a piece of their own, "
                              f"{match.group(1)} in all: use --vocab-size {match.group(1)} or more")
    if match := re.search(r"value <= (\d+)", message):
        return TokenizerError(f"--vocab-size {vocab_size} is more than this corpus yields (at most "
                              f"{match.group(1)}): use --vocab-size {match.group(1)} or less, or add text")
    if "sentences_.empty()" in message:
        return TokenizerError(f"no text to train on in {describe(paths)} (every document is empty): "
                              "check --input and --text-field")
    return TokenizerError(f"sentencepiece could not train a tokenizer on {describe(paths)} "
                          f"(--vocab-size {vocab_size}): {message.split('] ')[-1]}")


def describe_model(model: Path, out: Path, source: str) -> dict:
    """A tokenizer folder (card and vocabulary listing) for an existing sentencepiece model, e.g.
    one that came with a Hugging Face model; returns the card."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model, out / MODEL_FILE)
    processor = _load_processor(out / MODEL_FILE)
    ids = {"unk": processor.unk_id(), "bos": processor.bos_id(), "eos": processor.eos_id(), "pad": processor.pad_id()}
    if ids["pad"] < 0:  # many Llama tokenizers have no pad piece: padding positions are masked anyway
        ids["pad"] = ids["eos"]
    types = {1: "unigram", 2: "bpe"}
    proto = _model_proto((out / MODEL_FILE).read_bytes())
    return _describe(out, {"model_type": types.get(proto.trainer_spec.model_type, "other"), "special_ids": ids,
                           "special_pieces": {role: processor.id_to_piece(i) for role, i in ids.items()},
                           "inputs": [source]})


def _load_processor(model: Path) -> spm.SentencePieceProcessor:
    """The sentencepiece model in file `model`, or a TokenizerError naming it."""
    try:
        return spm.SentencePieceProcessor(model_file=str(model))
    except (RuntimeError, OSError) as error:
        raise TokenizerError(f"{model} is not a sentencepiece model that loads ({error}): the file is damaged or of "
                             "another kind; train a tokenizer with `pretrain tokenizer train` or restore the "
                             "file") from None


def _read_card(path: Path) -> dict:
    """card.json, checked to hold what loading needs."""
    remedy = "train the tokenizer again with `pretrain tokenizer train` or restore the file"
    try:
        card = json.loads(path.read_text())
    except ValueError as error:
        raise TokenizerError(f"{path} is not valid JSON ({error}): {remedy}") from None
    card = card if isinstance(card, dict) else {}
    missing = [key for key in ("sha256", "vocab_size", "special_ids") if key not in card]
    missing += [f"special_ids.{role}" for role in SPECIAL_IDS if role not in card.get("special_ids", SPECIAL_IDS)]
    if missing:
        raise TokenizerError(f"{path} has no {', '.join(missing)}: not a tokenizer card; {remedy}")
    return card


def _describe(out: Path, card: dict) -> dict:
    """Write tokenizer.vocab and card.json (vocab size and sha256 added) beside tokenizer.model."""
    processor = _load_processor(out / MODEL_FILE)
    with open(out / VOCAB_FILE, "w", encoding="utf-8") as listing:
        for piece_id in range(processor.get_piece_size()):
            piece = json.dumps(processor.id_to_piece(piece_id), ensure_ascii=False)[1:-1]  # control chars escaped
            listing.write(f"{piece_id}\t{piece}\t{processor.get_score(piece_id)}\n")
    card = {"vocab_size": processor.get_piece_size(), "sha256": file_sha256(out / MODEL_FILE), **card}
    (out / CARD_FILE).write_text(json.dumps(card, indent=1) + "\n")
    return card


def _train_sentencepiece(paths: list[Path], stats: DocumentStats, model: io.BytesIO, vocab_size: int,
                         model_type: str, text_field: str, max_chars: int, user_symbols: tuple[str, ...],
                         threads: int) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_chunks(iter_documents(paths, text_field, stats), max_chars),
        model_writer=model, vocab_size=vocab_size, model_type=model_type, character_coverage=1.0,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, add_dummy_prefix=False,
        max_sentence_length=_CHUNK_BYTES * 2, num_threads=threads, minloglevel=2,
        unk_id=SPECIAL_IDS["unk"], bos_id=SPECIAL_IDS["bos"], eos_id=SPECIAL_IDS["eos"], pad_id=SPECIAL_IDS["pad"],
        unk_piece=SPECIAL_PIECES["unk"], bos_piece=SPECIAL_PIECES["bos"], eos_piece=SPECIAL_PIECES["eos"],
        pad_piece=SPECIAL_PIECES["pad"], control_symbols=list(user_symbols),
    )


def _model_proto(model: bytes):
    from sentencepiece import sentencepiece_model_pb2

    return sentencepiece_model_pb2.ModelProto.FromString(model)


def differences_from_our_settings(proto) -> list[str]:
    """The settings of `pretrain tokenizer train` that a sentencepiece model lacks, among those
    that make its words independent (WordCache) and its Hugging Face export exact."""
    normalizer, trainer = proto.normalizer_spec, proto.trainer_spec
    checks = {
        "model_type=bpe": trainer.model_type == trainer.BPE,
        "normalization_rule_name=identity": normalizer.name == "identity",
        "add_dummy_prefix=false": not normalizer.add_dummy_prefix,
        "remove_extra_whitespaces=false": not normalizer.remove_extra_whitespaces,
        "escape_whitespaces=true": normalizer.escape_whitespaces,
        "split_by_whitespace=true": trainer.split_by_whitespace,
        "treat_whitespace_as_suffix=false": not trainer.treat_whitespace_as_suffix,
        "no user_defined_symbols": not any(piece.type == piece.USER_DEFINED for piece in proto.pieces),
    }
    return [name for name, ok in checks.items() if not ok]


class WordCache:
    """Sentencepiece BPE ids, memoised per word and per part of a word.

    Sentencepiece cuts the text into words before merging (SplitIntoWords: a word starts at each
    whitespace "▁" that does not continue a whitespace run; with whitespace-only pieces, a run
    of spaces and the non-space characters after it form one word) and encodes each word on its
    own, so a word's ids never depend on its neighbours. Inside a word, BPE only ever merges two
    symbols into a vocabulary piece, so it never merges across two characters that no piece
    holds side by side: a word cut at such seams encodes as its parts do. Text repeats words a
    lot (code most of all) and parts even more, so a known word costs a lookup and a new word
    only the encoding of its new parts. Ids are kept as bytes of C ints, joined without Python
    integers. Only valid when the text reaches the words unchanged: identity normalisation, no
    dummy prefix, no whitespace removal, no user-defined pieces (matched across words) -
    `for_model` checks that."""

    def __init__(self, processor: spm.SentencePieceProcessor, whitespace_runs: bool, limit: int = 200_000):
        self.processor, self.limit = processor, limit
        self.word_ids: dict[str, bytes] = {}
        self.part_ids: dict[str, bytes] = {"": _WORD_END}
        self.words = re.compile(" *+[^ ]++| ++" if whitespace_runs else " [^ ]*+|[^ ]++")  # possessive: no backtracking
        self.char_class, self.adjacent = _adjacency(processor)

    @classmethod
    def for_model(cls, model: bytes, processor: spm.SentencePieceProcessor) -> "WordCache | None":
        proto = _model_proto(model)
        if differences_from_our_settings(proto):
            return None
        return cls(processor, proto.trainer_spec.allow_whitespace_only_pieces)

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """All texts' ids back to back, and each text's number of ids."""
        # sentencepiece reads spaces as "▁": both spellings have the same ids, one ASCII regex is faster
        words = [self.words.findall(text.replace("▁", " ")) for text in texts]
        new = set().union(*words).difference(self.word_ids)
        if new:
            if len(self.word_ids) + len(new) > self.limit:  # start afresh rather than grow without bound
                self.word_ids.clear()
                new = set().union(*words)
            if len(self.part_ids) > self.limit:
                self.part_ids = {"": _WORD_END}
            self._add(list(new))
        ids = self.word_ids
        encoded = [b"".join([ids[word] for word in text_words]) for text_words in words]
        lengths = np.fromiter(map(len, encoded), np.int64, len(encoded)) // _ID.itemsize
        return np.frombuffer(b"".join(encoded), _ID), lengths

    def _add(self, words: list[str]) -> None:
        """Cache the ids of new words, cut at seams; only parts not seen yet go to sentencepiece."""
        text = "".join(words)
        separator = next((char for char in map(chr, range(32)) if char not in text), None)
        if separator is None:  # every control character occurs: encode the words whole
            self.word_ids.update(zip(words, map(_int_bytes, self.processor.encode(words, num_threads=1))))
            return
        code_points = np.frombuffer(text.encode("utf-32-le"), "<u4")
        classes = self.char_class[code_points]
        seams = ~self.adjacent[classes[:-1], classes[1:]]
        word_starts = np.cumsum(np.fromiter(map(len, words[:-1]), np.int64, len(words) - 1))
        seams[word_starts - 1] = False
        # a separator at each seam and two between words, so splitting the text (in C, not a Python
        # slice per part) gives each word's parts followed by an empty part
        marks = np.concatenate([np.flatnonzero(seams) + 1, word_starts, word_starts])
        parts = np.insert(code_points, marks, ord(separator)).tobytes().decode("utf-32-le").split(separator)
        new = list(set(parts).difference(self.part_ids))
        self.part_ids.update(zip(new, map(_int_bytes, self.processor.encode(new, num_threads=1))))
        self.word_ids.update(zip(words, b"".join([self.part_ids[part] for part in parts]).split(_WORD_END)))


_ID = np.dtype(np.intc)  # a C int, as in array("i")
# Ends a word's ids among its parts' ids: never inside C ints below 2**31 (any four bytes of
# them hold a most significant byte, which is below 0x80).
_WORD_END = b"\xff" * _ID.itemsize


def _int_bytes(ids: list[int]) -> bytes:
    return array("i", ids).tobytes()


def _adjacency(processor: spm.SentencePieceProcessor, classes: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Which characters sit side by side in some piece that merges can make (control, unknown and
    byte pieces never come from merges): a class per code point and a table of adjacent classes.
    Class 0 is for characters next to nothing in any piece. The `classes` - 2 characters in most
    pairs get a class of their own; the rest share one adjacent to everything (never a seam:
    slower, still exact)."""
    mergeable = [processor.id_to_piece(i) for i in range(processor.get_piece_size())
                 if not (processor.is_control(i) or processor.is_unknown(i) or processor.is_byte(i))]
    pairs = {piece[k:k + 2] for piece in mergeable for k in range(len(piece) - 1)}
    in_pairs = Counter(chain.from_iterable(pairs))
    own = sorted(in_pairs, key=lambda char: (-in_pairs[char], char))[:classes - 2]
    shared = len(own) + 1
    char_class = np.zeros(0x110000, np.uint16)
    char_class[[ord(char) for char in in_pairs]] = shared
    char_class[[ord(char) for char in own]] = np.arange(1, len(own) + 1)
    char_class[ord(" ")] = char_class[ord("▁")]  # sentencepiece sees spaces as "▁"
    adjacent = np.zeros((shared + 1, shared + 1), bool)
    adjacent[shared, 1:] = adjacent[1:, shared] = True
    for a, b in pairs:
        adjacent[char_class[ord(a)], char_class[ord(b)]] = True
    return char_class, adjacent


def split_flat(ids: np.ndarray, lengths: np.ndarray) -> Iterator[np.ndarray]:
    """Each text's ids, from `Tokenizer.encode_flat`'s ids back to back and lengths."""
    ends = np.cumsum(lengths).tolist()
    return (ids[start:end] for start, end in zip([0, *ends], ends))


@dataclass
class Tokenizer:
    """A trained tokenizer folder, checked against its card."""

    path: Path
    card: dict
    processor: spm.SentencePieceProcessor
    word_cache: WordCache | None = None

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        model, card_path = path / MODEL_FILE, path / CARD_FILE
        for required in (model, card_path):
            if not required.is_file():
                raise TokenizerError(f"tokenizer folder {path} has no {required.name}: "
                                     "train one with `pretrain tokenizer train`")
        card = _read_card(card_path)
        if file_sha256(model) != card["sha256"]:
            raise TokenizerError(f"{model} does not match the sha256 in {card_path}: the model file was replaced "
                                 "or damaged; retrain it or restore the original")
        processor = _load_processor(model)
        return cls(path, card, processor, WordCache.for_model(model.read_bytes(), processor))

    @property
    def sha256(self) -> str:
        return self.card["sha256"]

    @property
    def vocab_size(self) -> int:
        return self.card["vocab_size"]

    @property
    def eos_id(self) -> int:
        return self.card["special_ids"]["eos"]

    @property
    def pad_id(self) -> int:
        return self.card["special_ids"]["pad"]

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (no BOS/EOS added), the same as sentencepiece's."""
        return [ids.tolist() for ids in split_flat(*self.encode_flat(texts))]

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """All texts' ids back to back (C ints) and each text's number of ids: what packing
        wants, without a Python int per token. One thread: callers parallelise with processes."""
        if self.word_cache is not None:
            return self.word_cache.encode(texts)
        encoded = self.processor.encode(texts, num_threads=1)
        lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
        return np.fromiter(chain.from_iterable(encoded), _ID, int(lengths.sum())), lengths

    def decode(self, ids: list[int]) -> str:
        return self.processor.decode(ids)

    def export_hf(self, out: Path, model_max_length: int) -> None:
        """Write the files with which `transformers.AutoTokenizer` gives exactly our ids and
        special tokens: tokenizer.json (the same BPE model with byte fallback, no
        normalisation but spaces as "▁"), tokenizer_config.json (the generic fast class:
        the Llama classes would re-add a dummy prefix; special-token text inside documents is
        split like sentencepiece does), and tokenizer.model for tools that read sentencepiece.
        No BOS/EOS is added when encoding: training documents carry only a trailing EOS."""
        proto = _model_proto((self.path / MODEL_FILE).read_bytes())
        differences = differences_from_our_settings(proto) + ([] if proto.trainer_spec.byte_fallback
                                                              else ["byte_fallback=true"])
        if differences:
            raise TokenizerError(
                f"{self.path} lacks settings that the exact Hugging Face export needs ({', '.join(differences)}): "
                "only bpe tokenizers are exported, trained as `pretrain tokenizer train` does (Hugging Face's unigram "
                "segmented 23 of 677 documents differently); export without it (--tokenizer none)")
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.path / MODEL_FILE, out / MODEL_FILE)
        hf_json(self.processor).save(str(out / "tokenizer.json"))
        specials = {f"{role}_token": self.card["special_pieces"][role] for role in SPECIAL_IDS}
        (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=1) + "\n")
        (out / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", **specials, "split_special_tokens": True,
            "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False,
            "model_max_length": model_max_length}, indent=1) + "\n")


def hf_json(processor: spm.SentencePieceProcessor):
    """A `tokenizers.Tokenizer` equal to a sentencepiece BPE model trained with our settings."""
    from tokenizers import AddedToken, decoders, models, normalizers
    from tokenizers import Tokenizer as HFTokenizer

    size = processor.get_piece_size()
    pieces = [processor.id_to_piece(i) for i in range(size)]
    special = [i for i in range(size) if processor.is_control(i) or processor.is_unknown(i)]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    plain = {pieces[i] for i in range(size) if not (i in special or processor.is_byte(i) or processor.is_unused(i))}
    # sentencepiece merges the pair whose result has the best score, i.e. the lowest id
    merges = sorted(((piece[:k], piece[k:]) for piece in plain for k in range(1, len(piece))
                     if piece[:k] in plain and piece[k:] in plain),
                    key=lambda pair: (vocab[pair[0] + pair[1]], len(pair[0])))
    tokenizer = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=pieces[processor.unk_id()],
                                       byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.add_special_tokens([AddedToken(pieces[i], special=True, normalized=False) for i in special])
    return tokenizer
