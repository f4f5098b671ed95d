"""A SentencePiece-style tokenizer (Llama 2, Mistral, Gemma, Phi-3), built here: no hub.

Laid out as transformers' converter from SentencePiece lays one out in tokenizer.json: spaces
become "▁" (a leading one added where ``space_prefix``, as Llama 2 does and Gemma does not),
<unk>, <s>, </s> and the 256 <0xXX> byte tokens first, byte fallback for characters without a
token, and as BPE merges every pair that concatenates to a token, ranked by that token's own
rank (its SentencePiece score). The pieces are trained by the tokenizers library on Python's
documentation topics, never crossing a "▁".
"""

import json

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import PreTrainedTokenizerFast

from fourbit.reference_text import documentation_topics

SPACE = "\u2581"


def sentencepiece_style(space_prefix: bool = True, vocab_size: int = 800) -> PreTrainedTokenizerFast:
    trainer = Tokenizer(BPE(unk_token="<unk>"))
    trainer.normalizer = normalizers.Replace(" ", SPACE)
    trainer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="never", split=True)
    trainer.train_from_iterator(documentation_topics()[:40], BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                                       special_tokens=["<unk>"]))
    trained = json.loads(trainer.to_str())["model"]
    rank = {a + b: r for r, (a, b) in enumerate(m.split(" ", 1) if isinstance(m, str) else m for m in trained["merges"])}
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += [t for t, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]) if t not in pieces]
    ids = {t: i for i, t in enumerate(pieces)}
    merges = sorted(((a, t[len(a):]) for t in rank for a in (t[:k] for k in range(1, len(t)))
                     if a in ids and t[len(a):] in ids), key=lambda m: (rank[m[0] + m[1]], ids[m[0]], ids[m[1]]))
    tokenizer = Tokenizer(BPE(ids, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence(([normalizers.Prepend(SPACE)] if space_prefix else [])
                                                + [normalizers.Replace(" ", SPACE)])
    tokenizer.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
                                          + ([decoders.Strip(" ", 1, 0)] if space_prefix else []))
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
