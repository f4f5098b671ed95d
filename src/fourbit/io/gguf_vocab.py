"""A Hugging Face tokenizer as the metadata llama.cpp tokenizes and chats with (GGUF ``tokenizer.*``).

What llama.cpp reads (GGUF keys, written through gguf-py's GGUFWriter):

    tokenizer.ggml.model        "gpt2": byte-level BPE (Llama 3, Qwen, SmolLM, GPT-2);
                                "llama": SentencePiece-style BPE with byte fallback (Llama 2,
                                Mistral 7B, Gemma, Phi-3)
    tokenizer.ggml.pre          gpt2 only: the pre-tokenizer (how text is split before BPE), by name
    tokenizer.ggml.tokens       every token's text, by id
    tokenizer.ggml.token_type   1 normal, 2 unknown, 3 control (special), 4 user-defined (added, not
                                special), 5 unused (ids the tokenizer lacks), 6 byte (<0x00>..<0xFF>)
    tokenizer.ggml.merges       gpt2 only: the BPE merges, "a b" per line
    tokenizer.ggml.scores       llama only: each token's score (below)
    tokenizer.ggml.add_space_prefix   llama only: whether text gets a leading "▁" before splitting
    tokenizer.ggml.{bos,eos,eot,padding,unknown}_token_id
    tokenizer.ggml.add_{bos,eos}_token   whether encoding text adds them, as the tokenizer does
    tokenizer.chat_template     the Jinja chat template, as in tokenizer_config.json

Byte-level BPE. The pre-tokenizer name is found as llama.cpp's own converter finds it: the
tokenizer encodes a fixed check text (mixed whitespace, emoji, digits, scripts and contractions)
and the SHA-256 of the printed list of ids names the pre-tokenizer (``PRE_TOKENIZERS``: the
families fourbit exports); failing that (a known splitting over another vocabulary), the regular
expression the tokenizer splits with (``SPLIT_PATTERNS``). An unknown one is refused: llama.cpp
would split text another way than training did.

SentencePiece-style BPE. llama.cpp tokenizes as SentencePiece does: spaces become "▁" (and one
leads the text where ``add_space_prefix``), the text is cut into characters, and the adjacent
pair whose concatenation is a token with the highest score is merged, again and again; a
character with no token becomes its UTF-8 bytes' <0xXX> tokens. A Hugging Face tokenizer.json
holds the same model as BPE merges ranked by that score (transformers' converter from
SentencePiece lists, for every token, each pair that concatenates to it, best score first), so

    score(token) = -(rank of the first merge that makes it)     (0 for tokens no merge makes)

lets llama.cpp pick the merges Hugging Face picks. Whether a leading "▁" is added is read from the
tokenizer's behaviour ("a" encodes to "▁a" or to "a").

The end-of-turn token (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, ``<|end|>``, ...: what the
chat template closes a turn with, chat_templates.py) is written as ``eot`` so that llama.cpp's
generation stops there. Other tokenizer models (Unigram, WordPiece) are refused by name.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from pathlib import Path

import gguf

from ..chat_templates import end_of_turn_ids
from ..errors import InputError

# llama.cpp's check text (its converter, get_vocab_base_pre): its ids hash to a pre-tokenizer name
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 "
    "3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= "
    "нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure "
    "I'll make it, 'D you like some tea? We'Ve a'lL"
)
PRE_TOKENIZERS = {  # SHA-256 of str(tokenizer.encode(CHECK_TEXT)) -> llama.cpp's name
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen 1.5-3
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM 1-2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
}


SPLIT_PATTERNS = {  # a pre-tokenizer's Split regex -> llama.cpp's name, where the vocabulary is not known
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",  # single digits
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",  # digits in threes
}


def pre_tokenizer(tokenizer) -> str:
    """llama.cpp's name for how ``tokenizer`` splits text before its BPE merges: by the check-text
    hash (a known model's vocabulary and splitting), else by the regular expression it splits
    with (a known splitting over another vocabulary, e.g. a fine-tune that extended it)."""
    digest = hashlib.sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    if digest in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[digest]
    patterns = _split_patterns(json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {})
    if len(patterns) == 1 and patterns[0] in SPLIT_PATTERNS:
        return SPLIT_PATTERNS[patterns[0]]
    raise InputError(f"this tokenizer's pre-tokenizer (check hash {digest[:16]}...) is not one fourbit exports to "
                     f"GGUF ({', '.join(sorted(set(PRE_TOKENIZERS.values())))}); llama.cpp would split text "
                     "differently from training")


def _split_patterns(node: dict) -> list[str]:
    found = [node["pattern"]["Regex"]] if node.get("type") == "Split" and "Regex" in node.get("pattern", {}) else []
    for child in node.get("pretokenizers") or []:
        found += _split_patterns(child)
    return found


def tokenizer_kind(tokenizer) -> str:
    """GGUF's tokenizer model: "gpt2" (byte-level BPE) or "llama" (byte-fallback BPE, SentencePiece-style)."""
    model = _model_json(tokenizer)
    if model.get("type") == "BPE":
        return "llama" if model.get("byte_fallback") else "gpt2"
    raise InputError(f"the tokenizer is a {model.get('type')} model; fourbit's GGUF export writes BPE tokenizers: "
                     "byte-level (Llama 3, Qwen, SmolLM, GPT-2) and SentencePiece-style (Llama 2, Mistral, Gemma, Phi-3)")


def _model_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise InputError(f"{type(tokenizer).__name__} is not a fast (tokenizer.json) tokenizer; GGUF export reads one")
    return json.loads(backend.to_str())["model"]


def merge_scores(tokenizer) -> dict[str, float]:
    """SentencePiece-style scores from the BPE merges: -(rank of the first merge making a token)."""
    scores: dict[str, float] = {}
    for rank, merge in enumerate(_model_json(tokenizer).get("merges") or []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        scores.setdefault(left + right, -float(rank))
    return scores


def adds_space_prefix(tokenizer) -> bool:
    """Whether the tokenizer turns "a" into "▁a" (Llama 2, Mistral) or keeps it "a" (Gemma)."""
    first = tokenizer.convert_ids_to_tokens(tokenizer.encode("a", add_special_tokens=False))[0]
    return first.startswith("\u2581")


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer, vocab_size: int) -> dict[str, int]:
    """Write ``tokenizer`` into ``writer``; returns the special token ids written (bos, eos, eot, ...)."""
    kind = tokenizer_kind(tokenizer)
    pre = pre_tokenizer(tokenizer) if kind == "gpt2" else None
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise InputError(f"the tokenizer has ids up to {max(vocab.values())} but the model's vocabulary is {vocab_size}")
    by_id = {i: text for text, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    scores = merge_scores(tokenizer) if kind == "llama" else {}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added and not (kind == "llama" and i == tokenizer.unk_token_id):
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(_type_of(kind, by_id[i], i, tokenizer.unk_token_id))
    writer.add_tokenizer_model(kind)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if kind == "gpt2":
        writer.add_tokenizer_pre(pre)
    else:
        writer.add_token_scores([scores.get(t, 0.0) if y == gguf.TokenType.NORMAL else 0.0 for t, y in zip(tokens, types)])
        writer.add_add_space_prefix(adds_space_prefix(tokenizer))
    with tempfile.TemporaryDirectory() as tmp:  # merges, special ids and the template, as the files hold them
        tokenizer.save_pretrained(tmp)
        special = gguf.SpecialVocab(Path(tmp), load_merges=kind == "gpt2", n_vocab=vocab_size)
    if kind == "gpt2" and not special.merges:
        raise InputError("the tokenizer has no BPE merges to write")
    if tokenizer.chat_template and not special.chat_template:
        special.chat_template = tokenizer.chat_template
    # whether encoding adds BOS/EOS, as the tokenizer does it (transformers 5 may not write the flags)
    plain, special_ids = tokenizer.encode("a", add_special_tokens=False), tokenizer.encode("a")
    special.add_special_token["bos"] = tokenizer.bos_token_id is not None and special_ids[:1] == [tokenizer.bos_token_id] \
        and special_ids[:1] != plain[:1]
    special.add_special_token["eos"] = tokenizer.eos_token_id is not None and special_ids[-1:] == [tokenizer.eos_token_id] \
        and special_ids[-1:] != plain[-1:]
    stops = end_of_turn_ids(tokenizer)  # EOS first, then the template's end-of-turn token, if another
    if stops:
        special.special_token_ids["eot"] = stops[-1]
    special.add_to_gguf(writer, quiet=True)
    return dict(special.special_token_ids)


def _type_of(kind: str, text: str, i: int, unk_id: int | None) -> gguf.TokenType:
    """SentencePiece-style vocabularies mark <unk> and the byte tokens as llama.cpp's converter does."""
    if kind == "llama" and i == unk_id:
        return gguf.TokenType.UNKNOWN
    if kind == "llama" and re.fullmatch(r"<0x[0-9A-F]{2}>", text):
        return gguf.TokenType.BYTE
    return gguf.TokenType.NORMAL
