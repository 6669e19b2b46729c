"""Retrieval and keyword-spotting metrics against brute-force loops, scikit-learn and hand-made rankings."""
import itertools
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_curve

from trainer.metrics import (RETRIEVAL_PAIRS, Ranks, average_precision, chance_recall, keyword_chance,
                             keyword_relevance, keyword_spotting, positive_ranks, recall_summary, retrieval_chance,
                             six_way_retrieval)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def toy_split(seed=0, n_images=9, dim=12, captions=None):
    """Images with 1-5 captions each (or `captions` [n_images]); every caption spoken once, audio and text
    near their image."""
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(n_images, dim))
    image_ids = [f"img{i}" for i in range(n_images)]
    text, text_ids, text_image_ids = [], [], []
    for i, n_caps in enumerate(rng.integers(1, 6, size=n_images) if captions is None else captions):
        for c in range(n_caps):
            text.append(image[i] + 1.5 * rng.normal(size=dim))
            text_ids.append(f"img{i}#{c}")
            text_image_ids.append(f"img{i}")
    text = np.stack(text)
    order = rng.permutation(len(text_ids))  # utterances in another order than the captions
    audio = np.stack([text[j] + 1.5 * rng.normal(size=dim) for j in order])
    return dict(audio=audio, audio_image_ids=[text_image_ids[j] for j in order],
                audio_caption_ids=[text_ids[j] for j in order], image=image, image_ids=image_ids,
                text=text, text_ids=text_ids, text_image_ids=text_image_ids)


def brute_force(queries, candidates, q_keys, c_keys, ks=(1, 5, 10)):
    """Per-query loop: rank of the first positive, and whether ANY positive lies in the top k."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    c = candidates / np.linalg.norm(candidates, axis=1, keepdims=True)
    ranks, hits = [], {k: [] for k in ks}
    for i in range(len(q)):
        sims = [float(np.dot(q[i], c[j])) for j in range(len(c))]
        ranking = sorted(range(len(c)), key=lambda j: -sims[j])
        positives = [j for j in range(len(c)) if c_keys[j] == q_keys[i]]
        ranks.append(min(ranking.index(j) for j in positives) + 1)
        for k in ks:
            hits[k].append(any(j in ranking[:k] for j in positives))
    return np.array(ranks), {f"R@{k}": 100.0 * sum(h) / len(h) for k, h in hits.items()}


def pair_inputs(d):
    return {
        "audio_to_image": (d["audio"], d["image"], d["audio_image_ids"], d["image_ids"]),
        "audio_to_text": (d["audio"], d["text"], d["audio_caption_ids"], d["text_ids"]),
        "image_to_audio": (d["image"], d["audio"], d["image_ids"], d["audio_image_ids"]),
        "image_to_text": (d["image"], d["text"], d["image_ids"], d["text_image_ids"]),
        "text_to_audio": (d["text"], d["audio"], d["text_ids"], d["audio_caption_ids"]),
        "text_to_image": (d["text"], d["image"], d["text_image_ids"], d["image_ids"]),
    }


# ----------------------------------------------------------------------------- retrieval

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1])
def test_six_way_matches_brute_force(seed, device):
    d = toy_split(seed)
    result = six_way_retrieval(**d, device=device)
    assert set(result) == set(RETRIEVAL_PAIRS)
    for pair, (queries, candidates, q_keys, c_keys) in pair_inputs(d).items():
        ranks, recalls = brute_force(queries, candidates, q_keys, c_keys)
        np.testing.assert_array_equal(positive_ranks(queries, candidates, q_keys, c_keys).expected(), ranks)
        for key, value in recalls.items():
            assert result[pair][key] == pytest.approx(value), (pair, key)
        assert result[pair]["median_rank"] == pytest.approx(np.median(ranks))
        assert result[pair]["mean_rank"] == pytest.approx(np.mean(ranks))
        assert (result[pair]["n_queries"], result[pair]["n_candidates"]) == (len(queries), len(candidates))


def test_image_queries_hit_with_any_caption():
    # The image's 2nd caption is nearest, its 1st is last: image->text must count a hit at rank 1.
    image = np.array([[1.0, 0.0], [0.0, 1.0]])
    text = np.array([[-1.0, 0.1], [1.0, 0.05], [0.0, 1.0]])
    ranks = positive_ranks(image, text, ["a", "b"], ["a", "a", "b"])
    np.testing.assert_array_equal(ranks.expected(), [1, 1])


def test_chunking_does_not_change_results():
    d = toy_split(3, n_images=15)
    one = six_way_retrieval(**d, chunk=100_000)
    assert six_way_retrieval(**d, chunk=1) == one
    assert six_way_retrieval(**d, chunk=4) == one
    q, c, qk, ck = pair_inputs(d)["image_to_audio"]
    for got, want in zip(positive_ranks(q, c, qk, ck, chunk=2), positive_ranks(q, c, qk, ck, chunk=len(q))):
        np.testing.assert_array_equal(got, want)


def test_torch_inputs_give_the_same_result():
    d = toy_split(4)
    as_torch = {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in d.items()}
    assert six_way_retrieval(**as_torch) == six_way_retrieval(**d)


def by_every_order(above, tied, tied_positives, ks=(1, 2, 3, 5, 10)):
    """R@k and the mean rank over every order the tied candidates may come in (the reference for ties)."""
    group = ["-"] * tied + ["+"] * tied_positives
    orders = list(itertools.permutations(range(len(group))))
    firsts = [above + 1 + min(pos for pos, item in enumerate(order) if group[item] == "+") for order in orders]
    return {k: np.mean([f <= k for f in firsts]) for k in ks}, np.mean(firsts)


@pytest.mark.parametrize("above,tied,tied_positives", [(0, 0, 1), (3, 0, 1), (0, 4, 1), (1, 3, 2), (2, 2, 3),
                                                       (9, 1, 1), (0, 1, 5), (12, 2, 1)])
def test_ties_fall_every_way_with_equal_chance(above, tied, tied_positives):
    """A query whose best positive ties with other candidates scores what a random order of the tie gives on
    average, so that neither the candidates' order nor a collapsed encoder decides the figures."""
    ranks = Ranks(np.array([above]), np.array([tied]), np.array([tied_positives]))
    hit_rates, mean_rank = by_every_order(above, tied, tied_positives)
    for k, rate in hit_rates.items():
        assert ranks.hit_rate(k)[0] == pytest.approx(rate), k
    assert ranks.expected()[0] == pytest.approx(mean_rank)


def test_ties_are_counted_from_the_similarities():
    candidates = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # rows 0 and 1 tie once normalised
    ranks = positive_ranks(np.array([[1.0, 0.0]]), candidates, ["b"], ["a", "b", "c", "a"])
    assert [r.tolist() for r in ranks] == [[0], [1], [1]]
    ranks = positive_ranks(np.array([[1.0, 0.0]]), candidates, ["b"], ["b", "b", "c", "d"])
    assert [r.tolist() for r in ranks] == [[0], [0], [2]]
    assert recall_summary(positive_ranks(np.array([[1.0, 0.0]]), candidates, ["b"], ["a", "b", "c", "a"]))["R@1"] \
        == pytest.approx(50)


def test_an_encoder_that_maps_every_utterance_to_one_point_scores_chance():
    """Were ties counted for the query, such an encoder would score R@10 100 as image->audio (and be kept as
    the best checkpoint by --best-metric image_to_audio_R@10); counted against it, 0."""
    d = toy_split(0, n_images=30)
    d["audio"] = np.ones_like(d["audio"])
    r = six_way_retrieval(**d)
    chance = retrieval_chance(d["audio_image_ids"], len(d["image_ids"]), d["text_image_ids"], ks=(1, 5, 10))
    for pair in ("image_to_audio", "text_to_audio"):
        for k in (1, 5, 10):
            assert r[pair][f"R@{k}"] == pytest.approx(chance[pair][k]), (pair, k)


def test_query_without_positive_raises_naming_it():
    with pytest.raises(ValueError, match="'lost'"):
        positive_ranks(np.eye(2), np.eye(2), ["a", "lost"], ["a", "b"])
    d = toy_split(0)
    d["audio_image_ids"] = ["missing-image"] + d["audio_image_ids"][1:]
    with pytest.raises(ValueError, match="missing-image"):
        six_way_retrieval(**d)


def test_duplicate_image_ids_are_refused():
    d = toy_split(0)
    d["image_ids"] = [d["image_ids"][1]] + d["image_ids"][1:]
    with pytest.raises(ValueError, match="image_ids must be unique"):
        six_way_retrieval(**d)


def test_unspoken_captions_are_dropped_as_audio_queries_only():
    d = toy_split(5)
    d["audio"], d["audio_image_ids"], d["audio_caption_ids"] = (
        d["audio"][1:], d["audio_image_ids"][1:], d["audio_caption_ids"][1:])
    result = six_way_retrieval(**d)
    assert result["text_to_audio"]["n_queries"] == len(d["text"]) - 1
    assert result["text_to_image"]["n_queries"] == len(d["text"])
    assert result["audio_to_text"]["n_candidates"] == len(d["text"])


def test_recall_summary_and_chance():
    summary = recall_summary([1, 2, 6, 11], ks=(1, 5, 10))
    assert summary == {"R@1": 25.0, "R@5": 50.0, "R@10": 75.0, "median_rank": 4.0, "mean_rank": 5.0}
    assert chance_recall(1000, 1, 10) == pytest.approx(1.0)
    for n, m, k in [(5000, 5, 10), (20, 3, 5), (6, 5, 2), (10, 4, 10)]:
        assert chance_recall(n, m, k) == pytest.approx(100 * (1 - math.comb(n - m, k) / math.comb(n, k)))
    mixed = [1, 3, 5]
    assert chance_recall(50, mixed, 5) == pytest.approx(np.mean([chance_recall(50, m, 5) for m in mixed]))


def test_retrieval_chance_is_what_random_embeddings_score():
    """The chance column (evaluate's table and the report) against the mean recall of random embeddings on
    a split whose images have 1 or 9 captions (image->X R@5: 56 %, where 3 captions per image would give 84)."""
    d = toy_split(seed=3, n_images=4, captions=[1, 1, 9, 1])
    chance = retrieval_chance(d["audio_image_ids"], len(d["image_ids"]), d["text_image_ids"], ks=(1, 5))
    rng = np.random.default_rng(0)
    trials, sums = 400, {pair: np.zeros(2) for pair in RETRIEVAL_PAIRS}
    for _ in range(trials):
        random = {k: rng.normal(size=(len(d[k]), 16)) for k in ("audio", "image", "text")}
        result = six_way_retrieval(**(d | random))
        for pair in RETRIEVAL_PAIRS:
            sums[pair] += [result[pair]["R@1"], result[pair]["R@5"]]
    for pair in RETRIEVAL_PAIRS:
        n = result[pair]["n_queries"]
        for (k, expected), observed in zip(chance[pair].items(), sums[pair] / trials):
            p = expected / 100
            sigma = 100 * math.sqrt(p * (1 - p) / (trials * n))    # per-query hits are near independent
            assert abs(observed - expected) < 5 * sigma + 0.5, (pair, k, observed, expected)
    assert retrieval_chance(d["audio_image_ids"], len(d["image_ids"]))["image_to_text"] == {
        1: None, 5: None, 10: None}


# ----------------------------------------------------------------------------- keyword spotting

def test_average_precision_matches_sklearn_with_and_without_ties():
    rng = np.random.default_rng(0)
    for decimals in (None, 1):  # rounding to 1 decimal makes many ties
        scores = rng.normal(size=(300, 8))
        if decimals is not None:
            scores = np.round(scores, decimals)
        labels = rng.random((300, 8)) < np.linspace(0.02, 0.5, 8)
        ours = average_precision(scores, labels)
        ref = [average_precision_score(labels[:, j], scores[:, j]) for j in range(8)]
        np.testing.assert_allclose(ours, ref, rtol=1e-12)


def keyword_toy(seed=0, n=80, dim=6):
    rng = np.random.default_rng(seed)
    words = ["dog", "red", "ball", "grass", "zebra"]   # nobody says "zebra"
    vocab = ["a", "dog", "red", "ball", "grass", "runs"]
    transcripts = [" ".join(rng.choice(vocab, size=5)) for _ in range(n)]
    audio = rng.normal(size=(n, dim))
    audio[n // 2:] = audio[:n - n // 2]                  # duplicated rows give tied scores
    return audio, rng.normal(size=(len(words), dim)), transcripts, words


def test_keyword_spotting_matches_sklearn():
    audio, keyword_emb, transcripts, words = keyword_toy()
    result = keyword_spotting(audio, keyword_emb, transcripts, words)
    a = audio / np.linalg.norm(audio, axis=1, keepdims=True)
    k = keyword_emb / np.linalg.norm(keyword_emb, axis=1, keepdims=True)
    scores = (a @ k.T).astype(np.float32)  # the metric scores in float32, so ties survive the same way
    labels = np.array([[w in t.split() for w in words] for t in transcripts])
    ref = {w: 100 * average_precision_score(labels[:, j], scores[:, j]) for j, w in enumerate(words[:4])}
    for w, ap in ref.items():
        assert result["per_keyword"][w]["AP"] == pytest.approx(ap, rel=1e-6)
        assert result["per_keyword"][w]["n_relevant"] == labels[:, words.index(w)].sum()
    assert result["mAP"] == pytest.approx(np.mean(list(ref.values())), rel=1e-6)
    # micro AP is over the whole utterance x keyword matrix: "zebra", which nobody says, adds negatives
    micro = 100 * average_precision_score(labels, scores, average="micro")
    assert result["micro_AP"] == pytest.approx(micro, rel=1e-6)
    assert micro != pytest.approx(100 * average_precision_score(labels[:, :4].ravel(), scores[:, :4].ravel()))
    # "zebra" never occurs: reported with n_relevant 0, left out of every mean.
    assert result["per_keyword"]["zebra"]["n_relevant"] == 0 and result["n_keywords"] == 4
    assert math.isnan(result["per_keyword"]["zebra"]["AP"])
    for j, w in enumerate(words[:4]):   # EER against an interpolation on sklearn's ROC
        fpr, tpr, _ = roc_curve(labels[:, j], scores[:, j], drop_intermediate=False)
        gap = fpr - (1 - tpr)
        i = int(np.argmax(gap >= 0))
        eer = fpr[i - 1] + (fpr[i] - fpr[i - 1]) * -gap[i - 1] / (gap[i] - gap[i - 1])
        assert result["per_keyword"][w]["EER"] == pytest.approx(100 * eer, abs=1e-9)


def ranked_case(labels):
    """Utterances whose similarity with the keyword "dog" falls with their index; labels mark "dog"."""
    angles = np.linspace(0.1, 1.5, len(labels))
    audio = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    transcripts = ["a dog runs" if y else "a cat sits" for y in labels]
    return keyword_spotting(audio, np.array([[1.0, 0.0]]), transcripts, ["dog"])


def test_hand_made_rankings():
    perfect = ranked_case([1] * 4 + [0] * 16)
    assert (perfect["mAP"], perfect["P@N"], perfect["P@10"], perfect["EER"]) == (100, 100, 40, 0)
    reversed_ = ranked_case([0] * 16 + [1] * 4)
    assert (reversed_["P@N"], reversed_["P@10"], reversed_["EER"]) == (0, 0, 100)
    assert reversed_["mAP"] == pytest.approx(100 * np.mean([1 / 17, 2 / 18, 3 / 19, 4 / 20]))
    assert ranked_case([1, 0, 1, 0])["EER"] == pytest.approx(50)
    labels = [0] * 20
    for r in (1, 3, 12, 15):
        labels[r - 1] = 1
    mixed = ranked_case(labels)
    assert mixed["P@10"] == pytest.approx(20) and mixed["P@N"] == pytest.approx(50)
    assert mixed["mAP"] == pytest.approx(100 * np.mean([1 / 1, 2 / 3, 3 / 12, 4 / 15]))


def test_all_tied_scores_are_chance():
    transcripts = ["dog"] * 3 + ["cat"] * 9
    result = keyword_spotting(np.ones((12, 2)), np.array([[1.0, 0.0]]), transcripts, ["dog"])
    assert result["EER"] == pytest.approx(50) and result["mAP"] == pytest.approx(25)
    # not 30 and 100, which putting the tied "dog" utterances first (their order in the split) would give
    assert result["P@10"] == pytest.approx(25) and result["P@N"] == pytest.approx(25)


@pytest.mark.parametrize("seed", range(4))
def test_precision_at_k_over_ties_is_the_mean_over_every_order(seed):
    """Utterances in runs of tied scores: P@k as the mean, over every order the runs' rows may come in, of
    the precision of the top k of that order."""
    rng = np.random.default_rng(seed)
    n = 12
    levels = rng.integers(0, 4, size=n)                   # 4 or fewer distinct scores: long runs of ties
    labels = rng.random(n) < 0.4
    labels[0] = True
    angles = 0.1 + 0.2 * levels
    transcripts = ["a dog" if y else "a cat" for y in labels]
    result = keyword_spotting(np.stack([np.cos(angles), np.sin(angles)], axis=1), np.array([[1.0, 0.0]]),
                              transcripts, ["dog"])
    runs = [np.flatnonzero(levels == v) for v in sorted(set(levels.tolist()))]   # best score first
    for name, k in (("P@10", 10), ("P@N", int(labels.sum()))):
        precisions = [labels[list(itertools.chain(*orders))[:k]].mean()
                      for orders in itertools.product(*(itertools.permutations(r) for r in runs))]
        assert result[name] == pytest.approx(100 * np.mean(precisions)), name


def test_keyword_relevance_is_whole_word_case_insensitive():
    transcripts = ["A reddish dog.", "The RED ball!", "red-haired boy", "ice, cream", "Ice cream; red"]
    rel = keyword_relevance(transcripts, ["red", "dog", "ice cream", "ball"])
    np.testing.assert_array_equal(rel, [[0, 1, 0, 0],
                                        [1, 0, 0, 1],
                                        [1, 0, 0, 0],
                                        [0, 0, 1, 0],
                                        [1, 0, 1, 0]])
    assert keyword_chance(rel) == pytest.approx(100 * np.mean([3 / 5, 1 / 5, 2 / 5, 1 / 5]))
    with pytest.raises(ValueError, match="no letters"):
        keyword_relevance(["x"], ["--"])


def test_validation_runs_on_a_corpus_where_speakers_share_a_caption():
    """A JSONL corpus may give several utterances one caption_id (one caption read by several speakers):
    the figures that training logs at each validation must come out, equal to evaluate's for the same pairs."""
    from trainer.data import SplitData
    from trainer.evaluate import dev_metrics, embed_audio
    from trainer.model import CnnTransformer, get_preset
    torch.manual_seed(0)
    n, frames, dim = 6, 50, 128
    captions = ["a#0", "a#0", "a#1", "b#0", "b#0", "b#1"]
    data = SplitData("dev", [f"u{i}" for i in range(n)], captions, ["a dog"] * n, ["s"] * n,
                     torch.randn(n * frames, 39).half(), torch.arange(n + 1) * frames, torch.full((n,), frames),
                     torch.tensor([0, 0, 0, 1, 1, 1]), ["a", "b"], torch.randn(2, dim), torch.randn(n, dim))
    model = CnnTransformer(get_preset("demo"))
    logged = dev_metrics(model, data, None, 4, 2048)
    audio = embed_audio(model, data, 4, 2048)
    image_ids = ["a", "a", "a", "b", "b", "b"]
    full = six_way_retrieval(audio, image_ids, [f"u{i}" for i in range(n)], data.images, data.image_ids,
                             data.texts, [f"u{i}" for i in range(n)], image_ids)
    assert logged == {f"{pair}_{k}": full[pair][k] for pair in ("audio_to_image", "image_to_audio")
                      for k in ("R@1", "R@5", "R@10")}
