"""Special-token ids shared by every tokenizer, model and objective.

Both tokenizers (SentencePiece for text, the atom-level regex for SMILES) reserve the same five ids,
so objectives can refer to them as constants. fairseq uses a different order (<s>=0, <pad>=1, </s>=2,
<unk>=3, <mask>=last); ids are internal to a checkpoint, so nothing depends on matching it.
"""

PAD = 0
UNK = 1
BOS = 2  # "<s>": first slot of every block
EOS = 3  # "</s>": end of every block (and of every document inside a packed text block)
MASK = 4  # "[MASK]"

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "[MASK]")
NUM_SPECIAL = len(SPECIAL_TOKENS)

# The shortest block, `<s> x </s>`: one content token between the specials.
MIN_BLOCK_LEN = 3

# Never selected for masking (docs/design.md §2.1; why: docs/design.md §11). <unk> is content and may be masked.
UNMASKABLE = (PAD, BOS, EOS)
