"""An independent top-k oracle: plain Python per row (a full sort by (forced, -score, index))."""
import math


def topk_rows(scores, lengths, k, sinks=0, window=0, ordered=False):
    """scores: list of rows (lists of floats); lengths: list of ints -> list of k-lists of ints."""
    out = []
    for row, L in zip(scores, lengths):
        L = max(0, min(int(L), len(row)))

        def rank(j):
            x = float(row[j])
            v = -math.inf if math.isnan(x) else x
            forced = j < sinks or j >= L - window
            return (0 if forced else 1, 1 if math.isnan(x) else 0, -v, j)

        chosen = sorted(range(L), key=rank)[:min(k, L)]
        if ordered:
            def by_score(j):
                x = float(row[j])
                return (1 if math.isnan(x) else 0, 0.0 if math.isnan(x) else -x, j)
            chosen = sorted(chosen, key=by_score)
        else:
            chosen = sorted(chosen)
        out.append(chosen + [-1] * (k - len(chosen)))
    return out
