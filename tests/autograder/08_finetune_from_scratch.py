"""Hidden checks of Chapter 8's exercises (scripts/assignments.py puts them in the autograder)."""

from qlora_edu import quantized_nbytes


def ch8_ex_rank(env):
    """Rank 8's scores are the run trained in the chapter; rank 2 ends with a higher perplexity."""
    ranked = env["ranked"]
    assert ranked[8]["answer_perplexity"] == env["scores"]["answer_perplexity"]
    assert ranked[2]["answer_perplexity"] > ranked[8]["answer_perplexity"]


def ch8_ex_blocksize(env):
    """The bits of one MLP weight, recomputed; perplexity grows with the block."""
    n = 256 * 704
    by_blocksize = env["by_blocksize"]
    for blocksize, (bits, _) in by_blocksize.items():
        assert abs(bits - 8 * quantized_nbytes(n, blocksize, compress_statistics=False) / n) < 1e-3
    assert by_blocksize[64][1] < by_blocksize[256][1] < by_blocksize[1024][1]


def ch8_ex_greedy(env):
    """Both kinds of answer were checked: some right, some wrong, 20 prompts or more."""
    verdicts = env["verdicts"]
    assert len(verdicts) >= 20 and 0 < sum(verdicts) < len(verdicts)
