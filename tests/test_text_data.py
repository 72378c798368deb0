"""Text data as the tool cuts it: a language model's blocks."""

from __future__ import annotations

from realtools import _byte_bpe_tokenizer

from twa_cli.tasks.text import lm_blocks


def test_language_model_blocks_are_every_row_s_tokens_joined_by_end_of_text_in_order():
    rows = [{"text": f"line {i}: " + "to be or not to be " * (i % 5)} for i in range(40)]
    tok = _byte_bpe_tokenizer([r["text"] for r in rows])
    expected: list[int] = []
    for r in rows:  # one row at a time, as a reader would tokenize it
        expected += tok(r["text"])["input_ids"] + [tok.eos_token_id]
    blocks = lm_blocks(rows, tok, {}, 16, "data.jsonl")
    got = [int(t) for row in blocks.rows for t in row["input_ids"]]
    assert len(got) == (len(expected) // 16) * 16 > 0
    assert got == expected[: len(got)]
