"""Window schedules against the loops they are defined by (Hugging Face guide, lm-eval rolling)."""
import pytest

from pplfast.windows import chunk_windows, make_windows, rolling_windows, sliding_windows


def hf_guide_sliding(seq_len, max_length, stride):
    """The Hugging Face perplexity guide's loop: (begin, end, first scored token) per window."""
    out, prev_end = [], 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        # labels[:, :-trg_len] = -100, and the model's shift drops the window's first label
        out.append((begin, end, max(end - trg_len, begin + 1)))
        prev_end = end
        if end == seq_len:
            break
    return [w for w in out if w[2] < w[1]]


def lm_eval_rolling(token_list, prefix_token, max_seq_len, context_len=1):
    """lm-evaluation-harness get_rolling_token_windows + make_disjoint_window."""
    pred_len = max_seq_len - context_len + 1
    predicted = 0
    first_seq_len = min(max_seq_len, len(token_list))
    windows = [([prefix_token] + token_list[: first_seq_len - 1], token_list[:first_seq_len])]
    predicted += first_seq_len
    while predicted < len(token_list):
        window_pred_len = min(len(token_list) - predicted, pred_len)
        window_end = predicted + window_pred_len
        windows.append((token_list[window_end - max_seq_len - 1 : window_end - 1],
                        token_list[window_end - window_pred_len : window_end]))
        predicted += window_pred_len
    return [(a[: len(a) - (len(b) - 1)], b) for a, b in windows]


def scored_targets(windows):
    return [t for w in windows for t in range(w.score_start, w.stop)]


@pytest.mark.parametrize("n,window,stride", [
    (0, 4, 2), (1, 4, 2), (2, 4, 2), (5, 8, 3), (37, 8, 3), (64, 16, 8), (65, 16, 15),
    (63, 7, 1), (100, 10, 9), (9, 2, 1),
], ids=lambda v: str(v))
def test_sliding_matches_hf_guide_loop(n, window, stride):
    got = sliding_windows(n, window, stride)
    assert [(w.start, w.stop, w.score_start) for w in got] == hf_guide_sliding(n, window, stride)
    assert scored_targets(got) == list(range(1, n))  # every token after the first, once, in order
    for w in got:
        assert 0 <= w.start < w.score_start <= w.stop <= n and w.stop - w.start <= window


@pytest.mark.parametrize("n,window,stride", [(50, 12, 5), (33, 8, 7), (80, 16, 4)])
def test_sliding_gives_longest_context(n, window, stride):
    got = sliding_windows(n, window, stride)
    for w in got:
        for t in range(w.score_start, w.stop):
            # of all windows that can predict t, the earliest gives t the most left context
            assert w.start == min(v.start for v in got if v.start < t < v.stop), (t, w)


@pytest.mark.parametrize("n,window", [(0, 4), (1, 4), (3, 4), (4, 4), (5, 4), (17, 4), (16, 4),
                                      (23, 1), (40, 7)])
def test_rolling_matches_lm_eval(n, window):
    tokens = list(range(100, 100 + n))
    prefix = 7
    stream = [prefix] + tokens
    got = rolling_windows(n, window)
    expected = lm_eval_rolling(tokens, prefix, window) if n else []
    assert len(got) == len(expected)
    for w, (context, continuation) in zip(got, expected):
        # lm-eval feeds (context + continuation)[:-1] and scores the continuation
        assert stream[w.start : w.stop - 1] == (context + continuation)[:-1]
        assert stream[w.score_start : w.stop] == continuation
        assert w.input_length <= window
    assert scored_targets(got) == list(range(1, n + 1))  # every token once, the first from prefix


@pytest.mark.parametrize("n,window", [(0, 4), (1, 4), (4, 4), (9, 4), (10, 3), (12, 1)])
def test_chunks(n, window):
    got = chunk_windows(n, window)
    for w in got:
        assert w.start % window == 0 and w.stop == min(w.start + window, n)
        assert w.score_start == w.start + 1
    firsts = set(range(0, n, window))
    assert scored_targets(got) == [t for t in range(n) if t not in firsts]


def test_make_windows_defaults_and_errors():
    assert make_windows(10, window=4) == sliding_windows(10, 4, 2)
    assert make_windows(10) == sliding_windows(10, 10, 9)
    assert len(make_windows(10, mode="rolling")) == 1
    assert make_windows(10, mode="chunks") == chunk_windows(10, 10)
    with pytest.raises(ValueError, match="stride < window"):
        sliding_windows(10, 4, 4)
    with pytest.raises(ValueError, match="mode must be one of"):
        make_windows(10, window=4, mode="strided")
    with pytest.raises(ValueError, match="stride applies"):
        make_windows(10, window=4, stride=2, mode="rolling")
    with pytest.raises(ValueError, match="stride needs a window"):
        make_windows(10, stride=2)
    with pytest.raises(ValueError, match="window must be >= 2"):
        make_windows(10, window=1)
    with pytest.raises(TypeError, match="window must be an int"):
        make_windows(10, window=4.0)
