"""Evaluation metrics: six-way cross-modal retrieval (REFERENCE.md section 3) and keyword spotting.

Similarities are computed chunk by chunk so SpokenCOCO-sized splits fit in memory, on CPU or CUDA.
"""
import math
import re
from collections import Counter
from typing import Hashable, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

RETRIEVAL_PAIRS = ("audio_to_image", "audio_to_text", "image_to_audio",
                   "image_to_text", "text_to_audio", "text_to_image")
KEYWORD_SUMMARY_KEYS = ("mAP", "micro_AP", "P@10", "P@N", "EER")

ArrayLike = np.ndarray | torch.Tensor


def _unit_rows(x: ArrayLike, device: torch.device | str | None, name: str) -> torch.Tensor:
    """[N, E] array or tensor -> float32 tensor on `device` with L2-normalised rows."""
    t = torch.as_tensor(x)
    if t.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [N, E] array, got shape {tuple(t.shape)}")
    return F.normalize(t.to(device=device, dtype=torch.float32), dim=1)


def _codes(query_keys: Sequence[Hashable], candidate_keys: Sequence[Hashable]) -> tuple[np.ndarray, ...]:
    """Map arbitrary hashable keys to shared int64 codes (a dict, so str, int and tuple keys all work)."""
    index: dict = {}
    q = np.fromiter((index.setdefault(k, len(index)) for k in query_keys), np.int64, len(query_keys))
    c = np.fromiter((index.setdefault(k, len(index)) for k in candidate_keys), np.int64, len(candidate_keys))
    return q, c


class Ranks(NamedTuple):
    """Where each query's best-ranked positive lands, int64 [Q] each: `above` negatives score higher than it,
    `tied` negatives score the same, and `tied_positives` positives (itself included) score the same. A tie
    is broken at random, in expectation: an encoder that gives every utterance one embedding scores chance,
    and identical captions of two images count as half a hit at R@1 each, not a whole (or none)."""
    above: np.ndarray
    tied: np.ndarray
    tied_positives: np.ndarray

    def expected(self) -> np.ndarray:
        """float64 [Q] expected 1-based rank: the tied negatives before the first of the tied positives in a
        random order number tied / (tied_positives + 1) on average."""
        return self.above + 1.0 + self.tied / (self.tied_positives + 1.0)

    def hit_rate(self, k: int) -> np.ndarray:
        """float64 [Q]: the probability that a positive is in the top k (1 or 0 where nothing ties)."""
        return _hit_probability(self.tied + self.tied_positives, self.tied_positives, k - self.above)


def _hit_probability(n: ArrayLike, positives: ArrayLike, slots: ArrayLike) -> np.ndarray:
    """P(at least one of `positives` among the first `slots` of `n` items in random order), elementwise:
    1 - C(n - positives, slots) / C(n, slots); 0 where slots <= 0."""
    n, positives, slots = np.broadcast_arrays(*(np.asarray(a, dtype=np.float64) for a in (n, positives, slots)))
    i = np.arange(int(np.minimum(slots, n).max(initial=0)), dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):   # i >= n only where the factor is not used
        factors = np.clip((n[..., None] - positives[..., None] - i) / (n[..., None] - i), 0.0, None)
    miss = np.prod(np.where(i < np.minimum(slots, n)[..., None], factors, 1.0), axis=-1)
    return np.where(slots > 0, 1.0 - miss, 0.0)


def positive_ranks(queries: ArrayLike, candidates: ArrayLike, query_keys: Sequence[Hashable],
                   candidate_keys: Sequence[Hashable], chunk: int = 1024,
                   device: torch.device | str | None = None) -> Ranks:
    """Where the best-ranked positive candidate of each query lands, by cosine similarity (see Ranks).

    queries [Q, E], candidates [C, E] (normalised here); a candidate is a positive of a query when their
    keys are equal. At most `chunk` x C similarities exist at once. Raises ValueError naming the queries
    that have no positive.
    """
    if len(query_keys) != len(queries) or len(candidate_keys) != len(candidates):
        raise ValueError(f"keys and embeddings differ in length: {len(query_keys)} query keys for "
                         f"{len(queries)} queries, {len(candidate_keys)} candidate keys for "
                         f"{len(candidates)} candidates")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    q_codes, c_codes = _codes(query_keys, candidate_keys)
    if len(q_codes) == 0:
        return Ranks(*(np.zeros(0, dtype=np.int64) for _ in range(3)))
    orphans = np.flatnonzero(~np.isin(q_codes, c_codes))
    if orphans.size:
        named = ", ".join(f"#{i} ({query_keys[i]!r})" for i in orphans[:5])
        raise ValueError(f"{orphans.size} of {len(q_codes)} queries have no positive among the candidates, "
                         f"e.g. {named}: pass the candidates those keys point to, or drop these queries")
    if device is None:
        device = queries.device if isinstance(queries, torch.Tensor) else "cpu"
    q = _unit_rows(queries, device, "queries")
    c = _unit_rows(candidates, device, "candidates")
    if q.shape[1] != c.shape[1]:
        raise ValueError(f"queries have {q.shape[1]} dims but candidates have {c.shape[1]}")
    # Candidates grouped by key: the positives of a query with key code k are
    # by_key[first[k] : first[k] + n_with[k]], so only chunk x (most positives) indices are gathered.
    by_key = np.argsort(c_codes, kind="stable")
    n_with = np.bincount(c_codes, minlength=int(q_codes.max()) + 1)
    first = np.concatenate([[0], np.cumsum(n_with)[:-1]])
    counts = torch.empty((3, len(q)), dtype=torch.int64, device=device)   # above, tied, tied_positives
    for start in range(0, len(q), chunk):
        codes = q_codes[start:start + chunk]
        slots = np.arange(n_with[codes].max())
        valid = slots[None, :] < n_with[codes][:, None]                       # [chunk, P]
        positives = by_key[np.where(valid, first[codes][:, None] + slots[None, :], 0)]
        sims = q[start:start + chunk] @ c.T                                  # [chunk, C]
        # The best positive is read from the same sims matrix, so it never outranks itself by rounding.
        valid_t = torch.from_numpy(valid).to(device)
        at_positives = sims.gather(1, torch.from_numpy(positives).to(device))
        best = at_positives.masked_fill(~valid_t, -math.inf).amax(dim=1, keepdim=True)
        tied_positives = ((at_positives == best) & valid_t).sum(dim=1)   # the best one among them
        counts[0, start:start + chunk] = (sims > best).sum(dim=1)
        counts[1, start:start + chunk] = (sims == best).sum(dim=1) - tied_positives
        counts[2, start:start + chunk] = tied_positives
    return Ranks(*counts.cpu().numpy())


def recall_summary(ranks: Ranks | Sequence[int] | np.ndarray, ks: Sequence[int] = (1, 5, 10)
                   ) -> dict[str, float]:
    """Ranks (or plain 1-based ranks [Q]) -> {"R@k" (percent of queries with a hit in the top k, expected
    over the ways ties may fall), "median_rank", "mean_rank" (of the expected ranks)}."""
    r = ranks.expected() if isinstance(ranks, Ranks) else np.asarray(ranks)
    if r.size == 0:
        raise ValueError("recall_summary got no ranks: there were no queries to evaluate")
    hits = ranks.hit_rate if isinstance(ranks, Ranks) else (lambda k: r <= k)
    out = {f"R@{k}": float(100.0 * np.mean(hits(k))) for k in ks}
    out["median_rank"] = float(np.median(r))
    out["mean_rank"] = float(np.mean(r))
    return out


def chance_recall(n_candidates: int, n_positives_per_query: int | Sequence[int] | np.ndarray,
                  k: int) -> float:
    """R@k in percent of a random ranking: P(at least one of m positives among the top k of n).

    1 - C(n-m, k) / C(n, k), averaged over queries when `n_positives_per_query` is an array of m's.
    """
    m = np.atleast_1d(np.asarray(n_positives_per_query, dtype=np.float64))
    if np.any(m < 1) or np.any(m > n_candidates):
        raise ValueError(f"positives per query must lie in 1..{n_candidates}, got {m.min()}..{m.max()}")
    return float(100.0 * np.mean(_hit_probability(n_candidates, m, k)))


def retrieval_chance(audio_image_ids: Sequence[Hashable], n_images: int,
                     text_image_ids: Sequence[Hashable] | None = None,
                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, dict[int, float | None]]:
    """Chance R@k (percent) of each of the six pairs, as six_way_retrieval ranks them: ->image among the
    `n_images` images, ->audio and ->text among all utterances / captions, image->X with each image's own
    number of utterances / captions as its positives. The pairs with text are None without `text_image_ids`.
    """
    n_audio = len(audio_image_ids)
    setup: dict[str, tuple] = {"audio_to_image": (n_images, 1), "text_to_audio": (n_audio, 1),
                               "image_to_audio": (n_audio, list(Counter(audio_image_ids).values()))}
    if text_image_ids is not None:
        setup |= {"audio_to_text": (len(text_image_ids), 1), "text_to_image": (n_images, 1),
                  "image_to_text": (len(text_image_ids), list(Counter(text_image_ids).values()))}
    return {pair: {k: chance_recall(*setup[pair], k) if pair in setup and setup[pair][0] else None
                   for k in ks} for pair in RETRIEVAL_PAIRS}


def _require_unique(ids: Sequence[Hashable], name: str) -> None:
    if len(set(ids)) != len(ids):
        n_dup = len(ids) - len(set(ids))
        raise ValueError(f"{name} must be unique (one row per id), found {n_dup} duplicates")


def six_way_retrieval(audio: ArrayLike, audio_image_ids: Sequence[Hashable],
                      audio_caption_ids: Sequence[Hashable],
                      image: ArrayLike, image_ids: Sequence[Hashable],
                      text: ArrayLike, text_ids: Sequence[Hashable], text_image_ids: Sequence[Hashable],
                      chunk: int = 1024, device: torch.device | str | None = None) -> dict[str, dict]:
    """R@1/5/10, median and mean rank for the six directions between audio [N, E], image [I, E], text [T, E].

    ->image ranks the unique images; image->audio and image->text hit when ANY utterance or caption of
    the image is in the top K; audio<->text pair an utterance with the written caption it reads
    (audio_caption_ids vs text_ids). Images without utterances and captions that nobody spoke are
    dropped as image->audio / text->audio queries (e.g. after failed audio extraction); each pair's dict
    reports its "n_queries" and "n_candidates" so this shows.
    """
    _require_unique(list(image_ids), "image_ids")
    _require_unique(list(text_ids), "text_ids")
    if len(audio_image_ids) != len(audio) or len(audio_caption_ids) != len(audio):
        raise ValueError(f"{len(audio)} audio rows but {len(audio_image_ids)} audio_image_ids and "
                         f"{len(audio_caption_ids)} audio_caption_ids")
    if len(text_image_ids) != len(text):
        raise ValueError(f"{len(text)} text rows but {len(text_image_ids)} text_image_ids")
    spoken_images = set(audio_image_ids)
    spoken_captions = set(audio_caption_ids)
    image_keep = np.array([k in spoken_images for k in image_ids], dtype=bool)
    text_keep = np.array([k in spoken_captions for k in text_ids], dtype=bool)

    def subset(x: ArrayLike, keys: Sequence[Hashable], keep: np.ndarray) -> tuple:
        idx = np.flatnonzero(keep)
        return x[torch.as_tensor(idx) if isinstance(x, torch.Tensor) else idx], [keys[i] for i in idx]

    image_q, image_q_ids = subset(image, list(image_ids), image_keep)
    text_q, text_q_ids = subset(text, list(text_ids), text_keep)
    jobs = {  # pair: (queries, candidates, query keys, candidate keys)
        "audio_to_image": (audio, image, audio_image_ids, image_ids),
        "audio_to_text": (audio, text, audio_caption_ids, text_ids),
        "image_to_audio": (image_q, audio, image_q_ids, audio_image_ids),
        "image_to_text": (image, text, image_ids, text_image_ids),
        "text_to_audio": (text_q, audio, text_q_ids, audio_caption_ids),
        "text_to_image": (text, image, text_image_ids, image_ids),
    }
    results = {}
    for pair, (queries, candidates, q_keys, c_keys) in jobs.items():
        ranks = positive_ranks(queries, candidates, list(q_keys), list(c_keys), chunk, device)
        results[pair] = recall_summary(ranks) | {"n_queries": len(queries), "n_candidates": len(candidates)}
    return results


# ----------------------------------------------------------------------------- keyword spotting

def _words(text: str) -> list[str]:
    """Lower-cased words with punctuation as separators ("Dog's, red-haired" -> dog s red haired)."""
    return re.findall(r"[^\W_]+", text.lower())


def keyword_relevance(transcripts: Sequence[str], keywords: Sequence[str]) -> np.ndarray:
    """bool [N, K]: keyword k occurs as a whole word (or whole-word phrase) in transcript n.

    Case-insensitive; punctuation separates words, so "red" matches "Red," and "red-haired" but not
    "reddish".
    """
    columns: dict[tuple[str, ...], list[int]] = {}
    for j, word in enumerate(keywords):
        tokens = tuple(_words(word))
        if not tokens:
            raise ValueError(f"keyword #{j} {word!r} has no letters or digits: drop it from the keyword list")
        columns.setdefault(tokens, []).append(j)
    longest = max((len(t) for t in columns), default=0)
    relevance = np.zeros((len(transcripts), len(keywords)), dtype=bool)
    for i, text in enumerate(transcripts):
        words = _words(text)
        for n in range(1, longest + 1):
            for s in range(len(words) - n + 1):
                for j in columns.get(tuple(words[s:s + n]), ()):
                    relevance[i, j] = True
    return relevance


def keyword_chance(relevance: np.ndarray) -> float:
    """Mean frequency (percent) of the keywords that occur at least once, over relevance [N, K].

    It is the expected P@10 and P@N of a random ranking, and approximately its expected AP.
    """
    rel = np.asarray(relevance, dtype=bool)
    freq = rel.mean(axis=0)[rel.any(axis=0)]
    return float(100.0 * freq.mean()) if freq.size else float("nan")


def _ranked(scores: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort each column of scores [N, K] descending (stable: ties keep row order).

    Returns (tp [N, K] float64 cumulative true positives, group_end [N, K] bool marking the last row of
    each run of tied scores, sorted labels [N, K] float64).
    """
    sorted_scores, order = torch.sort(scores, dim=0, descending=True, stable=True)
    y = labels.gather(0, order).to(torch.float64)
    group_end = torch.ones_like(sorted_scores, dtype=torch.bool)
    group_end[:-1] = sorted_scores[1:] != sorted_scores[:-1]
    return torch.cumsum(y, dim=0), group_end, y


def _expected_hits(tp: torch.Tensor, group_end: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """float64 [K]: the relevant utterances among the top k[j] of column j (see _ranked), in expectation over
    the orders a run of tied scores across the k-th place may come in: the run's relevant ones count by the
    share of the run that lies within the top k."""
    n = tp.shape[0]
    rows = torch.arange(n, device=tp.device)[:, None].expand_as(tp)
    starts = torch.ones_like(group_end)
    starts[1:] = group_end[:-1]
    first = torch.where(starts, rows, 0).cummax(dim=0).values          # the first row of each row's run
    last = torch.where(group_end, rows, n).flip(0).cummin(dim=0).values.flip(0)   # and its last row
    at = (k - 1)[None]
    first, last = first.gather(0, at)[0], last.gather(0, at)[0]
    before = torch.where(first > 0, tp.gather(0, (first - 1).clamp(min=0)[None])[0], torch.zeros_like(tp[0]))
    in_run = tp.gather(0, last[None])[0] - before
    return before + in_run * (k - first).double() / (last - first + 1).double()


def average_precision(scores: ArrayLike, labels: ArrayLike) -> np.ndarray:
    """Non-interpolated AP of each column of scores [N, K] against bool labels [N, K], as fractions [K].

    Tied scores form one threshold (as scikit-learn's average_precision_score): AP = sum over distinct
    thresholds of (recall step) x precision. Columns without positives give NaN.
    """
    s = torch.as_tensor(scores, dtype=torch.float64)
    y = torch.as_tensor(labels).to(s.device)
    if s.ndim == 1:
        s, y = s[:, None], y[:, None]
    tp, group_end, _ = _ranked(s, y)
    seen = torch.arange(1, len(s) + 1, dtype=torch.float64, device=s.device)[:, None]
    tp_at_end = torch.where(group_end, tp, torch.zeros_like(tp))
    # tp is non-decreasing, so the running max of tp at group ends, shifted by one row, is the tp of the
    # previous threshold: the recall step of each threshold is (tp - that) / n_pos.
    prev = torch.cat([torch.zeros_like(tp[:1]), torch.cummax(tp_at_end, dim=0).values[:-1]])
    n_pos = tp[-1]
    ap = (group_end * (tp - prev) * tp / seen).sum(dim=0) / n_pos
    return ap.cpu().numpy()


def _equal_error_rate(tp: torch.Tensor, group_end: torch.Tensor) -> float:
    """EER (fraction) of one ranked column: where FPR = FNR on the ROC through the tie-group ends,
    interpolated linearly between the two ROC points that straddle it."""
    seen = torch.arange(1, len(tp) + 1, dtype=torch.float64, device=tp.device)
    n_pos, n_neg = tp[-1], len(tp) - tp[-1]
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    zero = torch.zeros(1, dtype=torch.float64, device=tp.device)
    fpr = torch.cat([zero, ((seen - tp) / n_neg)[group_end]])
    fnr = torch.cat([zero + 1, (1 - tp / n_pos)[group_end]])
    gap = fpr - fnr                                # -1 at the top of the ranking, +1 at the bottom
    i = int(torch.nonzero(gap >= 0)[0])            # first ROC point at or past the crossing (i >= 1)
    t = -gap[i - 1] / (gap[i] - gap[i - 1])
    return float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))


def keyword_spotting(audio: ArrayLike, keyword_emb: ArrayLike, transcripts: Sequence[str],
                     keywords: Sequence[str], device: torch.device | str | None = None) -> dict:
    """Rank utterances audio [N, E] by cosine similarity with keyword prompt embeddings [K, E].

    Relevance: keyword_relevance(transcripts, keywords). Returns percentages (0-100): "mAP", "micro_AP"
    (over the flattened utterance x keyword matrix), "P@10", "P@N" (N = number of relevant utterances),
    "EER", plus "n_keywords" (how many were scored) and "per_keyword": {word: {"AP", "P@10", "P@N",
    "EER", "n_relevant"}}. Keywords with no relevant utterance get n_relevant 0 and NaN figures and are
    left out of the means; micro_AP keeps them, as the whole matrix's negatives (REFERENCE.md §3;
    scikit-learn's average="micro"). P@10 divides by min(10, N); utterances that tie across the k-th place
    count as a random order of them would, in expectation (as retrieval ties); EER is NaN for a keyword
    present in every utterance and then left out of "EER".
    """
    if len(transcripts) != len(audio) or len(audio) == 0:
        raise ValueError(f"need one transcript per audio row and at least one row, got {len(audio)} audio "
                         f"rows and {len(transcripts)} transcripts")
    if len(keywords) != len(keyword_emb):
        raise ValueError(f"{len(keyword_emb)} keyword embeddings but {len(keywords)} keywords")
    if len(set(keywords)) != len(keywords):
        raise ValueError("keywords must be unique: per_keyword results are keyed by the word")
    if device is None:
        device = audio.device if isinstance(audio, torch.Tensor) else "cpu"
    scores = (_unit_rows(audio, device, "audio") @ _unit_rows(keyword_emb, device, "keyword_emb").T).double()
    relevance = torch.from_numpy(keyword_relevance(transcripts, keywords)).to(device)
    n = len(transcripts)
    n_rel = relevance.sum(dim=0)
    scored = n_rel > 0

    ap = average_precision(scores, relevance)
    tp, group_end, _ = _ranked(scores, relevance)
    k10 = min(10, n)
    p_at_10 = (_expected_hits(tp, group_end, torch.full_like(n_rel, k10)) / k10).cpu().numpy()
    p_at_n = (_expected_hits(tp, group_end, n_rel.clamp(min=1)) / n_rel.clamp(min=1)).cpu().numpy()
    eer = np.array([_equal_error_rate(tp[:, j], group_end[:, j]) for j in range(len(keywords))])

    per_keyword = {}
    for j, word in enumerate(keywords):
        ok = bool(scored[j])
        per_keyword[word] = {"AP": 100.0 * float(ap[j]) if ok else float("nan"),
                             "P@10": 100.0 * float(p_at_10[j]) if ok else float("nan"),
                             "P@N": 100.0 * float(p_at_n[j]) if ok else float("nan"),
                             "EER": 100.0 * float(eer[j]) if ok else float("nan"),
                             "n_relevant": int(n_rel[j])}
    mask = scored.cpu().numpy()
    if not mask.any():
        summary = {key: float("nan") for key in KEYWORD_SUMMARY_KEYS}
    else:
        micro = average_precision(scores.reshape(-1), relevance.reshape(-1))
        finite_eer = eer[mask][np.isfinite(eer[mask])]
        summary = {"mAP": 100.0 * float(ap[mask].mean()),
                   "micro_AP": 100.0 * float(micro[0]),
                   "P@10": 100.0 * float(p_at_10[mask].mean()),
                   "P@N": 100.0 * float(p_at_n[mask].mean()),
                   "EER": 100.0 * float(finite_eer.mean()) if finite_eer.size else float("nan")}
    return summary | {"n_keywords": int(mask.sum()), "per_keyword": per_keyword}
